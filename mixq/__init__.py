"""mixq: find, apply, train and ship mixed-precision quantization strategies for PyTorch models."""

from mixq import formats
from mixq.plan import LayerSpec, Options, Plan, PlanError
from mixq.formats import Rounding
from mixq.quant import (BitCount, QuantizedTensor, QuantSpec, bit_count, bits_per_value, dequantize,
                        fake_quantize, quantize)

__version__ = "0.1.0"

__all__ = [
    "LayerSpec", "Options", "Plan", "PlanError", "BitCount", "QuantSpec", "QuantizedTensor", "Rounding", "bit_count", "bits_per_value", "dequantize",
    "fake_quantize", "formats", "quantize",
]
