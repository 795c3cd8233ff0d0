"""Low-precision training emulation: quantized linear GEMMs, recipes, delayed and predicted scaling.

QAT and the optimizers live in their own modules (``mixq.training.qat``, ``mixq.training.optim``)
and are imported by their full path.
"""

from mixq.training.emulated import ROLES, EmulatedLinear, GemmFormats, quantize_operand, quantized_linear
from mixq.training.recipes import RECIPES, formats_for, recipe
from mixq.training.scaling import (DelayedScaling, PredictedScaling, ScalingState, delayed_quantize,
                                   predicted_quantize, quantize_with_amax)

__all__ = [
    "DelayedScaling", "EmulatedLinear", "GemmFormats", "PredictedScaling", "RECIPES", "ROLES", "ScalingState",
    "delayed_quantize", "formats_for", "predicted_quantize", "quantize_operand", "quantize_with_amax",
    "quantized_linear", "recipe",
]
