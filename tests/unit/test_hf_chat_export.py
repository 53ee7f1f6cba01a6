"""The Hugging Face export in transformers' own chat path, through transformers alone: a plain
`apply_chat_template(messages, add_generation_prompt=True)` gives the project's ids (the template's "<s>" is BOS, a
literal "<s>" in a message stays text), `generate` stops at `<|eot_id|>`, and `decode(skip_special_tokens=True)`
drops the markers.

The model is a bigram table built by hand (attention and MLP outputs zeroed, so each position's logits depend on its
own token only): after the generation prompt it answers A B <|eot_id|>, and after <|eot_id|> it would go on with A,
so a `generate` that does not stop at the end of the turn runs on to max_new_tokens.
"""

import json
import random
import shutil

import pytest
import torch

from dataset.chat import install_chat_template, render
from dataset.hf_tokenizer import write_hf_files
from dataset.tokenizer import Tokenizer
from tests.chat_utils import WORDS, msg, sentence, train_sp

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [msg("user", "hello world")],
    [msg("system", "You are a helpful assistant."), msg("user", "What is 2 + 2?")],
    [msg("user", "say <s> and </s> and <pad>"), msg("assistant", "<s> is text"), msg("user", "<s>")],
    [msg("user", "a"), msg("assistant", "b"), msg("user", "\n\nc  ")],
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(tokenizer directory, HF export of the bigram model, A, B, their text): written by modeling.convert."""
    from modeling.convert import hf_to_native, native_to_hf

    root = tmp_path_factory.mktemp("hf_chat")
    rng = random.Random(0)
    tok_dir = train_sp(root / "tok", [sentence(rng) for _ in range(3000)])
    write_hf_files(tok_dir / "tokenizer.model", tok_dir)
    install_chat_template(tok_dir)
    tok = Tokenizer(tok_dir)
    prompt_end = render(CONVERSATIONS[0], tok, add_generation_prompt=True)[0][-1]  # every prompt ends the same way
    words = [w for w in WORDS if tok.sp.piece_to_id(f"▁{w}") != tok.unk_id]  # a whole word in one piece
    a, b = (tok.sp.piece_to_id(f"▁{w}") for w in words[:2])
    eot = tok.token_id("<|eot_id|>")
    assert len({prompt_end, a, b, eot}) == 4

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # the last hidden state is the RMS-normalised embedding of the current token: point the next token's row at it
        unit = model.model.embed_tokens.weight / model.model.embed_tokens.weight.norm(dim=-1, keepdim=True)
        model.lm_head.weight.zero_()
        for current, following in ((prompt_end, a), (a, b), (b, eot), (eot, a)):
            model.lm_head.weight[following] += 10 * unit[current]
    model.save_pretrained(root / "hf_in")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tok_dir / name, root / "hf_in" / name)
    hf_to_native(root / "hf_in", root / "native")
    native_to_hf(root / "native", root / "hf")
    return tok_dir, root / "hf", a, b, " ".join(words[:2])


def test_plain_apply_chat_template_gives_the_project_ids(exported, tmp_path):
    tok_dir, hf_dir, *_ = exported
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    hf.save_pretrained(str(tmp_path))  # as transformers itself writes the files back
    resaved = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = Tokenizer(tok_dir)
    for messages in CONVERSATIONS:
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert ids == render(messages, tok, add_generation_prompt=True)[0], messages
        assert ids[0] == 1 and ids.count(1) == 1  # BOS once: the literal "<s>" in the messages is text
        assert resaved.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == ids
    # literal control names in plain text stay text, as in SentencePiece
    for text in ["<s>", "<s>hello", "a <s><|start_header_id|>", "<s> <|start_header_id|>", "<s>\n<|eot_id|>"]:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.sp.encode(text), text
    # the trade-off (dataset/hf_tokenizer.py): a text that starts exactly as the template does, "<s>" then the first
    # header, is read as the template's BOS; SentencePiece spells that "<s>" out
    start = "<s><|start_header_id|>user"
    assert hf(start, add_special_tokens=False)["input_ids"] == [1, *tok.sp.encode(start[3:])]
    assert tok.sp.encode(start)[:4] != [1, *tok.sp.encode(start[3:])][:4]


def test_generate_stops_at_the_end_of_turn_and_decode_drops_the_markers(exported):
    _, hf_dir, a, b, words = exported
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    eot = hf.convert_tokens_to_ids("<|eot_id|>")
    inputs = hf.apply_chat_template(
        [msg("user", "hello world")], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert reply == [a, b, eot]  # stopped at the end of the turn, not at max_new_tokens
    text = hf.decode(reply, skip_special_tokens=True)
    assert text == words
    assert "<|eot_id|>" not in text
    everything = hf.decode(out[0].tolist(), skip_special_tokens=True)
    assert not any(m in everything for m in ("<s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert "user" in everything and "hello world" in everything
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == [2, eot]
