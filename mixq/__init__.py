"""mixq: find, apply, train and ship mixed-precision quantization strategies for PyTorch models."""

from mixq import formats
from mixq.plan import LayerSpec, Options, Plan, PlanError
from mixq.formats import Rounding
from mixq.quant import (BitCount, QuantizedTensor, QuantSpec, bit_count, bits_per_value, dequantize,
                        fake_quantize, quantize)

__version__ = "0.1.0"


def load(path: str):  # noqa: ANN201  (a torch nn.Module; torch.nn is not imported here)
    """The fake-quant model saved at ``path``: a ``mixq export`` folder (mixq or compressed-tensors
    format) or a ``mixq quantize`` run folder. See :func:`mixq.export.load`."""
    from mixq.export.load import load as load_folder

    return load_folder(path)


__all__ = [
    "LayerSpec", "Options", "Plan", "PlanError", "BitCount", "QuantSpec", "QuantizedTensor", "Rounding", "bit_count", "bits_per_value", "dequantize",
    "fake_quantize", "formats", "load", "quantize",
]
