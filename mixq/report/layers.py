"""Per-layer pieces shared by the report's sections: the block × role allocation heat map, spec
summaries, the bits of a candidate, and the environment section."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from mixq.eval.search_report import block_and_role, short_name
from mixq.report.page import facts, section
from mixq.report.svg import heatmap

_GLOB = re.compile(r"[*?\[]")


def spec_summary(specs: Sequence[str]) -> str:
    """``int4:g32 x12, int8:channel x2``: how often each spec occurs, most frequent first."""
    counts = Counter(specs)
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def rule_candidate(rule: Mapping[str, Any]) -> str:
    """The candidate name of a plan rule dict: ``keep``, ``WEIGHTS`` or ``WEIGHTS@INPUTS``."""
    if rule.get("keep") or (rule.get("weights") is None and rule.get("inputs") is None):
        return "keep"
    weights = str(rule.get("weights") or "none")
    return f"{weights}@{rule['inputs']}" if rule.get("inputs") else weights


def exact_rules(rules: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(layer name, candidate)`` of the rules whose pattern names one layer (no glob, no ``re:``), in order;
    a later rule for the same name is ignored (first match wins)."""
    seen: dict[str, str] = {}
    for r in rules:
        pattern = str(r.get("pattern", ""))
        if pattern and not pattern.startswith("re:") and not _GLOB.search(pattern) and pattern not in seen:
            seen[pattern] = rule_candidate(r)
    return list(seen.items())


def nominal_bits(candidate: str) -> float | None:
    """Bits per weight of ``candidate`` on a 4096 x 4096 weight, every scale counted (16 for keep), or
    None when it cannot be parsed. Used where the real layer shapes are not in the folder."""
    if candidate == "keep":
        return 16.0
    try:
        from mixq.plan import parse_candidate

        return parse_candidate(candidate).weight_bits((4096, 4096)) / (4096 * 4096)
    except (ValueError, ImportError):
        return None


def allocation_svg(rows: Sequence[tuple[str, str, float | None, str]], plot_id: str, *,
                   lo: float | None = None, hi: float | None = None) -> str:
    """Heat map of one allocation: ``rows`` = (layer name, candidate, bits per weight, extra tip text).

    Grid rows are block indices (layers without one in a last row ``other``), columns layer roles in
    first-seen order; colour = bits per weight over [lo, hi]; each cell shows the candidate's short name.
    """
    placed = [(*block_and_role(name), name, cand, bits, more) for name, cand, bits, more in rows]
    blocks = sorted({b for b, *_ in placed if b is not None})
    keys: list[int | None] = [*blocks, *([None] if any(b is None for b, *_ in placed) else [])]
    roles = list(dict.fromkeys(role for _, role, *_ in placed))
    values: list[list[float | None]] = [[None] * len(roles) for _ in keys]
    texts = [[""] * len(roles) for _ in keys]
    tips = [[""] * len(roles) for _ in keys]
    for block, role, name, cand, bits, more in placed:
        i, j = keys.index(block), roles.index(role)
        values[i][j] = bits if bits is not None else 0.0
        texts[i][j] = short_name(cand)
        bits_text = "?" if bits is None else f"{bits:.3f}"
        tips[i][j] = f"{name}\n{cand}: {bits_text} bits/weight" + (f"\n{more}" if more else "")
    labels = ["other" if b is None else f"block {b}" for b in keys]
    return heatmap(labels, roles, values, texts, tips, plot_id, value_label="bits/weight", lo=lo, hi=hi)


def environment_section(env: Mapping[str, Any] | None, mixq_version: str | None) -> str:
    """The environment a run was made in (environment.json), or a note that the folder has none."""
    if not env:
        note = ("<p class=muted>This folder has no environment.json (the command that wrote it does not "
                "record one yet).</p>")
        return section("Environment", facts({"mixq version": mixq_version}) + note, "environment")
    versions = env.get("versions") or {}
    git = env.get("git") or {}
    items = {
        "command": env.get("command"), "created": env.get("created"), "python": env.get("python"),
        "platform": env.get("platform"), "cpu count": env.get("cpu_count"),
        "torch threads": env.get("torch_threads"),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v) or None,
        "mixq commit": (f"{git.get('commit', '')[:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"
                        if git else None),
    }
    return section("Environment", facts(items), "environment")
