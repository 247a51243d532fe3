"""Known answers for the parts of input optimization: objectives, parametrizations,
transforms (one draw per image, no x/y swap) and regularizers."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch

from deepscope.analysis.optimize import (
    MODEL_OUTPUT,
    AlphaNorm,
    Blur,
    FFTParam,
    Jitter,
    LowResParam,
    Objective,
    Pad,
    PixelParam,
    RandomRotate,
    RandomSource,
    Squash,
    TotalVariation,
    apply_transforms,
    channel,
    class_logit,
    default_transforms,
    direction,
    image_param,
    layer_l2,
    neuron,
    per_image,
    representation_match,
    target_generators,
)
from deepscope.analysis.optimize.param import _spectrum_scale
from deepscope.analysis.optimize.regularizers import (
    BatchNormPrior,
    BlurPenalty,
    batchnorm_prior,
    input_statistics,
)
from deepscope.analysis.optimize.transforms import AffineTransform


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- objectives ---------------------------------------------------------------------------


def test_class_logit_one_index_per_image() -> None:
    out = torch.arange(12.0).reshape(3, 4)
    assert class_logit([1, 0, 3])({MODEL_OUTPUT: out}).tolist() == [1.0, 4.0, 11.0]
    assert class_logit(2)({MODEL_OUTPUT: out}).tolist() == [2.0, 6.0, 10.0]
    assert class_logit(2).uses_output and class_logit(2).layers == ()


def test_neuron_on_non_square_map_indexes_row_then_column() -> None:
    a = torch.zeros(2, 3, 20, 28)
    a[0, 1, 3, 25] = 7.0  # y = 3 (height), x = 25 (width)
    a[1, 2, 10, 14] = 5.0  # the center (20 // 2, 28 // 2)
    assert neuron("l", [1, 1], y=3, x=25)({"l": a}).tolist() == [7.0, 0.0]
    assert neuron("l", 2)({"l": a}).tolist() == [0.0, 5.0]
    with pytest.raises(ValueError, match="y=20 out of range"):
        neuron("l", 0, y=20, x=0)({"l": a})
    with pytest.raises(ValueError, match="x=28 out of range"):
        neuron("l", 0, y=0, x=28)({"l": a})


def test_neuron_and_channel_on_linear_and_token_outputs() -> None:
    linear = torch.arange(10.0).reshape(2, 5)
    assert neuron("fc", [4, 0])({"fc": linear}).tolist() == [4.0, 5.0]
    assert channel("fc", 3)({"fc": linear}).tolist() == [3.0, 8.0]
    with pytest.raises(ValueError, match="takes no y/x"):
        neuron("fc", 0, y=1)({"fc": linear})
    tokens = torch.arange(24.0).reshape(2, 3, 4)  # (B, N, D)
    assert channel("t", 1)({"t": tokens}).tolist() == [5.0, 17.0]  # mean over tokens of d=1
    assert neuron("t", 1, x=2)({"t": tokens}).tolist() == [9.0, 21.0]


def test_channel_mean_per_image_channels_and_range_errors() -> None:
    a = torch.randn(2, 4, 5, 6)
    got = channel("c", [3, 1])({"c": a})
    assert torch.allclose(got, torch.stack([a[0, 3].mean(), a[1, 1].mean()]))
    with pytest.raises(ValueError, match="channel 4 out of range for layer 'c' with 4"):
        channel("c", 4)({"c": a})
    with pytest.raises(ValueError, match="3 channel indices given for a batch of 2"):
        channel("c", [0, 1, 2])({"c": a})


def test_layer_l2_direction_and_representation_match_values() -> None:
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    assert layer_l2("a")({"a": a}).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    # direction (0, 2) normalizes to (0, 1): the mean of channel 1.
    assert direction("a", torch.tensor([0.0, 2.0]))({"a": a}).item() == pytest.approx(3.5)
    target = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])
    expected = -((0 + 1 + 4 + 9) / 4)
    assert representation_match("a", target)({"a": a}).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="representation target"):
        representation_match("a", torch.zeros(1, 3))({"a": a})


def test_objective_arithmetic_and_layers() -> None:
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    acts = {"a": a, "b": b, MODEL_OUTPUT: a}
    ca, cb = channel("a", 1), channel("b", 2)
    combined = 2.0 * ca - cb / 2 + class_logit(0)
    expected = 2 * a[:, 1] - b[:, 2] / 2 + a[:, 0]
    assert torch.allclose(combined(acts), expected)
    assert combined.layers == ("a", "b") and combined.uses_output
    total = cast(Objective, sum([ca, cb]))
    assert torch.allclose(total(acts), a[:, 1] + b[:, 2])
    assert torch.allclose((-ca)(acts), -a[:, 1])


def test_per_image_scores_each_image_with_its_objective() -> None:
    acts = {"a": torch.randn(2, 3), "b": torch.randn(2, 5)}
    obj = per_image([channel("a", 2), channel("b", 4)])
    assert obj.layers == ("a", "b")
    assert torch.allclose(obj(acts), torch.stack([acts["a"][0, 2], acts["b"][1, 4]]))


# --- parametrizations ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 20, 28), (1, 5, 7, 9), (1, 3, 9, 7)])
@pytest.mark.parametrize("squash", [Squash.SIGMOID, Squash.CLAMP])
def test_fft_param_any_size_and_exact_init(
    shape: tuple[int, int, int, int], squash: Squash
) -> None:
    images = 0.1 + 0.8 * torch.rand(shape, generator=_gen())
    param = FFTParam(shape, init=images, squash=squash)
    out = param()
    assert out.shape == shape
    assert torch.allclose(out, images, atol=1e-5)
    random = FFTParam(shape, squash=squash, generator=_gen())()
    assert random.shape == shape and random.min() >= 0 and random.max() <= 1


def test_fft_param_decorrelates_only_three_channels() -> None:
    assert FFTParam((1, 3, 8, 8)).decorrelate
    assert not FFTParam((1, 1, 8, 8)).decorrelate
    assert not FFTParam((1, 4, 8, 8)).decorrelate
    assert not FFTParam((1, 3, 8, 8), decorrelate=False).decorrelate


def test_spectrum_scale_is_one_over_frequency() -> None:
    scale = _spectrum_scale(8, 8, 1.0)
    assert scale.shape == (8, 5)
    assert scale[0, 0].item() == pytest.approx(8.0)  # DC: f clamped to 1/8
    assert scale[0, 4].item() == pytest.approx(2.0)  # f = 1/2
    assert scale[4, 4].item() == pytest.approx(1 / math.sqrt(0.5))  # f = sqrt(2)/2


def test_pixel_param_init_and_clamp_projection() -> None:
    images = torch.rand(2, 1, 5, 6, generator=_gen())
    assert torch.allclose(PixelParam(images.shape, init=images, squash="clamp")(), images)  # type: ignore[arg-type]
    assert torch.allclose(PixelParam(images.shape, init=images)(), images.clamp(1e-3, 1 - 1e-3))  # type: ignore[arg-type]
    param = PixelParam((1, 1, 2, 2), init=torch.zeros(1, 1, 2, 2), squash="clamp")
    param().sum().backward()
    # Straight-through at the bound: a pixel on 0 still receives gradient and can move back.
    assert param.pixels.grad is not None and (param.pixels.grad == 1).all()
    with torch.no_grad():
        param.pixels.add_(-0.5)
    param.constrain_()
    assert (param.pixels == 0).all()


def test_param_seeds_per_image_generators_and_errors() -> None:
    a = image_param("fft", (2, 3, 8, 8), generator=_gen(1))()
    b = image_param("fft", (2, 3, 8, 8), generator=_gen(1))()
    assert torch.equal(a, b)
    gens = target_generators(0, [4, 7])
    pair = image_param("pixel", (2, 1, 4, 4), generator=gens)()
    alone = image_param("pixel", (1, 1, 4, 4), generator=target_generators(0, [7]))()
    assert torch.equal(pair[1:], alone)  # image 7's start ignores who shares its batch
    with pytest.raises(ValueError, match="unknown parametrization 'dct'; valid: pixel, fft"):
        image_param("dct", (1, 1, 4, 4))
    with pytest.raises(ValueError, match="init images have shape"):
        image_param("fft", (1, 1, 4, 4), init=torch.zeros(1, 1, 4, 5))


def test_low_res_param_upsamples_and_adds_detail() -> None:
    low = PixelParam((1, 1, 2, 3), init=torch.full((1, 1, 2, 3), 0.25), squash="clamp")
    detail = torch.zeros(1, 1, 4, 6)
    detail[..., 0, 0] = 0.5
    out = LowResParam(low, (4, 6), detail)()
    assert out.shape == (1, 1, 4, 6)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.75)
    assert out[0, 0, 3, 5].item() == pytest.approx(0.25)


# --- transforms ---------------------------------------------------------------------------


class _Shift(AffineTransform):
    """A fixed translation (deterministic: tests the warp geometry)."""

    def __init__(self, dx: float, dy: float) -> None:
        self.dx, self.dy = dx, dy

    def matrices(self, batch: int, height: int, width: int, rng: RandomSource) -> torch.Tensor:
        m = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
        m[:, 0, 2], m[:, 1, 2] = self.dx, self.dy
        return m


def test_warp_shift_moves_content_right_and_down_on_non_square() -> None:
    image = torch.rand(1, 2, 20, 28, generator=_gen())
    out = apply_transforms(image, [_Shift(2.0, 1.0)], RandomSource(_gen(), 1))
    # Content at (y, x) lands at (y + 1, x + 2): no x/y swap.
    assert torch.allclose(out[..., 1:, 2:], image[..., :-1, :-2], atol=1e-5)


def test_rotation_by_180_degrees_flips_a_non_square_image() -> None:
    image = torch.rand(1, 1, 6, 10, generator=_gen())
    out = apply_transforms(image, [RandomRotate(0.0), _Rotate180()], RandomSource(_gen(), 1))
    assert torch.allclose(out, image.flip(2, 3), atol=1e-5)


class _Rotate180(AffineTransform):
    def matrices(self, batch: int, height: int, width: int, rng: RandomSource) -> torch.Tensor:
        return torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)).repeat(batch, 1, 1)


def test_one_random_draw_per_image() -> None:
    image = torch.rand(1, 3, 16, 24, generator=_gen()).repeat(2, 1, 1, 1)
    for transforms in (default_transforms(16, 24), [Jitter(3.0)], [Blur(2.0)]):
        out = apply_transforms(image, transforms, RandomSource(_gen(), 2))
        assert out.shape == image.shape
        assert not torch.allclose(out[0], out[1]), transforms
    again = apply_transforms(image, default_transforms(16, 24), RandomSource(_gen(), 2))
    first = apply_transforms(image, default_transforms(16, 24), RandomSource(_gen(), 2))
    assert torch.equal(first, again)


def test_per_image_generators_make_images_independent_of_the_batch() -> None:
    images = torch.rand(3, 1, 12, 12, generator=_gen())
    gens = target_generators(5, [0, 1, 2])
    batched = apply_transforms(images, default_transforms(12, 12), RandomSource(gens, 3))
    alone = apply_transforms(
        images[2:], default_transforms(12, 12), RandomSource(target_generators(5, [2]), 1)
    )
    assert torch.allclose(batched[2:], alone, atol=1e-6)


def test_pad_fills_the_border_and_keeps_the_size() -> None:
    out = apply_transforms(torch.ones(1, 1, 20, 20), [Pad(5.0, fill=0.5)], RandomSource(None, 1))
    assert out.shape == (1, 1, 20, 20)
    assert out[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert out[0, 0, 10, 10].item() == pytest.approx(1.0)


def test_default_transforms_scale_with_size() -> None:
    pad, jitter, _, _, jitter2 = default_transforms(224, 300)
    assert isinstance(pad, Pad) and pad.pixels == pytest.approx(12)
    assert isinstance(jitter, Jitter) and jitter.pixels == pytest.approx(8)
    assert isinstance(jitter2, Jitter) and jitter2.pixels == pytest.approx(4)
    small = default_transforms(28, 28)[1]
    assert isinstance(small, Jitter) and small.pixels == pytest.approx(1.0)


def test_blur_keeps_constant_images() -> None:
    out = apply_transforms(torch.full((2, 3, 9, 7), 0.3), [Blur(2.0)], RandomSource(None, 2))
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-6)


# --- regularizers -------------------------------------------------------------------------


def test_total_variation_and_alpha_norm_known_values() -> None:
    ramp = torch.arange(4.0).repeat(3, 1)[None, None] * 0.1  # (1, 1, 3, 4), ∂x = 0.1, ∂y = 0
    scale = 0.5 / 6.5
    assert TotalVariation(1.0).penalty(ramp, {}).item() == pytest.approx(0.01 / scale**2)
    tv1 = TotalVariation(1.0, beta=1.0).penalty(ramp, {}).item()
    assert tv1 == pytest.approx(0.1 / scale, rel=1e-4)
    assert AlphaNorm(1.0).penalty(torch.ones(1, 1, 2, 2), {}).item() == pytest.approx(1.0)
    assert AlphaNorm(1.0).penalty(torch.full((1, 1, 2, 2), 0.75), {}).item() == pytest.approx(
        0.5**6
    )
    assert BlurPenalty(1.0).penalty(torch.full((1, 1, 6, 6), 0.2), {}).item() == pytest.approx(0)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        TotalVariation(-1.0)


def test_input_statistics_match_var_mean_and_gradcheck() -> None:
    x = (torch.randn(2, 3, 5, 7, generator=_gen()) * 2 + 1).double().requires_grad_(True)
    out, mean, var = input_statistics(x)
    ref_var, ref_mean = torch.var_mean(x, dim=(2, 3), unbiased=False)
    assert torch.equal(out, x)
    assert torch.allclose(mean, ref_mean) and torch.allclose(var, ref_var)
    assert torch.autograd.gradcheck(input_statistics, (x,))
    # The passed-through output and the statistics both carry gradient.
    weight = torch.randn(2, 3, 5, 7, dtype=torch.float64, generator=_gen(1))

    def mixed(t: torch.Tensor) -> torch.Tensor:
        out, mean, var = input_statistics(t)
        return (out * weight).sum() + mean.sum() + var.sum()

    assert torch.autograd.gradcheck(mixed, (x,))


def test_batchnorm_prior_known_value() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    bn = model[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    bn.running_mean.copy_(torch.tensor([1.0, 2.0]))  # type: ignore[union-attr]
    bn.running_var.copy_(torch.tensor([3.0, 4.0]))  # type: ignore[union-attr]
    prior = batchnorm_prior(model, 1.0)
    assert isinstance(prior, BatchNormPrior) and prior.layers == ("1",)
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0] = 1.0  # channel 0 matches the mean; channel 1: mean 0, var 0
    expected = 10 * (math.hypot(0.0, 2.0) + math.hypot(3.0, 4.0))  # first layer × 10
    _, mean, var = input_statistics(x)
    stats = {"1": (mean, var)}
    assert prior.penalty(torch.zeros(1, 1, 3, 3), stats).item() == pytest.approx(expected)
    # A layer that the pass did not reach contributes nothing.
    assert prior.penalty(torch.zeros(1, 1, 3, 3), {}).item() == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        batchnorm_prior(torch.nn.Linear(2, 2), 1.0)
