"""Low-precision training emulation: quantized linear GEMMs, recipes and delayed scaling.

QAT and the optimizers live in their own modules (``mixq.training.qat``, ``mixq.training.optim``)
and are imported by their full path.
"""

from mixq.training.emulated import ROLES, EmulatedLinear, GemmFormats, quantize_operand, quantized_linear
from mixq.training.recipes import RECIPES, formats_for, recipe
from mixq.training.scaling import DelayedScaling, ScalingState, delayed_quantize, quantize_with_amax

__all__ = [
    "DelayedScaling", "EmulatedLinear", "GemmFormats", "RECIPES", "ROLES", "ScalingState", "delayed_quantize",
    "formats_for", "quantize_operand", "quantize_with_amax", "quantized_linear", "recipe",
]
