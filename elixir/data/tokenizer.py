"""Tokenizers behind one small interface: bytes as tokens, or a Hugging Face tokenizer.

The byte tokenizer is the vocabulary of the reference GPT presets and of the default job (ids 0-255,
no special tokens, no chat template). A Hugging Face model folder trains with its own tokenizer
(`transformers.AutoTokenizer`), or with the one `--tokenizer PATH` names. Both give token ids for a
text, a fingerprint for the tokenization cache, and the ids the batches need (end of document,
padding); the Hugging Face one also renders chats with its template and maps tokens to characters.
"""

from __future__ import annotations

import hashlib
import json
import os

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
)
"""Files of a Hugging Face tokenizer that an exported model folder carries (those present)."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255. Documents are concatenated without a separator: there is no
    end-of-document token in a 256-token vocabulary."""

    name = "bytes"
    eos_token_id: int | None = None
    pad_token_id = 0
    chat_template: str | None = None

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def fingerprint(self) -> str:
        return "bytes-v1"


class HFTokenizer:
    """A `transformers` tokenizer (fast, so that tokens map back to characters for chat masking)."""

    def __init__(self, tokenizer, name: str) -> None:
        self.tok = tokenizer
        self.name = name
        self.eos_token_id: int | None = tokenizer.eos_token_id
        # Padded positions are masked out of attention and loss, so any id serves; the tokenizer's own
        # pad id when it has one, else its end-of-document id (the usual choice for causal LMs).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id: int = 0 if pad is None else int(pad)
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None)

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text`; `special` adds what the tokenizer puts around a text (e.g. a BOS)."""
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def encode_many(self, texts: list[str], *, special: bool = True) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=special)["input_ids"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a rendered text (no special tokens added: a chat template writes its own) and
        each token's (start, end) character span."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def render(self, messages: list[dict], *, generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def fingerprint(self) -> str:
        """Changes whenever the ids of some text or chat could: vocabulary, merges, normalizer,
        special tokens, chat template."""
        h = hashlib.sha256()
        backend = getattr(self.tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else repr(sorted(self.tok.get_vocab().items()))
        h.update(vocab.encode())
        h.update(json.dumps([self.chat_template, self.tok.all_special_tokens, self.eos_token_id,
                             type(self.tok).__name__], default=str).encode())
        return h.hexdigest()[:16]

    def files(self) -> dict[str, str | bytes]:
        """The tokenizer as the files `save_pretrained` writes, by name (for an exported model folder)."""
        import tempfile

        out: dict[str, str | bytes] = {}
        with tempfile.TemporaryDirectory() as tmp:
            self.tok.save_pretrained(tmp)
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    data = f.read()
                try:
                    out[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    out[name] = data
        return out


Tokenizer = ByteTokenizer | HFTokenizer


def has_tokenizer(folder: str) -> bool:
    """Whether a model folder carries tokenizer files."""
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(path: str) -> HFTokenizer:
    """The Hugging Face tokenizer saved in folder `path`; ValueError naming the folder and the fix when
    there is none, or when it is not a fast tokenizer (chat masking needs token offsets)."""
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer {path!r} is not a folder; pass a folder with tokenizer.json (or tokenizer.model)")
    if not has_tokenizer(path):
        raise ValueError(
            f"no tokenizer in {path!r} (no tokenizer.json, tokenizer.model or vocab.json); pass --tokenizer PATH "
            "to a folder that has one, or --byte-tokens to train on raw bytes (ids 0-255) on purpose"
        )
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"the tokenizer in {path!r} needs transformers: pip install 'elixir-train[hf]'"
        ) from None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a damaged or unknown tokenizer: say which folder, whatever the library raised
        raise ValueError(f"could not load the tokenizer in {path!r}: {type(e).__name__}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"the tokenizer in {path!r} is a slow (Python) tokenizer; save it with tokenizer.json (a fast tokenizer), "
            "which maps tokens to characters for chat masking"
        )
    return HFTokenizer(tok, os.path.abspath(path))
