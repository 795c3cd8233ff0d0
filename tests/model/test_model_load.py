"""Offline model loading: names, folders, errors and the SmolLM2 cache (without converting the GGUF)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixq.model import (ModelLoadError, cache_dir, linear_weights, load_model, resolve, smollm2_gguf,
                        smollm2_path)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 (Conv1D layers) saved as a Hugging Face folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_load_folder_uses_the_architecture_class(tiny_gpt2):
    model = load_model(tiny_gpt2)
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    shapes = dict((n, tuple(w.shape)) for n, w in linear_weights(model))
    assert shapes["transformer.h.0.attn.c_attn"] == (96, 32)  # Conv1D [in, out] transposed
    assert shapes["transformer.h.0.mlp.c_proj"] == (32, 128)
    assert "lm_head" not in shapes  # tied to wte


def test_messages_name_what_was_expected_and_found(tmp_path):
    with pytest.raises(ModelLoadError, match="no such name or path"):
        resolve(tmp_path / "nope")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="found a file"):
        resolve(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="readable config.json") as err:
        load_model(tmp_path)
    assert "\n" not in str(err.value)


def test_named_assets_resolve():
    assert (resolve("MiniLM") / "model.safetensors").is_file()
    assert smollm2_gguf().suffix == ".gguf"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MIXQ_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "mixq"


def test_smollm2_cache_hit_does_not_convert(tmp_path):
    target = tmp_path / f"{smollm2_gguf().stem}-fp32"
    target.mkdir()
    (target / "config.json").write_text("{}")
    messages: list[str] = []
    assert smollm2_path(tmp_path, status=messages.append) == target
    assert messages == []  # nothing was converted


def test_a_model_that_cannot_fit_is_refused_before_loading(make_llama_folder, tmp_path, monkeypatch):
    from mixq.model.load import MemoryRiskError, check_memory, fp32_bytes

    folder = make_llama_folder(tmp_path) / "src"
    need = fp32_bytes(folder)
    assert need and need > 0
    check_memory(folder, available=64 * 2**30)  # plenty: nothing to say
    with pytest.raises(MemoryRiskError, match="--max-memory") as err:
        check_memory(folder, available=need // 2)
    assert str(folder) in str(err.value) and "GiB" in str(err.value)
    monkeypatch.setenv("MIXQ_MEMORY_CHECK", "0")
    check_memory(folder, available=1)  # the escape hatch the message names
