"""One analysis, start to finish: model + data in, ``result.json`` + artifacts out.

``deepscope analyze`` calls :func:`run_analysis` in-process and the worker's job calls the same
function, so a job's result and the command line's are the same :class:`Result`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from deepscope import __version__
from deepscope.analyses.context import Progress, RunContext
from deepscope.analyses.registry import AnalysisParams, get_analysis, load_compute
from deepscope.contract.result import ModelInfo, Result
from deepscope.models.datasets import Dataset, load_dataset
from deepscope.models.loading import LoadedModel

__all__ = ["resolve_device", "run_analysis", "write_result"]


def resolve_device(name: str | None = None) -> torch.device:
    """``auto`` / None → CUDA when present, else CPU. Called at run time, never at import."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return device


def run_analysis(
    loaded: LoadedModel,
    analysis: str,
    params: AnalysisParams,
    out_dir: Path,
    *,
    dataset: str | Dataset | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> Result:
    """Run one registered analysis and write ``out_dir/result.json`` and its artifacts.

    Raises:
        UnknownAnalysisError: ``analysis`` is not registered.
        ValueError: bad parameters for this model (unknown layer, missing dataset, a dataset
            whose images do not fit the model).
    """
    spec = get_analysis(analysis)
    compute = load_compute(spec)
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = _resolve_dataset(loaded, dataset)
    ctx = RunContext(
        loaded=loaded,
        params=params,
        out_dir=out_dir,
        device=resolve_device(device),
        progress=progress or (lambda _f, _m: None),
        dataset=ds,
    )
    metrics = compute(ctx)
    if not isinstance(metrics, spec.metrics):
        raise TypeError(
            f"{spec.compute} returned {type(metrics).__name__}, not {spec.metrics.__name__}"
        )
    result = Result(
        analysis=spec.name,
        params=params.model_dump(mode="json", exclude={"analysis"}),
        model=ModelInfo(
            sha256=loaded.sha256,
            format=loaded.format.value,
            arch=loaded.manifest.arch,
            input_shape=list(loaded.input_shape),
            num_parameters=loaded.num_parameters,
        ),
        dataset=None if ds is None else ds.name,
        deepscope_version=__version__,
        metrics=metrics,
        artifacts=ctx.artifacts,
        warnings=ctx.warnings,
        duration_s=round(time.perf_counter() - started, 3),
    )
    write_result(result, out_dir)
    ctx.progress(1.0, "done")
    return result


def write_result(result: Result, out_dir: Path) -> Path:
    """``out_dir/result.json``, the result as JSON."""
    path = out_dir / "result.json"
    path.write_text(result.model_dump_json(indent=2, by_alias=True) + "\n")
    return path


def _resolve_dataset(loaded: LoadedModel, dataset: str | Dataset | None) -> Dataset | None:
    if dataset is None and loaded.manifest.training is not None:
        dataset = loaded.manifest.training.dataset
    if dataset is None:
        return None
    ds = load_dataset(dataset, "train") if isinstance(dataset, str) else dataset
    if ds.input_shape != loaded.input_shape:
        shape = "×".join(map(str, ds.input_shape))
        want = "×".join(map(str, loaded.input_shape))
        raise ValueError(f"dataset {ds.name!r} has {shape} images but the model takes {want}")
    return ds
