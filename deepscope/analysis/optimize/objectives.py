"""Objectives for input optimization: activations → one score per image, to MAXIMIZE.

An :class:`Objective` reads the activations captured in one forward pass, a mapping from module
name to tensor (batch ``B`` first), plus the model output under :data:`MODEL_OUTPUT`, and returns
a ``(B,)`` score. Each image's score depends on that image's activations only, so a batch of
targets optimizes as independent problems in one forward/backward pass.

Objectives compose: ``a + b``, ``a - b``, ``-a``, ``2.0 * a``, ``a / 2``; ``sum([a, b])`` works.
:attr:`Objective.layers` names the modules whose outputs are needed, so that only those are
hooked. Activation layouts understood: ``(B, F)`` (Linear), ``(B, C, H, W)`` (conv) and
``(B, N, D)`` (tokens, as in a ViT; the channel is the last axis ``D``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MODEL_OUTPUT",
    "Activations",
    "Objective",
    "channel",
    "class_logit",
    "direction",
    "layer_l2",
    "neuron",
    "per_image",
    "representation_match",
]

MODEL_OUTPUT = ""
"""Key of the model's output in the activation mapping (the root module's name in
``named_modules``)."""

Activations = Mapping[str, Tensor]
ScoreFn = Callable[[Activations], Tensor]


@dataclass(frozen=True)
class Objective:
    """A per-image score to maximize.

    Attributes:
        fn: activations → ``(B,)`` score.
        layers: module names whose outputs ``fn`` reads (hooked during optimization).
        uses_output: whether ``fn`` reads the model output (``acts[MODEL_OUTPUT]``).
        name: a readable description, e.g. ``channel('conv1', 3)``.
    """

    fn: ScoreFn
    layers: tuple[str, ...] = ()
    uses_output: bool = False
    name: str = "objective"

    def __call__(self, acts: Activations) -> Tensor:
        """Score ``(B,)`` of every image in the batch."""
        score = self.fn(acts)
        if score.dim() != 1:
            raise ValueError(f"objective {self.name} returned shape {tuple(score.shape)}, not (B,)")
        return score

    def _combine(self, other: Objective, fn: ScoreFn, name: str) -> Objective:
        layers = tuple(dict.fromkeys(self.layers + other.layers))
        return Objective(fn, layers, self.uses_output or other.uses_output, name)

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, int | float):
            if other == 0:
                return self
            return NotImplemented
        a, b = self, other
        return self._combine(other, lambda acts: a(acts) + b(acts), f"({a.name} + {b.name})")

    def __radd__(self, other: Objective | float) -> Objective:
        # Lets the builtin sum() start from 0.
        return self.__add__(other)

    def __sub__(self, other: Objective) -> Objective:
        a, b = self, other
        return self._combine(other, lambda acts: a(acts) - b(acts), f"({a.name} - {b.name})")

    def __neg__(self) -> Objective:
        return self * -1.0

    def __mul__(self, scalar: float) -> Objective:
        if not isinstance(scalar, int | float):
            return NotImplemented
        a, k = self, float(scalar)
        return Objective(lambda acts: k * a(acts), a.layers, a.uses_output, f"{k:g} * {a.name}")

    def __rmul__(self, scalar: float) -> Objective:
        return self.__mul__(scalar)

    def __truediv__(self, scalar: float) -> Objective:
        return self.__mul__(1.0 / float(scalar))


def _get(acts: Activations, layer: str) -> Tensor:
    if layer not in acts:
        raise ValueError(f"no activation for layer {layer!r} (was it hooked?)")
    return acts[layer]


def _indices(
    index: int | Sequence[int], batch: int, size: int, what: str, layer: str, device: torch.device
) -> Tensor:
    """``(B,)`` long indices: one int for every image, or one per image."""
    values = [int(index)] * batch if isinstance(index, int) else [int(i) for i in index]
    if len(values) != batch:
        raise ValueError(
            f"{len(values)} {what} indices given for a batch of {batch} at layer {layer!r}"
        )
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise ValueError(
            f"{what} {bad[0]} out of range for layer {layer!r} with {size} {what}s "
            f"(valid: 0..{size - 1})"
        )
    return torch.tensor(values, dtype=torch.long, device=device)


def _describe(index: int | Sequence[int]) -> str:
    return str(index) if isinstance(index, int) else f"[{', '.join(map(str, index))}]"


def _channel_axis_view(a: Tensor, layer: str) -> Tensor:
    """``(B, C, P)``: channels on axis 1 and the positions flattened, for any layout."""
    if a.dim() == 2:
        return a.unsqueeze(2)
    if a.dim() == 3:
        # Tokens (B, N, D): the channel is the embedding axis D.
        return a.transpose(1, 2)
    if a.dim() == 4:
        return a.flatten(2)
    raise ValueError(
        f"layer {layer!r} has activations of shape {tuple(a.shape)}; "
        "expected (B, F), (B, N, D) or (B, C, H, W)"
    )


def class_logit(index: int | Sequence[int]) -> Objective:
    """The model output (logits ``(B, K)``) at class ``index``.

    ``index`` is one class for every image or one class per image (length ``B``), which
    optimizes all classes in one batch.
    """

    def fn(acts: Activations) -> Tensor:
        out = _get(acts, MODEL_OUTPUT)
        if out.dim() != 2:
            raise ValueError(f"class_logit needs a (B, K) model output, got {tuple(out.shape)}")
        idx = _indices(index, out.shape[0], out.shape[1], "class", "output", out.device)
        return out.gather(1, idx[:, None])[:, 0]

    return Objective(fn, (), True, f"class_logit({_describe(index)})")


def neuron(
    layer: str, channel: int | Sequence[int], y: int | None = None, x: int | None = None
) -> Objective:
    """One unit: ``a[b, channel, y, x]`` of a conv map, ``a[b, channel]`` of a Linear output.

    For ``(B, C, H, W)`` maps ``y`` indexes the height and ``x`` the width; the default is the
    center ``(H // 2, W // 2)``. For tokens ``(B, N, D)``, ``x`` is the token (default 0, the
    class token of a ViT) and ``y`` must be None; for ``(B, F)`` both must be None.
    """

    def fn(acts: Activations) -> Tensor:
        a = _get(acts, layer)
        batch = a.shape[0]
        if a.dim() == 2:
            if y is not None or x is not None:
                raise ValueError(f"layer {layer!r} is (B, F): a neuron there takes no y/x")
            idx = _indices(channel, batch, a.shape[1], "channel", layer, a.device)
            return a.gather(1, idx[:, None])[:, 0]
        if a.dim() == 3:
            if y is not None:
                raise ValueError(f"layer {layer!r} is tokens (B, N, D): give the token as x")
            token = 0 if x is None else x
            _check_position(token, a.shape[1], "token", layer)
            idx = _indices(channel, batch, a.shape[2], "channel", layer, a.device)
            return a[:, token, :].gather(1, idx[:, None])[:, 0]
        if a.dim() == 4:
            height, width = a.shape[2], a.shape[3]
            row = height // 2 if y is None else y
            col = width // 2 if x is None else x
            _check_position(row, height, "y", layer)
            _check_position(col, width, "x", layer)
            idx = _indices(channel, batch, a.shape[1], "channel", layer, a.device)
            return a[:, :, row, col].gather(1, idx[:, None])[:, 0]
        _channel_axis_view(a, layer)  # raises with the shape
        raise AssertionError("unreachable")

    where = "" if y is None and x is None else f", y={y}, x={x}"
    return Objective(fn, (layer,), False, f"neuron({layer!r}, {_describe(channel)}{where})")


def _check_position(value: int, size: int, what: str, layer: str) -> None:
    if not 0 <= value < size:
        raise ValueError(
            f"{what}={value} out of range for layer {layer!r} (size {size}: 0..{size - 1})"
        )


def channel(layer: str, channel: int | Sequence[int]) -> Objective:
    """Mean of one channel over all positions (a feature map, or one Linear feature).

    ``channel`` is one channel for every image or one per image (length ``B``).
    """

    def fn(acts: Activations) -> Tensor:
        view = _channel_axis_view(_get(acts, layer), layer)
        idx = _indices(channel, view.shape[0], view.shape[1], "channel", layer, view.device)
        picked = view.gather(1, idx[:, None, None].expand(-1, 1, view.shape[2]))
        return picked[:, 0, :].mean(dim=1)

    return Objective(fn, (layer,), False, f"channel({layer!r}, {_describe(channel)})")


def layer_l2(layer: str) -> Objective:
    """DeepDream: the mean square of all activations of ``layer``, per image."""

    def fn(acts: Activations) -> Tensor:
        a = _get(acts, layer)
        return a.flatten(1).pow(2).mean(dim=1)

    return Objective(fn, (layer,), False, f"layer_l2({layer!r})")


def direction(layer: str, vector: Tensor) -> Objective:
    """Projection of each position's channel vector on the unit ``vector``, averaged.

    ``vector`` is ``(C,)`` for every image or ``(B, C)`` one per image.
    """
    if vector.dim() not in (1, 2):
        raise ValueError(f"direction vector must be (C,) or (B, C), got {tuple(vector.shape)}")
    unit = vector / vector.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def fn(acts: Activations) -> Tensor:
        view = _channel_axis_view(_get(acts, layer), layer)
        if unit.shape[-1] != view.shape[1]:
            raise ValueError(
                f"direction has {unit.shape[-1]} channels, layer {layer!r} has {view.shape[1]}"
            )
        v = unit.to(device=view.device, dtype=view.dtype)
        v = v.expand(view.shape[0], -1) if v.dim() == 1 else v
        if v.shape[0] != view.shape[0]:
            raise ValueError(f"{v.shape[0]} direction vectors for a batch of {view.shape[0]}")
        return torch.einsum("bcp,bc->bp", view, v).mean(dim=1)

    return Objective(fn, (layer,), False, f"direction({layer!r})")


def representation_match(layer: str, target: Tensor) -> Objective:
    """Mahendran & Vedaldi's normalized data term, negated: ``-‖Φ(x) − Φ₀‖² / ‖Φ₀‖²``.

    ``target`` is ``Φ₀`` with the layer's per-image shape, batch ``B`` or 1 (broadcast).
    """
    flat_target = target.detach().flatten(1)
    norm2 = flat_target.pow(2).sum(dim=1).clamp_min(1e-12)

    def fn(acts: Activations) -> Tensor:
        a = _get(acts, layer)
        if tuple(a.shape[1:]) != tuple(target.shape[1:]):
            raise ValueError(
                f"representation target for {layer!r} has shape {tuple(target.shape[1:])}, "
                f"the layer gives {tuple(a.shape[1:])}"
            )
        t = flat_target.to(device=a.device, dtype=a.dtype)
        n = norm2.to(device=a.device, dtype=a.dtype)
        return -(a.flatten(1) - t).pow(2).sum(dim=1) / n

    return Objective(fn, (layer,), False, f"representation_match({layer!r})")


def per_image(objectives: Sequence[Objective]) -> Objective:
    """Image ``k`` of the batch scored by ``objectives[k]`` (length ``B``).

    Used to batch different layers (caricatures, inversions at several depths) in one pass;
    each objective sees a batch of one, its own image.
    """
    objs = tuple(objectives)
    if not objs:
        raise ValueError("per_image needs at least one objective")

    def fn(acts: Activations) -> Tensor:
        batch = next(iter(acts.values())).shape[0]
        if batch != len(objs):
            raise ValueError(f"per_image has {len(objs)} objectives for a batch of {batch}")
        scores = [obj({n: t[k : k + 1] for n, t in acts.items()}) for k, obj in enumerate(objs)]
        return torch.cat(scores)

    layers = tuple(dict.fromkeys(n for obj in objs for n in obj.layers))
    return Objective(fn, layers, any(o.uses_output for o in objs), f"per_image({len(objs)})")
