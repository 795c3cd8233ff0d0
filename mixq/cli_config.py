"""Run configs for the command line: ``--config FILE.yaml`` and ``--set KEY=VALUE``.

A config is a YAML mapping of a command's options, written as they are on the command line without
the dashes (``samples: 32``, ``algorithm: gptq``, ``kv-only: true``; ``_`` and ``-`` are alike), plus
its positional arguments by name (``model: smollm2``) and optionally ``command: quantize``.
``mixq quantize --config run.yaml`` is exactly ``mixq quantize`` followed by those flags, so argparse
checks every value as usual. Precedence: the file < ``--set KEY=VALUE`` < flags typed on the command
line. A config with no ``command`` works for any command that has its keys.

After a command that writes a folder (``--out``) succeeds, the CLI saves the options it ran with as
``OUT/config.yaml`` (:func:`config_of`), so ``mixq COMMAND --config OUT/config.yaml`` repeats the run.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# options that describe how a command is run, not what it computes: never saved in config.yaml
CONFIG = "config.yaml"
SESSION_KEYS = frozenset({"debug", "config", "set", "json", "overwrite", "command", "out", "resume"})


class ConfigError(ValueError):
    """A config file or ``--set`` item that cannot be applied; the message says what and how to fix."""


def _pop_config_args(argv: list[str]) -> tuple[list[str], Path | None, list[str]]:
    """``argv`` without ``--config FILE`` / ``--set K=V`` items, the config path and the set items."""
    rest: list[str] = []
    config: Path | None = None
    sets: list[str] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        for flag in ("--config", "--set"):
            if item == flag or item.startswith(flag + "="):
                if item == flag:
                    if i + 1 >= len(argv):
                        raise ConfigError(f"{flag} expected a value, found the end of the command line")
                    value, i = argv[i + 1], i + 2
                else:
                    value, i = item.split("=", 1)[1], i + 1
                if flag == "--config":
                    config = Path(value)
                else:
                    sets.append(value)
                break
        else:
            rest.append(item)
            i += 1
    return rest, config, sets


def _load(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"expected a YAML config file, found no file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"expected valid YAML in {path}, found: {' '.join(str(err).split())}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of options in {path}, found a {type(data).__name__}")
    return {str(k).replace("_", "-"): v for k, v in data.items()}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flag_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _as_args(command: str, sub: argparse.ArgumentParser, values: dict[str, Any], typed: list[str],
             source: str) -> tuple[list[str], list[str]]:
    """(positional values, option flags) for ``values``; positionals the user typed are skipped."""
    options = {a.dest.replace("_", "-"): a for a in sub._actions if a.option_strings}
    positional = [a for a in sub._actions if not a.option_strings]
    known = set(options) | {a.dest.replace("_", "-") for a in positional}
    flags: list[str] = []
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: 'mixq {command}' has no option {key!r}{hint}; "
                              f"its options: {', '.join(sorted(known))}")
        if key not in options:
            continue
        action = options[key]
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {key} is a switch: expected true or false, found {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                flags.append(flag)
        elif value is not None:
            flags += [flag, _flag_text(value)]
    n_typed = _typed_positionals(sub, typed)
    pos = [_flag_text(values[a.dest.replace("_", "-")]) for a in positional
           if a.dest.replace("_", "-") in values and a.dest != "command"]
    return (pos if n_typed == 0 else []), flags


def _typed_positionals(sub: argparse.ArgumentParser, typed: Sequence[str]) -> int:
    """How many positional values the user typed among ``typed`` (flag values are not counted)."""
    takes_value = {s for a in sub._actions for s in a.option_strings if a.nargs != 0}
    count, skip = 0, False
    for item in typed:
        if skip:
            skip = False
        elif item.startswith("-") and len(item) > 1:
            skip = item in takes_value  # "--flag value"; "--flag=value" carries its own value
        else:
            count += 1
    return count


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expected KEY=VALUE, found {item!r}")
        out[key.strip().replace("_", "-")] = yaml.safe_load(text) if text.strip() else ""
    return out


def expand_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with ``--config`` / ``--set`` replaced by the flags they stand for (see the module
    docstring). Raises :class:`ConfigError` for a missing or malformed file or an unknown key."""
    rest, config, sets = _pop_config_args(list(argv))
    if config is None and not sets:
        return rest
    values = _load(config) if config is not None else {}
    subs = _subparsers(parser)
    typed_command = next((a for a in rest if not a.startswith("-")), None)
    command = typed_command if typed_command in subs else values.get("command")
    if command not in subs:
        raise ConfigError(f"expected a command ({', '.join(subs)}) on the command line or as 'command:' "
                          f"in the config, found {command!r}")
    if "command" in values and values["command"] != command:
        raise ConfigError(f"the config is for 'mixq {values['command']}', not 'mixq {command}'")
    values.pop("command", None)
    after = rest[rest.index(command) + 1:] if typed_command == command else rest
    before = rest[:rest.index(command)] if typed_command == command else []
    set_values = _parse_sets(sets)
    pos, file_flags = _as_args(command, subs[command], values, after, f"config {config}")
    set_pos, set_flags = _as_args(command, subs[command], set_values, after, "--set")
    if set_pos:
        names = ", ".join(k for k in set_values if k not in {f.lstrip("-") for f in set_flags})
        raise ConfigError(f"--set sets options, not positional arguments ({names}): type them on the command "
                          "line or put them in the config file")
    return before + [command] + pos + file_flags + set_flags + after


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options a command ran with, as a config mapping (``command`` first; session keys left out)."""
    out: dict[str, Any] = {"command": args.command}
    for key, value in sorted(vars(args).items()):
        if key in SESSION_KEYS or key.startswith("_") or callable(value):
            continue
        out[key.replace("_", "-")] = str(value) if isinstance(value, Path) else value
    return out


def save_config(args: argparse.Namespace) -> Path | None:
    """Write ``config.yaml`` into ``args.out`` when it is a folder (``config-COMMAND.yaml`` when the folder
    already holds another command's config, e.g. ``eval --out RUN``); returns its path."""
    import yaml

    from mixq.fileio import atomic_write_text

    out = getattr(args, "out", None)
    if out is None or not Path(out).is_dir() or os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 writes
        return None
    path = Path(out) / CONFIG
    if path.is_file() and (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("command") != args.command:
        path = Path(out) / f"config-{args.command}.yaml"  # e.g. eval --out RUN keeps quantize's config
    text = f"# mixq run config: mixq {args.command} --config {path.name} repeats this run\n"
    text += yaml.safe_dump(config_of(args), sort_keys=False)
    return atomic_write_text(path, text)
