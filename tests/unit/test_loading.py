"""Loading model files: every format gives the eager layer names, weights and geometry; hostile
or broken files are refused with a clear ValueError and never run."""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from deepscope.analysis.hooks import Where, capture_activations
from deepscope.analysis.layers import LayerKind, WeightLayer, weight_layers
from deepscope.manifest import Manifest, ModelFormat
from deepscope.models.loading import (
    LoadedModel,
    code_models_allowed,
    detect_format,
    layer_input_shapes,
    load_model,
)
from deepscope.models.registry import get_model

# Every file format of one model, and how each is loaded.
FORMATS = {
    "pt": ModelFormat.STATE_DICT,
    "safetensors": ModelFormat.SAFETENSORS,
    "pt2": ModelFormat.PT2,
    "scripted": ModelFormat.TORCHSCRIPT,
    "traced": ModelFormat.TORCHSCRIPT,
}


@pytest.fixture(autouse=True)
def _quiet_jit() -> Iterator[None]:
    # torch.jit.script/trace are deprecated upstream but still what users upload.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        yield


def _export(model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    """``torch.export`` with a dynamic batch (an example batch of 2: 0/1 would specialize)."""
    program = torch.export.export(
        model, (torch.zeros(2, *shape),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    )
    torch.export.save(program, path)


def _save_all(model: nn.Module, shape: tuple[int, int, int], folder: Path) -> dict[str, Path]:
    """The model in every format, under deliberately misleading extensions."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    paths = {key: folder / f"model_{key}.bin" for key in FORMATS}
    torch.save(model.state_dict(), paths["pt"])
    save_file(model.state_dict(), paths["safetensors"])
    _export(model, shape, paths["pt2"])
    torch.jit.script(model).save(str(paths["scripted"]))  # type: ignore[no-untyped-call]
    traced = torch.jit.trace(model, torch.zeros(1, *shape))  # type: ignore[no-untyped-call]
    traced.save(str(paths["traced"]))
    return paths


@dataclass
class Saved:
    arch: str
    model: nn.Module
    shape: tuple[int, int, int]
    paths: dict[str, Path]
    loaded: dict[str, LoadedModel]


def _saved(arch: str, folder: Path) -> Saved:
    torch.manual_seed(0)
    model = get_model(arch).eval()
    # Non-trivial BatchNorm statistics, so a wrong BN mode or missing buffer changes outputs.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    shape = (1, 28, 28)
    paths = _save_all(model, shape, folder)
    loaded = {
        key: load_model(path, arch=arch, allow_code=True, input_shape=shape)
        for key, path in paths.items()
    }
    return Saved(arch, model, shape, paths, loaded)


@pytest.fixture(scope="module")
def fcnn(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _saved("fcnn5", tmp_path_factory.mktemp("fcnn5"))


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _saved("resnet18_gray", tmp_path_factory.mktemp("resnet18_gray"))


def _geometry(layer: WeightLayer) -> tuple[Any, ...]:
    return (
        layer.kind,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        layer.padding_mode,
        tuple(layer.weight.shape),
        layer.bias is None,
    )


def _assert_same_layers(got: list[WeightLayer], expected: list[WeightLayer]) -> None:
    assert [layer.name for layer in got] == [layer.name for layer in expected]
    for a, b in zip(got, expected, strict=True):
        assert _geometry(a) == _geometry(b), a.name
        assert torch.equal(a.weight, b.weight), a.name
        if b.bias is not None:
            assert a.bias is not None
            assert torch.equal(a.bias, b.bias), a.name


# --------------------------------------------------------------------------- formats agree


@pytest.mark.parametrize("which", ["fcnn", pytest.param("resnet", marks=pytest.mark.slow)])
def test_every_format_gives_the_eager_layers_weights_and_outputs(
    which: str, request: pytest.FixtureRequest
) -> None:
    saved: Saved = request.getfixturevalue(which)
    expected = weight_layers(saved.model)
    x = torch.randn(3, *saved.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = saved.model(x)
    for key, loaded in saved.loaded.items():
        assert loaded.format is FORMATS[key], key
        _assert_same_layers(loaded.layers, expected)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(x), reference, rtol=1e-4, atol=1e-5)
        assert loaded.num_parameters == sum(p.numel() for p in saved.model.parameters())
        assert loaded.sha256 == hashlib.sha256(saved.paths[key].read_bytes()).hexdigest()
        assert loaded.input_shape == saved.shape
        assert loaded.manifest.format is FORMATS[key]
        assert not any(p.requires_grad for p in loaded.module.parameters()), key
        assert not loaded.module.training or key == "pt2", key
    assert saved.loaded["pt"].hookable is saved.loaded["pt"].module
    # The layers read the very tensors the hookable module runs with (no stale copies).
    for key in ("pt", "pt2", "scripted"):
        loaded = saved.loaded[key]
        runs = loaded.hookable or loaded.module
        modules = dict(runs.named_modules())
        for layer in loaded.layers:
            weight = getattr(modules[layer.name], "weight")  # noqa: B009 (mypy: Module | Tensor)
            assert layer.weight.data_ptr() == weight.data_ptr(), (key, layer.name)
    assert saved.loaded["scripted"].hookable is None


@pytest.mark.slow
def test_resnet_layer_names_and_conv_geometry(resnet: Saved) -> None:
    layers = {layer.name: layer for layer in resnet.loaded["pt2"].layers}
    assert list(layers)[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert layers["conv1"].weight.shape == (64, 1, 7, 7)
    assert (layers["conv1"].stride, layers["conv1"].padding) == ((2, 2), (3, 3))
    assert (layers["layer2.0.conv1"].stride, layers["layer2.0.conv1"].padding) == ((2, 2), (1, 1))
    down = layers["layer2.0.downsample.0"]
    assert (down.stride, down.padding, down.kernel_size) == ((2, 2), (0, 0), (1, 1))
    assert layers["fc"].kind is LayerKind.LINEAR
    assert layers["fc"].weight.shape == (10, 512)


@pytest.mark.parametrize("which", ["fcnn", pytest.param("resnet", marks=pytest.mark.slow)])
def test_layer_input_shapes_agree_across_formats(
    which: str, request: pytest.FixtureRequest
) -> None:
    saved: Saved = request.getfixturevalue(which)
    shapes = {key: layer_input_shapes(loaded) for key, loaded in saved.loaded.items()}
    for key in shapes:
        assert shapes[key] == shapes["pt"], key
    if which == "resnet":
        # 28 → conv1 (stride 2) 14 → maxpool 7 → layer2 4 → layer3 2 → layer4 1.
        assert shapes["pt"]["conv1"] == (1, 28, 28)
        assert shapes["pt"]["layer1.0.conv1"] == (64, 7, 7)
        assert shapes["pt"]["layer2.0.conv2"] == (128, 4, 4)
        assert shapes["pt"]["layer4.1.conv2"] == (512, 1, 1)
        assert shapes["pt"]["fc"] == (512,)
    else:
        assert shapes["pt"]["fc1"] == (784,)


@pytest.mark.slow
def test_hooks_fire_on_the_unflattened_pt2_module(resnet: Saved) -> None:
    loaded = resnet.loaded["pt2"]
    assert loaded.hookable is not None
    program = torch.export.load(resnet.paths["pt2"])
    x = torch.randn(2, *resnet.shape, generator=torch.Generator().manual_seed(2))
    names = ["layer1.0.conv1", "layer3.0.downsample.0", "fc"]
    with torch.no_grad():
        with capture_activations(loaded.hookable, names, Where.OUTPUT) as got:
            out = loaded.hookable(x)
        with capture_activations(resnet.model, names, Where.OUTPUT) as want:
            eager_out = resnet.model(x)
        torch.testing.assert_close(out, program.module()(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


class Geometry(nn.Module):
    """Convolutions whose geometry is easy to lose: reflect padding, 'same' with dilation and
    groups, non-square stride and padding."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2, bias=False)
        self.odd = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2))
        self.head = nn.Linear(6 * 4 * 11, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.odd(self.same(self.pad(x))).flatten(1))
        return out


def test_conv_geometry_survives_export_and_torchscript(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = Geometry().eval()
    shape = (2, 8, 8)
    paths = _save_all(model, shape, tmp_path)
    expected = weight_layers(model)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(4))
    for key in ("pt2", "scripted", "traced"):
        loaded = load_model(paths[key], allow_code=True, input_shape=shape)
        _assert_same_layers(loaded.layers, expected)
        # Known answer: the recovered geometry reproduces the layer (linear part + bias).
        pad = next(layer for layer in loaded.layers if layer.name == "pad")
        assert pad.bias is not None
        with torch.no_grad():
            torch.testing.assert_close(
                pad.apply(x) + pad.bias[:, None, None], model.pad(x), rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(loaded.module(x), model(x), rtol=1e-5, atol=1e-6)
    assert load_model(paths["pt2"], allow_code=True).input_shape == shape  # recorded in .pt2


def test_decomposed_pt2_gives_the_same_layers(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = get_model("fcnn5").eval()
    program = torch.export.export(
        model, (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    ).run_decompositions()  # Linear becomes addmm(bias, x, permute(weight))
    path = tmp_path / "core_aten.pt2"
    torch.export.save(program, path)
    _assert_same_layers(load_model(path, allow_code=True).layers, weight_layers(model))


# --------------------------------------------------------------------------- detection by content


def test_format_is_detected_by_content_not_name(fcnn: Saved, tmp_path: Path) -> None:
    for key, path in fcnn.paths.items():  # all named .bin
        assert detect_format(path) is FORMATS[key]
    renamed = tmp_path / "weights.pt"
    renamed.write_bytes(fcnn.paths["safetensors"].read_bytes())
    assert detect_format(renamed) is ModelFormat.SAFETENSORS
    legacy = tmp_path / "legacy.safetensors"
    torch.save(fcnn.model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert detect_format(legacy) is ModelFormat.STATE_DICT
    loaded = load_model(legacy, arch="fcnn5")
    _assert_same_layers(loaded.layers, weight_layers(fcnn.model))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},  # DataParallel
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["state_dict", "model", "dataparallel", "nested"],
)
def test_common_checkpoint_wrappers_load(fcnn: Saved, tmp_path: Path, wrap: Any) -> None:
    path = tmp_path / "checkpoint.pth"
    torch.save(wrap(fcnn.model.state_dict()), path)
    _assert_same_layers(load_model(path, arch="fcnn5").layers, weight_layers(fcnn.model))


# --------------------------------------------------------------------------- manifest


def test_manifest_beside_the_file_and_overrides(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = get_model("fcnn1", num_classes=4).eval()
    path = tmp_path / "fcnn1.safetensors"
    save_file(model.state_dict(), path)
    Manifest(name="mine", arch="fcnn1", arch_kwargs={"num_classes": 4}).write(
        tmp_path / "fcnn1.json"
    )
    loaded = load_model(path)  # arch and kwargs from the manifest; shape from the registry
    assert loaded.manifest.name == "mine"
    assert loaded.manifest.format is ModelFormat.SAFETENSORS
    assert loaded.input_shape == (1, 28, 28)
    assert loaded.manifest.input_shape == (1, 28, 28)
    # Explicit arguments win over the manifest file.
    with pytest.raises(ValueError, match="weights do not match arch 'fcnn1'"):
        load_model(path, arch_kwargs={"num_classes": 10})
    explicit = load_model(path, manifest=Manifest(arch="fcnn1", arch_kwargs={"num_classes": 4}))
    assert explicit.manifest.name == ""


def test_code_models_env_switch() -> None:
    assert code_models_allowed({"DEEPSCOPE_ALLOW_CODE_MODELS": "1"})
    assert not code_models_allowed({"DEEPSCOPE_ALLOW_CODE_MODELS": "0"})
    assert not code_models_allowed({})


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("key", "words"), [("pt2", "torch.export program (code)"), ("scripted", "TorchScript (code)")]
)
def test_code_formats_need_allow_code(fcnn: Saved, key: str, words: str) -> None:
    with pytest.raises(ValueError, match="loading code-bearing models is disabled") as info:
        load_model(fcnn.paths[key], arch="fcnn5")
    assert words in str(info.value)
    assert "--allow-code / DEEPSCOPE_ALLOW_CODE_MODELS=1" in str(info.value)


class Evil:
    """Unpickling this creates a file: what a hostile 'state dict' would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_pickle_that_needs_code_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    payload = {"fc1.weight": torch.zeros(2, 2), "evil": Evil(marker)}
    if how == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch_zip")
    assert detect_format(path) is ModelFormat.STATE_DICT
    with pytest.raises(ValueError, match="is not a weights-only state_dict") as info:
        load_model(path, arch="fcnn1")
    assert "needs code" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_a_whole_pickled_module_is_refused(fcnn: Saved, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(fcnn.model, path)
    with pytest.raises(ValueError, match=r"not a weights-only state_dict.*save model.state_dict"):
        load_model(path, arch="fcnn5")


def test_text_and_empty_files_are_not_model_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, not weights\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(ValueError, match="is not a model file \\(expected safetensors"):
            load_model(path, arch="fcnn1")
    with pytest.raises(ValueError, match="does not exist"):
        detect_format(tmp_path / "missing.pt")


@pytest.mark.parametrize("key", ["safetensors", "pt", "pt2"])
def test_truncated_files_are_refused(fcnn: Saved, tmp_path: Path, key: str) -> None:
    data = fcnn.paths[key].read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(path, arch="fcnn5", allow_code=True)


def test_truncated_legacy_pickle_is_refused(fcnn: Saved, tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save(fcnn.model.state_dict(), full, _use_new_zipfile_serialization=False)
    path = tmp_path / "cut.pt"
    path.write_bytes(full.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(path, arch="fcnn5")


def test_weights_only_formats_need_a_known_arch(fcnn: Saved) -> None:
    with pytest.raises(ValueError, match=r"holds only weights; give --arch .*deepscope list-archs"):
        load_model(fcnn.paths["safetensors"])
    with pytest.raises(ValueError, match="unknown architecture 'fcnn9'"):
        load_model(fcnn.paths["safetensors"], arch="fcnn9")


def test_weights_for_another_arch_are_refused(fcnn: Saved, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="weights do not match arch 'fcnn1'") as info:
        load_model(fcnn.paths["safetensors"], arch="fcnn1")
    message = str(info.value)
    assert "unexpected fc2.weight" in message or "unexpected fc2.bias" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"missing conv1.weight.*unexpected fc1.weight"):
        load_model(fcnn.paths["pt"], arch="resnet18_gray")
    with pytest.raises(
        ValueError, match=r"shape mismatch fc5.weight \(10, 32\) in file vs \(7, 32\) in arch"
    ):
        load_model(fcnn.paths["pt"], arch="fcnn5", arch_kwargs={"num_classes": 7})


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    model = get_model("fcnn1")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc1.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, path)
    with pytest.raises(ValueError, match="layer 'fc1' has non-finite values"):
        load_model(path, arch="fcnn1")


def test_wrong_input_shape_is_refused(fcnn: Saved) -> None:
    with pytest.raises(ValueError, match=r"model does not accept input shape \[1, 20, 20\]: "):
        load_model(fcnn.paths["safetensors"], arch="fcnn5", input_shape=(1, 20, 20))
    with pytest.raises(ValueError, match=r"model does not accept input shape \[3, 28, 28\]: "):
        load_model(fcnn.paths["pt2"], allow_code=True, input_shape=(3, 28, 28))
    with pytest.raises(ValueError, match="input_shape must be a positive"):
        load_model(fcnn.paths["safetensors"], arch="fcnn5", input_shape=(0, 28, 28))


def test_model_without_weight_layers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flat.pt"
    scripted = torch.jit.script(nn.Sequential(nn.Flatten(), nn.ReLU()))
    scripted.save(str(path))  # type: ignore[no-untyped-call]
    with pytest.raises(ValueError, match="no Linear or Conv2d layers"):
        load_model(path, allow_code=True, input_shape=(1, 4, 4))


def test_torchscript_without_input_shape_asks_for_one(fcnn: Saved) -> None:
    with pytest.raises(ValueError, match="does not record its input shape; give --input-shape"):
        load_model(fcnn.paths["scripted"], allow_code=True)


def test_pt2_with_a_fixed_batch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fixed.pt2"
    model = get_model("fcnn1").eval()
    torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 28, 28),)), path)
    with pytest.raises(ValueError, match=r"fixed batch size 1.*Dim.DYNAMIC"):
        load_model(path, allow_code=True)


def test_pt2_without_a_faithful_unflatten_still_loads(
    fcnn: Saved, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> nn.Module:
        raise RuntimeError("unflatten failed")

    monkeypatch.setattr(torch.export, "unflatten", broken)
    loaded = load_model(fcnn.paths["pt2"], allow_code=True)
    assert loaded.hookable is None
    _assert_same_layers(loaded.layers, weight_layers(fcnn.model))
    x = torch.randn(2, *fcnn.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), fcnn.model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be observed: it has no module"):
        layer_input_shapes(loaded)


class Branchy(nn.Module):
    """A layer called inside TorchScript control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        if bool(h.sum() >= 0):
            h = self.fc(h)
        out: Tensor = self.out(h)
        return out


def test_torchscript_layer_inside_control_flow_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "branchy.pt"
    torch.jit.script(Branchy()).save(str(path))  # type: ignore[no-untyped-call]
    loaded = load_model(path, allow_code=True, input_shape=(1, 2, 2))
    with pytest.raises(ValueError, match=r"'fc' are not visible in the TorchScript graph"):
        layer_input_shapes(loaded)


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(self.fc(self.fc(x.flatten(1))))
        return out


@pytest.mark.parametrize("key", ["pt2", "scripted"])
def test_input_shape_of_a_reused_layer_is_ambiguous(tmp_path: Path, key: str) -> None:
    paths = _save_all(Reused(), (1, 2, 2), tmp_path)
    loaded = load_model(paths[key], allow_code=True, input_shape=(1, 2, 2))
    assert [layer.name for layer in loaded.layers] == ["fc", "out"]
    with pytest.raises(ValueError, match=r"'fc' is called .* (times|than once) in one forward"):
        layer_input_shapes(loaded)
