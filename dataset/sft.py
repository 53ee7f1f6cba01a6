r"""Supervised fine-tuning data: chat records -> token ids with a loss mask -> packed, resumable batches.

Input: `.jsonl` or `.jsonl.zst` files (globs allowed), one record per line, in one of three forms:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
    {"prompt": "...", "response": "..."}                         (optional "system")
    {"instruction": "...", "input": "...", "output": "..."}      ("input" and "system" optional)

An instruction and a non-empty input are joined by a blank line into the user turn. Role order: an optional system
message first, then user and assistant alternating, starting with user and, for training, ending with assistant.
A record that breaks it, or whose text holds a chat marker, is an `SFTDataError` naming the file and line.

Chat template (Llama 3's layout with the reserved tokens of `dataset/tokenizer.py`), as text:

    <s><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>...
    [<|start_header_id|>assistant<|end_header_id|>\n\n]                    (add_generation_prompt)

Tokenization rule: the ids are those of the text after `<s>` tokenized as one string, `[bos] + encode(text)`. They
are built segment by segment, so that the loss mask falls on exact token boundaries: the chat markers are pieces at
which SentencePiece and the transformers files of `dataset/train_tokenizer.py` both split, so each stretch between
two markers is tokenized on its own. Only the start of the text gets SentencePiece's dummy-prefix "▁" (a lone "▁"
before the first header); a stretch after a marker gets none and is computed as encode(marker + stretch) less the
ids of the marker. The "\n\n" after a header and the content are one stretch, encoded together.

Labels are the ids of each assistant turn's content and its `<|eot_id|>`, -100 everywhere else (BOS, headers,
system and user turns). The content's tokens are those after the longest common prefix of the stretch's ids and the
ids of "\n\n" alone: with the project's tokenizer, trained line by line so that "\n" is a byte piece, that is
exactly the content; a token that joined the separator to the content would be labelled (the model must produce it),
as transformers' assistant mask does (`CHAT_TEMPLATE` marks the assistant turns with `{% generation %}`):

    hf.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, return_dict=True, return_assistant_tokens_mask=True,
                           tokenizer_kwargs={"split_special_tokens": False})

gives the same ids and mask. `split_special_tokens=False` is needed with the project's transformers files, which
read a literal "<s>" as text (as SentencePiece does) and so would spell out the template's BOS; it also makes
transformers read a literal "<s>" inside a message as BOS, where SentencePiece and this module read text.

Batches: the whole data set is read and tokenized at construction, on every rank (SFT sets are small: 5 bytes a
token, so 100k conversations of 500 tokens take 250 MB, and they load at about a million tokens a second). Conversations
longer than `seq_len + 1` are dropped or cut at the right. Every epoch is a fresh permutation seeded by (seed, epoch),
of which each data-parallel rank takes every dp_size-th conversation. Rows of `seq_len + 1` tokens are filled in
that order: with `pack=True` whole conversations are added while they fit (next fit: a conversation is never split;
the first that does not fit starts the next row), with `pack=False` one conversation per row; the rest is padding.
Each batch holds

    input_ids     (B, seq_len)  row[:-1]
    targets       (B, seq_len)  labels[1:]: the label of the next token, -100 where masked or padding
    document_ids  (B, seq_len)  0, 1, ... per conversation in the row; the padding gets its own id

    loader = build_sft_loader(SFTDataset("sft/*.jsonl.zst", tokenizer, 2048, dp_rank=r, dp_size=n), 4)
    batch = next(iter(loader)); state = loader.state_dict()   # (epoch, position): a resumed run goes on exactly
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import warnings
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dataset.jsonl_zst import DataError, DataWarning, iter_lines
from dataset.tokenizer import CHAT_TOKENS, Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
HEADER, END_HEADER, EOT = CHAT_TOKENS
SEPARATOR = "\n\n"  # between a turn's header and its content
TRUNCATION = ("drop", "truncate")
ON_ERROR = ("raise", "skip")
SUFFIXES = (".jsonl", ".jsonl.zst")
WARN_LIMIT = 10  # skipped records warned about; later ones are only counted
RENDER_CHUNK = 1024  # conversations tokenized per tokenizer call while loading

# The same text as `ChatRenderer` builds; `{% generation %}` marks what carries labels (ignored unless asked for).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }}<|eot_id|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class SFTDataError(DataError):
    """A record that cannot be used for fine-tuning; the message names the file and line and what to fix."""


def install_chat_template(tokenizer_dir: str | Path) -> Path:
    """Write `CHAT_TEMPLATE` into `tokenizer_dir/tokenizer_config.json` ("chat_template"); return that file.

    A `chat_template.jinja` beside it takes precedence in transformers, so it is rewritten too when present.
    """
    directory = Path(tokenizer_dir)
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        raise TokenizerError(
            f"{config_path}: not found; write the transformers files first (`python -m dataset.train_tokenizer`)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{config_path}:{e.lineno}: invalid JSON ({e.msg}); rewrite the tokenizer files") from e
    config["chat_template"] = CHAT_TEMPLATE
    _write_atomic(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if (directory / "chat_template.jinja").is_file():
        _write_atomic(directory / "chat_template.jinja", CHAT_TEMPLATE)
    return config_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def conversation_problem(messages: Sequence[dict[str, str]], *, for_generation: bool = False) -> str | None:
    """What is wrong with a conversation's roles or texts, or None; the rules are in the module docstring."""
    if not messages:
        return "no messages"
    first = 1 if messages[0]["role"] == "system" else 0
    if len(messages) == first:
        return "only a system message; a conversation needs a user turn and an assistant reply"
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            return f"message {i} has role {role!r}; use 'system', 'user' or 'assistant'"
        if i >= first:
            expected = "user" if (i - first) % 2 == 0 else "assistant"
            if role != expected:
                after = f"after {messages[i - 1]['role']!r}" if i else "first"
                return (
                    f"message {i} has role {role!r} {after}; roles go: optional system first, then user and assistant "
                    "alternating, starting with user"
                )
        for marker in CHAT_TOKENS:
            if marker in message["content"]:
                return f"message {i} contains the chat marker {marker}; remove it (it would open or end a turn)"
    last = messages[-1]["role"]
    if for_generation and last != "user":
        return "the conversation ends with an assistant message; a generation prompt follows a user message"
    if not for_generation and last != "assistant":
        return f"the conversation ends with a {last} message; training needs it to end with an assistant reply"
    return None


def _text_field(obj: dict, key: str, where: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        found = "missing" if key not in obj else f"a {type(value).__name__}"
        raise SFTDataError(f"{where}: field {key!r} must be a string, found {found}")
    return value


def normalize_record(obj: Any, path: str | Path, line: int) -> list[dict[str, str]]:
    """The messages of one parsed record (any of the three forms), checked; SFTDataError names `path:line`."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise SFTDataError(f"{where}: a record is a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list):
            raise SFTDataError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        messages = []
        for i, m in enumerate(raw):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise SFTDataError(f"{where}: message {i} needs string fields 'role' and 'content', found {m!r:.100}")
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        if "prompt" in obj or "response" in obj:
            user, reply = _text_field(obj, "prompt", where), _text_field(obj, "response", where)
        elif "instruction" in obj or "output" in obj:
            user, reply = _text_field(obj, "instruction", where), _text_field(obj, "output", where)
            if extra := _text_field(obj, "input", where, required=False):
                user = f"{user}{SEPARATOR}{extra}"
        else:
            raise SFTDataError(
                f"{where}: unknown record form (keys {sorted(obj)[:8]}); use 'messages', 'prompt'/'response' or "
                "'instruction'/'input'/'output'"
            )
        system = _text_field(obj, "system", where, required=False)
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if problem := conversation_problem(messages):
        raise SFTDataError(f"{where}: {problem}")
    return messages


class ChatRenderer:
    """Renders conversations to (ids, labels) with one tokenizer; marker ids and role pieces are computed once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        ids = [tokenizer.token_id(marker) for marker in CHAT_TOKENS]
        if missing := [m for m, i in zip(CHAT_TOKENS, ids, strict=True) if i < 0]:
            raise TokenizerError(
                f"{tokenizer.directory}: the vocabulary lacks {missing}; fine-tuning needs the chat markers: train "
                "the tokenizer with `python -m dataset.train_tokenizer`, which reserves them"
            )
        self.header, self.end_header, self.eot = ids
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
        opening = tokenizer.encode(HEADER)
        if opening[-1:] != [self.header]:
            raise TokenizerError(f"{tokenizer.directory}: {HEADER} does not encode to its own id; retrain it")
        self.lead = opening[:-1]  # what the start of a text gets before a marker (SentencePiece's dummy "▁")
        self._after_marker = [*self.lead, self.eot]
        self.roles = dict(zip(ROLES, self.continuation(list(ROLES)), strict=True))
        self.separator = self.continuation([SEPARATOR])[0]
        self.generation_prompt = [self.header, *self.roles["assistant"], self.end_header, *self.separator]

    def continuation(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text where it follows a chat marker: encode(marker + text) less the marker's ids."""
        n = len(self._after_marker)
        out = []
        for text, ids in zip(texts, self.tokenizer.encode_batch([EOT + t for t in texts]), strict=True):
            if ids[:n] != self._after_marker:
                raise TokenizerError(
                    f"{self.tokenizer.directory}: the tokenizer does not split at {EOT} before {text[:40]!r}; use a "
                    "tokenizer from `python -m dataset.train_tokenizer`"
                )
            out.append(ids[n:])
        return out

    def render(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of the templated conversation and, aligned with them, their labels (-100 where not trained)."""
        return self.render_many([messages], add_generation_prompt=add_generation_prompt)[0]

    def render_many(
        self, conversations: Sequence[Sequence[dict[str, str]]], *, add_generation_prompt: bool = False
    ) -> list[tuple[list[int], list[int]]]:
        """`render` of each conversation, with one tokenizer call for all (SentencePiece pays ~0.1 ms per call)."""
        for messages in conversations:
            if problem := conversation_problem(messages, for_generation=add_generation_prompt):
                raise SFTDataError(f"messages: {problem}")
        bodies = iter(self.continuation([SEPARATOR + m["content"] for messages in conversations for m in messages]))
        out = []
        for messages in conversations:
            ids = [*self.bos, *self.lead]
            labels = [IGNORE_INDEX] * len(ids)
            for message in messages:
                body = next(bodies)
                head = [self.header, *self.roles[message["role"]], self.end_header]
                ids += [*head, *body, self.eot]
                if message["role"] == "assistant":
                    k = 0  # tokens that spell the separator alone carry no label
                    while k < min(len(body), len(self.separator)) and body[k] == self.separator[k]:
                        k += 1
                    labels += [IGNORE_INDEX] * (len(head) + k) + body[k:] + [self.eot]
                else:
                    labels += [IGNORE_INDEX] * (len(head) + len(body) + 1)
            if add_generation_prompt:
                ids += self.generation_prompt
                labels += [IGNORE_INDEX] * len(self.generation_prompt)
            out.append((ids, labels))
        return out


def render(
    messages: Sequence[dict[str, str]], tokenizer: Tokenizer, *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation under `CHAT_TEMPLATE`; labels are -100 outside the assistant turns."""
    return ChatRenderer(tokenizer).render(messages, add_generation_prompt=add_generation_prompt)


def resolve_files(paths_or_glob: str | Path | Sequence[str | Path]) -> list[Path]:
    """The `.jsonl` / `.jsonl.zst` files named by paths or globs (expanded here, `**` allowed), each once."""
    items = [paths_or_glob] if isinstance(paths_or_glob, str | Path) else list(paths_or_glob)
    if not items:
        raise SFTDataError("no SFT data given: pass .jsonl or .jsonl.zst files or globs")
    files: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(str(item), recursive=True)) if glob.has_magic(str(item)) else [str(item)]
        if not matches:
            raise SFTDataError(f"{item}: the glob matches no file")
        for match in map(Path, matches):
            if not match.is_file():
                raise SFTDataError(f"{match}: no such file")
            if not match.name.endswith(SUFFIXES):
                raise SFTDataError(f"{match}: unsupported file type; SFT data is {' or '.join(SUFFIXES)}")
            if match not in files:
                files.append(match)
    return files


class SFTDataset:
    """Every conversation of the files, rendered and length-checked, and the rows of one data-parallel rank.

    Args:
        paths_or_glob: `.jsonl` / `.jsonl.zst` files or globs.
        tokenizer: a `Tokenizer` with the chat markers.
        seq_len: tokens per row of input_ids; a row holds `seq_len + 1` tokens before the shift.
        dp_rank: this rank's index in the data-parallel group.
        dp_size: the data-parallel group's size; ranks get disjoint conversations.
        seed: seeds each epoch's permutation together with the epoch number.
        pack: several conversations per row with document ids (True), or one per row (False).
        truncation: a conversation longer than `seq_len + 1` is dropped ("drop") or cut at the right ("truncate",
            labels cut with it; one left with no label to predict is dropped).
        on_error: a bad record raises ("raise") or is counted, warned about and left out ("skip"). Missing or
            corrupt files always raise.
    """

    def __init__(
        self,
        paths_or_glob: str | Path | Sequence[str | Path],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        pack: bool = True,
        truncation: str = "drop",
        on_error: str = "raise",
    ) -> None:
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation={truncation!r}: use one of {', '.join(TRUNCATION)}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: use one of {', '.join(ON_ERROR)}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len}: must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        self.files = resolve_files(paths_or_glob)
        self.seq_len, self.window = seq_len, seq_len + 1
        self.dp_rank, self.dp_size, self.seed, self.pack = dp_rank, dp_size, seed, pack
        self.truncation, self.on_error = truncation, on_error
        self.renderer = ChatRenderer(tokenizer)
        pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i >= 0), 0)
        self.pad_id = pad  # padding is never a target, any id would do
        self.counts = {"conversations": 0, "dropped": 0, "truncated": 0, "skipped": 0}
        self._warned = 0
        self._load()
        if len(self) < dp_size:
            raise SFTDataError(
                f"{self.files[0]}{' ...' if len(self.files) > 1 else ''}: {len(self)} usable conversations for "
                f"{dp_size} data-parallel ranks ({self.counts}); add data, raise seq_len or set truncation='truncate'"
            )
        self._order: tuple[int, list[int]] | None = None

    def _load(self) -> None:
        ids, mask, offsets = array("i"), bytearray(), [0]
        for path in self.files:
            records = self._records(path)
            while chunk := list(itertools.islice(records, RENDER_CHUNK)):
                for seq, labels in self.renderer.render_many(chunk):
                    if len(seq) > self.window:
                        seq, labels = seq[: self.window], labels[: self.window]
                        if self.truncation == "drop" or all(x == IGNORE_INDEX for x in labels[1:]):
                            self.counts["dropped"] += 1
                            continue
                        self.counts["truncated"] += 1
                    ids.extend(seq)
                    mask.extend(x != IGNORE_INDEX for x in labels)
                    offsets.append(len(ids))
        self.counts["conversations"] = len(offsets) - 1
        self._buffers = (ids, mask)  # the tensors below share their memory
        self.tokens = torch.frombuffer(ids, dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)
        self.labelled = torch.frombuffer(mask, dtype=torch.bool) if mask else torch.zeros(0, dtype=torch.bool)
        self.offsets = offsets
        logger.info("SFT data %s: %s, %d tokens", [str(f) for f in self.files], self.counts, len(ids))

    def _records(self, path: Path) -> Iterator[list[dict[str, str]]]:
        for line, _, _, raw in iter_lines(path):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    raise SFTDataError(f"{path}:{line}: invalid JSON ({e})") from None
                messages = normalize_record(obj, path, line)
            except SFTDataError as e:
                if self.on_error == "raise":
                    raise SFTDataError(f"{e}; fix the record, or set on_error='skip' to count and skip it") from None
                self.counts["skipped"] += 1
                if self._warned < WARN_LIMIT:
                    self._warned += 1
                    more = " (further skips are counted, not shown)" if self._warned == WARN_LIMIT else ""
                    warnings.warn(f"skipped: {e}{more}", DataWarning, stacklevel=2)
                continue
            yield messages

    def __len__(self) -> int:
        """Number of conversations kept (all ranks together)."""
        return len(self.offsets) - 1

    def conversation(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (int32, as stored) and labels (int64, -100 where not trained) of kept conversation `index`."""
        a, b = self.offsets[index], self.offsets[index + 1]
        return self.tokens[a:b], torch.where(self.labelled[a:b], self.tokens[a:b].long(), IGNORE_INDEX)

    def order(self, epoch: int) -> list[int]:
        """This rank's conversations in `epoch`, in row order: every dp_size-th of a (seed, epoch) permutation."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
            self._order = (epoch, torch.randperm(len(self), generator=g)[self.dp_rank :: self.dp_size].tolist())
        return self._order[1]

    def next_row(self, epoch: int, position: int) -> tuple[dict[str, torch.Tensor], int, int]:
        """The row that starts at conversation `position` of `epoch`'s order, and the (epoch, position) after it.

        The row dict holds `tokens`, `labels` and `document_ids`, each of `seq_len + 1` (int64).
        """
        tokens = torch.full((self.window,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.window,), IGNORE_INDEX, dtype=torch.long)
        documents = torch.empty(self.window, dtype=torch.long)
        used = doc = 0
        while True:
            index = self.order(epoch)[position]
            a, b = self.offsets[index], self.offsets[index + 1]
            if used + b - a > self.window:  # never on an empty row: every kept conversation fits
                break
            tokens[used : used + b - a], labels[used : used + b - a] = self.conversation(index)
            documents[used : used + b - a] = doc
            used, doc, position = used + b - a, doc + 1, position + 1
            if position == len(self.order(epoch)):
                epoch, position = epoch + 1, 0
            if not self.pack:
                break
        documents[used:] = doc
        return {"tokens": tokens, "labels": labels, "document_ids": documents}, epoch, position

    def stats(self) -> dict[str, int]:
        """Conversations kept, dropped as too long, truncated, and skipped as bad records."""
        return dict(self.counts)


class SFTLoader:
    """This rank's infinite stream of batches; its state is the (epoch, position) of the next conversation."""

    def __init__(self, dataset: SFTDataset, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.dataset, self.batch_size = dataset, batch_size
        self.epoch = self.position = 0

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            row, self.epoch, self.position = self.dataset.next_row(self.epoch, self.position)
            rows.append(row)
        tokens = torch.stack([r["tokens"] for r in rows])  # (B, seq_len + 1)
        labels = torch.stack([r["labels"] for r in rows])  # (B, seq_len + 1)
        documents = torch.stack([r["document_ids"] for r in rows])  # (B, seq_len + 1)
        return {
            "input_ids": tokens[:, :-1].contiguous(),
            "targets": labels[:, 1:].contiguous(),
            "document_ids": documents[:, :-1].contiguous(),
        }

    def _identity(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "conversations": len(ds),
            "tokens": len(ds.tokens),
            "seq_len": ds.seq_len,
            "pack": ds.pack,
            "seed": ds.seed,
            "dp_rank": ds.dp_rank,
            "dp_size": ds.dp_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch, with what it depends on (checked when loaded)."""
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()` taken with the same data and settings."""
        mine = self._identity()
        if changed := [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]:
            raise SFTDataError(
                f"the saved SFT data position does not fit this data set ({'; '.join(changed)}); resume with the same "
                "data and settings, or start without the saved data state"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def stats(self) -> dict[str, int]:
        """The dataset's counts: conversations, dropped, truncated, skipped."""
        return self.dataset.stats()


def build_sft_loader(dataset: SFTDataset, batch_size: int) -> SFTLoader:
    """An infinite, resumable iterator of `batch_size` rows of `dataset` (see the module docstring)."""
    return SFTLoader(dataset, batch_size)
