"""Rows to documents: token ids and the labels that train them, by format.

- `text`: a field of text; the tokenizer's special tokens around it and its end-of-document token after.
- `chat`: a list of messages ({"role", "content"}, or ShareGPT's {"from", "value"}) rendered with the
  tokenizer's chat template. Only what the assistant says is trained: every other token's label is -100
  (`train_on_prompt` trains them all).
- `instruction`: a prompt and a response field: rendered as a two-turn chat when the tokenizer has a
  template, else prompt then response then end-of-document; the prompt's labels are -100.
- `pretokenized`: `input_ids` (and optional `labels`, -100 where not trained) used as they are.

Every error names the file, the row and the field, and says what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from elixir.data.records import Table
from elixir.data.tokenizer import HFTokenizer, Tokenizer

FORMATS = ("auto", "text", "chat", "instruction", "pretokenized")
IGNORE = -100
"""The label of a token that is not trained (the ignore index of the models' cross-entropy)."""
INSTRUCTION_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "output"),
                     ("question", "answer"))
"""Prompt and response fields that `auto` recognizes, in this order."""
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


@dataclass(frozen=True)
class Fields:
    """Which fields of a row hold what (None: found by the format's usual names)."""

    format: str = "auto"
    text: str = "text"
    messages: str | None = None
    prompt: str | None = None
    response: str | None = None
    train_on_prompt: bool = False


@dataclass
class Documents:
    """Tokenized documents back to back: document d is `tokens[offsets[d]:offsets[d+1]]`, trained on
    `labels` of the same range (the model shifts them: labels[t] is predicted from tokens before t)."""

    tokens: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) int32, IGNORE where not trained
    offsets: np.ndarray  # (D + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


class _Builder:
    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, ids: list[int], labels: list[int]) -> None:
        if ids:
            self.tokens.append(np.asarray(ids, dtype=np.int32))
            self.labels.append(np.asarray(labels, dtype=np.int32))

    def done(self) -> Documents:
        lengths = np.array([len(t) for t in self.tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int32))
        return Documents(cat(self.tokens), cat(self.labels), offsets)


def resolve_format(table: Table, fields: Fields) -> Fields:
    """`fields` with the format and field names filled in from the table's columns (format 'auto'), and
    checked: ValueError naming the file, the missing field, the fields it has, and the flag to pass."""
    cols = set(table.columns)
    have = ", ".join(sorted(cols))
    fmt = fields.format
    if fmt == "auto":
        if (fields.messages or "messages") in cols or "conversations" in cols:
            fmt = "chat"
        elif "input_ids" in cols:
            fmt = "pretokenized"
        elif fields.prompt and fields.response or _pair(cols):
            fmt = "instruction"
        elif fields.text in cols:
            fmt = "text"
        else:
            raise ValueError(
                f"--data: cannot tell the format of {table.source!r} from its fields ({have}); pass --format "
                "(text, chat, instruction or pretokenized) and the field flag that names the column, e.g. "
                "--text-field NAME"
            )
    out = Fields(fmt, fields.text, fields.messages, fields.prompt, fields.response, fields.train_on_prompt)
    if fmt == "text":
        _require(table, out.text, "--text-field")
    elif fmt == "chat":
        name = fields.messages or ("messages" if "messages" in cols or "conversations" not in cols else "conversations")
        _require(table, name, "--messages-field")
        out = Fields(fmt, fields.text, name, fields.prompt, fields.response, fields.train_on_prompt)
    elif fmt == "instruction":
        prompt, response = fields.prompt, fields.response
        if prompt is None or response is None:
            pair = _pair(cols) or ("prompt", "response")
            prompt, response = prompt or pair[0], response or pair[1]
        _require(table, prompt, "--prompt-field")
        _require(table, response, "--response-field")
        out = Fields(fmt, fields.text, fields.messages, prompt, response, fields.train_on_prompt)
    else:
        _require(table, "input_ids", None)
    return out


def _pair(cols: set[str]) -> tuple[str, str] | None:
    return next(((p, r) for p, r in INSTRUCTION_PAIRS if p in cols and r in cols), None)


def _require(table: Table, field: str, flag: str | None) -> None:
    if field not in table.columns:
        fix = f"pass {flag} with one of them" if flag else "pretokenized rows hold input_ids (and optional labels)"
        raise ValueError(
            f"--data: {table.source!r} has no field {field!r} (its fields: {', '.join(sorted(table.columns))}); {fix}"
        )


def tokenize_table(table: Table, fields: Fields, tokenizer: Tokenizer, into: _Builder) -> None:
    """Append the documents of `table` to `into`, by its (resolved) format."""
    fmt = fields.format
    if fmt == "text":
        _text(table, fields, tokenizer, into)
    elif fmt == "chat":
        for row, messages in enumerate(table.columns[fields.messages]):
            ids, labels = render_chat(messages, tokenizer, where=f"{table.source!r}, row {row}",
                                      train_on_prompt=fields.train_on_prompt)
            into.add(ids, labels)
    elif fmt == "instruction":
        prompts, responses = table.columns[fields.prompt], table.columns[fields.response]
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            where = f"{table.source!r}, row {row}"
            for name, value in ((fields.prompt, prompt), (fields.response, response)):
                if not isinstance(value, str):
                    kind = type(value).__name__
                    raise ValueError(f"--data: {where}: field {name!r} is {kind}, not text; fix the row")
            ids, labels = _instruction(prompt, response, tokenizer, where, fields.train_on_prompt)
            into.add(ids, labels)
    else:
        labels_col = table.columns.get("labels")
        for row, ids in enumerate(table.columns["input_ids"]):
            labels = labels_col[row] if labels_col is not None and labels_col[row] is not None else ids
            if len(labels) != len(ids):
                raise ValueError(
                    f"--data: {table.source!r}, row {row}: labels has {len(labels)} values and input_ids "
                    f"{len(ids)}; give one label per token (-100 where not trained)"
                )
            into.add(list(ids), list(labels))


def _text(table: Table, fields: Fields, tokenizer: Tokenizer, into: _Builder) -> None:
    texts = table.columns[fields.text]
    for row, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            raise ValueError(
                f"--data: {table.source!r}, row {row}: field {fields.text!r} is {type(t).__name__}, not text; "
                "pass --text-field with a text column, or another --format"
            )
    kept = [t for t in texts if t]  # empty rows make no document
    eos = tokenizer.eos_token_id
    batches = (
        tokenizer.encode_many(kept[i : i + 1024]) if isinstance(tokenizer, HFTokenizer)
        else [tokenizer.encode(t) for t in kept[i : i + 1024]]
        for i in range(0, len(kept), 1024)
    )
    for batch in batches:
        for ids in batch:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]  # the model learns where a document ends
            into.add(ids, ids)


def _instruction(prompt: str, response: str, tokenizer: Tokenizer, where: str,
                 train_on_prompt: bool) -> tuple[list[int], list[int]]:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return render_chat(messages, tokenizer, where=where, train_on_prompt=train_on_prompt)
    p = tokenizer.encode(prompt, special=True)
    r = tokenizer.encode(response, special=False)
    if tokenizer.eos_token_id is not None:
        r = [*r, tokenizer.eos_token_id]
    return p + r, (p if train_on_prompt else [IGNORE] * len(p)) + r


def render_chat(messages, tokenizer: Tokenizer, *, where: str, train_on_prompt: bool = False
                ) -> tuple[list[int], list[int]]:
    """Token ids of a chat rendered with the tokenizer's template, and labels: the ids of what the
    assistant says (its turns as the template writes them, end-of-turn included), -100 elsewhere.

    An assistant turn is the text that rendering the turn adds to the conversation before it with
    the generation prompt (the "assistant" header) already written; a token is trained when it starts
    inside such a span (tokens map to characters through the fast tokenizer's offsets)."""
    if not isinstance(tokenizer, HFTokenizer) or not tokenizer.chat_template:
        raise ValueError(
            f"--data: {where} is a chat, but the tokenizer ({tokenizer.name}) has no chat template; use a tokenizer "
            "with one (--tokenizer PATH), or --format text"
        )
    messages = _messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(
            f"--data: {where} has no assistant turn, so nothing in it would be trained; remove the row, or add "
            "the assistant's answer"
        )
    full = tokenizer.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render(messages[:i], generation_prompt=True) if i else ""
        upto = tokenizer.render(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(
                f"--data: {where}: the chat template renders earlier turns differently once later ones are added, "
                "so the assistant's tokens cannot be told apart; use --train-on-prompt, or a template that "
                "only appends"
            )
        spans.append((len(before), len(upto)))
    ids, offsets = tokenizer.encode_with_offsets(full)
    if train_on_prompt:
        return ids, list(ids)
    starts = np.array([o[0] for o in offsets], dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        trained |= (starts >= lo) & (starts < hi)
    labels = np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE).tolist()
    return ids, labels


def _messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        kind = type(messages).__name__
        raise ValueError(f"--data: {where}: the messages are {kind}, not a list of turns; fix the row")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"--data: {where}, message {j}: {m!r} is not an object with role and content")
        if "role" in m and "content" in m:
            out.append({"role": m["role"], "content": m["content"]})
        elif "from" in m and "value" in m and m["from"] in SHAREGPT_ROLES:  # ShareGPT's layout
            out.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        else:
            raise ValueError(
                f"--data: {where}, message {j} has fields {sorted(m)}; a message has role and content (or from and "
                "value)"
            )
    return out
