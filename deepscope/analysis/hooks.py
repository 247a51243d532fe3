"""Reading activations out of a model: hooks on named modules only, always removed.

Peers got this wrong in three ways, each handled here:

* leaked hooks when a run raised: hooks are removed in ``finally`` and the model's train/eval
  mode is restored;
* a module called more than once per forward pass (one ReLU reused) is captured only on its last
  call: such a module is refused with a message instead of giving a silently wrong activation;
* an in-place op (``ReLU(inplace=True)``, ``out += identity``) overwrites the tensor a hook
  captured: with ``clone=True`` the value at capture time is kept and the overwrite is reported;
  with ``clone=False`` (cheaper, no copy) reading an overwritten value raises.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Capture", "Where", "capture_activations", "eval_mode", "resolve_modules"]


class Where(StrEnum):
    """Which side of a module to capture."""

    INPUT = "input"
    OUTPUT = "output"


@dataclass
class Capture:
    """Activations captured during forward passes inside :func:`capture_activations`.

    ``calls`` counts calls per module for the current pass; call :meth:`reset` between passes.
    """

    clone: bool
    _values: dict[str, Tensor] = field(default_factory=dict)
    _originals: dict[str, tuple[Tensor, int]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def record(self, name: str, tensor: Tensor) -> None:
        self.calls[name] += 1
        if self.calls[name] > 1:
            raise ValueError(
                f"module {name!r} is called {self.calls[name]} times in one forward pass "
                "(a reused module); its activation is ambiguous, name a module called once"
            )
        self._originals[name] = (tensor, tensor._version)
        self._values[name] = tensor.clone() if self.clone else tensor

    def modified_in_place(self) -> list[str]:
        """Names whose captured tensor was overwritten in place after it was captured."""
        return [name for name, (t, version) in self._originals.items() if t._version != version]

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._values:
            raise KeyError(f"no activation captured for {name!r} (was the module called?)")
        if not self.clone and name in self.modified_in_place():
            raise ValueError(
                f"the activation at {name!r} was overwritten by a later in-place operation "
                "(an in-place ReLU or +=); capture it with clone=True"
            )
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def reset(self) -> None:
        """Forget the last pass (call before the next forward)."""
        self._values.clear()
        self._originals.clear()
        self.calls.clear()


def resolve_modules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """``{name: module}`` for ``names``; ValueError listing the valid names on a miss."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        valid = ", ".join(n for n in modules if n) or "(none)"
        raise ValueError(
            f"unknown layer(s) {', '.join(map(repr, unknown))}; valid layers are: {valid}"
        )
    return {n: modules[n] for n in names}


def _first_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], Tensor):
        return value[0]
    raise ValueError(f"module {name!r} does not take or return a tensor; it cannot be captured")


@contextmanager
def capture_activations(
    model: nn.Module,
    names: Sequence[str],
    where: Where = Where.OUTPUT,
    *,
    clone: bool = True,
) -> Iterator[Capture]:
    """Capture the input or output tensor of each named module while the context is open.

    Only the named modules are hooked. Hooks are removed on exit, also when the body raises.

    Raises:
        ValueError: a name is not a module of ``model`` (the message lists the valid ones), or a
            named module is called more than once in one pass.
    """
    modules = resolve_modules(model, names)
    capture = Capture(clone=clone)
    handles: list[RemovableHandle] = []
    try:
        for name, module in modules.items():
            if where is Where.INPUT:

                def pre_hook(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                    capture.record(_name, _first_tensor(args, _name))

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:

                def hook(
                    _m: nn.Module, _args: tuple[Any, ...], out: Any, _name: str = name
                ) -> None:
                    capture.record(_name, _first_tensor(out, _name))

                handles.append(module.register_forward_hook(hook))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` (every submodule) in eval mode; restore each submodule's mode on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
