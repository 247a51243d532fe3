"""The ``deepscope`` command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deepscope.cli import main
from deepscope.models.registry import get_model

DEEPSCOPE = [sys.executable, "-m", "deepscope"]


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*DEEPSCOPE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DEEPSCOPE_DEBUG": ""},
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fcnn1 trained on digits by the CLI itself (seconds)."""
    out = tmp_path_factory.mktemp("model") / "fcnn1.safetensors"
    proc = run(
        "train", "fcnn1", "--dataset", "digits", "--epochs", "3", "--recipe", "fast", "--out", out
    )
    assert "held-out accuracy" in proc.stdout
    manifest = json.loads(out.with_suffix(".json").read_text())
    assert manifest["arch"] == "fcnn1"
    assert manifest["training"]["accuracy"] > 0.8
    return out


def test_signal_space_from_the_command_line(trained: Path, tmp_path: Path) -> None:
    run("analyze", trained, "--analysis", "signal_space", "--out", tmp_path, "-q")
    result = json.loads((tmp_path / "result.json").read_text())
    (layer,) = result["metrics"]["layers"]
    assert layer["name"] == "fc1"
    assert layer["matrix_shape"] == [10, 784]
    # The metrics keep a summary; every singular value is in the .npz.
    assert layer["spectrum"]["count"] == 10
    sv = np.load(tmp_path / "singular_values.npz")["fc1"]
    assert sv.shape == (10,)
    assert layer["spectrum"]["profile"]["values"] == pytest.approx(sv.tolist(), rel=1e-12)
    assert layer["condition_number"] == pytest.approx(sv[0] / sv[-1], rel=1e-9)
    names = {a["name"] for a in result["artifacts"]}
    assert {"spectra", "weights_fc1", "singular_vectors_fc1", "singular_values"} <= names
    for artifact in result["artifacts"]:
        if artifact["media_type"] == "image/png":
            assert (tmp_path / artifact["url"]).read_bytes()[:4] == b"\x89PNG"


def test_residuals_from_the_command_line(trained: Path, tmp_path: Path) -> None:
    run(
        "analyze",
        trained,
        "--analysis",
        "residuals",
        "--out",
        tmp_path,
        "-q",
        "--dataset",
        "digits",
    )
    result = json.loads((tmp_path / "result.json").read_text())
    (layer,) = result["metrics"]["layers"]
    assert [c["class"] for c in layer["classes"]] == [str(k) for k in range(10)]
    for c in layer["classes"]:
        # 10 rows in a 784-dim space: nearly all of a digit lies in the null space.
        assert 0.5 < c["lost_fraction"] < 1.0
        assert c["residual_norm"] ** 2 == pytest.approx(c["lost_fraction"] * c["input_norm"] ** 2)
    assert "lost_fraction_by_depth" in {a["name"] for a in result["artifacts"]}


def _one_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("deepscope: error: ")
    return lines[0]


def invoke(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """``deepscope ARGS`` through the console entry point, in-process (no torch re-import)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["deepscope", *map(str, args)])
        mp.delenv("DEEPSCOPE_DEBUG", raising=False)
        with pytest.raises(SystemExit) as exc:
            main()
    return _one_line(int(exc.value.code or 0), capsys.readouterr().err)


def test_bad_input_in_a_real_process(trained: Path, tmp_path: Path) -> None:
    proc = run(
        "analyze",
        trained,
        "--arch",
        "fcnn9",
        "--analysis",
        "signal_space",
        "--out",
        tmp_path,
        ok=False,
    )
    assert "unknown architecture 'fcnn9'" in _one_line(proc.returncode, proc.stderr)


def test_bad_input_is_one_line(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert "model does not accept input shape" in invoke(
        capsys,
        "analyze",
        trained,
        "--input-shape",
        "3,32,32",
        "--analysis",
        "signal_space",
        "--out",
        out,
    )
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "is not a model file" in invoke(
        capsys, "analyze", text, "--arch", "fcnn1", "--analysis", "signal_space", "--out", out
    )
    nan = get_model("fcnn1").state_dict()
    nan["fc1.weight"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in nan.items()}, str(tmp_path / "nan.safetensors"))
    assert "'fc1' has non-finite values" in invoke(
        capsys,
        "analyze",
        tmp_path / "nan.safetensors",
        "--arch",
        "fcnn1",
        "--analysis",
        "signal_space",
        "--out",
        out,
    )
    assert "unknown analysis 'svd'" in invoke(
        capsys, "analyze", trained, "--analysis", "svd", "--out", out
    )
    assert "view" in invoke(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "signal_space",
        "--params",
        '{"view": "rows"}',
        "--out",
        out,
    )
    assert "is not valid JSON" in invoke(
        capsys, "analyze", trained, "--analysis", "signal_space", "--params", "{view", "--out", out
    )
    assert "unknown layer(s) 'conv1'" in invoke(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "signal_space",
        "--params",
        '{"layers": ["conv1"]}',
        "--out",
        out,
    )
    assert "does not exist" in invoke(
        capsys,
        "analyze",
        tmp_path / "missing.safetensors",
        "--arch",
        "fcnn1",
        "--analysis",
        "signal_space",
        "--out",
        out,
    )
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    assert "weights do not match arch 'fcnn1'" in invoke(
        capsys,
        "analyze",
        tmp_path / "w.safetensors",
        "--arch",
        "fcnn1",
        "--analysis",
        "signal_space",
        "--out",
        out,
    )
    plain = get_model("fcnn1").state_dict()  # no manifest beside it: no dataset known
    save_file({k: v.contiguous() for k, v in plain.items()}, str(tmp_path / "plain.safetensors"))
    assert "needs a dataset" in invoke(
        capsys,
        "analyze",
        tmp_path / "plain.safetensors",
        "--arch",
        "fcnn1",
        "--analysis",
        "residuals",
        "--out",
        out,
    )


def invoke_ok(capsys: pytest.CaptureFixture[str], *args: str | Path) -> dict[str, object]:
    """``deepscope analyze ... --out DIR`` in-process; returns DIR/result.json."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["deepscope", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            main()
    assert exc.value.code in (0, None), capsys.readouterr().err
    out = Path(str(args[args.index("--out") + 1]))
    result: dict[str, object] = json.loads((out / "result.json").read_text())
    for artifact in result["artifacts"]:  # type: ignore[attr-defined]
        assert (out / artifact["url"]).stat().st_size > 0
    return result


def test_input_optimization_from_the_command_line(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    am = invoke_ok(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "activation_maximization",
        "--params",
        '{"steps": 64}',
        "--out",
        tmp_path / "am",
        "-q",
    )
    targets = am["metrics"]["targets"]  # type: ignore[index]
    assert [t["target"] for t in targets] == list(range(10))
    assert all(t["final_objective"] > t["initial_objective"] for t in targets)
    assert sum(t["predicted_class"] == t["target"] for t in targets) >= 8
    with np.load(tmp_path / "am" / "activation_maximization.npz") as npz:
        images = npz["images"]
    assert images.shape == (10, 1, 28, 28)
    assert images.min() >= 0.0
    assert images.max() <= 1.0

    inv = invoke_ok(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "inversion",
        "--dataset",
        "digits",
        "--params",
        '{"layers": ["flatten", "fc1"], "images": [0, 5], "steps": 60}',
        "--out",
        tmp_path / "inv",
        "-q",
    )
    by_layer = {(t["target"], t["image"]): t for t in inv["metrics"]["targets"]}  # type: ignore[index]
    assert set(by_layer) == {("flatten", 0), ("flatten", 5), ("fc1", 0), ("fc1", 5)}
    # Flatten loses nothing, a 784→10 layer nearly everything: the picture tells depth apart.
    for i in (0, 5):
        assert by_layer[("flatten", i)]["image_error"] < 0.3
        assert by_layer[("fc1", i)]["image_error"] > by_layer[("flatten", i)]["image_error"]

    car = invoke_ok(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "caricature",
        "--dataset",
        "digits",
        "--params",
        '{"layers": ["fc1"], "steps": 16, "octaves": 2}',
        "--out",
        tmp_path / "car",
        "-q",
    )
    (target,) = car["metrics"]["targets"]  # type: ignore[index]
    assert target["final_objective"] > target["initial_objective"]

    assert "image index 999999 is out of range" in invoke(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "inversion",
        "--dataset",
        "digits",
        "--params",
        '{"layers": ["fc1"], "images": [999999]}',
        "--out",
        tmp_path / "x",
    )
    assert "unknown layer(s) 'conv9'" in invoke(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "caricature",
        "--dataset",
        "digits",
        "--params",
        '{"layers": ["conv9"]}',
        "--out",
        tmp_path / "x",
    )
    assert "steps" in invoke(
        capsys,
        "analyze",
        trained,
        "--analysis",
        "activation_maximization",
        "--params",
        '{"steps": 0}',
        "--out",
        tmp_path / "x",
    )
