"""The Docker files, checked by reading (no Docker engine here): every compose service's command
is a real ``deepscope`` command with real options, every ``DEEPSCOPE_*`` variable a real
setting, and the pieces the deployment relies on (AOF Redis on a volume, a shared artifact
volume, an NVIDIA reservation, a non-root image whose entry point is ``deepscope``) are there."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.core
import yaml

from deepscope.cli import app
from deepscope.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
#: The standard AWS settings an ``s3://`` storage URL reads (passed on from the shell).
AWS_ENV = {
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
}


def _default(value: str) -> str:
    """Compose's ``${NAME:-default}`` → ``default`` (what runs when the shell sets nothing)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _deepscope_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("deepscope")
    }


def _parse(args: list[str]) -> Any:
    """Parse ``deepscope ARGS`` with the real command objects (raises on unknown commands,
    unknown options and bad values), without running anything. → the (click) context."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    name, *rest = args
    command = group.commands.get(name)
    assert command is not None, f"`deepscope {name}` does not exist"
    return command.make_context(name, rest)


def test_every_service_command_is_a_real_cli_command(compose: dict[str, Any]) -> None:
    services = _deepscope_services(compose)
    assert set(services) == {"api", "worker-cpu", "worker-gpu"}
    for name, svc in services.items():
        ctx = _parse(list(svc["command"]))
        assert ctx.command.name in ("api", "worker"), name
    assert _parse(services["api"]["command"]).params["host"] == "0.0.0.0"
    assert _parse(services["worker-cpu"]["command"]).params["queues"] == "cpu"
    assert _parse(services["worker-gpu"]["command"]).params["queues"] == "gpu"


def test_the_checker_catches_bad_commands() -> None:
    with pytest.raises(typer.TyperException, match="No such option"):
        _parse(["worker", "--queue", "cpu"])
    with pytest.raises(typer.BadParameter, match="integer"):
        _parse(["api", "--port", "not-a-port"])
    with pytest.raises(AssertionError, match="does not exist"):
        _parse(["serve"])


def test_environment_names_real_settings(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name, svc in _deepscope_services(compose).items():
        env = svc["environment"]
        assert isinstance(env, dict), name
        for var, value in env.items():
            if var in AWS_ENV:
                assert value is None, (name, var)  # from the shell: no secret in the file
                continue
            assert var.startswith("DEEPSCOPE_"), (name, var)
            assert var.removeprefix("DEEPSCOPE_").lower() in fields, (name, var)
        assert _default(env["DEEPSCOPE_REDIS_URL"]).startswith("redis://redis:"), name
        assert "DEEPSCOPE_API_KEYS" in env, name


def test_redis_keeps_an_append_only_file_on_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    volumes = [v.split(":") for v in redis["volumes"]]
    assert [name for name, target in volumes if target == "/data"] == ["redis-data"]
    assert "redis-data" in compose["volumes"]


def test_api_and_workers_share_the_artifact_volume(compose: dict[str, Any]) -> None:
    mounts = {}
    for name, svc in _deepscope_services(compose).items():
        storage = _default(svc["environment"]["DEEPSCOPE_STORAGE_URL"])
        volumes = dict(reversed(v.split(":")[:2]) for v in svc["volumes"])
        assert storage in volumes, (name, storage, volumes)
        mounts[name] = volumes[storage]
    assert set(mounts.values()) == {"artifacts"}
    assert "artifacts" in compose["volumes"]


def test_workers_scale_and_can_share_s3_storage(compose: dict[str, Any]) -> None:
    """``docker compose up --scale worker-cpu=N``: nothing a replica would collide on (a fixed
    container name, a host port, a hostname); every deepscope service takes the same storage
    URL and AWS settings from the shell, so workers on other hosts can share an S3 store."""
    services = _deepscope_services(compose)
    for name in ("worker-cpu", "worker-gpu"):
        svc = services[name]
        assert not {"container_name", "ports", "hostname"} & set(svc), name
        assert "--name" not in svc["command"], name  # RQ gives each replica a name of its own
    envs = [svc["environment"] for svc in services.values()]
    for env in envs:
        assert set(env) >= AWS_ENV
        assert env["DEEPSCOPE_STORAGE_URL"] == envs[0]["DEEPSCOPE_STORAGE_URL"]
        assert env["DEEPSCOPE_STORAGE_URL"].startswith("${DEEPSCOPE_STORAGE_URL:-")
        assert env["DEEPSCOPE_REDIS_URL"].startswith("${DEEPSCOPE_REDIS_URL:-")


def test_gpu_worker_reserves_an_nvidia_device(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert "runtime" in gpu["build"]["args"]["BASE_IMAGE"]
    cpu = compose["services"]["worker-cpu"]
    assert cpu["build"]["args"] == {"VARIANT": "cpu", "BASE_IMAGE": "python:3.11-slim"}


def test_dockerfile_variants_user_and_entrypoint(compose: dict[str, Any], dockerfile: str) -> None:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["VARIANT"] == "cpu"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile, re.MULTILINE)
    for svc in _deepscope_services(compose).values():
        assert set(svc["build"]["args"]) <= set(args)
    assert re.search(r'^ENTRYPOINT \["deepscope"\]$', dockerfile, re.MULTILINE)
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and not users[-1].startswith(("root", "0"))
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd is not None
    assert _parse(yaml.safe_load(cmd.group(1))).command.name == "api"
    # Everything the image copies exists.
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists() or source == "README.md", source
