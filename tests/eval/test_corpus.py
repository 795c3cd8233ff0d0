"""Corpus splits and windows on a synthetic text with a fake tokenizer (the wiki-smollm2 protocol)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mixq.eval.corpus import (CorpusError, cached_token_stream, calibration_windows, eval_windows,
                              load_token_source, split_stream, token_stream)


class FakeTokenizer:
    """Character-level tokenizer with a BOS id 1 when special tokens are requested; counts its calls."""

    name_or_path = "fake-chars"

    def __init__(self) -> None:
        self.calls = 0

    def __len__(self) -> int:
        return 260

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        self.calls += 1
        ids = [2 + (ord(c) % 256) for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


TEXT = "\n\n".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(200))


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))


def test_token_stream_has_no_special_tokens():
    ids = token_stream(FakeTokenizer(), "abc")
    assert ids.dtype == torch.long and ids.tolist() == [2 + 97, 2 + 98, 2 + 99]


@pytest.mark.parametrize("n", [10, 999, 1000, 1009, 12345])
def test_split_sizes_follow_protocol(n):
    tokens = torch.arange(n)
    pool, test = split_stream(tokens)
    assert len(test) == int(n * 0.10) and len(pool) == n - int(n * 0.10)
    assert torch.equal(torch.cat([pool, test]), tokens)  # test = the last 10 %


def test_calibration_windows_reproduce_randint_protocol():
    pool = torch.arange(5000) * 3
    got = calibration_windows(pool, n=64, length=512, seed=0)
    starts = torch.randint(0, len(pool) - 512 + 1, (64,), generator=torch.Generator().manual_seed(0))
    assert got.shape == (64, 512) and got.dtype == torch.long
    for i, s in enumerate(starts.tolist()):
        assert torch.equal(got[i], pool[s:s + 512])
    assert not torch.equal(got, calibration_windows(pool, n=64, length=512, seed=1))


def test_calibration_window_may_reach_the_end_and_errors_when_short():
    pool = torch.arange(10)
    got = calibration_windows(pool, n=50, length=10, seed=3)
    assert (got == pool).all()  # only one possible start
    with pytest.raises(CorpusError, match="at least length=11 tokens, found 10"):
        calibration_windows(pool, n=1, length=11)


def test_eval_windows_are_the_first_non_overlapping():
    test = torch.arange(1000)
    got = eval_windows(test, n=3, length=100)
    assert got.shape == (3, 100)
    for i in range(3):
        assert torch.equal(got[i], test[i * 100:(i + 1) * 100])
    assert len(set(got.flatten().tolist())) == 300  # no token shared between windows
    with pytest.raises(CorpusError, match="11\\*100 = 1100 tokens, found 1000"):
        eval_windows(test, n=11, length=100)


def test_text_file_source_tokenizes_and_splits(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    tok = FakeTokenizer()
    pool, test = load_token_source(str(path), tok, length=64)
    whole = token_stream(FakeTokenizer(), TEXT)
    assert len(test) == int(len(whole) * 0.10)
    assert torch.equal(torch.cat([pool, test]), whole)


def test_token_stream_cache_is_reused(tmp_path):
    tok = FakeTokenizer()
    first = cached_token_stream(tok, TEXT, cache=tmp_path)
    second = cached_token_stream(tok, TEXT, cache=tmp_path)
    assert tok.calls == 1 and torch.equal(first, second) and second.dtype == torch.long
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temporary file left behind
    cached_token_stream(tok, TEXT + "!", cache=tmp_path)  # another text gets another key
    assert tok.calls == 2 and len(list((tmp_path / "tokens").iterdir())) == 2


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".json"])
def test_token_file_formats(tmp_path, suffix):
    ids = torch.arange(3000) % 500
    path = tmp_path / f"ids{suffix}"
    if suffix == ".pt":
        torch.save(ids, path)
    elif suffix == ".npy":
        np.save(path, ids.numpy().astype(np.int32))
    else:
        path.write_text(json.dumps(ids.tolist()))
    pool, test = load_token_source(path, tokenizer=None, length=128)
    assert pool.dtype == torch.long and len(test) == 300 and len(pool) == 2700
    assert torch.equal(torch.cat([pool, test]), ids)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        load_token_source(str(tmp_path / "nope.txt"), FakeTokenizer())
    other = tmp_path / "data.csv"
    other.write_text("1,2,3")
    with pytest.raises(CorpusError, match="data.csv"):
        load_token_source(str(other), FakeTokenizer())


def test_bad_token_files(tmp_path):
    torch.save(torch.zeros(4, 4, dtype=torch.long), tmp_path / "a.pt")
    with pytest.raises(CorpusError, match="1-D integer"):
        load_token_source(tmp_path / "a.pt", None, length=1)
    (tmp_path / "b.json").write_text(json.dumps([0.5, 1.5, 2.5]))
    with pytest.raises(CorpusError, match="1-D integer"):
        load_token_source(tmp_path / "b.json", None, length=1)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(CorpusError, match="unreadable"):
        load_token_source(tmp_path / "c.json", None, length=1)


def test_split_too_short_for_one_window_names_sizes(tmp_path):
    torch.save(torch.arange(2000), tmp_path / "short.pt")
    with pytest.raises(CorpusError, match="512 tokens, found 2000 tokens split into pool=1800 and test=200"):
        load_token_source(tmp_path / "short.pt", None)


def test_anonymous_tokenizer_is_not_cached(tmp_path):
    tok = FakeTokenizer()
    tok.name_or_path = ""
    cached_token_stream(tok, TEXT, cache=tmp_path)
    cached_token_stream(tok, TEXT, cache=tmp_path)
    assert tok.calls == 2 and not (tmp_path / "tokens").exists()
