"""Hooks that capture what a module receives; each lives inside a context manager that removes it.

Typical use, walking a model block by block::

    with capture_block_inputs(block) as calls:
        for batch in batches:
            try:
                model(batch)
            except StopForward:
                pass
    # calls[i] = (args, kwargs) of the i-th call: args[0] is hidden_states [B, T, d]; kwargs hold
    # attention_mask, position_embeddings, ... exactly as the parent model passed them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import Tensor, nn


class StopForward(Exception):
    """Raised by capture_block_inputs' hook to end the forward pass once the inputs are stored."""


@contextmanager
def capture_block_inputs(block: nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """Record ``(args, kwargs)`` of every call to ``block`` and stop the forward with StopForward.

    Yields the list the calls are appended to (tensors are stored as received, not copied). The
    caller runs the model inside ``try/except StopForward``. The hook is removed on exit, also when
    the body raises.
    """
    calls: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.append((args, dict(kwargs)))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _first_input(args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    if args:
        return args[0]
    return next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


@contextmanager
def record_inputs(modules: dict[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, x)`` with the first positional input ``x`` of each module on every forward.

    A module called with keyword arguments only passes its first tensor keyword. Hooks are removed
    on exit, also when the body raises.
    """
    with ExitStack() as stack:
        for name, module in modules.items():
            def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], name: str = name) -> None:
                x = _first_input(args, kwargs)
                if x is not None:
                    fn(name, x)

            stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)
        yield
