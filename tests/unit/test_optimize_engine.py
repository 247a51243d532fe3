"""The optimization loop: hooks, freezing, modes, in-place and reused modules, dead ReLUs,
batch-norm prior, non-square neurons, validation."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from deepscope.analysis.optimize import (
    MAX_STEPS,
    PixelParam,
    batchnorm_prior,
    channel,
    class_logit,
    image_param,
    neuron,
    optimize,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cnn(inplace: bool = False, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: OrderedDict[str, nn.Module] = OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1))
    if bn:
        layers["bn"] = nn.BatchNorm2d(4)
    layers["relu"] = nn.ReLU(inplace=inplace)
    layers["pool"] = nn.AdaptiveAvgPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(16, 3)
    return nn.Sequential(layers)


def _assert_clean(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name
        assert not getattr(module, "_backward_pre_hooks", {}), name


def test_hooks_flags_and_modes_restored_after_a_raising_run() -> None:
    model = _cnn(inplace=True, bn=True)
    model.train()
    model[-1].eval()
    model[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    seen: list[bool] = []

    def progress(_f: float, _o: float) -> None:
        # During the run the model is frozen and in eval mode.
        seen.append(any(p.requires_grad for p in model.parameters()) or model.training)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        optimize(
            model,
            channel("conv", 1) + class_logit(0),
            image_param("fft", (2, 1, 8, 8)),
            steps=5,
            regularizers=[batchnorm_prior(model, 0.1)],
            redirect_relu_steps=3,
            progress=progress,
        )
    assert seen == [False]
    _assert_clean(model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    for p in model.parameters():
        assert p.grad is None  # no weight gradients were computed


def test_steps_and_lr_validation() -> None:
    model = _cnn()
    param = image_param("pixel", (1, 1, 8, 8))
    for steps in (0, -3, MAX_STEPS + 1):
        with pytest.raises(ValueError, match="steps"):
            optimize(model, class_logit(0), param, steps=steps)
    with pytest.raises(ValueError, match="steps=11 is above the maximum of 10"):
        optimize(model, class_logit(0), param, steps=11, max_steps=10)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        optimize(model, class_logit(0), param, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="normalization mean has 2 values for 1 channels"):
        optimize(model, class_logit(0), param, steps=1, normalize=((0.1, 0.2), (1.0,)))
    _assert_clean(model)


def test_unknown_layer_lists_valid_names_and_channel_out_of_range() -> None:
    model = _cnn()
    param = image_param("pixel", (1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"unknown layer.*'conv9'.*valid layers are: conv, relu"):
        optimize(model, channel("conv9", 0), param, steps=1)
    with pytest.raises(ValueError, match="channel 4 out of range for layer 'conv' with 4"):
        optimize(model, channel("conv", 4), param, steps=1)
    with pytest.raises(ValueError, match="class 3 out of range"):
        optimize(model, class_logit(3), param, steps=1)
    _assert_clean(model)


def test_objective_rises_for_every_image() -> None:
    model = _cnn()
    result = optimize(
        model,
        class_logit([0, 1, 2]),
        image_param("fft", (3, 1, 12, 12), generator=_gen()),
        steps=30,
        generator=_gen(),
    )
    assert result.history.shape == (30, 3)
    assert (result.final_objective > result.initial_objective).all()
    assert result.images.shape == (3, 1, 12, 12)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert result.predicted_class.shape == (3,)


def test_inplace_relu_gives_the_same_run_as_a_non_inplace_twin_and_warns() -> None:
    runs = {}
    for inplace in (False, True):
        model = _cnn(inplace=inplace)
        runs[inplace] = optimize(
            model,
            channel("conv", [0, 2]),
            image_param("pixel", (2, 1, 8, 8), generator=_gen()),
            steps=10,
            generator=_gen(),
        )
    assert torch.allclose(runs[True].history, runs[False].history)
    assert torch.allclose(runs[True].images, runs[False].images)
    assert runs[False].warnings == []
    assert any("'conv' is overwritten in place" in w for w in runs[True].warnings)
    # The pre-ReLU conv output goes negative: the in-place ReLU's zeros were not used.
    assert (runs[True].history < 0).any()


def test_a_reused_module_raises_clearly() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 2), nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.act(self.fc2(self.act(self.fc1(x.flatten(1)))))
            return out

    model = Reuse()
    with pytest.raises(ValueError, match="'act' is called 2 times in one forward pass"):
        optimize(model, channel("act", 0), image_param("pixel", (1, 1, 2, 2)), steps=3)
    _assert_clean(model)


def test_redirected_relu_revives_a_dead_unit_and_is_removed() -> None:
    fc = nn.Linear(4, 1)
    model = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=fc, relu=nn.ReLU(inplace=True)))
    with torch.no_grad():
        fc.weight.fill_(4.0)
        fc.bias.fill_(-10.0)  # dead at the gray start (4 * 4 * 0.5 - 10 = -2)
    stalled = optimize(
        model, neuron("relu", 0), PixelParam((1, 1, 2, 2)), steps=60, lr=0.1, transforms=()
    )
    revived = optimize(
        model,
        neuron("relu", 0),
        PixelParam((1, 1, 2, 2)),
        steps=60,
        lr=0.1,
        transforms=(),
        redirect_relu_steps=30,
    )
    assert stalled.final_objective.item() == 0.0
    assert revived.final_objective.item() > 1.0
    _assert_clean(model)


def test_neuron_at_y_x_on_a_non_square_input() -> None:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    model = nn.Sequential(OrderedDict(conv=conv))
    with torch.no_grad():
        conv.weight.fill_(1.0)  # identity: the map is the image
    result = optimize(
        model,
        neuron("conv", 0, y=3, x=21),
        PixelParam((1, 1, 20, 28), generator=_gen()),
        steps=20,
        transforms=(),
    )
    flat = int(result.images[0, 0].argmax())
    assert divmod(flat, 28) == (3, 21)


def test_batchnorm_prior_is_finite_and_decreases() -> None:
    model = _cnn(bn=True)
    conv, bn = model[0], model[1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        # Statistics of uniform noise images: reachable, far from the gray start.
        noise = conv(torch.rand(64, 1, 10, 10, generator=_gen(3)))
        bn.running_var.copy_(noise.var(dim=(0, 2, 3)))
        bn.running_mean.copy_(noise.mean(dim=(0, 2, 3)))
    result = optimize(
        model,
        0.0 * class_logit(0),
        image_param("pixel", (2, 1, 10, 10), generator=_gen()),
        steps=40,
        lr=0.1,
        transforms=(),
        regularizers=[batchnorm_prior(model, 1.0)],
    )
    penalty = result.penalty_history
    assert torch.isfinite(penalty).all()
    assert (penalty[-5:].mean(0) < 0.7 * penalty[0]).all()


def test_early_stop_matches_a_full_forward() -> None:
    # An objective on an early layer stops the forward pass once it and the batch-norm inputs
    # are captured; a zero-weighted use of the output forces full passes: the runs must agree.
    model = _cnn(bn=True)
    runs = []
    for objective in (channel("conv", 1), channel("conv", 1) + 0.0 * class_logit(0)):
        runs.append(
            optimize(
                model,
                objective,
                PixelParam((1, 1, 8, 8), generator=_gen()),
                steps=8,
                regularizers=[batchnorm_prior(model, 0.5)],
                generator=_gen(),
            )
        )
    assert torch.allclose(runs[0].images, runs[1].images)
    assert torch.allclose(runs[0].penalty_history, runs[1].penalty_history)
    assert (runs[0].penalty_history > 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_models_device() -> None:
    model = _cnn(bn=True).cuda()
    result = optimize(
        model,
        class_logit([0, 1]),
        image_param("fft", (2, 1, 8, 8), generator=_gen()),
        steps=5,
        regularizers=[batchnorm_prior(model, 0.1)],
        generator=_gen(),
    )
    assert result.images.device.type == "cpu" and torch.isfinite(result.history).all()
    _assert_clean(model)
