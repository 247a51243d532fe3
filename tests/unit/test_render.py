"""deepscope.render: grids that never flatten a panel, markers that are counted, the PNG layout
chunk, the spectra figure (numpy + Pillow) and the matplotlib curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepscope import render
from deepscope.render import (
    AXES_KEY,
    MARKER_CLIPPED,
    MARKER_NONFINITE,
    PANELS_KEY,
    Grid,
    PanelBox,
    Scale,
    SpectrumLine,
    colormap_lut,
    curves_plot,
    image_grid,
    panel_span,
    read_panels,
    spectra_figure,
)
from deepscope.render.grid import write_png
from deepscope.render.scaling import group_limits, robust_limits


def _pixels(grid: Grid, box: PanelBox) -> np.ndarray:
    """(h, w, 3) uint8 pixels of a panel's box."""
    return np.asarray(grid.image.convert("RGB"))[box.y0 : box.y1, box.x0 : box.x1]


def _count_colour(grid: Grid, box: PanelBox, colour: tuple[int, int, int]) -> int:
    return int((_pixels(grid, box) == colour).all(-1).sum())


def _factor(box: PanelBox, data_h: int) -> int:
    """The integer upscale of a single-tile panel with ``data_h`` rows."""
    return (box.y1 - box.y0) // data_h


def _old_bug_panels(rng: np.random.Generator) -> np.ndarray:
    """7 rows × 10 panels of 8×8 within ±0.5, one row within ±1.5e4 (it flattened the rest).

    Uniform values: each panel reaches near its row's extremes, as comparable panels do.
    """
    panels = rng.uniform(-0.5, 0.5, size=(70, 8, 8))
    panels[20:30] = rng.uniform(-1.5e4, 1.5e4, size=(10, 8, 8))
    return panels


@pytest.mark.parametrize("scale", ["panel", "row"])
def test_no_panel_is_flattened_by_a_huge_row(scale: Scale) -> None:
    grid = image_grid(
        list(_old_bug_panels(np.random.default_rng(0))),
        ncols=10,
        row_labels=[f"layer{i}" for i in range(7)],
        scale=scale,
        title="old bug",
    )
    assert len(grid.panels) == 70
    for box in grid.panels:
        assert not box.constant
        assert box.clipped == 0 and box.nonfinite == 0
        assert panel_span(grid, box) >= 0.5, box
    big = grid.panels[25]
    assert big.vmax > 1e3 and grid.panels[0].vmax < 10
    if scale == "row":  # one scale per row: the row's panels share (vmin, vmax)
        assert len({(b.vmin, b.vmax) for b in grid.panels[10:20]}) == 1


@pytest.mark.parametrize("scale", ["panel", "row", "shared"])
def test_one_huge_panel_gets_its_own_scale(scale: Scale) -> None:
    rng = np.random.default_rng(1)
    panels = rng.uniform(-0.5, 0.5, size=(20, 8, 8))
    panels[3] = rng.normal(0.0, 1.5e4, size=(8, 8))
    grid = image_grid(list(panels), ncols=10, scale=scale)
    for box in grid.panels:
        assert panel_span(grid, box) >= 0.5, box
    assert grid.panels[3].scale == ("panel" if scale == "panel" else "own")
    assert grid.panels[3].vmax > 1e3
    assert all(b.vmax < 10 for k, b in enumerate(grid.panels) if k != 3)


def test_a_few_wild_pixels_are_clipped_and_marked() -> None:
    rng = np.random.default_rng(2)
    panel = rng.normal(0.0, 0.5, size=(32, 32))
    spikes = rng.choice(32 * 32, size=12, replace=False)
    panel.flat[spikes] = 1.5e4 * np.sign(rng.normal(size=12))
    other = rng.normal(0.0, 0.5, size=(32, 32))
    grid = image_grid([panel, other], scale="shared")
    box = grid.panels[0]
    assert box.clipped == 12
    assert box.vmax < 10  # the scale follows the bulk, not the spikes
    f = _factor(box, 32)
    assert _count_colour(grid, box, MARKER_CLIPPED) == 12 * f * f
    assert panel_span(grid, box) >= 0.5
    assert panel_span(grid, grid.panels[1]) >= 0.5


def test_a_delta_kernel_is_data_not_an_outlier() -> None:
    kernel = np.full((3, 3), 1e-5)
    kernel[1, 1] = 0.5
    assert robust_limits(kernel.ravel(), signed=True) == (-0.5, 0.5)
    grid = image_grid([kernel])
    assert grid.panels[0].clipped == 0


def test_robust_limits_ignore_spikes_and_groups_flag_outlier_panels() -> None:
    rng = np.random.default_rng(3)
    bulk = rng.uniform(0.0, 1.0, size=1000)
    spiked = np.concatenate([bulk, [1e6, -1e6]])
    lo, hi = robust_limits(spiked, signed=False)
    assert 0.0 <= lo < 0.01 and 0.99 < hi <= 1.0
    m = robust_limits(spiked, signed=True)[1]
    assert 0.99 < m <= 1.0
    (_, ghi), own = group_limits([bulk, bulk * 1e5, bulk * 2], signed=False)
    assert own == [False, True, False]
    assert 1.9 < ghi <= 2.0


def test_constant_panels_are_reported_and_do_not_crash() -> None:
    rng = np.random.default_rng(4)
    for kind in ("signed", "image", "magnitude"):
        grid = image_grid(
            [np.zeros((8, 8)), np.full((8, 8), 0.7), rng.normal(size=(8, 8))],
            kind=kind,
        )
        zero, flat, varied = grid.panels
        assert zero.constant and flat.constant and not varied.constant
        assert panel_span(grid, zero) == 0.0 and panel_span(grid, flat) == 0.0
        assert panel_span(grid, varied) >= 0.5


def test_nonfinite_values_are_counted_and_drawn_in_their_marker() -> None:
    rng = np.random.default_rng(5)
    panel = rng.normal(size=(10, 10))
    panel[0, :3] = np.nan
    panel[5, 5] = np.inf
    panel[9, 9] = -np.inf
    all_nan = np.full((10, 10), np.nan)
    clean = rng.normal(size=(10, 10))
    grid = image_grid([panel, all_nan, clean], scale="shared")
    box, empty, ok = grid.panels
    f = _factor(box, 10)
    assert box.nonfinite == 5 and box.clipped == 0
    assert _count_colour(grid, box, MARKER_NONFINITE) == 5 * f * f
    assert empty.nonfinite == 100 and not empty.constant
    assert ok.nonfinite == 0 and _count_colour(grid, ok, MARKER_NONFINITE) == 0
    # ±inf and NaN never widen anyone's scale.
    assert np.isfinite([box.vmin, box.vmax]).all()
    assert panel_span(grid, box) >= 0.5 and panel_span(grid, ok) >= 0.5


def test_signed_zero_is_the_colormaps_centre() -> None:
    rng = np.random.default_rng(6)
    panel = rng.normal(size=(6, 6)) + 3.0  # mostly positive: 0 must still be the centre
    panel[2, 4] = 0.0
    grid = image_grid([panel], kind="signed")
    box = grid.panels[0]
    f = _factor(box, 6)
    pixel = np.asarray(grid.image)[box.y0 + 2 * f + f // 2, box.x0 + 4 * f + f // 2]
    lut = colormap_lut("RdBu_r")
    assert tuple(pixel) == tuple(lut[len(lut) // 2])
    assert box.vmin == -box.vmax  # symmetric about 0


def test_rgb_images_keep_their_colours() -> None:
    image = np.zeros((3, 4, 4))
    image[0, :2, :2] = 1.0  # red
    image[1, :2, 2:] = 1.0  # green
    image[2, 2:, :2] = 1.0  # blue
    image[:, 2:, 2:] = 0.5  # grey
    grid = image_grid([image, image * 0.5], kind="image")
    for box in grid.panels:
        assert box.cmap == "rgb"
        f = _factor(box, 4)
        px = _pixels(grid, box)[f // 2 :: f, f // 2 :: f]  # one pixel per data pixel
        assert tuple(px[0, 0]) == (255, 0, 0)
        assert tuple(px[0, 3]) == (0, 255, 0)
        assert tuple(px[3, 0]) == (0, 0, 255)
        assert px[3, 3, 0] == px[3, 3, 1] == px[3, 3, 2]
        assert panel_span(grid, box) == 1.0
    fixed = image_grid([image * 0.5], kind="image", vrange=(0.0, 1.0))
    px = _pixels(fixed, fixed.panels[0])
    assert tuple(px[0, 0]) == (128, 0, 0)  # the fixed scale keeps the true brightness
    assert fixed.panels[0].scale == "fixed"


def test_fixed_and_data_ranges_mark_out_of_range_values() -> None:
    rng = np.random.default_rng(7)
    image = rng.uniform(0.0, 1.0, size=(1, 8, 8))
    image[0, 0, :4] = [-0.5, 1.5, 2.0, -1.0]
    grid = image_grid([image], kind="image", vrange=(0.0, 1.0))
    assert grid.panels[0].clipped == 4
    ranged = image_grid([image], kind="image", data_range=(0.0, 1.0))
    box = ranged.panels[0]
    assert box.clipped == 4 and box.vmin >= 0.0 and box.vmax <= 1.0


def test_many_channels_are_tiled_side_by_side() -> None:
    rng = np.random.default_rng(8)
    grid = image_grid([rng.normal(size=(5, 3, 3))], kind="magnitude")
    box = grid.panels[0]
    assert len(box.tiles) == 5 and box.cmap == "viridis"
    widths = {x1 - x0 for x0, _, x1, _ in box.tiles}
    assert len(widths) == 1
    assert box.tiles[1][0] - box.tiles[0][2] == 1  # a 1-px gap
    assert panel_span(grid, box) >= 0.5


def test_small_kernels_are_upscaled_and_text_fits() -> None:
    grid = image_grid(list(np.random.default_rng(9).normal(size=(64, 3, 3))), ncols=8)
    box = grid.panels[0]
    assert box.x1 - box.x0 >= 24 and (box.x1 - box.x0) % 3 == 0
    assert grid.image.width < 1000 and grid.image.height < 1000


def test_png_text_chunk_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    panels = rng.normal(size=(6, 1, 5, 5))
    panels[1, 0, 0, 0] = np.nan
    grid = image_grid(
        list(panels), titles=[f"σ{i}·v{i}" for i in range(6)], title="σᵢ·vᵢ", scale="row"
    )
    path = grid.save(tmp_path / "sub" / "grid.png")
    assert path.is_file()
    with Image.open(path) as image:
        assert PANELS_KEY in image.info
        assert image.size == grid.image.size
    assert read_panels(path) == grid.panels
    with Image.open(path) as image:  # the PNG holds exactly the drawn pixels
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(grid.image))
    for k in range(6):
        assert panel_span(path, k) == pytest.approx(panel_span(grid, k))


def test_photo_grids_round_trip_exactly(tmp_path: Path) -> None:
    """RGB panels are saved with the "Up" filter tried too: still the same pixels."""
    yy, xx = np.mgrid[0:24, 0:24] / 24.0
    images = [np.stack([np.sin(xx * 3 + k), yy, xx * yy]) for k in range(4)]
    grid = image_grid(images, kind="image", titles=["a", "b", "c", "d"])
    path = grid.save(tmp_path / "photos.png")
    with Image.open(path) as image:
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(grid.image))
    assert read_panels(path) == grid.panels


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_write_png_keeps_pixels_and_texts(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(15)
    pixels = rng.integers(0, 256, size=(37, 53, 4), dtype=np.uint8)
    pixels[10:20] = 255  # flat rows, as in the pictures
    image = Image.fromarray(pixels, mode="RGBA").convert(mode)
    for photo in (False, True):
        path = write_png(image, tmp_path / f"{mode}{photo}.png", {"k": '{"a": 1}'}, photo=photo)
        with Image.open(path) as back:
            back.load()
            assert back.info["k"] == '{"a": 1}'
            expected = image.convert("RGB") if mode == "P" else image
            assert back.mode == expected.mode
            assert np.array_equal(np.asarray(back), np.asarray(expected))


def test_warm_up_draws_without_files_left() -> None:
    render.warm_up()


def test_read_panels_rejects_a_plain_png(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError, match=PANELS_KEY):
        read_panels(path)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        image_grid([])
    with pytest.raises(ValueError):
        image_grid([np.zeros((2, 2))], scale="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        image_grid([np.zeros((2, 2, 2, 2))])
    with pytest.raises(ValueError):
        image_grid([np.zeros((2, 2))], vrange=(1.0, 1.0))
    with pytest.raises(ValueError):
        image_grid([np.zeros((2, 2))] * 4, ncols=2, row_labels=["a", "b", "c"])


def test_hundreds_of_kernels_render_quickly() -> None:
    kernels = list(np.random.default_rng(11).normal(size=(300, 3, 3)))
    start = time.perf_counter()
    grid = image_grid(kernels, title="300 kernels")
    elapsed = time.perf_counter() - start
    print(f"300 3×3 kernels: {elapsed * 1e3:.0f} ms, {grid.image.size}")  # no timed assert
    assert len(grid.panels) == 300


def _fake_layers(count: int, rng: np.random.Generator) -> list[SpectrumLine]:
    layers = []
    for i in range(count):
        n = int(rng.integers(20, 600))
        sv = np.sort(10.0 ** rng.uniform(-8.0, 2.0, size=n))[::-1]
        if i == 2:
            sv[-3:] = 0.0  # rank deficient
        idx = np.unique(np.linspace(0, n - 1, 100).astype(int))  # decimated profile
        cond = None if i % 7 == 2 else float(sv[0] / sv[-1])
        layers.append(SpectrumLine(f"block{i}.conv", idx, sv[idx], n, cond))
    return layers


@pytest.mark.parametrize("count", [60, 3])
def test_spectra_figure_writes_one_png(tmp_path: Path, count: int) -> None:
    layers = _fake_layers(count, np.random.default_rng(12))
    layers[-1] = SpectrumLine.full("last", np.array([2.0, 1.0, 0.5]), float("inf"))
    path = spectra_figure(layers, tmp_path / f"spectra{count}.png", title="signal spaces")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600
        axes = json.loads(image.info[AXES_KEY])
        pixels = np.asarray(image.convert("RGB"))
    # Unbounded condition numbers: red triangles in the band above the finite range.
    x0, y0, x1, _ = axes["condition"]["box"]
    band = pixels[y0 : y0 + axes["condition"]["top_band"], x0:x1]
    assert axes["condition"]["top_band"] > 0
    assert (band == (220, 20, 60)).all(-1).sum() > 20


def _box(pixels: np.ndarray, box: list[int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return pixels[y0:y1, x0:x1]


def test_spectra_figure_draws_each_layer_in_its_depth_colour(tmp_path: Path) -> None:
    layers = [
        SpectrumLine.full("first", np.array([4.0, 2.0, 1.0, 0.5, 0.1])),
        SpectrumLine.full("last", np.array([3.0, 2.5, 2.0, 1.8, 1.5])),
    ]
    path = spectra_figure(layers, tmp_path / "two.png", title="two layers")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        image.load()  # a valid, complete PNG
        axes = json.loads(image.info[AXES_KEY])
        pixels = np.asarray(image)
    lut = colormap_lut("viridis")
    left = _box(pixels, axes["spectra"]["box"])
    right = _box(pixels, axes["condition"]["box"])
    for colour in (lut[0], lut[-1]):  # first layer darkest, last one yellow
        assert (left == colour).all(-1).sum() >= 10, colour
        assert (right == colour).all(-1).sum() >= 10, colour
    assert axes["condition"]["top_band"] == 0  # both bounded: no "∞" band
    # The left plot spans 10⁻¹ (at least) to above 10⁰, on a log10 axis.
    lo, hi = axes["spectra"]["log10_y"]
    assert lo <= -1.0 < 0.0 < hi


def test_spectra_figure_marks_zeros_and_empty_layers(tmp_path: Path) -> None:
    sv = np.array([1.0, 0.1, 0.01, 0.0, 0.0])
    layers = [SpectrumLine.full("deficient", sv), SpectrumLine.full("empty", np.zeros(3))]
    path = spectra_figure(layers, tmp_path / "zeros.png", title="zeros")
    with Image.open(path) as image:
        axes = json.loads(image.info[AXES_KEY])
    # Zeros sit on a floor a decade below the smallest positive ratio (0.01), inside the axis.
    assert axes["spectra"]["log10_y"][0] < -3.0
    assert axes["condition"]["top_band"] > 0  # None condition numbers: unbounded


def _timing_layers(count: int, rng: np.random.Generator) -> list[SpectrumLine]:
    layers = []
    for i in range(count):
        n = 10 if count == 1 else int(rng.integers(20, 600))
        sv = np.sort(10.0 ** rng.uniform(-4.0, 0.0, size=n))[::-1]
        idx = np.unique(np.linspace(0, n - 1, 100).astype(int))
        cond = None if count > 5 and i in (5, 40) else float(sv[0] / sv[-1])
        layers.append(SpectrumLine(f"block{i}.conv", idx, sv[idx], n, cond))
    return layers


def test_spectra_figure_timings(tmp_path: Path) -> None:
    """Prints the drawing time for 1, 5 and 60 layers (no timed assert: shared CI cores)."""
    rng = np.random.default_rng(14)
    spectra_figure(_timing_layers(1, rng), tmp_path / "warm.png", title="warm-up")
    for count in (1, 5, 60):
        layers = _timing_layers(count, rng)
        best = np.inf
        for k in range(5):
            start = time.perf_counter()
            spectra_figure(layers, tmp_path / f"t{count}_{k}.png", title="signal spaces")
            best = min(best, time.perf_counter() - start)
        print(f"spectra_figure, {count} layers: {best * 1e3:.1f} ms")
    panels = list(rng.normal(size=(10, 28, 28)))
    titles = [f"σ{k}·v{k}" for k in range(10)]
    best_grid = best_save = np.inf
    for k in range(10):
        start = time.perf_counter()
        grid = image_grid(panels, ncols=8, titles=titles, title="fc: top 10", scale="panel")
        best_grid = min(best_grid, time.perf_counter() - start)
        start = time.perf_counter()
        grid.save(tmp_path / f"grid{k}.png")
        best_save = min(best_save, time.perf_counter() - start)
    print(f"image_grid 10×28×28: {best_grid * 1e3:.1f} ms, save {best_save * 1e3:.1f} ms")


def test_spectrum_line_validates_its_profile() -> None:
    with pytest.raises(ValueError):
        SpectrumLine("x", np.arange(3), np.ones(2), 3, None)
    with pytest.raises(ValueError):
        SpectrumLine("x", np.array([0, 5]), np.ones(2), 3, None)
    line = SpectrumLine.full("x", np.array([4.0, 2.0, 1.0]))
    assert line.count == 3 and line.condition_number == 4.0
    with pytest.raises(ValueError):
        spectra_figure([], Path("unused.png"), title="")


def test_curves_plot_writes_a_png(tmp_path: Path) -> None:
    names = [f"layer{i}" for i in range(50)]
    rng = np.random.default_rng(13)
    curves = {f"class{k}": list(rng.uniform(1e-3, 1.0, size=50)) for k in range(10)}
    path = curves_plot(names, curves, tmp_path / "curves.png", title="t", ylabel="y", logy=True)
    with Image.open(path) as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError):
        curves_plot(names, {"short": [1.0]}, tmp_path / "bad.png", title="t", ylabel="y")
