"""The ``deepscope`` command line.

Heavy imports (torch, the analyses) happen inside the commands that need them, so ``deepscope
--help`` is instant. Every user error (bad file, unknown arch, bad params) ends as one line on
stderr and exit code 2; set ``DEEPSCOPE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

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


def _echo_progress(fraction: float, message: str) -> None:
    typer.echo(f"[{fraction:4.0%}] {message}", err=True)


@app.command()
def analyze(
    model_file: Annotated[
        Path, typer.Argument(help="safetensors, state_dict, .pt2 or TorchScript")
    ],
    analysis: Annotated[str, typer.Option(help="signal_space or residuals")],
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
    from deepscope.params import AnalysisKind, parse_params

    parsed = parse_params(analysis, _json_arg(params, "--params"))
    kwargs = _json_arg(arch_kwargs, "--arch-kwargs")
    from deepscope.models.loading import code_models_allowed, load_model
    from deepscope.workers.pipeline import run_analysis

    loaded = load_model(
        model_file,
        arch=arch,
        arch_kwargs=kwargs or None,
        input_shape=_shape_arg(input_shape),
        allow_code=allow_code or code_models_allowed(),
    )
    result = run_analysis(
        loaded,
        AnalysisKind(analysis),
        parsed,
        out,
        dataset=dataset,
        device=device,
        progress=None if quiet else _echo_progress,
    )
    typer.echo(f"{out / 'result.json'} ({len(result['artifacts'])} artifacts)")


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
    from deepscope.models.training import Recipe, train_model
    from deepscope.workers.pipeline import resolve_device

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


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where to write the demo's model and results")] = Path(
        "out/demo"
    ),
) -> None:
    """Train fcnn1 on the digits in seconds, then run signal_space and residuals on it."""
    from deepscope.models.loading import load_model
    from deepscope.models.training import Recipe, train_model
    from deepscope.params import AnalysisKind, parse_params
    from deepscope.workers.pipeline import run_analysis

    weights = out / "fcnn1-digits.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    result, _ = train_model("fcnn1", "digits", weights, epochs=10, recipe=Recipe.FAST, seed=0)
    typer.echo(f"trained fcnn1 on digits: held-out accuracy {result.accuracy:.1%} → {weights}")
    loaded = load_model(weights)
    for kind in (AnalysisKind.SIGNAL_SPACE, AnalysisKind.RESIDUALS):
        res = run_analysis(loaded, kind, parse_params(kind.value), out / kind.value)
        typer.echo(
            f"{kind.value}: {out / kind.value / 'result.json'} ({len(res['artifacts'])} pictures)"
        )
    typer.echo(
        f"open {out}/signal_space/weights_fc1.png and "
        f"{out}/residuals/residuals_fc1_lost.png to start"
    )


def error_message(exc: BaseException) -> str:
    """One readable line for a user error; pydantic's errors become ``field: problem; ...``."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            # The first location element of a tagged union is the tag (the analysis name).
            loc = [str(p) for p in err["loc"][1:]] or [str(p) for p in err["loc"]]
            parts.append(f"{'.'.join(loc)}: {err['msg']}")
        return "invalid parameters: " + "; ".join(parts)
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"no such file: {exc.filename}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
