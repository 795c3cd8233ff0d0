"""Shipping: packed checkpoints (mixq's manifest format and compressed-tensors) and loading them back.

Writers take the layers' codes (:func:`quantized_layers`); readers give back the exact fake-quant
model (:func:`load`) or the codes for the packed CPU runtime (:func:`read`).
"""

from mixq.export.layers import ExportError, Exported, QuantizedLayer, quantized_layers
from mixq.export.load import kind_of, load, read

__all__ = ["ExportError", "Exported", "QuantizedLayer", "kind_of", "load", "quantized_layers", "read"]
