"""Synthetic data with data.document_attention: the loader cuts each sequence into documents, and the trainer's loss
is then the loss of each document run on its own (attention and positions restart at every document)."""

import tempfile

import torch

from configs.schema import load_config
from tests.integration.train_utils import SYNTHETIC
from training.data import SyntheticLoader


def _loader(documents: bool, micro_batch: int = 4) -> SyntheticLoader:
    return SyntheticLoader(
        vocab_size=50, seq_len=24, micro_batch=micro_batch, grad_accum=1, dp_rank=0, dp_size=1, seed=3,
        documents=documents,
    )  # fmt: skip


def test_synthetic_documents_keep_the_tokens_and_cut_each_sequence_into_one_to_four():
    plain, docs = _loader(False), _loader(True)
    counts = []
    for _ in range(10):
        a, b = next(plain), next(docs)
        assert "document_ids" not in a
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])
        d = b["document_ids"]  # (B, T)
        assert d.shape == a["input_ids"].shape and (d[:, 0] == 0).all()
        assert set(d.diff(dim=1).unique().tolist()) <= {0, 1}  # documents follow one another
        counts += (d[:, -1] + 1).tolist()
    assert set(counts) == {1, 2, 3, 4}
    # sequence n is the same whatever the micro-batch: the documents are part of the global numbering
    assert torch.equal(next(_loader(True, 2))["document_ids"], next(_loader(True, 4))["document_ids"][:2])


def test_trainer_loss_with_synthetic_documents_is_the_loss_of_each_document_alone():
    from training.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        overrides = [*SYNTHETIC, f"checkpoint.dir={out}", "data.document_attention=true", "data.seq_len=48"]
        trainer = Trainer(load_config(None, overrides), resume=False)
        batch = next(iter(trainer.loader))
        assert "document_ids" in batch
        _, ce, _ = trainer.micro_batch_loss(batch)
        model, ids, targets, docs = trainer.model, batch["input_ids"], batch["targets"], batch["document_ids"]
        assert (docs[:, -1] > 0).any(), "no sequence with two documents: the check would see nothing"
        nll, n = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for row in range(ids.shape[0]):
                for d in docs[row].unique():
                    span = (docs[row] == d).nonzero().squeeze(1)  # (len,): one document's positions
                    part = slice(int(span[0]), int(span[-1]) + 1)
                    loss = model(ids[row : row + 1, part], targets=targets[row : row + 1, part]).loss
                    nll += loss.double() * span.numel()
                    n += span.numel()
        assert abs(ce.item() - (nll / n).item()) < 1e-5
