"""Quantization algorithms: tensor functions that return result objects, and the sequential runner.

The runner (:func:`mixq.algorithms.runner.quantize_model`) is imported from its module: it edits
module trees through ``mixq.model``, which itself uses the tensor functions exported here.
"""

from mixq.algorithms.awq import AWQError, AWQResult, awq_clip, awq_search
from mixq.algorithms.bias_correction import BiasCorrectionError, corrected_bias
from mixq.algorithms.gptq import gptq
from mixq.algorithms.hadamard import (HadamardError, block_hadamard, block_hadamard_matrix, hadamard_matrix,
                                      random_signs, rotation_matrix)
from mixq.algorithms.hessian import HessianAccumulator, layer_loss
from mixq.algorithms.rtn import WeightResult, rtn
from mixq.algorithms.salient import SalientError, salient_rows
from mixq.algorithms.smoothquant import SmoothQuantError, smooth_factors

__all__ = [
    "AWQError", "AWQResult", "BiasCorrectionError", "HadamardError", "HessianAccumulator", "SalientError",
    "SmoothQuantError", "WeightResult", "awq_clip", "awq_search", "block_hadamard", "block_hadamard_matrix",
    "corrected_bias", "gptq", "hadamard_matrix", "layer_loss", "random_signs", "rotation_matrix", "rtn",
    "salient_rows", "smooth_factors",
]
