r"""Chat records and conversations: normalisation, the chat template, and rendering to token ids with labels.

A record is a JSON object in one of three forms:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
    {"prompt": "...", "response": "..."}                         (optional "system")
    {"instruction": "...", "input": "...", "output": "..."}      ("input" and "system" optional)

An instruction and a non-empty input are joined by a blank line into the user turn. Role order: an optional system
message first, then user and assistant alternating, starting with user and, for training, ending with assistant.
A record that breaks it, or whose text holds a chat marker, is a `ChatError` naming the file and line.

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

    hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)

gives the same ids and mask with the project's transformers files (`dataset/hf_tokenizer.py`), a plain call: they
keep `split_special_tokens` on, so a literal "<s>" in a message is text as here, and read the template's own "<s>"
(the one that starts the text, right before the first header) as BOS. Passing `split_special_tokens=False` gives
other ids: transformers then normalizes each stretch between two special tokens on its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dataset.lines import DataError
from dataset.packing import IGNORE_INDEX
from dataset.tokenizer import CHAT_TOKENS, Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")
HEADER, END_HEADER, EOT = CHAT_TOKENS
SEPARATOR = "\n\n"  # between a turn's header and its content

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


class ChatError(DataError):
    """A record or conversation that cannot be used; the message names where (file and line, or `messages`) and why."""


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
        raise ChatError(f"{where}: field {key!r} must be a string, found {found}")
    return value


def normalize_record(obj: Any, path: str | Path, line: int) -> list[dict[str, str]]:
    """The messages of one parsed record (any of the three forms), checked; ChatError names `path:line`."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise ChatError(f"{where}: a record is a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list):
            raise ChatError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        messages = []
        for i, m in enumerate(raw):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ChatError(f"{where}: message {i} needs string fields 'role' and 'content', found {m!r:.100}")
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        if "prompt" in obj or "response" in obj:
            user, reply = _text_field(obj, "prompt", where), _text_field(obj, "response", where)
        elif "instruction" in obj or "output" in obj:
            user, reply = _text_field(obj, "instruction", where), _text_field(obj, "output", where)
            if extra := _text_field(obj, "input", where, required=False):
                user = f"{user}{SEPARATOR}{extra}"
        else:
            raise ChatError(
                f"{where}: unknown record form (keys {sorted(obj)[:8]}); use 'messages', 'prompt'/'response' or "
                "'instruction'/'input'/'output'"
            )
        system = _text_field(obj, "system", where, required=False)
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if problem := conversation_problem(messages):
        raise ChatError(f"{where}: {problem}")
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
                raise ChatError(f"messages: {problem}")
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
