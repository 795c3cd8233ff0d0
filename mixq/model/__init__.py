"""Models: offline loading, architecture facts, module-tree edits, plan matching and run folders."""

from mixq.model.arch import ArchFacts, ArchitectureError, ScaleGroup, arch_facts, known_families
from mixq.model.load import (NAMED_MODELS, ModelLoadError, cache_dir, load_model, minilm_path, resolve,
                             smollm2_gguf, smollm2_path)
from mixq.model.plan_match import ResolvedLayer, ResolvedPlan, count_bits
from mixq.model.plan_match import resolve as resolve_plan
from mixq.model.tree import quantizable_modules, weight_matrix
from mixq.model.weights import count_parameters, linear_weights

__all__ = [
    "NAMED_MODELS", "ArchFacts", "ArchitectureError", "ModelLoadError", "ResolvedLayer", "ResolvedPlan",
    "ScaleGroup", "arch_facts", "cache_dir", "count_bits", "count_parameters", "known_families",
    "linear_weights", "load_model", "minilm_path", "quantizable_modules", "resolve", "resolve_plan",
    "smollm2_gguf", "smollm2_path", "weight_matrix",
]
