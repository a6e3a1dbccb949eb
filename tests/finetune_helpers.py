"""What the fine-tuning tests make for themselves, nothing downloaded: a small BPE tokenizer trained on
the embedded corpus and saved as a Hugging Face tokenizer with a ChatML template, tiny Hugging Face
models that use it, and data files in every format."""

from __future__ import annotations

import json
import os

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATS = [
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "What is a list?"},
     {"role": "assistant", "content": "A mutable sequence."}],
    [{"role": "user", "content": "Name a loop."},
     {"role": "assistant", "content": "The for statement."},
     {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "The while statement."}],
]


def make_tokenizer(folder: str, vocab_size: int = 400, chat_template: str | None = CHATML) -> str:
    """A byte-level BPE tokenizer trained on part of the embedded corpus, saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from elixir.data import load_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = load_corpus().decode("utf-8")[:40_000]
    tok.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(folder)
    return folder


def make_llama(folder: str, vocab_size: int, *, seq_len: int = 64, tokenizer_from: str | None = None,
               seed: int = 0) -> str:
    """A tiny Llama (~30k parameters) saved in `folder`, with the tokenizer files of `tokenizer_from`
    and a generation_config.json."""
    import shutil

    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len, eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.generation_config = transformers.GenerationConfig(eos_token_id=0, pad_token_id=0, max_new_tokens=8)
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        for name in os.listdir(tokenizer_from):
            shutil.copy(os.path.join(tokenizer_from, name), folder)
    return folder


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def text_rows(n: int) -> list[dict]:
    """Rows of varied text from the embedded corpus (a few hundred characters each)."""
    from elixir.data import load_corpus

    text = load_corpus().decode("utf-8")
    return [{"text": text[i * 300 : i * 300 + 150 + (i * 37) % 200]} for i in range(n)]


def chat_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        chat = CHATS[i % len(CHATS)]
        rows.append({"messages": [dict(m, content=f"{m['content']} ({i})") for m in chat]})
    return rows
