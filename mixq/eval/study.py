"""The format study: round-to-nearest weight error of many quantizer specs on every layer of a model.

For each layer weight ``x`` and spec, ``q = mixq.fake_quantize(x, spec)`` and

- ``mse = mean((x - q)**2)``,
- ``sqnr_db = 10 * log10(sum(x**2) / sum((x - q)**2))`` (``inf`` when ``q == x`` exactly),
- ``bits_per_value = mixq.bits_per_value(spec, x.shape)`` (every scale and zero point counted).

Sums are taken in float64. A spec whose granularity does not fit a layer (a group size that does
not divide the input dimension) is recorded for that layer as skipped, with the reason.

Per spec, :class:`SpecSummary` aggregates the layers it applied to. A layer above
:data:`ON_GRID_DB` is not a quantization result but a sign that the weights already sit on that
spec's grid (SmolLM2's weights come from a Q4_1 GGUF); the summary counts and flags such layers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixq.formats import FloatFormat, GridFormat, IntFormat
from mixq.quant import GroupSizeError, QuantSpec, bits_per_value, fake_quantize

ON_GRID_DB = 60.0
Progress = Callable[[float, float | None, str], None]


def spec_family(spec: QuantSpec) -> str:
    """``INT``, ``FP`` or ``grid`` from the class of the element format (``other`` otherwise)."""
    if isinstance(spec.format, IntFormat):
        return "INT"
    if isinstance(spec.format, FloatFormat):
        return "FP"
    if isinstance(spec.format, GridFormat):
        return "grid"
    return "other"


@dataclass(frozen=True)
class LayerResult:
    """One (layer, spec) measurement; the metric fields are None when the spec was skipped."""

    layer: str
    shape: tuple[int, ...]
    numel: int
    spec: str
    signal: float  # sum(x**2), float64
    error: float | None = None  # sum((x - q)**2), float64
    bits_per_value: float | None = None
    skipped: str | None = None

    @property
    def mse(self) -> float | None:
        return None if self.error is None else self.error / max(self.numel, 1)

    @property
    def sqnr_db(self) -> float | None:
        return None if self.error is None else sqnr_db(self.signal, self.error)


@dataclass(frozen=True)
class SpecSummary:
    """A spec's results over the layers it applied to.

    ``bits_per_value`` is numel-weighted (total bits / total values); ``sqnr_*`` are over the
    per-layer SQNRs in dB; ``sqnr_global_db`` and ``rel_mse`` pool every value
    (``sum((x-q)**2) / sum(x**2)``). Fields are NaN when the spec applied to no layer.
    """

    spec: str
    family: str
    bits_per_value: float
    sqnr_mean_db: float
    sqnr_median_db: float
    sqnr_min_db: float
    sqnr_global_db: float
    rel_mse: float
    layers: int
    layers_skipped: int
    layers_on_grid: int
    skip_reasons: tuple[str, ...] = ()

    @property
    def on_grid(self) -> bool:
        """Whether some layer's SQNR exceeds :data:`ON_GRID_DB`: weights already on this grid."""
        return self.layers_on_grid > 0

    @property
    def note(self) -> str:
        parts = []
        if self.on_grid:
            parts.append(f"{self.layers_on_grid}/{self.layers} layers > {ON_GRID_DB:g} dB: "
                         "weights already on this grid, not a quantization result")
        if self.layers_skipped:
            n = self.layers_skipped
            parts.append(f"skipped on {n} layer{'s' if n != 1 else ''}: {self.skip_reasons[0]}")
        return "; ".join(parts)


@dataclass
class StudyResult:
    """Every (layer, spec) measurement of a study, its per-spec summary, and free-form ``meta``."""

    specs: list[str]
    layers: list[LayerResult]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> list[SpecSummary]:
        return [summarize(s, [r for r in self.layers if r.spec == s]) for s in self.specs]

    def to_json(self, layers: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict. Infinite SQNR (exact) is the string ``"inf"``; NaN is null."""
        from mixq.eval.study_report import result_to_json

        return result_to_json(self, layers)

    def table(self, title: str | None = None) -> Any:
        """The summary as a ``rich.table.Table``."""
        from mixq.eval.study_report import summary_table

        return summary_table(self, title)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Save SQNR (dB) against bits per value, one labelled point per spec, as a PNG."""
        from mixq.eval.study_plot import plot_study

        return plot_study(self, Path(path), title)

    def save(self, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
        """Write ``study.json``, ``study.csv`` and (``plot``) ``study.png`` atomically into ``out_dir``."""
        from mixq.eval.study_report import save_study

        return save_study(self, Path(out_dir), plot)


def sqnr_db(signal: float, error: float) -> float:
    """``10 * log10(signal / error)``: ``inf`` when ``error == 0``, NaN when either is NaN."""
    if math.isnan(signal) or math.isnan(error):
        return math.nan
    if error == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / error)


def summarize(spec: str, rows: list[LayerResult]) -> SpecSummary:
    """Aggregate one spec's layer rows (see :class:`SpecSummary`)."""
    done = [r for r in rows if r.skipped is None]
    skipped = [r for r in rows if r.skipped is not None]
    reasons = tuple(dict.fromkeys(r.skipped for r in skipped if r.skipped))
    family = spec_family(QuantSpec.parse(spec))
    if not done:
        nan = math.nan
        return SpecSummary(spec, family, nan, nan, nan, nan, nan, nan, 0, len(skipped), 0, reasons)
    numel = sum(r.numel for r in done)
    dbs = [r.sqnr_db for r in done]
    signal = sum(r.signal for r in done)
    error = sum(r.error for r in done)
    mean = math.inf if math.inf in dbs else statistics.fmean(dbs)
    return SpecSummary(
        spec=spec,
        family=family,
        bits_per_value=sum(r.bits_per_value * r.numel for r in done) / numel,
        sqnr_mean_db=mean,
        sqnr_median_db=statistics.median(dbs),
        sqnr_min_db=min(dbs),
        sqnr_global_db=sqnr_db(signal, error),
        rel_mse=error / signal if signal else math.nan,
        layers=len(done),
        layers_skipped=len(skipped),
        layers_on_grid=sum(1 for d in dbs if d > ON_GRID_DB),
        skip_reasons=reasons,
    )


def study(weights: Iterable[tuple[str, torch.Tensor]], specs: Iterable[str | QuantSpec],
          progress: Progress | None = None, seed: int = 0) -> StudyResult:
    """Measure every spec on every weight.

    ``weights``: ``(name, tensor)`` pairs (any float dtype; computed in fp32), e.g. from
    :func:`mixq.model.linear_weights`. ``specs``: spec strings or objects, all parsed before any work
    (a bad spec raises ``SpecError``/``UnknownFormatError`` at once); duplicates are dropped.
    ``progress(done, total, message)`` is called after each measurement, counting work in
    values x specs; ``total`` is None when ``weights`` has no length. Stochastic rounding is seeded
    with ``seed`` for every measurement, so results are reproducible.
    """
    parsed = list({str(s): s for s in (QuantSpec.parse(t) for t in specs)}.values())
    if not parsed:
        raise ValueError("expected at least one spec, found none")
    total = None
    if isinstance(weights, Sized):
        weights = list(weights)
        total = float(sum(w.numel() for _, w in weights) * len(parsed))
    rows: list[LayerResult] = []
    done = 0.0
    for name, w in weights:
        x = w.detach().float()
        shape = tuple(x.shape)
        signal = float(x.double().square().sum())
        buf = torch.empty_like(x)  # one output buffer per layer, reused by every spec
        for spec in parsed:
            rows.append(_measure(name, x, shape, signal, spec, seed, buf))
            done += x.numel()
            if progress is not None:
                progress(done, total, f"{name} {spec}")
    return StudyResult([str(s) for s in parsed], rows)


def _measure(name: str, x: torch.Tensor, shape: tuple[int, ...], signal: float, spec: QuantSpec,
             seed: int, buf: torch.Tensor) -> LayerResult:
    try:
        bpv = bits_per_value(spec, shape)
    except GroupSizeError as err:
        return LayerResult(name, shape, x.numel(), str(spec), signal, skipped=" ".join(str(err).split()))
    gen = torch.Generator().manual_seed(seed)
    diff = fake_quantize(x, spec, generator=gen, out=buf).sub_(x)  # q - x, [shape] fp32, in buf
    error = float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
    return LayerResult(name, shape, x.numel(), str(spec), signal, error, bpv)
