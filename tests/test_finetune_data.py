"""Fine-tuning data: every format and file type, chat masking token by token, packing with document
boundaries, padding, the rank-independent order of batches, the tokenization cache, and bad input."""

import json
import time

import numpy as np
import pytest
import torch
from finetune_helpers import CHATS, chat_rows, make_llama, make_tokenizer, text_rows, write_jsonl

from elixir.cli import main
from elixir.data import (
    IGNORE,
    Documents,
    Fields,
    Rows,
    SequenceBatches,
    find_sources,
    load_tokenizer,
    render_chat,
    tokenize,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tok_dir):
    return make_llama(str(tmp_path_factory.mktemp("llama")), 400, tokenizer_from=tok_dir)


def enc(tok, text):
    return tok.encode(text, special=False)


def test_chat_masks_every_token_but_the_assistants(tok):
    ids, labels = render_chat(CHATS[1], tok, where="test")
    # by hand: the template's pieces, each tokenized alone (special tokens and newlines cut BPE merges there)
    p1 = enc(tok, "<|im_start|>user\nName a loop.<|im_end|>\n<|im_start|>assistant\n")
    a1 = enc(tok, "The for statement.<|im_end|>\n")
    p2 = enc(tok, "<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n")
    a2 = enc(tok, "The while statement.<|im_end|>\n")
    assert ids == p1 + a1 + p2 + a2
    assert labels == [IGNORE] * len(p1) + a1 + [IGNORE] * len(p2) + a2
    im_end = tok.tok.convert_tokens_to_ids("<|im_end|>")
    assert labels.count(im_end) == 2  # the model learns to end its turns
    ids2, labels2 = render_chat(CHATS[1], tok, where="test", train_on_prompt=True)
    assert ids2 == ids and labels2 == ids


def test_every_file_type_gives_the_same_documents(tok, tmp_path):
    import datasets
    import pandas as pd

    rows = text_rows(12)
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    want = [enc(tok, r["text"]) + [tok.eos_token_id] for r in rows]  # no BOS in this tokenizer; EOS after each
    for name in ("a.jsonl", "b.json", "c.parquet", "d.csv", "saved"):
        docs, info = tokenize(find_sources(str(tmp_path / name)), Fields(), tok)
        got = [docs.tokens[docs.offsets[d] : docs.offsets[d + 1]].tolist() for d in range(len(docs))]
        assert got == want, name
        assert np.array_equal(docs.labels, docs.tokens) and info["formats"] == {str(tmp_path / name): "text"}


def test_instruction_pretokenized_and_chat_formats(tok, tmp_path):
    write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Name a loop.", "output": "The for statement."}])
    docs, info = tokenize(find_sources(str(tmp_path / "inst.jsonl")), Fields(), tok)
    messages = [{"role": "user", "content": "Name a loop."}, {"role": "assistant", "content": "The for statement."}]
    ids, labels = render_chat(messages, tok, where="x")
    assert info["formats"][str(tmp_path / "inst.jsonl")] == "instruction"
    assert docs.tokens.tolist() == ids and docs.labels.tolist() == labels

    write_jsonl(tmp_path / "pre.jsonl", [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}])
    docs, _ = tokenize(find_sources(str(tmp_path / "pre.jsonl")), Fields(), tok)
    assert docs.tokens.tolist() == [5, 6, 7, 8, 9] and docs.labels.tolist() == [-100, 6, 7, 8, 9]
    assert docs.offsets.tolist() == [0, 3, 5]

    sharegpt = [{"conversations": [{"from": "human", "value": m["content"]} if m["role"] == "user" else
                                   {"from": "gpt", "value": m["content"]} for m in CHATS[1]]}]
    write_jsonl(tmp_path / "share.jsonl", sharegpt)
    docs, _ = tokenize(find_sources(str(tmp_path / "share.jsonl")), Fields(), tok)
    assert (docs.tokens.tolist(), docs.labels.tolist()) == tuple(map(list, render_chat(CHATS[1], tok, where="x")))


def test_packed_rows_restart_positions_and_mask_document_starts():
    docs = Documents(np.arange(10, 20, dtype=np.int32), np.arange(10, 20, dtype=np.int32),
                     np.array([0, 3, 7, 10], dtype=np.int64))
    rows = Rows(docs, 4, packing="pack", pad_id=0)
    assert rows.num_rows == 3
    r0, r1, r2 = (rows.row(i) for i in range(3))
    assert r0["input_ids"].tolist() == [10, 11, 12, 13]
    assert r0["position_ids"].tolist() == [0, 1, 2, 0]  # document 1 starts at token 3
    assert r0["labels"].tolist() == [10, 11, 12, IGNORE]  # predicted from document 0: not trained
    assert r1["position_ids"].tolist() == [0, 1, 2, 0] and r1["labels"].tolist() == [14, 15, 16, IGNORE]
    assert r2["input_ids"].tolist() == [18, 19, 0, 0]  # the last row is padded
    assert r2["labels"].tolist() == [18, 19, IGNORE, IGNORE] and r2["position_ids"].tolist() == [0, 1, 0, 1]
    padded = Rows(docs, 4, packing="pad", pad_id=0)
    assert padded.num_rows == 3 and padded.truncated() == 0
    p1 = padded.row(1)
    assert p1["input_ids"].tolist() == [13, 14, 15, 16] and p1["attention_mask"].tolist() == [1, 1, 1, 1]
    p0 = padded.row(0)
    assert p0["attention_mask"].tolist() == [1, 1, 1, 0] and p0["labels"].tolist() == [10, 11, 12, IGNORE]
    assert "position_ids" not in p0


def test_a_packed_document_attends_only_to_itself(llama_dir):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    a, b = torch.randint(1, 400, (1, 5)), torch.randint(1, 400, (1, 7))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        # no key/value cache, as in training (elixir train turns it off): transformers then reads the
        # position ids as document boundaries
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(together[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_the_order_of_batches_does_not_depend_on_ranks():
    n = 40
    docs = Documents(np.arange(n * 4, dtype=np.int32), np.arange(n * 4, dtype=np.int32),
                     np.arange(0, n * 4 + 1, 4, dtype=np.int64))
    rows = Rows(docs, 4)
    one = SequenceBatches(rows, range(n), batch_size=8, seed=3)
    two = [SequenceBatches(rows, range(n), batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(12):  # 5 batches per epoch: crosses two epochs
        whole = next(one)["input_ids"]
        parts = [next(s)["input_ids"] for s in two]
        assert torch.equal(torch.cat(parts), whole)
        seen.append(whole)
    epoch0 = torch.cat(seen[:5])[:, 0].tolist()
    assert len(set(epoch0)) == 40  # an epoch sees every row once
    # resumed on another number of ranks, mid-epoch: exactly the next batch
    state = one.state_dict()
    want = next(one)["input_ids"]
    resumed = [SequenceBatches(rows, range(n), batch_size=8, seed=3, rank=r, world_size=4) for r in range(4)]
    for s in resumed:
        s.load_state_dict(state)
    assert torch.equal(torch.cat([next(s)["input_ids"] for s in resumed]), want)
    with pytest.raises(ValueError, match="batch_size"):
        SequenceBatches(rows, range(n), batch_size=4, seed=3).load_state_dict(state)


def test_the_second_run_reads_the_tokenization_cache(tok_dir, llama_dir, tmp_path, monkeypatch):
    import elixir.cli.train.prepare as build_mod
    from elixir.cli import parse_args

    write_jsonl(tmp_path / "chat.jsonl", chat_rows(400))
    flags = ["train", "--model", llama_dir, "--data", str(tmp_path / "chat.jsonl"), "--cache-dir",
             str(tmp_path / "cache"), "--seq-len", "64", "--batch-size", "2"]
    rank_world = (0, 1)

    def data_of():
        args = parse_args(flags)
        build_mod.check_args(args)
        t = time.perf_counter()
        data = build_mod.build_data(args, build_mod._tokenizer(args), *rank_world, position_ids=True)
        return data, time.perf_counter() - t

    first, first_s = data_of()
    assert "tokenized and cached" in first.description
    monkeypatch.setattr(build_mod, "tokenize", lambda *a: pytest.fail("tokenized again despite the cache"))
    second, second_s = data_of()
    assert "from the cache" in second.description
    assert torch.equal(first.train.peek()["input_ids"], second.train.peek()["input_ids"])
    assert second_s < first_s  # measured: about 0.9 s then 0.01 s for 400 chats
    (tmp_path / "chat.jsonl").write_text((tmp_path / "chat.jsonl").read_text() + json.dumps(chat_rows(1)[0]) + "\n")
    monkeypatch.undo()
    third, _ = data_of()  # the file changed: tokenized again
    assert "tokenized and cached" in third.description


@pytest.mark.parametrize(
    "setup, flags, named",
    [
        ("missing_field", ["--format", "text", "--text-field", "body"], ["data.jsonl", "'body'", "--text-field"]),
        ("no_assistant", [], ["data.jsonl", "row 1", "no assistant turn"]),
        ("bad_json", [], ["data.jsonl", "could not be read as json"]),
        ("empty", [], ["data.jsonl", "is empty"]),
        ("big_vocab", [], ["500 tokens", "400 rows", "--tokenizer"]),
        ("long", ["--seq-len", "128"], ["--seq-len 128", "64 tokens"]),
        ("no_tokenizer", [], ["no tokenizer", "--byte-tokens"]),
        ("bad_key", [], ["unknown key 'seq_lenn'", "did you mean 'seq_len'"]),
    ],
)
def test_bad_input_is_one_line_naming_it_before_the_model_is_built(setup, flags, named, tok_dir, llama_dir,
                                                                   tmp_path, capsys, monkeypatch):
    import elixir.cli.train.prepare as build_mod

    monkeypatch.setattr(build_mod, "_build_model", lambda args: pytest.fail("the model was built"))
    data = tmp_path / "data.jsonl"
    model = llama_dir
    extra = []
    if setup == "missing_field":
        write_jsonl(data, text_rows(4))
    elif setup == "no_assistant":
        write_jsonl(data, [chat_rows(1)[0], {"messages": [{"role": "user", "content": "hi"}]}])
    elif setup == "bad_json":
        data.write_text('{"text": "fine"}\n{"text": broken\n')
    elif setup == "empty":
        data.write_text("")
    else:
        write_jsonl(data, text_rows(4))
    if setup == "big_vocab":
        make_tokenizer(str(tmp_path / "bigtok"), vocab_size=500)
        extra = ["--tokenizer", str(tmp_path / "bigtok")]
    if setup == "no_tokenizer":
        model = make_llama(str(tmp_path / "bare"), 400)
    if setup == "bad_key":
        (tmp_path / "job.yaml").write_text("seq_lenn: 32\n")
        extra = ["--config", str(tmp_path / "job.yaml")]
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", model, "--data", str(data), "--cache-dir", str(tmp_path / "cache"),
              "--hardware", "CPU", *flags, *extra])
    assert e.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("elixir train: error:")
    for part in named:
        assert part in message
