"""Named low-precision training recipes (``GemmFormats``) and per-layer overrides.

Every operand is quantized with the reduction dimension last (see :mod:`mixq.training.emulated`).

========  ======================================================================================
name      operands
========  ======================================================================================
fp32      every operand in fp32 (the control: gradients equal plain autograd exactly)
fp8       E4M3 per tensor for X and W (forward and backward), E5M2 per tensor for dY: the
          "hybrid" FP8 format of Transformer Engine; pair it with delayed scaling
          (``EmulatedLinear(..., delayed=DelayedScaling(...))``) for TE's default recipe
mxfp8     MXFP8 E4M3 (blocks of 32 along the reduction dim, E8M0 scales) for every operand,
          gradients included (the MXFP8 pretraining recipe keeps E4M3 everywhere) [bg]
mxfp4     MXFP4 for every operand, stochastic rounding on dY, random Hadamard (order 32) on the
          wgrad operands: the backward of Quartet (MXFP4 end-to-end); Quartet's forward also
          rotates and uses QuEST clipping, which is not emulated here
nvfp4     NVFP4 pretraining: W in 16x16 2-D blocks (forward and dgrad see the same quantized W),
          X and dY in 1x16 blocks (E4M3 block scales, fp32 tensor scale), stochastic rounding on
          dY, random Hadamard of order 16 on the wgrad operands; the paper keeps a few layers in
          higher precision: express that with overrides, e.g. ``[("lm_head", None)]``
int8      INT8 symmetric with one scale per outer row of every operand (per token for X and dY,
          per output channel for W in forward, per input channel in dgrad), round to nearest
========  ======================================================================================

[bg]: background knowledge, not in the project's research notes.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from mixq.plan.plan import pattern_matches
from mixq.training.emulated import GemmFormats


def _nvfp4() -> GemmFormats:
    return GemmFormats(input="nvfp4", weight="nvfp4:b16x16", grad_output="nvfp4:sr",
                       dgrad_weight="nvfp4:b16x16", wgrad_grad_output="nvfp4:sr", wgrad_input="nvfp4",
                       hadamard_wgrad=16)


def _mxfp4() -> GemmFormats:
    return GemmFormats(input="mxfp4", weight="mxfp4", grad_output="mxfp4:sr", dgrad_weight="mxfp4",
                       wgrad_grad_output="mxfp4:sr", wgrad_input="mxfp4", hadamard_wgrad=32)


RECIPES: dict[str, GemmFormats] = {
    "fp32": GemmFormats(),
    "fp8": GemmFormats.of("fp8_e4m3", "fp8_e5m2"),
    "mxfp8": GemmFormats.of("mxfp8_e4m3", "mxfp8_e4m3"),
    "mxfp4": _mxfp4(),
    "nvfp4": _nvfp4(),
    "int8": GemmFormats.of("int8:token", "int8:token"),
}


def recipe(name: str, *, seed: int | None = None) -> GemmFormats:
    """The recipe called ``name`` (case-insensitive), optionally with another Hadamard/SR ``seed``.

    Unknown names raise KeyError listing close matches and all recipes.
    """
    key = str(name).strip().lower()
    if key not in RECIPES:
        close = difflib.get_close_matches(key, list(RECIPES), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown training recipe {name!r}.{hint} Recipes: {', '.join(RECIPES)}")
    found = RECIPES[key]
    return found if seed is None else found.with_(seed=seed)


Override = tuple[str, GemmFormats | str | None]


def formats_for(name: str, default: GemmFormats | str | None,
                overrides: Sequence[Override] = ()) -> GemmFormats | None:
    """The formats of layer ``name``: the first override whose pattern matches, else ``default``.

    Patterns follow plans (:func:`mixq.plan.plan.pattern_matches`: shell globs, ``re:`` regexes).
    A value may be ``GemmFormats``, a recipe name, or None (keep the layer in full precision).
    """
    chosen = default
    for pattern, value in overrides:
        if pattern_matches(pattern, name):
            chosen = value
            break
    if chosen is None or isinstance(chosen, GemmFormats):
        return chosen
    if isinstance(chosen, str):
        return recipe(chosen)
    raise TypeError(f"layer formats must be GemmFormats, a recipe name or None, got {type(chosen).__name__}")
