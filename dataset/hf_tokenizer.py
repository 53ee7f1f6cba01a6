"""SentencePiece model -> Hugging Face tokenizer files that give the same ids, and the check that they do.

Why not `transformers.LlamaTokenizer`: in transformers 5 it rebuilds a fixed pipeline from the vocabulary, which
differs from SentencePiece on leading spaces (" x"), on a chat marker at the start of the text and under NFKC. The
HF files here hold a `tokenizers` pipeline built from the model (SentencePiece's normalizer, the dummy prefix on
the whole text, chat markers split out after it, the merges ranked by piece score) under `PreTrainedTokenizerFast`,
with `split_special_tokens` on so that a literal "<s>" is text, as in SentencePiece. `parity_mismatches` checks
that both give the same ids; `python -m dataset.train_tokenizer` runs it on probe strings and a corpus sample.

transformers' chat path: `apply_chat_template` renders the template to text and encodes it with the same settings,
so the template's own "<s>" would be spelled out too. The one place the template writes it, the start of the text
right before `<|start_header_id|>`, is therefore read as BOS (then the dummy-prefix "▁" that the text after it gets),
which makes a plain `apply_chat_template(messages, add_generation_prompt=True)` give `dataset/chat.py`'s ids while a
"<s>" inside a message, or anywhere else in a text, stays text. The price: a plain text that itself starts with
exactly "<s><|start_header_id|>" encodes with BOS there, where SentencePiece spells the "<s>" out (BPE models; a
unigram model cannot express it and spells the template's BOS out: pass the ids of `dataset/chat.py` instead).
Control pieces and chat markers are special tokens, so `decode(skip_special_tokens=True)` drops `<|eot_id|>` and the
headers; under `split_special_tokens` they are never matched as added tokens, so encoding is unchanged by that.

Known differences: HF reads a text that is exactly a control or byte piece name ("</s>", "<0x41>") and comes right
after a chat marker, at the end of the text or before another marker, as that piece; with `--model-type unigram`
HF may also read such names anywhere when their first character is not in the vocabulary, and near-ties in long
texts may segment differently (SentencePiece sums scores in float32); training then warns instead of failing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from dataset.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS


class ConversionError(ValueError):
    """A SentencePiece model with settings these files cannot express (this project's trainer never writes them)."""


def build_hf_backend(model_file: str | Path):
    """A `tokenizers.Tokenizer` that encodes and decodes like SentencePiece with `model_file` (see the module doc).

    For models with this trainer's whitespace settings (escaped spaces, no collapsing); others raise.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces = list(proto.pieces)
    normal, control, user, byte = 1, 3, 4, 6  # SentencePiece piece types; 2 is unknown
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        mergeable = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == normal}
        # SentencePiece merges the adjacent pair whose union has the highest score; rank unions the same way.
        ranked = sorted(
            (-score, i, cut, piece[:cut], piece[cut:])
            for piece, (score, i) in mergeable.items()
            for cut in range(1, len(piece))
            if piece[:cut] in mergeable and piece[cut:] in mergeable
        )
        # ignore_merges: a chunk that is a whole piece (a chat marker, split out below) is taken as it is.
        model = models.BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in ranked],
            unk_token=pieces[proto.trainer_spec.unk_id].piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
            ignore_merges=True,
        )
    elif proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        # SentencePiece never matches control and byte pieces in text; the Viterbi search here would (score 0),
        # so they get a score below any spelling of their names out of ordinary pieces.
        floor = 10 * min(p.score for p in pieces if p.type == normal) - 1000.0
        scores = [(p.piece, floor if p.type in (2, control, byte) else p.score) for p in pieces]
        model = models.Unigram(scores, unk_id=proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback)
    else:
        raise ConversionError(f"{model_file}: only BPE and unigram SentencePiece models convert to transformers")
    backend = Tokenizer(model)

    spec = proto.normalizer_spec
    if spec.remove_extra_whitespaces or not spec.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise ConversionError(f"{model_file}: whitespace settings this trainer never writes; cannot convert")
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        # On the whole text, always: Metaspace skips texts that start with "▁" and runs per added-token chunk.
        steps.append(normalizers.Prepend("▁"))
    markers = sorted((p.piece for p in pieces if p.type == user), key=len, reverse=True)
    bos = proto.trainer_spec.bos_piece
    split = [re.escape(m) for m in markers]
    # The chat template's BOS (see the module doc): "<s>" that starts the text right before the first header is the
    # BOS piece, followed by the dummy-prefix "▁" that the text after it gets; anywhere else "<s>" stays text.
    # BPE takes a chunk that is a whole piece as that piece; a unigram model would spell it (its score is a floor).
    chat_start = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE and CHAT_TOKENS[0] in markers
    if chat_start:
        header, lead = re.escape(CHAT_TOKENS[0]), "▁" if spec.add_dummy_prefix else ""
        steps.append(normalizers.Replace(Regex(rf"\A{lead}{re.escape(bos)}(?={header})"), f"{bos}{lead}"))
        split.insert(0, rf"\A{re.escape(bos)}(?={lead}{header})")
    backend.normalizer = normalizers.Sequence(steps)
    if split:
        backend.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(split)), behavior="isolated")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    # Control pieces and chat markers are special: decode(skip_special_tokens=True) drops them. Under
    # split_special_tokens (set by write_hf_files) none is matched as an added token: the markers are split out by
    # the pre-tokenizer above, after the normalizer has seen the whole text, and control names in text are text.
    specials = [AddedToken(p.piece, normalized=False, special=True) for p in pieces if p.type in (2, control, user)]
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, proto.trainer_spec.bos_id)]
    )
    return backend


def write_hf_files(model_file: str | Path, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `model_file` into `out_dir`."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    names = dict(zip(("unk_token", "bos_token", "eos_token", "pad_token"), SPECIAL_TOKENS, strict=True))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_hf_backend(model_file),
        split_special_tokens=True,  # a literal "<s>" in text is text, as in SentencePiece
        clean_up_tokenization_spaces=False,
        **names,
    )
    hf.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 reads BOS/EOS from tokenizer.json's post-processor; 4.x and other readers read these keys.
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")


def parity_mismatches(out_dir: str | Path, texts: Iterable[str]) -> list[tuple[str, list[str], list[str]]]:
    """(text, SentencePiece pieces, transformers pieces) for each text where `out_dir`'s two tokenizers differ.

    Texts that start as the chat template does ("<s><|start_header_id|>") are not compared: there transformers
    reads the BOS the template means, by design.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(Path(out_dir) / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(out_dir))
    template_start = sp.id_to_piece(sp.bos_id()) + CHAT_TOKENS[0]  # read as BOS on purpose (the module doc)
    texts = [t for t in texts if not t.startswith(template_start)]
    if not texts:
        return []
    pairs = zip(texts, sp.encode(texts), hf(texts, add_special_tokens=False)["input_ids"], strict=True)
    return [(text, sp.id_to_piece(a), hf.convert_ids_to_tokens(b)) for text, a, b in pairs if a != b]
