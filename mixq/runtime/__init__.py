"""Real low-precision inference on the CPU: packed linear modules, integer-only requantization, generation.

Packed modules are built from exported ``QuantizedLayer`` records (``mixq.export.layers``) and placed in a
model by :func:`mixq.model.packed.pack_model`. Every packed computation is tested against the fake-quant
model, which stays the reference.
"""

from mixq.runtime.dyadic import dyadic, int_linear
from mixq.runtime.generate import generate, greedy_tokens
from mixq.runtime.linear import PackedLinearW8A8, PackedLinearWeightOnly, supports, why_not

__all__ = ["PackedLinearW8A8", "PackedLinearWeightOnly", "dyadic", "generate", "greedy_tokens", "int_linear",
           "supports", "why_not"]
