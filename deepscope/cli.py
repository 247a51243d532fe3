"""The ``deepscope`` command line.

Heavy imports (torch, the analyses) happen inside the commands that need them, so ``deepscope
--help`` is instant. Every user error (bad file, unknown arch, bad params) ends as one line on
stderr and exit code 2; set ``DEEPSCOPE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from deepscope.analyses.registry import analysis_names

__all__ = ["app", "error_message", "main"]

app = typer.Typer(
    name="deepscope",
    help="See inside trained image classifiers: signal spaces, residuals, inverse maps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
def list_archs() -> None:
    """List the registered architectures (the paper's networks and every torchvision classifier)."""
    from deepscope.models.registry import get_model_spec, list_models

    for name in list_models():
        spec = get_model_spec(name)
        shape = "×".join(map(str, spec.input_shape))
        typer.echo(f"{name:28s} {shape:10s} {spec.description}")


@app.command("list-analyses")
def list_analyses_command(
    metrics: Annotated[bool, typer.Option("--metrics", help="also list per-layer metrics")] = False,
) -> None:
    """List the registered analyses: name, queue, what each computes, and (with --metrics) the
    per-layer metrics that `check --max` can gate on."""
    from deepscope.analyses.registry import list_analyses

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


# --- the service from a terminal or a CI job: submit, wait, predict, check, report ------------
# Built on the SDK (deepscope.client, no torch). The server is --url / DEEPSCOPE_URL (default
# http://127.0.0.1:8000), the key --key / DEEPSCOPE_API_KEY (default: the development key that
# `deepscope up` keeps in $DEEPSCOPE_DATA_DIR/dev-api-key). Results go to stdout (a job id, a
# table), progress and notes to stderr. Exit codes: 0 ok; 1 a job failed or a gate failed; 2 an
# error (unreachable server, unknown id, bad input).

if TYPE_CHECKING:  # the SDK is imported by the commands that use it (fast --help)
    from deepscope.client import Client, JobOut
    from deepscope.gates import GateOutcome

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


def _summary(job: JobOut) -> list[str]:
    """A few lines on what a finished job found."""
    lines: list[str] = []
    result = job.result
    if result is None:
        return lines
    for layer, values in result.metrics.layer_values().items():
        shown = "  ".join(
            f"{metric.replace('_', ' ')} {'∞' if v is None else f'{v:.4g}'}"
            for metric, v in values.items()
        )
        lines.append(f"  {layer:24s} {shown}")
    if result.predictions is not None:
        images = result.predictions.images
        lines.append(f"  {len(images)} generated images predicted by the model (result.json)")
    lines.append(f"  {len(result.artifacts)} artifacts")
    return lines


def _finish_job(client: Client, job: JobOut, out: Path | None, quiet: bool) -> None:
    """Print the outcome of a finished job, download it to ``out``; exit 1 unless it
    succeeded."""
    from deepscope.client import JobStatus

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
    wait: Annotated[bool, typer.Option("--wait", help="wait for the job, with progress")] = False,
    out: Annotated[
        Path | None, typer.Option(help="download result.json and artifacts here (implies --wait)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the job")] = 3600.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Submit an analysis to the service; print the job id. A file is uploaded (and validated)
    first."""
    from deepscope.client import ModelStatus

    parsed = _json_arg(params, "--params")
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
        job = client.submit(model_id, analysis, parsed or None, dataset)
        typer.echo(job.id)
        if wait or out is not None:
            job = client.wait(job, progress=not quiet, timeout=timeout, raise_on_failure=False)
            _finish_job(client, job, out, quiet)
        elif not quiet and job.cached:
            _note("answered from the cache (succeeded)")


@app.command("wait")
def wait_job(
    job: Annotated[str, typer.Argument(help="the job id")],
    out: Annotated[Path | None, typer.Option(help="download result.json and artifacts")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 3600.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Wait for a job with a progress bar; exit 1 unless it succeeded."""
    with _service_errors(), _client(url, key) as client:
        done = client.wait(job, progress=not quiet, timeout=timeout, raise_on_failure=False)
        _finish_job(client, done, out, quiet)


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
        body = [p.model_dump(mode="json", by_alias=True) for p in predictions]
        typer.echo(json.dumps(body, indent=2))
        return
    labels = [p.name for p in images] if len(images) == len(predictions) else None
    for i, pred in enumerate(predictions):
        label = labels[i] if labels else f"{images[0].name}[{i}]"
        top = "  ".join(f"{t.class_} {t.probability:.1%}" for t in pred.top_k)
        typer.echo(f"{label}\t{top}")


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
    layers: Annotated[
        str | None, typer.Option(help="comma-separated layer names to gate (default: all)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for unfinished jobs")] = 3600.0,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Quality gates for CI: exit 1 (naming each layer that fails) when a gate fails."""
    from deepscope.client import JobStatus
    from deepscope.gates import gate_max, gate_recognized, parse_limit

    limits = [parse_limit(text, "--max") for text in max_ or []]
    if max_condition_number is not None:
        limits.append(("condition_number", max_condition_number))
    if max_lost_fraction is not None:
        limits.append(("lost_fraction_max", max_lost_fraction))
    if not limits and min_accuracy is None:
        raise ValueError(
            "no gate given: use --max METRIC=LIMIT, --max-condition-number, --max-lost-fraction "
            "or --min-accuracy"
        )
    chosen = {n.strip() for n in layers.split(",") if n.strip()} if layers else None
    failed = False
    with _service_errors(), _client(url, key) as client:
        done = []
        for job_id in jobs:
            job = client.wait(job_id, progress=False, timeout=timeout, raise_on_failure=False)
            if job.status is not JobStatus.SUCCEEDED:
                reason = f": {job.error.message}" if job.error else ""
                typer.echo(f"FAIL job {job.id} {job.status.value}{reason}")
                failed = True
            else:
                done.append(job)
        outcomes = [gate_max(done, metric, limit, chosen) for metric, limit in limits]
        if min_accuracy is not None:
            recognized, without = gate_recognized(done, min_accuracy)
            held_out = _model_accuracy(client, without, min_accuracy)
            recognized.failures += held_out.failures
            recognized.checked += held_out.checked
            outcomes.append(recognized)
    for outcome in outcomes:
        if outcome.failures:
            failed = True
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
