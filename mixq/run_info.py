"""The environment a run was made in: interpreter, platform, library versions, threads, mixq checkout.

Each command that writes a run folder records :func:`environment` there as ``environment.json``
(:func:`write_environment`), so that ``mixq compare`` and ``mixq report`` can say what produced a result.
Reading the versions imports nothing heavy except torch, and only when it is installed.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mixq.fileio import atomic_write_text

ENVIRONMENT = "environment.json"
PACKAGES = ("mixq", "torch", "transformers", "numpy", "scipy", "safetensors", "compressed-tensors")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())


def git_commit(folder: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """``{"commit": SHA, "dirty": bool}`` of the git checkout holding ``folder`` (default: the mixq
    package), or None when it is not in a checkout or git is not available."""
    where = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    """The environment of this process as a JSON-ready dict.

    Keys: ``python`` (version), ``implementation``, ``platform``, ``machine``, ``cpu_count``,
    ``torch_threads`` (None without torch), ``versions`` (package -> version or None for
    :data:`PACKAGES`), ``git`` (:func:`git_commit` of the mixq checkout, or None), ``command``
    (``argv``, default ``sys.argv``, as one shell-quoted line), ``created`` (UTC, ISO 8601).
    """
    args = list(sys.argv if argv is None else argv)
    if args and Path(args[0]).name in ("__main__.py", "mixq"):
        args[0] = "mixq"
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "versions": {name: _version(name) for name in PACKAGES},
        "git": git_commit(),
        "command": shlex.join(args),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def process_memory(field: str) -> int | None:
    """A memory figure of this process in bytes from ``/proc/self/status`` (``"VmRSS:"`` now,
    ``"VmHWM:"`` its peak); None where the file or the field is missing (not Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def write_environment(folder: str | os.PathLike[str], env: dict[str, Any] | None = None) -> Path:
    """Write ``env`` (default :func:`environment`) to ``folder/environment.json`` atomically; returns the path."""
    record = environment() if env is None else env
    return atomic_write_text(Path(folder) / ENVIRONMENT, json.dumps(record, indent=1, default=str) + "\n")


def read_environment(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``environment.json`` of a run folder, or None when it has none or it is not a JSON object."""
    path = Path(folder) / ENVIRONMENT
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
