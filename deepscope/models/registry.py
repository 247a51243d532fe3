"""The architecture registry: names → model builders (torchvision style).

Every classification architecture of torchvision is registered under its torchvision name
(always with ``weights=None``: the service has no internet and users upload their own weights),
plus the paper's networks (:mod:`deepscope.models.paper`) and the top-down network
(:mod:`deepscope.models.topdown`). Registration is lazy and cheap: no model is built until
:func:`get_model` is called.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "ModelSpec",
    "accepted_kwargs",
    "get_model",
    "get_model_spec",
    "list_models",
    "register_model",
    "replace_first_conv",
]

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture.

    ``input_shape`` is the default ``(C, H, W)`` the model is built for; ``invertible`` marks
    networks whose exact inverse exists (the paper's SELU FCNNs).
    """

    name: str
    builder: Builder
    input_shape: tuple[int, int, int]
    invertible: bool = False
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}
_LOCK = threading.RLock()
_registered = False
_registering = False

# Modules whose import registers models; imported on first use of the registry so that importing
# the registry itself stays cheap and free of import cycles.
_PROVIDERS = ("deepscope.models.paper", "deepscope.models.topdown")


def register_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    invertible: bool = False,
    description: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder ``(**kwargs) -> nn.Module`` under ``name``.

    Raises ``ValueError`` when ``name`` is already registered or ``input_shape`` is not a
    positive ``(C, H, W)`` triple.
    """
    if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"input_shape must be a positive (C, H, W) triple, got {input_shape!r}")
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))

    def decorator(builder: Builder) -> Builder:
        with _LOCK:
            if name in _REGISTRY:
                raise ValueError(f"architecture {name!r} is already registered")
            _REGISTRY[name] = ModelSpec(
                name=name,
                builder=builder,
                input_shape=shape,
                invertible=invertible,
                description=description,
            )
        return builder

    return decorator


def _ensure_registered() -> None:
    global _registered, _registering
    if _registered:
        return
    with _LOCK:  # other threads wait here until registration is complete
        if _registered or _registering:  # _registering: re-entry from a provider module
            return
        _registering = True
        try:
            _register_torchvision()
            for module in _PROVIDERS:
                importlib.import_module(module)
            _registered = True
        finally:
            _registering = False


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, sorted(_REGISTRY), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    return ValueError(f"unknown architecture {name!r}; {hint}(deepscope list-archs lists all)")


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name`` (``ValueError`` if unknown)."""
    _ensure_registered()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def list_models() -> list[str]:
    """All registered architecture names, sorted."""
    _ensure_registered()
    return sorted(_REGISTRY)


def accepted_kwargs(name: str) -> frozenset[str]:
    """Keyword arguments the builder of ``name`` declares (e.g. ``num_classes``,
    ``in_channels``, ``input_shape``). Torchvision builders pass any others on to torchvision."""
    return _declared_kwargs(get_model_spec(name).builder)[1]


def _declared_kwargs(builder: Builder) -> tuple[frozenset[str] | None, frozenset[str]]:
    """(all accepted names or None if open-ended, explicitly declared names)."""
    params = inspect.signature(builder).parameters.values()
    named = frozenset(
        p.name
        for p in params
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return (None if open_ended else named), named


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a fresh, randomly initialised model of architecture ``name``.

    Unknown names and keyword arguments the builder does not take raise ``ValueError``.
    """
    spec = get_model_spec(name)
    accepted, _ = _declared_kwargs(spec.builder)
    if accepted is not None:
        bad = sorted(set(kwargs) - accepted)
        if bad:
            raise ValueError(
                f"architecture {name!r} does not take keyword argument(s) "
                f"{', '.join(bad)}; it takes: {', '.join(sorted(accepted)) or 'none'}"
            )
    try:
        return spec.builder(**kwargs)
    except TypeError as exc:
        # Pass-through kwargs (torchvision) fail deep inside the constructor with a TypeError.
        if "keyword argument" in str(exc):
            raise ValueError(f"architecture {name!r}: bad keyword argument(s): {exc}") from None
        raise


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first ``nn.Conv2d`` (``named_modules`` order) by one taking ``in_channels``.

    All other hyper-parameters are kept; the new layer is freshly initialised. Returns ``model``
    (modified in place). ``ValueError`` if the model has no ``Conv2d`` or the layer's ``groups``
    does not divide ``in_channels``.
    """
    if in_channels <= 0:
        raise ValueError(f"in_channels must be positive, got {in_channels}")
    for qualified, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.in_channels == in_channels:
            return model
        if in_channels % module.groups:
            raise ValueError(
                f"cannot give {qualified!r} {in_channels} input channels: "
                f"it has groups={module.groups}"
            )
        new = nn.Conv2d(
            in_channels,
            module.out_channels,
            kernel_size=module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
        )
        new.to(device=module.weight.device, dtype=module.weight.dtype)
        parent_name, _, child = qualified.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        return model
    raise ValueError(f"{type(model).__name__} has no Conv2d layer whose input channels to change")


def _torchvision_builder(tv_name: str) -> Builder:
    def build(*, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        import torchvision

        if "weights" in kwargs and kwargs["weights"] is not None:
            raise ValueError("pretrained weights are not available (no internet); upload them")
        kwargs.pop("weights", None)
        if tv_name in ("inception_v3", "googlenet"):
            # Without weights torchvision warns unless init_weights is explicit.
            kwargs.setdefault("init_weights", True)
        model: nn.Module = torchvision.models.get_model(
            tv_name, weights=None, num_classes=num_classes, **kwargs
        )
        if in_channels != 3:
            replace_first_conv(model, in_channels)
        return model

    build.__name__ = f"build_{tv_name}"
    build.__doc__ = f"torchvision {tv_name} (weights=None); input (N, in_channels, H, W)."
    return build


def _register_torchvision() -> None:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    for tv_name in names:
        if tv_name in _REGISTRY:  # a retried, previously interrupted registration
            continue
        side = 299 if tv_name == "inception_v3" else 224
        register_model(
            tv_name,
            input_shape=(3, side, side),
            description=f"torchvision {tv_name} (random init)",
        )(_torchvision_builder(tv_name))
