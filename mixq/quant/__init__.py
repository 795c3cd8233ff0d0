"""The quantization core: granularities, scale rules, rounding, specs, and quantize/dequantize."""

from mixq.quant.accounting import BitCount, bit_count, bits_per_value
from mixq.quant.core import QuantizedTensor, dequantize, fake_quantize, quantize
from mixq.quant.granularity import (Granularity, GroupSizeError, Grouping, PerBlock, PerChannel, PerGroup,
                                    PerTensor, PerToken)
from mixq.quant.spec import AbsMaxClip, MSEClip, PercentileClip, QuantSpec, ScaleRule, SpecError

__all__ = [
    "AbsMaxClip", "BitCount", "Granularity", "GroupSizeError", "Grouping", "MSEClip", "PerBlock",
    "PerChannel", "PerGroup", "PerTensor", "PerToken", "PercentileClip", "QuantSpec", "QuantizedTensor",
    "ScaleRule", "SpecError", "bit_count", "bits_per_value", "dequantize", "fake_quantize", "quantize",
]
