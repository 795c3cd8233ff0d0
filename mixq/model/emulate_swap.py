"""Swap the linear and convolution layers of a model for low-precision emulations (and back).

:func:`emulate` replaces, in place, every ``nn.Linear`` by an
:class:`~mixq.training.emulated.EmulatedLinear` and every ``nn.Conv2d`` (``groups == 1``) by an
:class:`~mixq.training.emulated_conv.EmulatedConv2d`, with the formats that
:func:`mixq.training.recipes.formats_for` gives the layer's name. The wrappers share the original
parameter objects, so optimizers built before or after the swap see the same tensors and tied
weights stay tied. :func:`restore` swaps them back for plain modules.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mixq.model.tree import weight_matrix
from mixq.model.training_swap import modules_of_type, replace_modules
from mixq.quant.granularity import Grouping
from mixq.training.emulated import ROLES, EmulatedLinear, GemmFormats, is_identity
from mixq.training.emulated_conv import EmulatedConv2d
from mixq.training.recipes import Override, formats_for
from mixq.training.scaling import DelayedScaling, PredictedScaling


def quantizes_something(formats: GemmFormats | None) -> bool:
    """Whether ``formats`` changes any operand (some role is not fp32, or a Hadamard is applied)."""
    return formats is not None and (bool(formats.hadamard_wgrad)
                                    or any(not is_identity(formats.spec(r)) for r in ROLES))


def _check_fits(name: str, W: Tensor, formats: GemmFormats) -> None:
    """Raise ValueError naming the layer when a spec's blocks do not fit its weight ``W`` [out, in_flat]."""
    checks = [("weight", W), ("dgrad_weight", W.t()), ("input", W[:1])]  # input: [T, in], in = reduction
    for role, operand in checks:
        spec = formats.spec(role)
        if is_identity(spec):
            continue
        try:
            Grouping(tuple(operand.shape), spec.granularity)
        except ValueError as err:
            raise ValueError(f"layer {name} (weight {list(W.shape)}): the {role} format {spec} does not fit: "
                             f"{' '.join(str(err).split())}; keep the layer in full precision "
                             f"(an override (pattern, None), --keep)") from err


def emulate(model: nn.Module, default_formats: GemmFormats | str | None,
            overrides: Sequence[Override] | None = None, seed: int = 0, *,
            delayed: DelayedScaling | None = None,
            predicted: PredictedScaling | None = None) -> dict[str, GemmFormats]:
    """Replace, in place, each ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by its emulated version.

    ``default_formats``: GemmFormats or a recipe name (``"fp8"``, ``"nvfp4"``, ...), for every layer no
    override matches; ``overrides``: ``(pattern, formats | recipe name | None)`` pairs, first match wins,
    None keeps a layer in full precision. Layer ``i`` (in module order) gets ``seed + i`` as the seed of
    its stochastic rounding and Hadamard signs. Layers whose formats quantize nothing (the ``fp32``
    recipe) are left as they are, so an fp32 run is exactly plain training. ``delayed``: delayed scaling
    for the per-tensor roles of linear layers; ``predicted``: MOSS-style predicted scaling of their
    per-tensor weights. Returns ``{name: GemmFormats}`` of the swapped layers.
    """
    kinds = (nn.Linear, nn.Conv2d)
    chosen: dict[str, GemmFormats] = {}
    for i, (name, module) in enumerate(modules_of_type(model, kinds).items()):
        formats = formats_for(name, default_formats, tuple(overrides or ()))
        if not quantizes_something(formats):
            continue
        assert formats is not None
        _check_fits(name, weight_matrix(module), formats)
        chosen[name] = formats.with_(seed=seed + i)

    def make(name: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Conv2d):
            return EmulatedConv2d(module, chosen[name])
        return EmulatedLinear(module, chosen[name], delayed=delayed, predicted=predicted)

    replace_modules(model, chosen, make)
    return chosen


def emulated_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every :class:`EmulatedLinear` / :class:`EmulatedConv2d` of ``model``."""
    return modules_of_type(model, (EmulatedLinear, EmulatedConv2d))


def restore(model: nn.Module) -> list[str]:
    """Swap every emulated layer back for a plain Linear/Conv2d (same parameters); returns their names."""
    layers = emulated_layers(model)
    replace_modules(model, layers,
                    lambda _, m: m.to_linear() if isinstance(m, EmulatedLinear) else m.to_conv())
    return list(layers)


__all__ = ["emulate", "emulated_layers", "quantizes_something", "restore"]
