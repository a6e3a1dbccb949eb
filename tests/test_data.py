"""Corpus loading, text folders, the train/val split and rank-split token batches."""

import pytest
import torch

from elixir.data import TokenBatches, load_corpus, load_text, split

DATA = bytes(range(256)) * 8  # 2048 bytes, every byte value


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_corpus_is_nonempty_utf8_text():
    corpus = load_corpus()
    # Its exact text varies by Python release: check only what every release has.
    assert len(corpus) > 100_000
    text = corpus.decode("utf-8")
    assert "for" in text and "class" in text


def test_batches_shapes_and_labels():
    stream = TokenBatches(DATA, batch_size=4, seq_len=16)
    b = next(stream)
    assert set(b) == {"input_ids", "labels"}
    assert b["input_ids"].shape == (4, 16) and b["input_ids"].dtype == torch.long
    assert b["labels"] is b["input_ids"]
    # Each row is a contiguous window of the data.
    for row in b["input_ids"]:
        start = DATA.index(bytes([row[0].item()]) + bytes([row[1].item()]))
        assert bytes(row.tolist()) == DATA[start : start + 16]


def test_offsets_reach_the_last_window():
    data = bytes(range(5))
    rows = torch.cat(
        [next(TokenBatches(data, batch_size=64, seq_len=4, seed=s))["input_ids"] for s in range(3)]
    )
    assert {tuple(r.tolist()) for r in rows} == {(0, 1, 2, 3), (1, 2, 3, 4)}


def test_batches_are_deterministic_given_seed():
    a = take(TokenBatches(DATA, batch_size=4, seq_len=16, seed=7), 3)
    b = take(TokenBatches(DATA, batch_size=4, seq_len=16, seed=7), 3)
    c = take(TokenBatches(DATA, batch_size=4, seq_len=16, seed=8), 3)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"])
    assert not all(torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c))
    assert not torch.equal(a[0]["input_ids"], a[1]["input_ids"])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_see_the_global_batch(world_size):
    whole = take(TokenBatches(DATA, batch_size=8, seq_len=16, seed=3), 3)
    ranks = [
        take(TokenBatches(DATA, batch_size=8, seq_len=16, seed=3, rank=r, world_size=world_size), 3)
        for r in range(world_size)
    ]
    for step in range(3):
        parts = [ranks[r][step]["input_ids"] for r in range(world_size)]
        assert all(p.shape == (8 // world_size, 16) for p in parts)
        assert torch.equal(torch.cat(parts), whole[step]["input_ids"])


def test_state_dict_resumes_the_stream():
    stream = TokenBatches(DATA, batch_size=4, seq_len=16, seed=5)
    take(stream, 2)
    state = stream.state_dict()
    expected = take(stream, 2)
    resumed = TokenBatches(DATA, batch_size=4, seq_len=16, seed=5)
    resumed.load_state_dict(state)
    for x, y in zip(expected, take(resumed, 2)):
        assert torch.equal(x["input_ids"], y["input_ids"])
    with pytest.raises(ValueError, match="seed=5"):
        TokenBatches(DATA, batch_size=4, seq_len=16, seed=6).load_state_dict(state)


def test_batch_errors():
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by world_size=4"):
        TokenBatches(DATA, batch_size=6, seq_len=16, world_size=4)
    with pytest.raises(ValueError, match="10 bytes, fewer than seq_len \\+ 1 = 17"):
        TokenBatches(b"0123456789", batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match="rank=2"):
        TokenBatches(DATA, batch_size=4, seq_len=16, rank=2, world_size=2)


def test_load_text_file_and_folder(tmp_path):
    (tmp_path / "b.md").write_bytes(b"bee")
    (tmp_path / "a.txt").write_bytes(b"ay")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_bytes(b"sea")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "sub" / "skip.png").write_bytes(b"png")
    assert load_text(tmp_path) == b"ay\nbee\nsea"
    assert load_text(str(tmp_path / "b.md")) == b"bee"


def test_load_text_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        load_text(missing)
    (tmp_path / "only.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="no text found"):
        load_text(tmp_path)


def test_split():
    train, val = split(DATA, val_fraction=0.25)
    assert train + val == DATA
    assert len(val) == 512
    with pytest.raises(ValueError, match="val_fraction=0"):
        split(DATA, val_fraction=0)
    with pytest.raises(ValueError, match="too few"):
        split(b"a", val_fraction=0.5)
