"""The input-optimization loop: Adam on an image parametrization, batched over targets.

One step = images from the parametrization → random transforms (one draw per image) → the
model's normalization → ONE forward pass of the whole batch → objective (per image, maximized)
minus regularizers (per image) → ONE backward pass → Adam step → projection.

What the loop guarantees (failure modes seen in peer libraries):

* only the modules the objective and the regularizers name are hooked, through
  :func:`~deepscope.analysis.hooks.capture_activations` with ``clone=True`` (an in-place ReLU
  after a captured layer cannot corrupt it; such overwrites are reported in ``warnings``); a
  module called twice in one pass raises; all hooks are removed in ``finally``;
* the model's parameters are frozen (``requires_grad_(False)``, no weight gradients) and its
  train/eval modes are restored afterwards, also when the run raises (e.g. in ``progress``);
* the device is the model's (no import-time choice); random draws come from explicit generators;
* dead ReLUs: for the first ``redirect_relu_steps`` steps every ``nn.ReLU`` passes a redirected
  gradient (Lucid/captum's RedirectedReLU) through temporary hooks, removed afterwards;
* when neither the objective nor a regularizer needs the model output, the forward pass stops
  once the last needed activation is captured (after a first full pass that checks the model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from deepscope.analysis.hooks import Capture, Where, capture_activations, eval_mode
from deepscope.analysis.normalization import ChannelNormalization
from deepscope.analysis.optimize.objectives import MODEL_OUTPUT, Objective
from deepscope.analysis.optimize.param import ImageParam
from deepscope.analysis.optimize.regularizers import Regularizer, input_statistics
from deepscope.analysis.optimize.rng import Generators, RandomSource
from deepscope.analysis.optimize.transforms import Transform, apply_transforms, default_transforms

__all__ = [
    "MAX_STEPS",
    "Normalize",
    "OptimizationResult",
    "Progress",
    "Schedule",
    "frozen",
    "make_normalizer",
    "model_device",
    "optimize",
    "score_images",
]

MAX_STEPS = 10_000
"""Default upper bound on ``steps`` (a guard against runaway jobs)."""
#: Seconds between progress reports at most (when steps are slow).
_REPORT_EVERY_S = 1.0

Normalize = Callable[[Tensor], Tensor] | tuple[Sequence[float], Sequence[float]] | None
"""The model's input normalization: a function, ``(mean, std)`` per channel, or None."""

Progress = Callable[[float, float], None]
"""``progress(fraction_done, mean_objective)``."""


class Schedule(StrEnum):
    """The learning-rate schedule over the steps."""

    CONSTANT = "constant"
    COSINE = "cosine"


@dataclass(frozen=True)
class OptimizationResult:
    """What :func:`optimize` returns (all tensors on the CPU, float32 unless noted).

    Attributes:
        images: ``(B, C, H, W)`` in [0, 1], the final parametrized images (no transforms).
        history: ``(steps, B)`` the objective at every step (on the transformed images).
        penalty_history: ``(steps, B)`` the weighted sum of the regularizers at every step.
        initial_objective: ``(B,)`` the objective at the first step (``history[0]``: the
            initial images, transformed).
        final_objective: ``(B,)`` the objective of the final images, untransformed.
        predicted_class: ``(B,)`` int64, the model's argmax on the final images.
        warnings: what the user should know (in-place overwrites, early stop on NaN).
    """

    images: Tensor
    history: Tensor
    penalty_history: Tensor
    initial_objective: Tensor
    final_objective: Tensor
    predicted_class: Tensor
    warnings: list[str] = field(default_factory=list)


def model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``model``'s first parameter or buffer (CPU float32)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device, torch.float32
    return torch.device("cpu"), torch.float32


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad_(False)`` on every parameter; each flag restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def make_normalizer(normalize: Normalize, channels: int) -> Callable[[Tensor], Tensor]:
    """A function ``(B, C, H, W) → (B, C, H, W)`` from :data:`Normalize`.

    Raises:
        ValueError: mean/std lengths are neither 1 nor ``channels``, or a std is not positive.
    """
    if normalize is None:
        return lambda x: x
    if callable(normalize):
        return normalize
    mean, std = normalize
    return ChannelNormalization.of(mean, std, channels).normalize


def _output_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(f"the model returned {type(out).__name__}, not a tensor")


def _predicted(out: Tensor) -> Tensor:
    if out.dim() < 2:
        return torch.full((out.shape[0],), -1, dtype=torch.long)
    return out.detach().flatten(1).argmax(dim=1).cpu()


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose gradient, for an image where the true ReLU gradient is all zero, lets through
    the gradient components that would push negative inputs up (Lucid/captum's RedirectedReLU).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        relu_grad = grad * (x > 0).to(grad.dtype)
        # Descent moves x by -grad: where x < 0 keep only grad < 0 (it raises x towards 0).
        redirected = torch.where((x < 0) & (grad > 0), torch.zeros_like(grad), grad)
        if grad.dim() == 0:
            return relu_grad if bool(relu_grad != 0) else redirected
        dead = relu_grad.flatten(1).abs().amax(dim=1) == 0
        dead = dead.reshape(-1, *([1] * (grad.dim() - 1)))
        return torch.where(dead, redirected, relu_grad)


def _redirect_relus(model: nn.Module) -> list[RemovableHandle]:
    """Temporary hooks making every ``nn.ReLU`` of ``model`` a redirected ReLU."""
    handles: list[RemovableHandle] = []
    for module in model.modules():
        if not isinstance(module, nn.ReLU):
            continue
        pending: list[Tensor] = []

        def pre_hook(
            m: nn.Module, args: tuple[Any, ...], _pending: list[Tensor] = pending
        ) -> tuple[Any, ...] | None:
            if not args or not isinstance(args[0], Tensor):
                return None
            _pending.append(args[0])
            # An in-place ReLU would overwrite the input we need: let it work on a copy.
            if getattr(m, "inplace", False):
                return (args[0].clone(), *args[1:])
            return None

        def hook(
            _m: nn.Module, _args: tuple[Any, ...], _out: Any, _pending: list[Tensor] = pending
        ) -> Tensor | None:
            if not _pending:
                return None
            x = _pending.pop()
            out: Tensor = _RedirectedReLU.apply(x)
            return out

        handles.append(module.register_forward_pre_hook(pre_hook, prepend=True))
        # prepend: capture hooks on the same ReLU see the redirected output.
        handles.append(module.register_forward_hook(hook, prepend=True))
    return handles


def _remove_all(handles: Sequence[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _statistics_hooks(
    model: nn.Module, names: Sequence[str], stats: dict[str, tuple[Tensor, Tensor]]
) -> list[RemovableHandle]:
    """Pre-hooks storing each named module's input statistics in ``stats`` (4-D inputs)."""
    modules = dict(model.named_modules())
    handles: list[RemovableHandle] = []
    for name in names:

        def pre_hook(
            _m: nn.Module, args: tuple[Any, ...], _name: str = name
        ) -> tuple[Any, ...] | None:
            if not args or not isinstance(args[0], Tensor) or args[0].dim() != 4:
                return None
            x, mean, var = input_statistics(args[0])
            stats[_name] = (mean, var)
            return (x, *args[1:])

        handles.append(modules[name].register_forward_pre_hook(pre_hook))
    return handles


class _StopForwardError(Exception):
    """Raised inside a hook once every needed activation is captured."""


def _early_stop_hooks(
    model: nn.Module,
    outputs: Capture,
    out_names: Sequence[str],
    inputs: Capture,
    in_names: Sequence[str],
    enabled: list[bool],
) -> list[RemovableHandle]:
    modules = dict(model.named_modules())
    handles: list[RemovableHandle] = []

    def check() -> None:
        if (
            enabled[0]
            and all(n in outputs for n in out_names)
            and all(n in inputs for n in in_names)
        ):
            raise _StopForwardError

    for name in out_names:
        handles.append(modules[name].register_forward_hook(lambda *_: check()))
    for name in in_names:
        handles.append(modules[name].register_forward_pre_hook(lambda *_: check()))
    return handles


def _check_steps(steps: int, max_steps: int) -> None:
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if steps > max_steps:
        raise ValueError(f"steps={steps} is above the maximum of {max_steps}")


def _inplace_warnings(capture: Capture) -> list[str]:
    return [
        f"the activation of {name!r} is overwritten in place later in the forward pass "
        "(an in-place ReLU or +=); the value at capture time was used"
        for name in capture.modified_in_place()
    ]


def score_images(
    model: nn.Module,
    objective: Objective,
    images: Tensor,
    *,
    normalize: Normalize = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Objective ``(B,)`` and predicted class ``(B,)`` of ``images`` ``(B, C, H, W)`` in [0, 1].

    No gradients, no transforms; hooks only on the objective's layers, removed on exit.
    Returns ``(scores, predicted_class, warnings)`` (CPU tensors).
    """
    device, dtype = model_device(model)
    norm = make_normalizer(normalize, images.shape[1])
    with (
        eval_mode(model),
        torch.no_grad(),
        capture_activations(model, objective.layers, Where.OUTPUT, clone=True) as cap,
    ):
        out = _output_tensor(model(norm(images.to(device=device, dtype=dtype))))
        acts: dict[str, Tensor] = {n: cap[n] for n in objective.layers}
        acts[MODEL_OUTPUT] = out
        scores = objective(acts).float().cpu()
        return scores, _predicted(out), _inplace_warnings(cap)


def optimize(
    model: nn.Module,
    objective: Objective,
    param: ImageParam,
    *,
    steps: int,
    lr: float = 0.05,
    schedule: Schedule | str = Schedule.CONSTANT,
    transforms: Sequence[Transform] | None = None,
    regularizers: Sequence[Regularizer] = (),
    normalize: Normalize = None,
    generator: Generators = None,
    progress: Progress | None = None,
    redirect_relu_steps: int = 0,
    max_steps: int = MAX_STEPS,
) -> OptimizationResult:
    """Maximize ``objective − Σ regularizers`` over the images of ``param`` with Adam.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)``; it runs where its parameters are.
        objective: per-image score to maximize; only its layers are hooked.
        param: the images ``(B, C, H, W)``; moved to the model's device (in place).
        steps: optimizer steps, ``1..max_steps``.
        lr: Adam learning rate.
        schedule: constant (Lucent), or cosine decay to 0 (converges precisely: inversion).
        transforms: random transforms applied each step, one draw per image; None → the
            size-scaled :func:`default_transforms`, ``()`` → none.
        regularizers: per-image penalties on the (untransformed) images; those with
            ``layers`` (the batch-norm prior) also read per-image statistics of those layers'
            inputs, computed in pre-hooks during the same forward pass.
        normalize: the model's input normalization, applied after the transforms.
        generator: the transforms' random source (one generator, or one per image).
        progress: called as ``progress(fraction_done, mean_objective)``: ``(0, nan)`` when the
            first step starts, then after the first step, about 100 times in all, and at least
            every second; an exception it raises aborts the run (hooks removed, model
            restored).
        redirect_relu_steps: use redirected ReLU gradients for this many first steps.
        max_steps: the largest ``steps`` accepted.

    Raises:
        ValueError: ``steps`` out of range, ``lr`` not positive, an unknown layer (the message
            lists the valid ones), a channel out of range, a module called twice.
    """
    _check_steps(steps, max_steps)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}")
    device, dtype = model_device(model)
    param.to(device)
    batch, channels, height, width = param.shape
    chain = default_transforms(height, width) if transforms is None else list(transforms)
    norm = make_normalizer(normalize, channels)
    rng = RandomSource(generator, batch)
    out_names = list(objective.layers)
    in_names = list(dict.fromkeys(n for r in regularizers for n in r.layers))
    needs_output = objective.uses_output
    warnings: list[str] = []

    try:
        cosine = Schedule(schedule) is Schedule.COSINE
    except ValueError:
        valid = ", ".join(s.value for s in Schedule)
        raise ValueError(f"unknown schedule {schedule!r}; valid: {valid}") from None
    optimizer = torch.optim.Adam(param.parameters(), lr=lr)
    history = torch.zeros(steps, batch, device=device)
    penalties = torch.zeros(steps, batch, device=device)
    every = max(1, steps // 100)
    reported = time.monotonic()
    done = steps
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        stack.enter_context(frozen(model))
        outputs = stack.enter_context(
            capture_activations(model, out_names, Where.OUTPUT, clone=True)
        )
        # The regularizers read statistics of their layers' inputs, computed in a pre-hook that
        # also passes the input on (see input_statistics); the capture, without a copy, only
        # checks that each layer runs once and that its input is not overwritten in place.
        inputs = stack.enter_context(capture_activations(model, in_names, Where.INPUT, clone=False))
        stats: dict[str, tuple[Tensor, Tensor]] = {}
        hooks: list[RemovableHandle] = []
        stack.callback(_remove_all, hooks)  # before any is registered: none can leak
        hooks += _statistics_hooks(model, in_names, stats)
        early = [False]
        if not needs_output:
            # Registered after the statistics hooks, so these run last on a shared layer.
            hooks += _early_stop_hooks(model, outputs, out_names, inputs, in_names, early)
        redirect = _redirect_relus(model) if redirect_relu_steps > 0 else []
        hooks += redirect
        if progress is not None:
            progress(0.0, math.nan)  # everything checked: the optimization starts
        for step in range(steps):
            if step == redirect_relu_steps:
                for h in redirect:
                    h.remove()
            outputs.reset()
            inputs.reset()
            stats.clear()
            images = param()
            x = norm(apply_transforms(images, chain, rng).to(dtype))
            out: Tensor | None = None
            with suppress(_StopForwardError):
                out = _output_tensor(model(x))
            acts: dict[str, Tensor] = {n: outputs[n] for n in out_names}
            if out is not None:
                acts[MODEL_OUTPUT] = out
            score = objective(acts).float()
            overwritten = inputs.modified_in_place()
            if overwritten:
                raise ValueError(
                    f"the input of {overwritten[0]!r} is overwritten in place during the forward "
                    "pass, so a regularizer cannot read it; switch that regularizer off"
                )
            penalty = torch.zeros_like(score)
            for regularizer in regularizers:
                penalty = penalty + regularizer(images, stats).float()
            if cosine:
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward((penalty - score).sum())
            optimizer.step()
            param.constrain_()
            history[step] = score.detach()
            penalties[step] = penalty.detach()
            warnings += _inplace_warnings(outputs)
            # The first pass ran in full, so a reused module has been detected by now.
            early[0] = True
            checkpoint = (step + 1) % every == 0 or step + 1 == steps
            # Also after the first step and at least every _REPORT_EVERY_S: a model whose steps
            # take seconds shows that it is optimizing, and how far along.
            due = progress is not None and (
                step == 0 or time.monotonic() - reported >= _REPORT_EVERY_S
            )
            if checkpoint or due:
                mean = float(score.detach().mean())
                if checkpoint and not math.isfinite(mean):
                    warnings.append(f"the objective became non-finite at step {step + 1}; stopped")
                    done = step + 1
                    break
                if progress is not None:
                    progress((step + 1) / steps, mean)
                    reported = time.monotonic()

    final_images = param().detach()
    final, predicted, messages = score_images(model, objective, final_images, normalize=norm)
    warnings = list(dict.fromkeys(warnings + messages))
    history_cpu = history[:done].float().cpu()
    return OptimizationResult(
        images=final_images.float().cpu(),
        history=history_cpu,
        penalty_history=penalties[:done].float().cpu(),
        initial_objective=history_cpu[0].clone(),
        final_objective=final,
        predicted_class=predicted,
        warnings=warnings,
    )
