"""The ``deepscope`` command line.

Heavy imports (torch, the analyses, the service) happen inside the commands that need them, so
``deepscope --help`` is instant and the remote commands (``submit``, ``wait``, ``jobs``,
``check``, …) work in a light install (``pip install deepscope``: no torch, no FastAPI, no
Redis); an in-process command there says which extra it needs. Every user error (bad file,
unknown arch, bad params) ends as one line on stderr and exit code 2; set ``DEEPSCOPE_DEBUG=1``
for the traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from deepscope.analyses.registry import analysis_names

__all__ = ["SERVER_EXTRA", "app", "error_message", "main"]

app = typer.Typer(
    name="deepscope",
    help="See inside trained image classifiers: signal spaces, residuals, inverse maps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: What an in-process command says in a light install.
SERVER_EXTRA = "this command needs the server extra: pip install 'deepscope[server]'"


def _version(value: bool) -> None:
    if value:
        from deepscope import __version__

        typer.echo(f"deepscope {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """See inside trained image classifiers: signal spaces, residuals, inverse maps."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken entry
        return False


def _require_server(*modules: str) -> None:
    """ValueError (exit 2) naming the server extra when a module this in-process command
    imports is not installed (the light install: SDK and remote commands only)."""
    missing = [m for m in modules if not _installed(m)]
    if missing:
        raise ValueError(f"{SERVER_EXTRA} ({', '.join(missing)} not installed)")


def _print_json(value: Any) -> None:
    """``value`` (pydantic models inside allowed) as indented JSON on stdout."""
    from pydantic import BaseModel

    def plain(item: Any) -> Any:
        if isinstance(item, BaseModel):
            return item.model_dump(mode="json", by_alias=True)
        if isinstance(item, list | tuple):
            return [plain(i) for i in item]
        if isinstance(item, dict):
            return {k: plain(v) for k, v in item.items()}
        return item

    typer.echo(json.dumps(plain(value), indent=2))


JsonOption = Annotated[
    bool, typer.Option("--json", help="print the result as JSON on stdout (notes stay on stderr)")
]
#: A listing's page options.
CursorOption = Annotated[str | None, typer.Option(help="the page after a previous one")]
AllPagesOption = Annotated[bool, typer.Option("--all", help="every page")]


def _json_arg(text: str | None, what: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc.msg} (at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _shape_arg(text: str | None) -> tuple[int, int, int] | None:
    if not text:
        return None
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"--input-shape must be C,H,W (three integers), got {text!r}") from None
    if len(dims) != 3 or min(dims) <= 0:
        raise ValueError(f"--input-shape must be three positive integers C,H,W, got {text!r}")
    return (dims[0], dims[1], dims[2])


# The registry is torch-free and quick to import; plugins named in DEEPSCOPE_ANALYSIS_PLUGINS
# are loaded with it, so their analyses are in the help too.
AnalysisOption = Annotated[
    str,
    typer.Option(
        metavar="ANALYSIS",
        help=f"one of {', '.join(analysis_names())} (`deepscope list-analyses` says what each "
        "does)",
    ),
]


def _echo_progress(fraction: float, message: str) -> None:
    typer.echo(f"[{fraction:4.0%}] {message}", err=True)


@app.command()
def analyze(
    model_file: Annotated[
        Path, typer.Argument(help="safetensors, state_dict, .pt2 or TorchScript")
    ],
    analysis: AnalysisOption,
    out: Annotated[Path, typer.Option(help="output directory (result.json + PNGs)")],
    arch: Annotated[
        str | None, typer.Option(help="registered architecture (weights files)")
    ] = None,
    arch_kwargs: Annotated[str | None, typer.Option(help="JSON kwargs for the arch")] = None,
    input_shape: Annotated[str | None, typer.Option(help="C,H,W")] = None,
    params: Annotated[str | None, typer.Option(help="analysis parameters as JSON")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="digits, fashion-mnist, an idx directory or an .npz")
    ] = None,
    allow_code: Annotated[
        bool, typer.Option(help="allow code-bearing formats (.pt2, TorchScript)")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run one analysis in-process (no service) and write OUT/result.json and its artifacts."""
    _require_server("torch")
    from deepscope.analyses.registry import parse_params

    parsed = parse_params(analysis, _json_arg(params, "--params"))
    kwargs = _json_arg(arch_kwargs, "--arch-kwargs")
    from deepscope.analyses.run import run_analysis
    from deepscope.models.loading import code_models_allowed, load_model

    loaded = load_model(
        model_file,
        arch=arch,
        arch_kwargs=kwargs or None,
        input_shape=_shape_arg(input_shape),
        allow_code=allow_code or code_models_allowed(),
    )
    result = run_analysis(
        loaded,
        analysis,
        parsed,
        out,
        dataset=dataset,
        device=device,
        progress=None if quiet else _echo_progress,
    )
    typer.echo(f"{out / 'result.json'} ({len(result.artifacts)} artifacts)")


@app.command()
def train(
    arch: Annotated[str, typer.Argument(help="registered architecture, e.g. fcnn1")],
    dataset: Annotated[str, typer.Option(help="digits, fashion-mnist, an idx directory or .npz")],
    out: Annotated[Path, typer.Option(help="weights file to write (.safetensors)")],
    epochs: Annotated[int, typer.Option(min=1)] = 1,
    recipe: Annotated[
        str, typer.Option(help="paper (SGD lr 1e-3, momentum 0.9, batch 32) or fast (Adam)")
    ] = "paper",
    seed: int = 0,
    arch_kwargs: Annotated[str | None, typer.Option(help="JSON kwargs for the arch")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
) -> None:
    """Train ARCH on a dataset; write safetensors plus a manifest beside it (.json)."""
    _require_server("torch")
    from deepscope.analyses.run import resolve_device
    from deepscope.models.training import Recipe, train_model

    try:
        chosen = Recipe(recipe)
    except ValueError:
        raise ValueError(
            f"unknown recipe {recipe!r}; valid: {', '.join(r.value for r in Recipe)}"
        ) from None

    def report(epoch: int, loss: float, accuracy: float) -> None:
        typer.echo(f"epoch {epoch}: loss {loss:.4f}, held-out accuracy {accuracy:.2%}", err=True)

    result, _ = train_model(
        arch,
        dataset,
        out,
        epochs=epochs,
        recipe=chosen,
        seed=seed,
        arch_kwargs=_json_arg(arch_kwargs, "--arch-kwargs") or None,
        device=resolve_device(device),
        progress=report,
    )
    typer.echo(
        f"{arch} on {dataset}: held-out accuracy {result.accuracy:.2%} "
        f"({result.epochs} epochs, {result.seconds:.1f} s) → {out}"
    )


@app.command("list-archs")
def list_archs(as_json: JsonOption = False) -> None:
    """List the registered architectures (the paper's networks and every torchvision classifier)."""
    _require_server("torch", "torchvision")
    from deepscope.models.registry import get_model_spec, list_models

    specs = [(name, get_model_spec(name)) for name in list_models()]
    if as_json:
        _print_json(
            [
                {
                    "name": name,
                    "input_shape": list(spec.input_shape),
                    "description": spec.description,
                }
                for name, spec in specs
            ]
        )
        return
    for name, spec in specs:
        shape = "×".join(map(str, spec.input_shape))
        typer.echo(f"{name:28s} {shape:10s} {spec.description}")


@app.command("list-analyses")
def list_analyses_command(
    metrics: Annotated[bool, typer.Option("--metrics", help="also list per-layer metrics")] = False,
    as_json: JsonOption = False,
) -> None:
    """List the registered analyses: name, queue, what each computes, and (with --metrics) the
    per-layer metrics that `check --max` can gate on."""
    from deepscope.analyses.registry import list_analyses

    if as_json:
        _print_json(
            [
                {
                    "name": spec.name,
                    "resource": spec.resource.value,
                    "summary": spec.summary,
                    "generates_images": spec.generates_images,
                    "layer_metrics": list(spec.layer_metrics),
                }
                for spec in list_analyses()
            ]
        )
        return
    for spec in list_analyses():
        typer.echo(f"{spec.name:26s} {spec.resource.value:4s} {spec.summary}")
        if metrics and spec.layer_metrics:
            typer.echo(f"{'':31s} per-layer metrics: {', '.join(spec.layer_metrics)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where to write the demo's model and results")] = Path(
        "out/demo"
    ),
) -> None:
    """Train fcnn1 on the digits in seconds, then run signal_space and residuals on it."""
    _require_server("torch")
    from deepscope.analyses.registry import parse_params
    from deepscope.analyses.run import run_analysis
    from deepscope.models.loading import load_model
    from deepscope.models.training import Recipe, train_model

    weights = out / "fcnn1-digits.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    result, _ = train_model("fcnn1", "digits", weights, epochs=10, recipe=Recipe.FAST, seed=0)
    typer.echo(f"trained fcnn1 on digits: held-out accuracy {result.accuracy:.1%} → {weights}")
    loaded = load_model(weights)
    for analysis in ("signal_space", "residuals"):
        res = run_analysis(loaded, analysis, parse_params(analysis), out / analysis)
        typer.echo(f"{analysis}: {out / analysis / 'result.json'} ({len(res.artifacts)} artifacts)")
    typer.echo(
        f"open {out}/signal_space/weights_fc1.png and {out}/residuals/residuals_fc1.png to start"
    )


def error_message(exc: BaseException) -> str:
    """One readable line for a user error (pydantic's errors become ``field: problem; ...``)."""
    from deepscope.contract.errors import user_message

    return user_message(exc, local=True)  # the user's own paths stay


def main() -> None:
    """Console entry point: user errors as one line, exit code 2."""
    try:
        app()
    except (ValueError, OSError) as exc:
        if os.environ.get("DEEPSCOPE_DEBUG") == "1":
            raise
        typer.echo(f"deepscope: error: {error_message(exc)}", err=True)
        sys.exit(2)


# --- the service: `deepscope api`, `deepscope worker`, `deepscope up` -------------------------


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    workers: Annotated[
        int,
        typer.Option(
            min=1, max=64, help="API processes sharing the port (uvicorn's process manager)"
        ),
    ] = 1,
) -> None:
    """Serve the HTTP API (uvicorn). Needs Redis: DEEPSCOPE_REDIS_URL or a running `up`."""
    _require_server("fastapi", "uvicorn", "redis")
    import uvicorn

    from deepscope.settings import Settings

    Settings().resolved_redis_url()  # no Redis: one clear line now, not at the first request
    uvicorn.run(
        "deepscope.service.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        log_level=log_level,
        # Several processes: uvicorn's supervisor forks them, restarts one that dies, and
        # the kernel spreads connections over them (SO_REUSEPORT is not needed: one socket).
        workers=workers,
        timeout_graceful_shutdown=5,
    )


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated: cpu, gpu")] = "cpu",
    kind: Annotated[
        str,
        typer.Option(help="auto (gpu queues: in-process; else fork per job), fork or simple"),
    ] = "auto",
    name: Annotated[str | None, typer.Option(help="worker name (default: random)")] = None,
    burst: Annotated[bool, typer.Option(help="exit when the queues are empty")] = False,
) -> None:
    """Run an RQ worker for analysis jobs (torch is imported once, before any job forks)."""
    _require_server("torch", "redis", "rq")
    import logging

    from deepscope.settings import Settings
    from deepscope.workers.worker import WorkerKind, parse_queues, run_worker

    try:
        chosen = WorkerKind(kind)
    except ValueError:
        valid = ", ".join(k.value for k in WorkerKind)
        raise ValueError(f"unknown worker kind {kind!r}; valid: {valid}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_worker(Settings(), parse_queues(queues), kind=chosen, name=name, burst=burst)
    # The worker has deregistered; the interpreter's teardown of torch would take seconds
    # more (a slow Ctrl-C), and there is nothing left to save.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="interface of the API")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="cpu worker processes")] = 2,
    gpu_workers: Annotated[
        int | None, typer.Option(min=0, help="gpu worker processes (default: 1 if a GPU)")
    ] = None,
    demo: Annotated[
        bool, typer.Option(help="on first start, train and register the demo models")
    ] = True,
    logs: Annotated[bool, typer.Option(help="show the children's logs here")] = False,
) -> None:
    """Run the whole stack here: Redis (embedded), workers and the API. Ctrl-C stops it."""
    _require_server("torch", "fastapi", "uvicorn", "redis", "rq")
    from deepscope.service.stack import Stack, StackOptions
    from deepscope.settings import Settings

    options = StackOptions(
        host=host,
        port=port,
        workers=workers,
        gpu_workers=gpu_workers,
        demo=demo,
        show_logs=logs,
    )
    code = Stack(Settings(), options, echo=typer.echo).run()
    if code:
        raise typer.Exit(code)


# --- the service from a terminal or a CI job: submit, wait, jobs, check, diff, report, ... -----
# Built on the SDK (deepscope.client, no torch). The server is --url / DEEPSCOPE_URL (default
# http://127.0.0.1:8000), the key --key / DEEPSCOPE_API_KEY (default: the development key that
# `deepscope up` keeps in $DEEPSCOPE_DATA_DIR/dev-api-key). Results go to stdout (a job id, a
# table, or with --json one JSON document), progress and notes to stderr. Exit codes: 0 ok; 1 a
# job failed or a gate failed; 2 an error (unreachable server, unknown id, bad input).

if TYPE_CHECKING:  # the SDK is imported by the commands that use it (fast --help)
    from deepscope.client import Client, CompareOut, JobOut, Page
    from deepscope.gates import GateOutcome

_Item = TypeVar("_Item")

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="DEEPSCOPE_URL", help="the service [default: http://127.0.0.1:8000]"
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="DEEPSCOPE_API_KEY",
        help="API key [default: the dev key in $DEEPSCOPE_DATA_DIR/dev-api-key]",
        show_default=False,
    ),
]
LabelOption = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        metavar="KEY=VALUE",
        help="a label (repeatable), e.g. git_sha=3f2a9c1",
    ),
]


def _client(url: str | None, key: str | None, timeout: float = 120.0) -> Client:
    """A ``deepscope.client.Client`` for the resolved URL and key."""
    from deepscope.client import Client, resolve_credentials

    resolved_url, resolved_key = resolve_credentials(url, key)
    return Client(resolved_url, resolved_key, timeout=timeout)


@contextlib.contextmanager
def _service_errors() -> Iterator[None]:
    """A DeepscopeError becomes a one-line user error (exit code 2)."""
    from deepscope.client import DeepscopeError

    try:
        yield
    except DeepscopeError as exc:
        raise ValueError(str(exc)) from None


def _note(text: str) -> None:
    typer.echo(text, err=True)


def _labels(items: list[str] | None) -> dict[str, str] | None:
    """``--label KEY=VALUE`` options → a dict (None without any)."""
    if not items:
        return None
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--label takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def _fmt(value: float | None) -> str:
    return "∞" if value is None else f"{value:.4g}"


def _summary(job: JobOut) -> list[str]:
    """A few lines on what a finished job found."""
    lines: list[str] = []
    result = job.result
    if result is None:
        return lines
    for layer, values in result.metrics.layer_values().items():
        shown = "  ".join(f"{metric.replace('_', ' ')} {_fmt(v)}" for metric, v in values.items())
        lines.append(f"  {layer:24s} {shown}")
    if result.predictions is not None:
        images = result.predictions.images
        lines.append(f"  {len(images)} generated images predicted by the model (result.json)")
    lines.append(f"  {len(result.artifacts)} artifacts")
    return lines


def _finish_job(
    client: Client,
    job: JobOut,
    out: Path | None,
    quiet: bool,
    *,
    as_json: bool = False,
    mlflow: bool = False,
) -> None:
    """Print the outcome of a finished job (with ``as_json``, the job as JSON on stdout),
    download it to ``out``, log it to MLflow; exit 1 unless it succeeded."""
    from deepscope.client import JobStatus

    if as_json:
        _print_json(job)
    if job.status is not JobStatus.SUCCEEDED:
        reason = f" ({job.error.type}): {job.error.message}" if job.error else ""
        _note(f"job {job.id} {job.status.value}{reason}")
        raise typer.Exit(1)
    if not quiet:
        took = ""
        if job.cached:
            took = " (from the cache)"
        elif job.started_at and job.finished_at:
            took = f" in {(job.finished_at - job.started_at).total_seconds():.2f} s"
        _note(f"job {job.id} ({job.analysis}) succeeded{took}")
        for line in _summary(job):
            _note(line)
    if out is not None:
        files = client.download_artifacts(job, out)
        _note(f"wrote {len(files)} files to {out}")
    if mlflow:
        run_id = client.log_to_mlflow(job)
        _note(f"logged to MLflow run {run_id}")
    if not quiet:
        _note(f"report: {client.report_url(job)}")


@app.command()
def submit(
    model: Annotated[
        str, typer.Argument(help="a model file to upload first, or the id of an uploaded model")
    ],
    analysis: AnalysisOption,
    params: Annotated[str | None, typer.Option(help="analysis parameters as JSON")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="digits, fashion-mnist or an uploaded dataset's id")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="upload: registered architecture")] = None,
    arch_kwargs: Annotated[str | None, typer.Option(help="upload: arch kwargs (JSON)")] = None,
    input_shape: Annotated[str | None, typer.Option(help="upload: C,H,W")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="upload: manifest JSON [default: MODEL.json beside it]")
    ] = None,
    name: Annotated[str | None, typer.Option(help="upload: the model's name")] = None,
    label: LabelOption = None,
    callback_url: Annotated[
        str | None,
        typer.Option(help="POST the final job here, signed, when it ends (an allowed host)"),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="the job's Idempotency-Key: a rerun with the same key returns the same job "
            "[default: a fresh one]"
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job, with progress")] = False,
    out: Annotated[
        Path | None, typer.Option(help="download result.json and artifacts here (implies --wait)")
    ] = None,
    mlflow: Annotated[
        bool, typer.Option("--mlflow", help="log the finished job to MLflow (implies --wait)")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the job")] = 3600.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Submit an analysis to the service; print the job id (with --json, the job). A file is
    uploaded (and validated) first; the same file again is the same model. Labels go on the
    uploaded model and on the job."""
    from deepscope.client import ModelStatus
    from deepscope.client._core import hold_for

    parsed = _json_arg(params, "--params")
    labels = _labels(label)
    with _service_errors(), _client(url, key) as client:
        path = Path(model)
        if path.is_file():
            kwargs = _json_arg(arch_kwargs, "--arch-kwargs")
            uploaded = client.upload_model(
                path,
                manifest,
                arch=arch,
                arch_kwargs=kwargs or None,
                input_shape=_shape_arg(input_shape),
                name=name,
                labels=labels,
                wait=True,
            )
            if uploaded.status is not ModelStatus.READY:
                raise ValueError(f"model {uploaded.id} is invalid: {uploaded.error}")
            if not quiet:
                _note(
                    f"uploaded {path.name}: model {uploaded.id} ready "
                    f"({len(uploaded.layers)} layers, {uploaded.num_parameters} parameters)"
                )
            model_id = uploaded.id
        elif len(model) == 32 and all(c in "0123456789abcdef" for c in model):
            model_id = model
        else:
            raise ValueError(f"{model!r} is neither a model file nor a model id")
        waiting = wait or out is not None or mlflow
        # Submit and wait in one request (the service holds it until the job ends, briefly
        # with a progress bar to draw); then wait sends nothing for a job that ended.
        hold = min(hold_for(progress=not quiet), timeout) if waiting else 0.0
        job = client.submit(
            model_id,
            analysis,
            parsed or None,
            dataset,
            labels=labels,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            wait=hold,
        )
        if waiting:
            if not as_json:
                typer.echo(job.id)
            job = client.wait(job, progress=not quiet, timeout=timeout, raise_on_failure=False)
            _finish_job(client, job, out, quiet, as_json=as_json, mlflow=mlflow)
            return
        if as_json:
            _print_json(job)
        else:
            typer.echo(job.id)
        if not quiet and job.cached:
            _note("answered from the cache (succeeded)")


@app.command("wait")
def wait_job(
    job: Annotated[str, typer.Argument(help="the job id")],
    out: Annotated[Path | None, typer.Option(help="download result.json and artifacts")] = None,
    mlflow: Annotated[
        bool,
        typer.Option(
            "--mlflow",
            help="log the finished job to MLflow (metrics, params, artifacts, report): the "
            "active run, else MLFLOW_RUN_ID, else a new run in MLFLOW_EXPERIMENT_NAME at "
            "MLFLOW_TRACKING_URI",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 3600.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Wait for a job with a progress bar; exit 1 unless it succeeded."""
    if mlflow:
        from deepscope.client.mlflow import require_mlflow

        with _service_errors():
            require_mlflow()  # before the wait, not after an hour of it
    with _service_errors(), _client(url, key) as client:
        done = client.wait(job, progress=not quiet, timeout=timeout, raise_on_failure=False)
        _finish_job(client, done, out, quiet, as_json=as_json, mlflow=mlflow)


@app.command("predict")
def predict_images(
    model: Annotated[str, typer.Argument(help="the model id")],
    images: Annotated[list[Path], typer.Argument(help="PNG files, or one .npz with 'images'")],
    top_k: Annotated[int, typer.Option(min=1, help="classes per image")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="print the predictions as JSON")] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """What the model says about each image: its top classes and their probabilities."""
    with _service_errors(), _client(url, key) as client:
        predictions = client.predict(model, images, top_k=top_k)
    if as_json:
        _print_json(predictions)
        return
    labels = [p.name for p in images] if len(images) == len(predictions) else None
    for i, pred in enumerate(predictions):
        label = labels[i] if labels else f"{images[0].name}[{i}]"
        top = "  ".join(f"{t.class_} {t.probability:.1%}" for t in pred.top_k)
        typer.echo(f"{label}\t{top}")


# --- lists and single jobs: jobs, models, cancel, bundle --------------------------------------


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _check_status(kind: type[StrEnum], status: str | None) -> None:
    """ValueError (exit 2) naming the valid values when ``status`` is not one of ``kind``."""
    if status is not None and status not in {s.value for s in kind}:
        valid = ", ".join(s.value for s in kind)
        raise ValueError(f"unknown status {status!r}; valid: {valid}")


def _listing(
    one_page: Callable[..., Page[_Item]],
    every_page: Callable[..., Iterator[_Item]],
    all_: bool,
    cursor: str | None,
    filters: dict[str, Any],
) -> tuple[list[_Item], str | None]:
    """The items of one page (from ``cursor``) and the next page's cursor, or, with ``all_``,
    every page's items and None."""
    if all_:
        return list(every_page(**filters)), None
    page = one_page(cursor=cursor, **filters)
    return list(page.items), page.next_cursor


@app.command("jobs")
def list_jobs(
    status: Annotated[
        str | None, typer.Option(help="queued, running, succeeded, failed or canceled")
    ] = None,
    analysis: Annotated[str | None, typer.Option(help="only this analysis")] = None,
    model: Annotated[str | None, typer.Option(help="only jobs of this model id")] = None,
    label: LabelOption = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="jobs per page")] = 20,
    cursor: CursorOption = None,
    all_: AllPagesOption = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """List jobs, newest first: id, status, analysis, model, created, labels. Filters apply
    before the limit; the next page's cursor is noted on stderr (--all: every page)."""
    from deepscope.client import JobStatus

    _check_status(JobStatus, status)
    filters: dict[str, Any] = {
        "status": status,
        "analysis": analysis,
        "model_id": model,
        "labels": _labels(label),
        "limit": limit,
    }
    with _service_errors(), _client(url, key) as client:
        jobs, next_cursor = _listing(client.list_jobs, client.iter_jobs, all_, cursor, filters)
    if as_json:
        _print_json({"jobs": jobs, "next_cursor": next_cursor})
        return
    for job in jobs:
        created = job.created_at.strftime("%Y-%m-%d %H:%M:%S")
        labels = _labels_text(getattr(job, "labels", None) or {})
        typer.echo(
            f"{job.id}  {job.status.value:9s}  {job.analysis:24s}  {job.model_id[:8]}  "
            f"{created}  {labels}".rstrip()
        )
    if next_cursor:
        _note(f"more: --cursor {next_cursor}")


@app.command("models")
def list_models_command(
    status: Annotated[str | None, typer.Option(help="validating, ready or invalid")] = None,
    label: LabelOption = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="models per page")] = 20,
    cursor: CursorOption = None,
    all_: AllPagesOption = False,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """List models, newest first: id, status, name, arch, parameters, labels."""
    from deepscope.client import ModelStatus

    _check_status(ModelStatus, status)
    filters: dict[str, Any] = {"status": status, "labels": _labels(label), "limit": limit}
    with _service_errors(), _client(url, key) as client:
        models, next_cursor = _listing(
            client.list_models, client.iter_models, all_, cursor, filters
        )
    if as_json:
        _print_json({"models": models, "next_cursor": next_cursor})
        return
    for m in models:
        labels = _labels_text(getattr(m, "labels", None) or {})
        params = "" if m.num_parameters is None else f"{m.num_parameters} params"
        typer.echo(
            f"{m.id}  {m.status.value:10s}  {m.name[:28]:28s}  {m.arch or '-':12s}  "
            f"{params:14s}  {labels}".rstrip()
        )
    if next_cursor:
        _note(f"more: --cursor {next_cursor}")


@app.command()
def cancel(
    job: Annotated[str, typer.Argument(help="the job id")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Cancel a queued job or stop a running one (an error when it already finished)."""
    with _service_errors(), _client(url, key) as client:
        done = client.cancel(job)
    if as_json:
        _print_json(done)
    else:
        typer.echo(f"{done.id} {done.status.value}")


@app.command()
def bundle(
    job: Annotated[str, typer.Argument(help="the job id (succeeded)")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="the zip to write [default: JOB.zip here]")
    ] = Path("."),
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Download one zip of a job: result.json, every artifact and the self-contained
    report.html; print its path."""
    with _service_errors(), _client(url, key) as client:
        path = client.download_bundle(job, out)
    typer.echo(str(path))


# --- baselines and gates: diff, check -----------------------------------------------------------


def _change(diff: Any) -> str:
    if diff.relative_change is not None:
        return f"{diff.relative_change:+.1%}"
    if diff.difference is not None:
        return f"{diff.difference:+.4g}"
    return "-"


def _diff_lines(comparison: CompareOut) -> list[str]:
    """The comparison as a table: layer, metric, baseline, value, change."""
    lines = [f"{'layer':24s} {'metric':26s} {'baseline':>12s} {'job':>12s} {'change':>9s}"]
    for layer in comparison.layers:
        for metric, d in layer.metrics.items():
            lines.append(
                f"{layer.layer:24s} {metric:26s} {_fmt(d.baseline):>12s} {_fmt(d.value):>12s} "
                f"{_change(d):>9s}"
            )
    for metric, d in comparison.metrics.items():
        lines.append(
            f"{'(job)':24s} {metric:26s} {_fmt(d.baseline):>12s} {_fmt(d.value):>12s} "
            f"{_change(d):>9s}"
        )
    if comparison.only_in_job:
        lines.append(f"only in the job: {', '.join(comparison.only_in_job)}")
    if comparison.only_in_baseline:
        lines.append(f"only in the baseline: {', '.join(comparison.only_in_baseline)}")
    return lines


@app.command()
def diff(
    job: Annotated[str, typer.Argument(help="the job id")],
    baseline: Annotated[str, typer.Argument(help="the baseline job's id (the same analysis)")],
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Per-layer differences of every numeric metric of JOB against BASELINE (layers matched by
    name; unmatched ones listed)."""
    with _service_errors(), _client(url, key) as client:
        comparison = client.compare(job, baseline)
    if as_json:
        _print_json(comparison)
        return
    typer.echo(
        f"{comparison.analysis}: job {comparison.job_id} vs baseline {comparison.baseline_id}"
    )
    for line in _diff_lines(comparison):
        typer.echo(line)


def _model_accuracy(client: Client, jobs: list[JobOut], limit: float) -> GateOutcome:
    """For jobs without generated inputs: the model's held-out accuracy from its manifest."""
    from deepscope.gates import GateOutcome

    outcome = GateOutcome(f"accuracy ≥ {limit:g}")
    for job in jobs:
        model = client.get_model(job.model_id)
        if model.training is None:
            outcome.failures.append(
                f"job {job.id[:8]}: no generated inputs and no recorded accuracy for model "
                f"{model.id[:8]} (its manifest has no training.accuracy)"
            )
            continue
        acc = model.training.accuracy
        what = f"model {model.name} held-out accuracy on {model.training.dataset} (manifest)"
        outcome.checked.append(f"{what}: {acc:.1%}")
        if acc < limit:
            outcome.failures.append(f"{what}: {acc:.1%} < {limit:.1%}")
    return outcome


@app.command()
def check(
    jobs: Annotated[list[str], typer.Argument(help="job ids (waited for when unfinished)")],
    max_: Annotated[
        list[str] | None,
        typer.Option(
            "--max",
            help="METRIC=LIMIT: every layer's METRIC at most LIMIT (repeatable); METRIC is any "
            "per-layer metric (`deepscope list-analyses --metrics`)",
        ),
    ] = None,
    max_condition_number: Annotated[
        float | None, typer.Option(help="every layer's condition number at most this")
    ] = None,
    max_lost_fraction: Annotated[
        float | None, typer.Option(help="every layer's lost fraction, for every input, at most")
    ] = None,
    min_accuracy: Annotated[
        float | None,
        typer.Option(
            help="0..1: generated inputs recognized as their class; else the model's held-out "
            "accuracy from its manifest"
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="a baseline job (e.g. the last release's) for --max-increase"),
    ] = None,
    max_increase: Annotated[
        list[str] | None,
        typer.Option(
            "--max-increase",
            metavar="METRIC=PCT",
            help="no layer's METRIC more than PCT percent above the baseline's (repeatable; "
            "50% or 50); needs --baseline",
        ),
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="comma-separated layer names to gate (default: all)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for unfinished jobs")] = 3600.0,
    as_json: JsonOption = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Quality gates for CI: exit 1 (naming each layer that fails, with its values) when a gate
    fails; exit 2 on a malformed gate or when the baseline cannot be compared."""
    from deepscope.client import JobStatus
    from deepscope.contract.compare import compare_results
    from deepscope.gates import (
        gate_increase,
        gate_max,
        gate_recognized,
        parse_increase,
        parse_limit,
    )

    limits = [parse_limit(text, "--max") for text in max_ or []]
    increases = [parse_increase(text, "--max-increase") for text in max_increase or []]
    if max_condition_number is not None:
        limits.append(("condition_number", max_condition_number))
    if max_lost_fraction is not None:
        limits.append(("lost_fraction_max", max_lost_fraction))
    if increases and baseline is None:
        raise ValueError("--max-increase needs --baseline BASE (the job to compare with)")
    if baseline is not None and not increases:
        raise ValueError("--baseline needs --max-increase METRIC=PCT (e.g. condition_number=50%)")
    if not limits and not increases and min_accuracy is None:
        raise ValueError(
            "no gate given: use --max METRIC=LIMIT, --max-condition-number, --max-lost-fraction, "
            "--min-accuracy or --baseline JOB --max-increase METRIC=PCT"
        )
    chosen = {n.strip() for n in layers.split(",") if n.strip()} if layers else None
    failed_jobs: list[str] = []
    with _service_errors(), _client(url, key) as client:
        base = None
        if baseline is not None:
            base = client.wait(baseline, progress=False, timeout=timeout, raise_on_failure=False)
            if base.status is not JobStatus.SUCCEEDED:
                raise ValueError(
                    f"baseline job {base.id} is {base.status.value}: it cannot be compared"
                )
        done = []
        for job_id in jobs:
            job = client.wait(job_id, progress=False, timeout=timeout, raise_on_failure=False)
            if job.status is not JobStatus.SUCCEEDED:
                reason = f": {job.error.message}" if job.error else ""
                failed_jobs.append(f"job {job.id} {job.status.value}{reason}")
            else:
                done.append(job)
        outcomes = [gate_max(done, metric, limit, chosen) for metric, limit in limits]
        if base is not None:
            comparisons = [compare_results(job, base) for job in done]  # ValueError: mismatch
            outcomes += [gate_increase(comparisons, m, pct, chosen) for m, pct in increases]
        if min_accuracy is not None:
            recognized, without = gate_recognized(done, min_accuracy)
            held_out = _model_accuracy(client, without, min_accuracy)
            recognized.failures += held_out.failures
            recognized.checked += held_out.checked
            outcomes.append(recognized)
    failed = bool(failed_jobs) or any(o.failures for o in outcomes)
    if as_json:
        _print_json(
            {
                "passed": not failed,
                "failed_jobs": failed_jobs,
                "gates": [
                    {
                        "title": o.title,
                        "passed": not o.failures,
                        "failures": o.failures,
                        "checked": o.checked,
                    }
                    for o in outcomes
                ],
            }
        )
    else:
        for line in failed_jobs:
            typer.echo(f"FAIL {line}")
        for outcome in outcomes:
            if outcome.failures:
                for line in outcome.failures:
                    typer.echo(f"FAIL {outcome.title}: {line}")
            else:
                details = f" ({'; '.join(outcome.checked)})" if outcome.checked else ""
                typer.echo(f"ok   {outcome.title}{details}")
    if failed:
        raise typer.Exit(1)


@app.command()
def report(
    job: Annotated[
        str | None, typer.Argument(help="a job id; none: the index of models and jobs")
    ] = None,
    ttl: Annotated[int, typer.Option(min=60, max=86400, help="seconds the link lives")] = 3600,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="write the job's report here as one self-contained HTML file (opens from "
            "disk, no server: e.g. a CI artifact) and print its path",
        ),
    ] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Print a signed, read-only link to a job's report page (or the index) for a browser;
    with --save, write the report as one HTML file instead."""
    if save is None:
        with _service_errors(), _client(url, key) as client:
            typer.echo(client.report_url(job, ttl=ttl))
        return
    if job is None:
        raise ValueError("--save needs a job id (the index of models and jobs is not saved)")
    with _service_errors(), _client(url, key) as client:
        html = client.report_html(job, standalone=True)
    save.parent.mkdir(parents=True, exist_ok=True)
    save.write_text(html, encoding="utf-8")
    typer.echo(str(save))
