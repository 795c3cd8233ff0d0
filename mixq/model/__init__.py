"""Models: offline loading by name or path, and the weights a quantizer acts on."""

from mixq.model.load import (NAMED_MODELS, ModelLoadError, cache_dir, load_model, minilm_path, resolve,
                             smollm2_gguf, smollm2_path)
from mixq.model.weights import count_parameters, linear_weights

__all__ = [
    "NAMED_MODELS", "ModelLoadError", "cache_dir", "count_parameters", "linear_weights", "load_model",
    "minilm_path", "resolve", "smollm2_gguf", "smollm2_path",
]
