"""Run folders for the report tests, written by the real commands on a tiny random Llama (session scope).

``runs`` maps a kind to a folder: ``profile``, ``frontier`` (measured: perplexities of every searched
plan and of the uniform int4 candidate), ``quantize`` (int4:g32, RTN), ``train`` (tiny-lm, 3 steps)
and ``export`` (mixq format of the quantize run). About 20 s on one CPU thread.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from mixq.cli import main


def run_cli(*argv: object) -> str:
    """Run ``mixq ARGV`` in-process; returns its stdout and fails the test on a non-zero exit."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main([str(a) for a in argv])
    assert code == 0, f"mixq {' '.join(map(str, argv))} exited {code}: {err.getvalue()}"
    return buf.getvalue()


@pytest.fixture(scope="session")
def cli():
    """:func:`run_cli` as a fixture."""
    return run_cli


@pytest.fixture(scope="session")
def runs(tmp_path_factory, make_llama_folder):
    root = make_llama_folder(tmp_path_factory.mktemp("report"))
    calib = ["--calib", root / "tokens.pt", "--samples", "4", "--length", "32", "--batch-size", "2"]
    run_cli("profile", root / "src", "--candidates", "int4:g32,int8:channel,keep", "--metrics", "weight,fisher",
            *calib, "--out", root / "profile")
    run_cli("frontier", root / "profile", "--budgets", "5.5,7", "--families", "joint,int", "--measure",
            "--eval-windows", "2", "--samples", "4", "--algorithm", "rtn", "--out", root / "frontier")
    run_cli("quantize", root / "src", *calib, "--spec", "int4:g32", "--algorithm", "rtn", "--out", root / "quantize")
    run_cli("train", "--task", "tiny-lm", "--steps", "3", "--out", root / "train")
    run_cli("export", root / "quantize", "--format", "mixq", "--out", root / "export")
    return {kind: root / kind for kind in ("profile", "frontier", "quantize", "train", "export")}
