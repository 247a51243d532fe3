"""Every analysis runs on every paper architecture through the same pipeline as the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from deepscope.analyses import get_analysis, parse_params
from deepscope.analyses.run import run_analysis
from deepscope.contract import Result
from deepscope.manifest import Manifest, manifest_path_for
from deepscope.models.loading import load_model
from deepscope.models.registry import get_model
from deepscope.render import PANELS_KEY, panel_span, read_panels

# Cheap parameters: this checks the wiring on each architecture, not the science (unit tests do).
CASES: dict[str, dict[str, object]] = {
    "signal_space": {"vectors": 4},
    "residuals": {"max_iter": 15},
    "inverse_images": {"steps": 3, "max_samples": 200, "methods": ["avg", "min+training"]},
    "activation_maximization": {"steps": 3, "targets": [0, 7]},
    "caricature": {"steps": 2, "octaves": 1},
    "inversion": {"steps": 3},
}
LAYERS = {
    "fcnn5": ["fc2", "fc4"],
    "resnet18_gray": ["layer1.0.conv1", "layer4.1.conv2"],
    "topdown": ["stage1.conv1", "stage3.conv2"],
}


@pytest.fixture(scope="module", params=sorted(LAYERS))
def model_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = request.param
    torch.manual_seed(0)
    model = get_model(arch)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    Manifest(name=arch, arch=arch, input_shape=(1, 28, 28)).write(manifest_path_for(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("analysis", sorted(CASES))
def test_every_analysis_on_every_arch(model_file: Path, analysis: str, tmp_path: Path) -> None:
    arch = model_file.stem
    params = dict(CASES[analysis])
    if analysis in ("caricature", "inversion"):
        params["layers"] = LAYERS[arch]
    seen: list[float] = []
    result = run_analysis(
        load_model(model_file),
        analysis,
        parse_params(analysis, params),
        tmp_path,
        dataset="digits",
        device="cpu",
        progress=lambda f, _m: seen.append(f),
    )
    assert result == Result.model_validate_json((tmp_path / "result.json").read_text())
    assert isinstance(result.metrics, get_analysis(analysis).metrics)
    assert seen[-1] == 1.0
    assert seen == sorted(seen), "progress never goes back"
    assert any(a.media_type == "image/png" for a in result.artifacts)
    grids = 0
    for artifact in result.artifacts:
        path = tmp_path / artifact.url
        assert path.stat().st_size > 0
        if artifact.media_type != "image/png" or PANELS_KEY not in Image.open(path).info:
            continue  # a plot with axes (spectra, curves), not a grid of panels
        grids += 1
        for panel in read_panels(path):
            # Every panel with something to show uses at least half of its colour scale:
            # no panel is washed out by another's range.
            if not panel.constant:
                assert panel_span(path, panel) >= 0.5, (artifact.name, panel.index, panel)
    assert grids or (analysis == "residuals" and arch != "fcnn5"), "no grid of panels drawn"
