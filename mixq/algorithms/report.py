"""What a quantization run reports: one row per layer, honest bits, time and warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """What happened to one layer: spec, algorithm used, proxy losses (GPTQ's ``tr(E H E^T)``)."""

    name: str
    spec: str
    algorithm: str
    bits_per_weight: float
    loss: float | None = None
    rtn_loss: float | None = None
    error: float = 0.0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class QuantizeReport:
    """The result of :func:`quantize_model`: per-layer rows, honest bits, time and warnings."""

    layers: list[LayerReport]
    bits: dict[str, float]
    seconds: float
    calibration: dict[str, Any]
    warnings: list[str]
    rotation: dict[str, Any] | None = None
    scales: dict[str, Any] = field(default_factory=dict, repr=False)
    """Per layer, the ``GroupScales`` its weight was quantized with (None: the weight is off the grid,
    e.g. salient rows kept in fp16); what export needs to recover the codes. Not part of ``to_json``."""

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "seconds": self.seconds, "calibration": self.calibration,
                "warnings": self.warnings, "rotation": self.rotation,
                "layers": [vars(r) for r in self.layers]}
