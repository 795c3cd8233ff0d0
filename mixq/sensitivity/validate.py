"""Check a profile against measurement: Spearman rank correlation of each predicted metric with ``kl``.

A seeded random subset of the applicable, non-keep (layer, candidate) pairs is measured (or read from
the table's own ``kl`` column when it has one); each other metric is rank-correlated with it over
those pairs. A good predictor orders the pairs the way the measurement does (rho close to 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor, nn

from mixq.model.tree import get_module, weight_matrix
from mixq.sensitivity.measured import OutputCache
from mixq.sensitivity.outputs import ProfileInputError, check_batches, eval_mode
from mixq.sensitivity.table import SensitivityTable, model_fingerprint
from mixq.sensitivity.weight_error import quantized_weight

Progress = Callable[[str, int, int], None]


def _model_layers(model: nn.Module, table: SensitivityTable) -> list[tuple[str, tuple[int, int]]]:
    """(name, shape) of the table's layer names in ``model`` (a missing name ends the list)."""
    out = []
    for layer in table.layers:
        try:
            module = get_module(model, layer.name)
            shape = tuple(int(s) for s in weight_matrix(module).shape)
        except (ValueError, AttributeError):
            break
        out.append((layer.name, (shape[0], shape[1])))
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rho of two equally long sequences (NaN when fewer than 2 values or one is constant)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def validate(table: SensitivityTable, model: nn.Module, batches: Sequence[dict[str, Tensor]], *,
             pairs: int = 24, seed: int = 0, progress: Progress | None = None) -> dict:
    """Measure ``kl`` on ``pairs`` seeded random applicable non-keep pairs and rank-correlate every other metric.

    Returns (and stores in ``table.validation``) ``{"pairs": [{"layer", "candidate", "measured",
    <metric>: value, ...}], "spearman": {metric: rho}, "measured_by": "kl", "seconds": s}``.
    ProfileError when ``model`` is not the profiled model.
    """
    t0 = time.perf_counter()
    if pairs < 1:
        raise ProfileInputError(f"expected pairs >= 1, found {pairs}")
    found = _model_layers(model, table)
    table.check_model(model_fingerprint(found), found)
    kind = str(table.meta.get("kind", "lm"))
    cands = table.candidate_objects()
    applicable = table.applicable()
    pool = [(i, j) for i in range(len(table.layers)) for j, c in enumerate(cands)
            if applicable[i, j] and not c.is_keep]
    if not pool:
        raise ProfileInputError("the profile has no applicable non-keep (layer, candidate) pair to validate")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(pool), size=min(pairs, len(pool)), replace=False).tolist())
    chosen = [pool[k] for k in picks]
    report = progress or (lambda stage, done, total: None)
    measured: list[float] = []
    if "kl" in table.scores:
        measured = [float(table.scores["kl"][i, j]) for i, j in chosen]
    else:
        check_batches(batches, kind)
        with eval_mode(model):
            cache = OutputCache(model, batches, kind, progress)
            for k, (i, j) in enumerate(chosen):
                report("validate", k, len(chosen))
                layer, cand = table.layers[i], cands[j]
                Wq = quantized_weight(weight_matrix(get_module(model, layer.name)), cand)
                measured.append(cache.measure(layer.name, Wq, cand.spec.inputs))
            del cache
        report("validate", len(chosen), len(chosen))
    others = [m for m in table.scores if m != "kl"]
    rows = []
    for (i, j), value in zip(chosen, measured):
        row: dict = {"layer": table.layers[i].name, "candidate": table.candidates[j], "measured": value}
        row.update({m: float(table.scores[m][i, j]) for m in others})
        rows.append(row)
    rho = {m: spearman([r[m] for r in rows], measured) for m in others}
    result = {"pairs": rows, "spearman": rho, "measured_by": "kl",
              "seconds": time.perf_counter() - t0}
    table.validation = result
    return result

