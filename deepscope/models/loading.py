"""Loading an uploaded model file safely, in any supported format, with the eager layer names.

Formats are told apart by content, never by file name (:func:`detect_format`):

* safetensors and weights-only state dicts are data: the architecture comes from the registry
  and the tensors are loaded into it (``torch.load(weights_only=True)``: a pickle that needs code
  is refused, never run);
* a ``torch.export`` program (``.pt2``) and a TorchScript archive carry code and are refused
  unless ``allow_code`` (loading them runs the file's code: ``docs/architecture.md``,
  security).

Whatever the format, :attr:`LoadedModel.layers` names every Linear and Conv2d layer exactly as
the eager module does (``layer1.0.conv1``), so analyses and their cached results agree across
formats, and :attr:`LoadedModel.hookable` is a module whose submodules under those names are
really called in ``forward`` (for ``.pt2`` the ``torch.export.unflatten`` of the program).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.export.passes import move_to_device_pass
from torch.utils.hooks import RemovableHandle

from deepscope.analysis.hooks import Where, capture_activations, eval_mode, resolve_modules
from deepscope.analysis.layers import LayerKind, WeightLayer, finite_or_raise, weight_layers
from deepscope.analysis.normalization import ChannelNormalization
from deepscope.manifest import Manifest, ModelFormat, manifest_path_for
from deepscope.models.registry import get_model, get_model_spec

__all__ = [
    "ALLOW_CODE_ENV",
    "LoadedModel",
    "code_models_allowed",
    "detect_format",
    "layer_input_shapes",
    "load_model",
]

ALLOW_CODE_ENV = "DEEPSCOPE_ALLOW_CODE_MODELS"
"""Environment variable that enables code-bearing formats (``.pt2``, TorchScript) when ``1``."""

_NOT_A_MODEL = (
    "is not a model file (expected safetensors, a PyTorch state_dict, .pt2 or TorchScript)"
)
# A safetensors header is JSON; real ones are kilobytes. The cap keeps a hostile length cheap.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# Keys under which training scripts commonly nest the state dict in a checkpoint.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Key prefixes added by DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CODE_NAMES = {ModelFormat.PT2: "a torch.export program", ModelFormat.TORCHSCRIPT: "TorchScript"}


def code_models_allowed(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``DEEPSCOPE_ALLOW_CODE_MODELS`` enables code-bearing formats (``1``/``true``)."""
    env = os.environ if environ is None else environ
    return env.get(ALLOW_CODE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class LoadedModel:
    """A model file loaded for analysis.

    Attributes:
        module: runs forward passes ``(B, C, H, W) -> (B, classes)``; eval mode, every parameter
            ``requires_grad=False``, on the CPU.
        format: the format detected from the file's content.
        layers: every Linear and Conv2d layer in model (``named_modules``) order, named as the
            eager module names them.
        hookable: a module whose ``named_modules()`` use the eager names and whose submodules are
            called in ``forward``, so hooks on ``layers[i].name`` fire; None for TorchScript.
        input_shape: the per-sample input ``(C, H, W)``.
        manifest: the manifest in effect (arguments and detected format applied).
        sha256: hex digest of the file's bytes.
        num_parameters: number of parameter elements (shared parameters counted once).
    """

    module: nn.Module
    format: ModelFormat
    layers: list[WeightLayer]
    hookable: nn.Module | None
    input_shape: tuple[int, int, int]
    manifest: Manifest
    sha256: str
    num_parameters: int

    @property
    def normalization(self) -> ChannelNormalization:
        """The manifest's input normalization, expanded to the model's channels."""
        norm = self.manifest.normalization
        return ChannelNormalization.of(norm.mean, norm.std, self.input_shape[0])


# --------------------------------------------------------------------------- format detection


def _not_a_model(path: Path, why: str = "") -> ValueError:
    return ValueError(f"{path} {_NOT_A_MODEL}" + (f": {why}" if why else ""))


def detect_format(path: Path) -> ModelFormat:
    """The format of the model file at ``path``, from its content (the name is ignored).

    safetensors: 8-byte little-endian header length, then a JSON header. ``.pt2``: a zip with an
    ``archive_format`` entry ``pt2``. TorchScript: a zip with ``code/`` and ``constants.pkl``.
    ``torch.save`` zip archives (``data.pkl``) and legacy pickles: state dict.

    Raises:
        ValueError: the file does not exist, is none of these, or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_format(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        # A pickle (protocol 2+): torch.save's legacy format. torch.load(weights_only=True)
        # decides whether it is plain data.
        return ModelFormat.STATE_DICT
    if len(head) >= 9 and head[8:9] == b"{":
        _check_safetensors(path, size)
        return ModelFormat.SAFETENSORS
    raise _not_a_model(path)


def _check_safetensors(path: Path, size: int) -> None:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _MAX_SAFETENSORS_HEADER:
            raise _not_a_model(path, f"a {length}-byte safetensors header is implausible")
        if 8 + length > size:
            raise _not_a_model(path, "truncated: the safetensors header runs past the file's end")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_a_model(path, "the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _not_a_model(path, "the safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and "dtype" in info):
            raise _not_a_model(path, f"safetensors entry {name!r} has no dtype/data_offsets")
        end = max(end, int(offsets[1]))
    available = size - 8 - length
    if end > available:
        raise ValueError(
            f"{path} is a truncated safetensors file: its header describes {end} bytes of "
            f"tensor data but the file holds {available}"
        )


def _zip_format(path: Path) -> ModelFormat:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            fmt = next((n for n in names if n.rsplit("/", 1)[-1] == "archive_format"), None)
            if fmt is not None and archive.read(fmt).strip() == b"pt2":
                return ModelFormat.PT2
    except (zipfile.BadZipFile, OSError, EOFError):
        raise _not_a_model(path, "a truncated or corrupt zip archive") from None
    parts = [n.split("/") for n in names]
    if any("code" in p[:-1] for p in parts) and any(p[-1] == "constants.pkl" for p in parts):
        return ModelFormat.TORCHSCRIPT
    if any(p[-1] == "model.json" and "models" in p[:-1] for p in parts):
        return ModelFormat.PT2  # an archive from a torch.export that wrote no archive_format
    if any(p[-1] == "data.pkl" for p in parts):
        return ModelFormat.STATE_DICT
    raise _not_a_model(path, "a zip archive that torch did not write")


# --------------------------------------------------------------------------- loading


def load_model(
    path: Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    manifest: Manifest | None = None,
    allow_code: bool = False,
) -> LoadedModel:
    """Load the model file at ``path`` (any supported format) for analysis.

    The manifest is ``manifest``, else the ``.json`` beside the file, else an empty one;
    ``arch``, ``arch_kwargs`` and ``input_shape`` override its fields. safetensors and state
    dicts need an architecture from the registry; the input shape defaults to the manifest's,
    then the registry's (with ``arch_kwargs['in_channels']`` as C), then what a ``.pt2`` records.
    After loading, weights must be finite and one forward pass on zeros ``(1, C, H, W)`` must run.

    Raises:
        ValueError: with a one-line message for every refusal (unknown format, code-bearing
            format without ``allow_code``, pickle that needs code, missing or unknown arch,
            weights that do not match the arch, non-finite weights, wrong input shape, ...).
    """
    path = Path(path)
    fmt = detect_format(path)
    if manifest is None:
        beside = manifest_path_for(path)
        manifest = Manifest.read(beside) if beside != path and beside.is_file() else Manifest()
    if arch is not None and arch != manifest.arch and arch_kwargs is None:
        arch_kwargs = {}  # the manifest's kwargs belong to the manifest's arch
    arch = arch if arch is not None else manifest.arch
    kwargs = dict(arch_kwargs if arch_kwargs is not None else manifest.arch_kwargs)
    shape = _shape_or_raise(input_shape) if input_shape is not None else manifest.input_shape

    if fmt in _CODE_NAMES and not allow_code:
        raise ValueError(
            f"{path} is {_CODE_NAMES[fmt]} (code); loading code-bearing models is disabled; "
            f"enable it with --allow-code / {ALLOW_CODE_ENV}=1"
        )

    hookable: nn.Module | None
    if fmt in (ModelFormat.SAFETENSORS, ModelFormat.STATE_DICT):
        if not arch:
            raise ValueError(
                f"{path} holds only weights; give --arch (one of the registered architectures, "
                "see `deepscope list-archs`)"
            )
        if shape is None:
            shape = _registry_shape(arch, kwargs)
        state = _read_safetensors(path) if fmt is ModelFormat.SAFETENSORS else _read_pickle(path)
        module = _build_and_fill(arch, kwargs, state)
        layers = weight_layers(module)
        hookable = module
    elif fmt is ModelFormat.PT2:
        program = _load_export(path)
        layers = _export_layers(program)
        recorded = _export_input(path, program)
        if shape is None:
            shape = recorded or (_registry_shape(arch, kwargs) if arch else None)
        module, hookable = _export_modules(program, layers, _need_shape(path, shape))
        # The unflattened module holds copies: point the layers at the tensors that run.
        layers = _export_layers(program, dict(module.state_dict(keep_vars=True)))
        del program
    else:
        module = _load_torchscript(path)
        layers = _torchscript_layers(module)
        hookable = None
        if shape is None and arch:
            shape = _registry_shape(arch, kwargs)

    shape = _need_shape(path, shape)
    if not layers:
        raise ValueError(f"{path}: the model has no Linear or Conv2d layers to analyze")
    finite_or_raise(layers)
    for part in {id(m): m for m in (module, hookable) if m is not None}.values():
        # program.module() refuses eval(); its graph fixed the mode at export.
        with contextlib.suppress(NotImplementedError):
            part.eval()
        # Not Module.requires_grad_: ScriptModules refuse it; their parameters do not.
        for parameter in part.parameters():
            parameter.requires_grad_(False)
    _forward_or_raise(module, shape)

    effective = manifest.model_copy(
        update={"format": fmt, "arch": arch, "arch_kwargs": kwargs, "input_shape": shape}
    )
    return LoadedModel(
        module=module,
        format=fmt,
        layers=layers,
        hookable=hookable,
        input_shape=shape,
        manifest=effective,
        sha256=_sha256(path),
        num_parameters=sum(p.numel() for p in module.parameters()),
    )


def _shape_or_raise(shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(v) for v in shape)
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"input_shape must be a positive [C, H, W], got {list(shape)}")
    return (values[0], values[1], values[2])


def _need_shape(path: Path, shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if shape is None:
        raise ValueError(f"{path} does not record its input shape; give --input-shape C,H,W")
    return shape


def _registry_shape(arch: str, kwargs: Mapping[str, Any]) -> tuple[int, int, int]:
    c, h, w = get_model_spec(arch).input_shape
    channels = kwargs.get("in_channels")
    # The default shape is for the default channels; a 1-channel variant keeps H, W.
    return (int(channels), h, w) if isinstance(channels, int) and channels > 0 else (c, h, w)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _input_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float16 models take float16)."""
    floating = (p.dtype for p in module.parameters() if p.is_floating_point())
    return next(floating, torch.get_default_dtype())


def _forward_or_raise(module: nn.Module, shape: tuple[int, int, int]) -> None:
    try:
        with torch.no_grad():
            module(torch.zeros((1, *shape), dtype=_input_dtype(module)))
    except Exception as exc:
        raise ValueError(
            f"model does not accept input shape {list(shape)}: {_first_line(exc)}"
        ) from None


# --------------------------------------------------------------------------- weights-only formats


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        state: dict[str, Tensor] = load_file(str(path), device="cpu")
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {_first_line(exc)}") from None
    return state


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        # A file object, not the path: torch.load dispatches on a ".safetensors" name.
        with path.open("rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or ("Weights only load failed" in text and "truncated" not in text):
            detail = f" ({found.group(1)})" if found else ""
            raise ValueError(
                f"{path} is not a weights-only state_dict: its pickle needs code{detail}; "
                "save model.state_dict() or use safetensors"
            ) from None
        raise ValueError(
            f"{path} could not be read as a PyTorch state_dict (truncated or corrupt?): "
            f"{_first_line(exc)}"
        ) from None
    return _unwrap_state_dict(path, obj)


def _unwrap_state_dict(path: Path, obj: Any) -> dict[str, Tensor]:
    for _ in range(3):
        if not isinstance(obj, Mapping) or _all_tensors(obj):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{path} does not hold a state_dict (a mapping of names to tensors); "
            f"found {type(obj).__name__}"
        )
    if not _all_tensors(obj):
        odd = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)][:3]
        raise ValueError(
            f"{path} does not hold a state_dict: entries {', '.join(odd)} are not tensors "
            f"(expected the tensors themselves or one of the keys {', '.join(_WRAPPER_KEYS)})"
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def _build_and_fill(arch: str, kwargs: dict[str, Any], state: dict[str, Tensor]) -> nn.Module:
    module = get_model(arch, **kwargs)
    expected = module.state_dict()
    for key in expected:
        # Old checkpoints lack BatchNorm's step counter; it does not affect eval outputs.
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(expected[k].shape)} in arch"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} {_few(keys)}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"weights do not match arch {arch!r}: {'; '.join(problems)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights do not match arch {arch!r}: {_first_line(exc)}") from None
    return module


def _few(items: Sequence[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- torch.export (.pt2)

_aten = torch.ops.aten
# Ops whose args are (input, weight, bias, stride, padding, dilation, groups).
_CONV2D_OPS = {_aten.conv2d.default, _aten.conv2d.padding}
_CONVOLUTION_OPS = {_aten.convolution.default, _aten._convolution.default}
_PAD_MODES = {
    _aten.reflection_pad2d.default: "reflect",
    _aten.replication_pad2d.default: "replicate",
    _aten._pad_circular.default: "circular",
}


def _load_export(path: Path) -> torch.export.ExportedProgram:
    try:
        # A file object: given a path, torch.export.load insists on the ".pt2" name.
        with path.open("rb") as f:
            program = torch.export.load(f)
        tensors = [*program.state_dict.values(), *program.constants.values()]
        if any(isinstance(t, Tensor) and t.device.type != "cpu" for t in tensors):
            # Exported on a GPU: the loader's contract is a CPU module (callers move it).
            program = move_to_device_pass(program, "cpu")
    except Exception as exc:
        raise ValueError(
            f"{path} could not be loaded as a torch.export program: {_first_line(exc)}"
        ) from None
    return program


def _export_input(path: Path, program: torch.export.ExportedProgram) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` the program was exported for (None if symbolic).

    Raises:
        ValueError: the batch dimension is fixed: analyses run batches of other sizes.
    """
    user_inputs = set(program.graph_signature.user_inputs)
    node = next(
        (n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs), None
    )
    dims: tuple[Any, ...] = tuple(getattr(node.meta.get("val"), "shape", ())) if node else ()
    if dims and isinstance(dims[0], int):
        raise ValueError(
            f"{path} was exported with a fixed batch size {dims[0]}; analyses run other batch "
            "sizes: export with dynamic_shapes=({0: torch.export.Dim.DYNAMIC},) and an example "
            "batch of 2 or more"
        )
    if len(dims) == 4 and all(isinstance(d, int) for d in dims[1:]):
        return (int(dims[1]), int(dims[2]), int(dims[3]))
    return None


def _export_layers(
    program: torch.export.ExportedProgram, tensors: Mapping[str, Tensor] | None = None
) -> list[WeightLayer]:
    """Linear and Conv2d layers of an exported program, from its graph.

    A layer is a conv/linear op whose weight is a parameter; its name is the innermost module
    of ``nn_module_stack`` (the eager name), its geometry the op's arguments. Order: the
    parameters' order, which is the eager ``named_modules`` order. Weights are taken from
    ``tensors`` (by qualified name) where given, else from the program's state dict.
    """
    signature = program.graph_signature
    fqn_of = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    sources: dict[str, Any] = {**program.state_dict, **program.constants, **(tensors or {})}
    order = {fqn: i for i, fqn in enumerate(signature.parameters)}

    def tensor_of(arg: Any) -> tuple[str, Tensor] | None:
        if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" and arg.name in fqn_of:
            fqn = fqn_of[arg.name]
            value = sources.get(fqn)
            return (fqn, value.detach()) if isinstance(value, Tensor) else None
        return None

    found: dict[str, tuple[int, WeightLayer]] = {}
    for position, node in enumerate(program.graph.nodes):
        if node.op != "call_function":
            continue
        layer = _export_layer(node, tensor_of)
        if layer is None or layer[1].name in found:
            continue  # not a weight layer, or a module called again
        fqn, weight_layer = layer
        found[weight_layer.name] = (order.get(fqn, len(order) + position), weight_layer)
    return [layer for _, layer in sorted(found.values(), key=lambda item: item[0])]


def _module_name(node: torch.fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    name, type_name = list(stack.values())[-1]
    return str(name), str(type_name)


def _export_layer(node: torch.fx.Node, tensor_of: Any) -> tuple[str, WeightLayer] | None:
    target = node.target
    args = list(node.args)
    owner = _module_name(node)
    if target in _CONV2D_OPS or target in _CONVOLUTION_OPS:
        weight = tensor_of(args[1]) if len(args) > 1 else None
        if weight is None or weight[1].dim() != 4:
            return None
        if target in _CONVOLUTION_OPS:
            if len(args) > 6 and args[6]:
                return None  # transposed convolution
            geometry = [*args[3:6], args[8] if len(args) > 8 else 1]
        else:
            geometry = args[3:7]
        padding_mode, explicit_pad = _export_pad(args[0], owner)
        kind = LayerKind.CONV2D
    elif target == _aten.linear.default:
        weight = tensor_of(args[1]) if len(args) > 1 else None
        geometry, padding_mode, explicit_pad = [], "zeros", None
        kind = LayerKind.LINEAR
    elif target in (_aten.addmm.default, _aten.mm.default):
        # Decomposed Linear: addmm(bias, x, t(weight)) / mm(x, t(weight)).
        if owner is None or not owner[1].endswith("Linear"):
            return None
        transposed = args[-1]
        if not (
            isinstance(transposed, torch.fx.Node)
            and transposed.op == "call_function"
            and transposed.target in (_aten.t.default, _aten.permute.default)
        ):
            return None
        weight = tensor_of(transposed.args[0])
        args = [None, transposed.args[0], args[0] if target == _aten.addmm.default else None]
        geometry, padding_mode, explicit_pad = [], "zeros", None
        kind = LayerKind.LINEAR
    else:
        return None
    if weight is None or (kind is LayerKind.LINEAR and weight[1].dim() != 2):
        return None
    fqn, w = weight
    name = owner[0] if owner is not None else fqn.removesuffix(".weight")
    bias_ref = tensor_of(args[2]) if len(args) > 2 else None
    bias = bias_ref[1] if bias_ref is not None else None
    if kind is LayerKind.LINEAR:
        return fqn, WeightLayer(name, kind, w, bias)
    stride, padding, dilation, groups = _conv_geometry(geometry, w)
    if explicit_pad is not None:
        padding = explicit_pad
    return fqn, WeightLayer(
        name,
        kind,
        w,
        bias,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )


def _export_pad(source: Any, owner: tuple[str, str] | None) -> tuple[str, tuple[int, int] | None]:
    """A non-zero padding mode: Conv2d pads explicitly first, inside the same module."""
    if not (isinstance(source, torch.fx.Node) and source.op == "call_function"):
        return "zeros", None
    if owner is None or _module_name(source) != owner:
        return "zeros", None
    if source.target == _aten.pad.default:
        mode = str(source.args[2]) if len(source.args) > 2 else "constant"
        if mode == "constant":
            return "zeros", None
        pad = source.args[1]
    elif source.target in _PAD_MODES:
        mode, pad = _PAD_MODES[source.target], source.args[1]
    else:
        return "zeros", None
    if not isinstance(pad, Sequence) or len(pad) != 4:
        return "zeros", None
    # F.pad order is (left, right, top, bottom); Conv2d padding is (h, w).
    return mode, (int(pad[2]), int(pad[0]))  # type: ignore[arg-type]


def _conv_geometry(
    args: Sequence[Any], weight: Tensor
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """(stride, padding, dilation, groups) from a conv op's args, defaults for absent ones."""

    def pair(value: Any, default: int) -> tuple[int, int]:
        if value is None:
            return (default, default)
        if isinstance(value, int):
            return (value, value)
        values = [int(v) for v in value]
        return (values[0], values[-1])

    stride = pair(args[0] if len(args) > 0 else None, 1)
    dilation = pair(args[2] if len(args) > 2 else None, 1)
    groups = int(args[3]) if len(args) > 3 and args[3] is not None else 1
    raw_padding = args[1] if len(args) > 1 else None
    if isinstance(raw_padding, str):
        kernel = (int(weight.shape[2]), int(weight.shape[3]))
        if raw_padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): total d*(k-1), nn.Conv2d keeps the low side's share
            padding = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
    else:
        padding = pair(raw_padding, 0)
    return stride, padding, dilation, groups


def _export_modules(
    program: torch.export.ExportedProgram,
    layers: Sequence[WeightLayer],
    shape: tuple[int, int, int],
) -> tuple[nn.Module, nn.Module | None]:
    """(module, hookable): the unflattened program for both when it is faithful.

    The unflattened module is checked on zeros: every layer's hook fires and its output equals
    ``program.module()``'s. Otherwise ``program.module()`` runs and there is no hookable module.
    """
    flat = program.module()
    names = [layer.name for layer in layers]
    calls: Counter[str] = Counter()
    handles: list[RemovableHandle] = []
    try:
        unflat: nn.Module = torch.export.unflatten(program)
        for name, sub in resolve_modules(unflat, names).items():

            def pre_hook(_m: nn.Module, _args: tuple[Any, ...], _name: str = name) -> None:
                calls[_name] += 1

            handles.append(sub.register_forward_pre_hook(pre_hook))
        # Random, not zeros: zeros can make different graphs agree.
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((2, *shape), generator=generator, dtype=_input_dtype(flat))
        with torch.no_grad():
            faithful = _same(unflat(x), flat(x)) and all(calls[n] for n in names)
    except Exception:
        # Bad input shapes are reported by the caller's forward check on ``flat``.
        faithful = False
    finally:
        for handle in handles:
            handle.remove()
    if not faithful:
        return flat, None
    return unflat, unflat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --------------------------------------------------------------------------- TorchScript

_TS_CONV_KINDS = ("aten::conv2d", "aten::_convolution", "aten::_convolution_mode")
_TS_LAYER_KINDS = (*_TS_CONV_KINDS, "aten::linear")


def _load_torchscript(path: Path) -> nn.Module:
    try:
        module: nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(path), map_location="cpu"
        )
    except Exception as exc:
        raise ValueError(f"{path} could not be loaded as TorchScript: {_first_line(exc)}") from None
    return module


def _torchscript_layers(module: nn.Module) -> list[WeightLayer]:
    """Linear and Conv2d submodules of a scripted or traced module, by ``original_name``."""
    layers: list[WeightLayer] = []
    for name, sub in module.named_modules():
        kind = {"Linear": LayerKind.LINEAR, "Conv2d": LayerKind.CONV2D}.get(
            str(getattr(sub, "original_name", ""))
        )
        weight = getattr(sub, "weight", None)
        if kind is None or not isinstance(weight, Tensor):
            continue
        bias = getattr(sub, "bias", None)
        bias = bias.detach() if isinstance(bias, Tensor) else None
        if kind is LayerKind.LINEAR:
            layers.append(WeightLayer(name, kind, weight.detach(), bias))
            continue
        if hasattr(sub, "stride"):  # scripted: nn.Conv2d's constants are kept
            geometry = [sub.stride, sub.padding, sub.dilation, sub.groups]
            padding_mode = str(getattr(sub, "padding_mode", "zeros"))
            explicit_pad = None
        else:  # traced: only the forward graph records them
            geometry, padding_mode, explicit_pad = _traced_conv_geometry(sub, name)
        stride, padding, dilation, groups = _conv_geometry(geometry, weight)
        layers.append(
            WeightLayer(
                name,
                kind,
                weight.detach(),
                bias,
                stride=stride,
                padding=explicit_pad or padding,
                dilation=dilation,
                groups=groups,
                padding_mode=padding_mode,
            )
        )
    return layers


def _ts_value(value: Any) -> Any:
    """The constant behind a TorchScript graph value (lists built from constants included)."""
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [_ts_value(v) for v in node.inputs()]
    raise ValueError(f"not a constant: {node.kind()}")


def _traced_conv_geometry(
    sub: nn.Module, name: str
) -> tuple[list[Any], str, tuple[int, int] | None]:
    graph: Any = sub.graph
    padding_mode, explicit_pad = "zeros", None
    for node in graph.nodes():
        kind = node.kind()
        inputs = list(node.inputs())
        if kind == "aten::pad":
            mode = _ts_value(inputs[2])
            pad = _ts_value(inputs[1])
            if mode != "constant" and len(pad) == 4:
                padding_mode, explicit_pad = str(mode), (int(pad[2]), int(pad[0]))
        elif kind in _TS_CONV_KINDS:
            args = [_ts_value(v) for v in inputs[3:]]
            if kind == "aten::_convolution":
                if args[3]:
                    break  # transposed
                return [*args[0:3], args[5]], padding_mode, explicit_pad
            return args[0:4], padding_mode, explicit_pad
    raise ValueError(f"TorchScript layer {name!r}: no convolution found in its graph")


def _torchscript_input_shapes(module: nn.Module, x: Tensor) -> dict[str, tuple[int, ...]]:
    """Per-layer input shapes of a TorchScript module, which takes no Python hooks.

    The forward graph is inlined, the input of every conv/linear op whose weight is a
    submodule's ``weight`` becomes an extra output, and the rewritten graph runs once.
    """
    forward: Any = module.forward
    graph: Any = forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    names: list[str] = []
    probes: list[Any] = []
    for node in graph.nodes():  # top-level block only: ops inside if/loop are not reachable
        if node.kind() not in _TS_LAYER_KINDS:
            continue
        inputs = list(node.inputs())
        parts: list[str] = []
        source = inputs[1].node()
        while source.kind() == "prim::GetAttr":
            parts.append(source.s("name"))
            source = next(iter(source.inputs())).node()
        if not parts or parts[0] != "weight":
            continue
        names.append(".".join(reversed(parts[1:])))
        probes.append(inputs[0])
    if not probes:
        return {}
    tuple_node = graph.create("prim::TupleConstruct", probes, 1)
    tuple_node.output().setType(torch._C.TupleType([p.type() for p in probes]))
    tuple_node.insertBefore(graph.return_node())
    graph.eraseOutput(0)
    graph.registerOutput(tuple_node.output())
    probe = torch._C._create_function_from_graph("deepscope_probe", graph)
    with torch.no_grad():
        values = probe(module._c, x)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, value in zip(names, values, strict=True):
        if name in shapes:
            raise ValueError(
                f"module {name!r} is called more than once in one forward pass (a reused "
                "module); its input shape is ambiguous"
            )
        shapes[name] = tuple(int(d) for d in value.shape[1:])
    return shapes


# --------------------------------------------------------------------------- input shapes


def layer_input_shapes(loaded: LoadedModel) -> dict[str, tuple[int, ...]]:
    """``{layer name: per-sample input shape}`` of every weight layer, from one forward pass.

    Linear: ``(in,)`` (or ``(..., in)``); Conv2d: ``(C_in, H, W)``. Uses input pre-hooks on
    :attr:`LoadedModel.hookable`; for TorchScript the inlined graph is probed instead.

    Raises:
        ValueError: a layer is called more than once, or its input could not be observed.
    """
    names = [layer.name for layer in loaded.layers]
    x = torch.zeros((1, *loaded.input_shape), dtype=_input_dtype(loaded.module))
    if loaded.hookable is not None:
        try:
            with (
                eval_mode(loaded.hookable),
                torch.no_grad(),
                capture_activations(loaded.hookable, names, Where.INPUT) as capture,
            ):
                loaded.hookable(x)
                shapes = {n: tuple(capture[n].shape[1:]) for n in names if n in capture}
        except ValueError as exc:
            # torch.fx appends the graph node it was executing: keep the one-line message.
            raise ValueError(_first_line(exc)) from None
    elif loaded.format is not ModelFormat.TORCHSCRIPT:
        raise ValueError(
            f"layer inputs of this {loaded.format} model cannot be observed: it has no module "
            "whose layers take hooks (torch.export.unflatten did not reproduce the program)"
        )
    else:
        try:
            shapes = _torchscript_input_shapes(loaded.module, x)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(
                "cannot observe layer inputs of this TorchScript model (it takes no hooks): "
                f"{_first_line(exc)}; upload safetensors + --arch or a .pt2 instead"
            ) from None
    missing = [n for n in names if n not in shapes]
    if missing:
        why = (
            "were not called in a forward pass"
            if loaded.hookable is not None
            else "are not visible in the TorchScript graph (called inside control flow?)"
        )
        raise ValueError(
            f"layer(s) {_few([repr(n) for n in missing])} {why}; their input shapes are unknown"
        )
    return {n: tuple(int(d) for d in shapes[n]) for n in names}
