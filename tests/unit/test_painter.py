"""The worker's painter: a picture drawn there is the picture drawn here, byte for byte, and
whatever goes wrong there (a refused picture, a painter killed mid-job, a value that cannot be
sent) ends with the picture drawn here, or with the error drawing it here raises."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deepscope import render
from deepscope.analyses.context import LocalPainter
from deepscope.workers.painter import PainterProcess, RemotePainter, decode, encode


@pytest.fixture
def painter() -> Iterator[PainterProcess]:
    process = PainterProcess()
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _drawings() -> list[tuple[str, str, dict[str, Any]]]:
    rng = np.random.default_rng(0)
    noise = [rng.standard_normal((8, 8)) for _ in range(5)]
    line = render.SpectrumLine("fc1", np.arange(10), np.linspace(3.0, 0.1, 10), 10, 30.0)
    partial = render.SpectrumLine(
        "conv", np.array([0, 1, 98, 99]), np.array([5.0, 4.0, 0.2, 0.0]), 100, None, True
    )
    return [
        (
            "grid",
            "grid.png",
            {
                "panels": [*noise, np.full((8, 8), np.nan)],
                "titles": ["a", "b", "c", "d", "e", "nan"],
                "kind": "signed",
                "scale": "row",
                "title": "a grid",
                "note": "drawn twice",
            },
        ),
        (
            "grid",
            "pixels.png",
            {
                "panels": rng.random((3, 3, 6, 6)).astype(np.float32),
                "kind": "image",
                "vrange": (0.0, 1.0),
                "row_labels": ["rgb"],
            },
        ),
        ("spectra", "spectra.png", {"layers": [line, partial], "title": "spectra"}),
        (
            "curves",
            "curves.png",
            {
                "x_labels": ["l1", "l2", "l3"],
                "curves": {"x0": [0.5, 0.25, math.nan], "x1": [0.1, 0.2, 0.3]},
                "title": "curves",
                "ylabel": "y",
                "logy": True,
            },
        ),
    ]


def test_wire_format_round_trip() -> None:
    line = render.SpectrumLine("l", np.arange(3), np.array([3.0, 2.0, 1.0]), 3, math.inf)
    value: dict[str, Any] = {
        "panels": [np.arange(6, dtype=np.int16).reshape(2, 3), np.array([True, False])],
        "pair": (0.0, 1.5),
        "nested": {"x": [1, 2.5, None, "s", math.nan]},
        "lines": [line],
        "scalar": np.float32(2.5),
    }
    arrays: list[np.ndarray] = []
    wire = encode(value, arrays)
    back = decode(wire, arrays)
    assert len(arrays) == 4
    np.testing.assert_array_equal(back["panels"][0], value["panels"][0])
    assert back["panels"][0].dtype == np.int16
    np.testing.assert_array_equal(back["panels"][1], value["panels"][1])
    assert back["pair"] == (0.0, 1.5)
    assert back["nested"]["x"][:4] == [1, 2.5, None, "s"] and math.isnan(back["nested"]["x"][4])
    assert back["lines"][0].name == "l" and back["lines"][0].condition_number == math.inf
    np.testing.assert_array_equal(back["lines"][0].values, line.values)
    assert back["scalar"] == 2.5
    with pytest.raises(TypeError):
        encode({"x": np.array([object()])}, [])
    with pytest.raises(TypeError):
        encode({"x": object()}, [])


def test_painted_pictures_are_the_local_ones(painter: PainterProcess, tmp_path: Path) -> None:
    conn = painter.connect()
    assert conn is not None
    remote = RemotePainter(conn, painter.pid)
    local = LocalPainter()
    for drawing, name, kwargs in _drawings():
        remote.draw(drawing, tmp_path / "remote" / name, kwargs)
        local.draw(drawing, tmp_path / "local" / name, kwargs)
    remote.finish()
    assert not remote.broken
    for _drawing, name, _kwargs in _drawings():
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    conn.close()
    # The next job gets a connection of its own, to the same painter.
    again = painter.connect()
    assert again is not None and painter.alive()
    job = RemotePainter(again, painter.pid)
    drawing, name, kwargs = _drawings()[0]
    job.draw(drawing, tmp_path / "next" / name, kwargs)
    job.finish()
    assert (tmp_path / "next" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    again.close()


def test_a_refused_picture_raises_the_local_error(painter: PainterProcess, tmp_path: Path) -> None:
    conn = painter.connect()
    assert conn is not None
    remote = RemotePainter(conn, painter.pid)
    remote.draw("grid", tmp_path / "bad.png", {"panels": [np.zeros((2, 2))], "scale": "all"})
    with pytest.raises(ValueError, match="scale must be"):
        remote.finish()
    # The painter refused a picture, it did not fail: it keeps drawing.
    assert not remote.broken and painter.alive()
    drawing, name, kwargs = _drawings()[2]
    remote.draw(drawing, tmp_path / name, kwargs)
    remote.finish()
    assert (tmp_path / name).stat().st_size > 0
    conn.close()


def test_a_dead_painter_leaves_the_pictures_to_the_job(
    painter: PainterProcess, tmp_path: Path
) -> None:
    conn = painter.connect()
    assert conn is not None and painter.pid is not None
    first_pid = painter.pid
    os.kill(first_pid, signal.SIGKILL)
    os.waitpid(first_pid, 0)
    painter.pid = first_pid  # as the worker knew it: dead now
    remote = RemotePainter(conn, first_pid)
    for drawing, name, kwargs in _drawings():
        remote.draw(drawing, tmp_path / name, kwargs)
    remote.finish()
    assert remote.broken
    for _drawing, name, _kwargs in _drawings():
        assert (tmp_path / name).stat().st_size > 0
    conn.close()
    # The worker starts another for the next job.
    assert not painter.alive()
    assert painter.connect() is not None
    assert painter.alive() and painter.pid != first_pid


def test_an_unsendable_value_is_drawn_here(painter: PainterProcess, tmp_path: Path) -> None:
    conn = painter.connect()
    assert conn is not None
    remote = RemotePainter(conn, painter.pid)
    panels = np.empty(2, dtype=object)  # arrays of objects do not travel
    panels[:] = [np.zeros((3, 3)), np.arange(9.0).reshape(3, 3)]
    remote.draw("grid", tmp_path / "here.png", {"panels": panels})
    assert (tmp_path / "here.png").stat().st_size > 0  # drawn at once, here
    remote.draw("grid", tmp_path / "there.png", {"panels": list(panels)})
    remote.finish()
    assert (tmp_path / "there.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    assert not remote.broken and painter.alive()
    conn.close()
