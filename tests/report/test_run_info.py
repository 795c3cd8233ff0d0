"""The environment record: what it holds, atomic writing, reading back, and ``mixq train`` writing it."""

from __future__ import annotations

import json
import os

from mixq.run_info import ENVIRONMENT, environment, read_environment, write_environment


def test_environment_holds_versions_threads_and_command():
    env = environment(["/usr/bin/mixq", "train", "--out", "a b"])
    assert env["command"] == "mixq train --out 'a b'"
    assert env["cpu_count"] == os.cpu_count() and env["torch_threads"] >= 1
    assert env["versions"]["torch"] and env["versions"]["numpy"] and env["versions"]["mixq"]
    assert env["git"] is None or len(env["git"]["commit"]) == 40
    json.dumps(env)  # JSON-ready


def test_write_and_read_back(tmp_path):
    path = write_environment(tmp_path, {"python": "3.x"})
    assert path == tmp_path / ENVIRONMENT and read_environment(tmp_path) == {"python": "3.x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [ENVIRONMENT]  # no temporary file left
    (tmp_path / ENVIRONMENT).write_text("[1, 2]")
    assert read_environment(tmp_path) is None and read_environment(tmp_path / "none") is None


def test_train_folder_records_its_environment(runs):
    env = read_environment(runs["train"])
    assert env is not None and isinstance(env["command"], str) and env["versions"]["torch"]
