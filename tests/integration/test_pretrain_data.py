"""pretrain_llama.py on text: jsonl.zst shards, a trained SentencePiece tokenizer, the streaming loader with 2
workers, eval and samples. A run stopped twice (train.exit_interval) and rerun equals the straight run, eval included:
the loader's saved position resumes with exactly the next token."""

import json

import pytest

from tests.integration.train_utils import eval_metrics, pretrain, text_corpus, text_overrides


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("corpus"))


def _args(corpus):
    return [
        *text_overrides(corpus),
        "data.seq_len=32",
        "data.num_workers=2",
        "train.micro_batch_size=2",
        "train.max_steps=12",
        "train.eval_every=6",
        "train.eval_batches=2",
        "train.sample_every=6",
        "train.sample_tokens=8",
        "checkpoint.every=6",
    ]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_text_run_with_eval_and_samples_resumes_exactly(corpus, tmp_path):
    straight = tmp_path / "straight"
    proc = pretrain(straight, _args(corpus))
    assert "eval loss" in proc.stdout and "sample 0 @ step 12" in proc.stdout
    rows, evals = _rows(straight), eval_metrics(straight)
    assert [r["step"] for r in evals] == [6, 12]
    assert all(r["eval_bpb"] > 0 and r["eval_ppl"] > 1 for r in evals)
    assert (straight / "step-00000012" / "tokenizer.model").exists()  # the checkpoint carries its tokenizer

    resumed = tmp_path / "resumed"
    for _ in range(3):
        pretrain(resumed, [*_args(corpus), "train.exit_interval=5"])
    strip = lambda rs: [{k: v for k, v in r.items() if k in ("step", "loss", "eval_loss")} for r in rs]  # noqa: E731
    assert strip(_rows(resumed)) == strip(rows)  # bitwise, through two restarts mid-epoch with 2 workers
