"""The Docker files, checked by reading: every compose service's command is a real ``deepscope``
command with real options, every ``DEEPSCOPE_*`` variable a real setting, and the pieces the
deployment relies on (AOF Redis on a volume, a shared artifact volume, an NVIDIA reservation, a
non-root multi-stage image whose entry point is ``deepscope``, whose package indexes and CA stay
in the builder stage, and whose health check knows every service) are there.

``make deploy-test`` (deploy/deploy-test.sh) builds the image and runs the stack for real; it
needs a Docker engine and minutes, so it is not part of ``make test``."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
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


Stage = tuple[str, str, list[str]]
#: Build args that name package indexes: the builder stage's alone.
INDEX_ARGS = {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST"}
INDEX_ARGS |= {"TORCH_INDEX_URL"}


def _stages(dockerfile: str) -> list[Stage]:
    """``(FROM image, stage name, instructions)`` per stage: continuation lines joined and
    comment lines dropped, as the Dockerfile parser does."""
    lines: list[str] = []
    current = ""
    for raw in dockerfile.splitlines():
        if raw.strip().startswith("#"):
            continue
        if raw.endswith("\\"):
            current += raw[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(" ".join(current.split()))
        current = ""
    stages: list[Stage] = []
    for line in lines:
        m = re.fullmatch(r"FROM (\S+)(?: AS (\S+))?", line, re.IGNORECASE)
        if m:
            stages.append((m[1], m[2] or "", []))
        elif stages:
            stages[-1][2].append(line)
    return stages


def _final(dockerfile: str) -> list[str]:
    return _stages(dockerfile)[-1][2]


def _args(instructions: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for line in instructions:
        m = re.fullmatch(r"ARG (\w+)(?:=(\S*))?", line)
        if m:
            out[m[1]] = m[2]
    return out


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", ROOT / "deploy" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _dockerignored(path: str) -> bool:
    """Does .dockerignore keep ``path`` out of the build context? (Last matching rule wins; a
    rule matches the path or a folder above it.)"""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").removeprefix("**/")
        if any(fnmatch(p, pattern) or fnmatch(p.split("/")[-1], pattern) for p in prefixes):
            ignored = not negated
    return ignored


def test_dockerfile_variants_user_and_entrypoint(compose: dict[str, Any], dockerfile: str) -> None:
    stages = _stages(dockerfile)
    preamble = dockerfile.split("\nFROM ")[0]
    global_args = dict(re.findall(r"^ARG (\w+)=(\S*)$", preamble, re.MULTILINE))
    assert global_args["BASE_IMAGE"] == "python:3.11-slim"
    # The image is the last stage; it descends, through the named stages, from ${BASE_IMAGE}.
    names = {name: base for base, name, _ in stages if name}
    base = stages[-1][0]
    while base in names:
        base = names[base]
    assert base == "${BASE_IMAGE}"
    declared = set(global_args)
    for _, _, instructions in stages:
        declared |= set(_args(instructions))
    variant = {v for _, _, ins in stages for k, v in _args(ins).items() if k == "VARIANT"}
    assert variant == {"cpu"}
    for svc in _deepscope_services(compose).values():
        assert set(svc["build"]["args"]) <= declared
    final = _final(dockerfile)
    assert 'ENTRYPOINT ["deepscope"]' in final
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0"))
    cmd = [line for line in final if line.startswith("CMD ")]
    assert len(cmd) == 1
    assert _parse(yaml.safe_load(cmd[0].removeprefix("CMD "))).command.name == "api"
    # Everything the image copies from the build context exists and is not .dockerignored.
    for _, _, instructions in stages:
        for line in instructions:
            if not line.startswith("COPY ") or "--from=" in line:
                continue
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not _dockerignored(source), f"{source} is in .dockerignore"


def test_the_checker_reads_dockerignore() -> None:
    assert _dockerignored("tests/unit/test_deploy.py")
    assert _dockerignored("deploy/deploy-test.sh")
    assert _dockerignored("deepscope/__pycache__/cli.cpython-311.pyc")
    assert _dockerignored(".env")
    assert not _dockerignored("deploy/healthcheck.py")
    assert not _dockerignored("deepscope/cli.py")


def test_package_indexes_and_ca_stay_in_the_builder(dockerfile: str) -> None:
    """A private mirror's URLs (build args) and CA bundle (a BuildKit secret) are seen by the
    builder stage alone: the image takes the venv and the wheel from it, never the settings."""
    stages = {name: (base, ins) for base, name, ins in _stages(dockerfile) if name}
    assert set(_args(stages["builder"][1])) >= INDEX_ARGS
    secret_users = [
        name for name, (_, ins) in stages.items() if any("type=secret,id=ca" in i for i in ins)
    ]
    assert secret_users == ["builder"]
    assert any("PIP_CERT=/run/secrets/ca" in i for i in stages["builder"][1])
    final = _final(dockerfile)
    text = "\n".join(final)
    assert not INDEX_ARGS & set(_args(final))
    assert "secret" not in text
    assert "PIP_CERT" not in text
    for _, _, instructions in _stages(dockerfile):
        for line in instructions:
            if line.startswith("ENV "):  # an ENV lives on in the image: no index, no CA there
                assert not re.search(r"PIP_(INDEX_URL|EXTRA_INDEX_URL|FIND_LINKS|CERT)", line)
    copies = [line for line in final if line.startswith("COPY --from=")]
    assert copies == ["COPY --from=builder /opt/deepscope /opt/deepscope"]
    installs = [line for line in final if "from=wheel" in line]
    assert len(installs) == 1
    assert "pip install --no-deps --no-index" in installs[0]


def test_image_labels_and_health_check(dockerfile: str) -> None:
    final = _final(dockerfile)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _args(final)["VERSION"] == version  # `docker build` without --build-arg VERSION
    labels = " ".join(line for line in final if line.startswith("LABEL "))
    for key in ("title", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    health = [line for line in final if line.startswith("HEALTHCHECK ")]
    assert len(health) == 1
    assert health[0].endswith('CMD ["deepscope-healthcheck"]')
    assert "COPY deploy/healthcheck.py /usr/local/bin/deepscope-healthcheck" in final


def test_health_check_knows_every_service(compose: dict[str, Any], tmp_path: Path) -> None:
    """deploy/healthcheck.py finds what the container runs from its command line: the API's
    port, a worker (its heartbeat), or nothing to check."""
    hc = _module("healthcheck")
    venv = ["/opt/deepscope/bin/python3", "/opt/deepscope/bin/deepscope"]
    for name, svc in _deepscope_services(compose).items():
        command = list(svc["command"])
        service = hc.parse(1, [*venv, *command])
        assert service is not None, name
        assert service.role == command[0] == _parse(command).command.name, name
    api = compose["services"]["api"]
    service = hc.parse(1, [*venv, *api["command"]])
    container_port = api["ports"][0].rsplit(":", 1)[1]
    assert service.option("--port") == container_port == "8000"
    assert hc.parse(1, ["deepscope", "api", "--port=9000"]).option("--port") == "9000"
    assert hc.parse(1, [*venv, "train", "fcnn1"]) is None
    assert hc.parse(1, ["redis-server", "--appendonly", "yes"]) is None
    # With an init as PID 1, the lowest deepscope process (not its job's child) is the service.
    init = ["/sbin/docker-init", "--", "deepscope", "worker"]  # compose's `init: true`
    assert hc.parse(1, init) is None
    for pid, argv in {1: init, 7: [*venv, "worker"]}.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv))
    (tmp_path / "30").mkdir()
    (tmp_path / "30" / "cmdline").write_bytes((tmp_path / "7" / "cmdline").read_bytes())
    found = hc.find_service(tmp_path)
    assert (found.role, found.pid) == ("worker", 7)


def test_compose_health_restart_and_images(compose: dict[str, Any]) -> None:
    # docker-compose 1.x (Debian's) rejects a top-level `name`: the project name is -p /
    # COMPOSE_PROJECT_NAME.
    assert "name" not in compose
    for name, svc in _deepscope_services(compose).items():
        assert svc["healthcheck"]["test"] == ["CMD", "deepscope-healthcheck"], name
        assert svc["restart"] in ("unless-stopped", "always"), name
        # PID 1 ignores SIGTERM until the process installs a handler (a worker imports torch
        # first): an init takes PID 1, so that `stop` and `down` do not wait for the kill.
        assert svc["init"] is True, name
    redis = compose["services"]["redis"]
    assert _default(redis["image"]) == "redis:7.4-alpine"
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    assert redis["restart"] in ("unless-stopped", "always")
    assert [_default(p) for p in compose["services"]["api"]["ports"]] == ["8000:8000"]


def test_the_image_installs_what_pyproject_says() -> None:
    """The image installs the server and s3 extras at constraints.txt's pins: torch first (its
    own index), then the rest; the light client's dependencies have no torch."""
    req = _module("requirements")
    data = req.load(ROOT / "pyproject.toml")
    pins = req.load_pins(ROOT / "constraints.txt")
    deps = data["project"]["dependencies"]
    assert not {req._name(d) for d in deps} & {"torch", "torchvision", "fastapi", "redis"}
    torch = req.torch_pins(data, pins)
    assert torch == [f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}"]
    rest = req.rest(data, ["server", "s3"])
    assert not {req._name(r) for r in rest} & {"torch", "torchvision"}
    server = req.expand(data, ["server"])
    assert {d for d in server if req._name(d) not in ("torch", "torchvision")} <= set(rest)
    assert set(deps) <= set(rest)
    assert set(data["project"]["optional-dependencies"]["s3"]) <= set(rest)
    assert set(data["build-system"]["requires"]) <= set(rest)  # the wheel builds offline
    # dev is the server, s3 and mlflow extras plus the tools: the expansion follows deepscope[..]
    dev = req.expand(data, ["dev"])
    assert set(server) <= set(dev)
    assert not any(req._name(d) == "deepscope" for d in dev)
    with pytest.raises(SystemExit, match="no extra"):
        req.rest(data, ["nope"])


def test_constraints_pin_every_requirement() -> None:
    """Every requirement of the package and its extras has an exact pin in constraints.txt
    (what `make` and the image install), and the pin lies in pyproject.toml's range."""
    from packaging.requirements import Requirement

    req = _module("requirements")
    data = req.load(ROOT / "pyproject.toml")
    pins = req.load_pins(ROOT / "constraints.txt")
    optional = sorted(data["project"]["optional-dependencies"])
    for text in [*data["project"]["dependencies"], *req.expand(data, optional)]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = req._name(requirement.name)
        assert name in pins, f"constraints.txt pins no {name} (make constraints)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {text!r}"
        )


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_deploy_script_parses() -> None:
    for script in (ROOT / "deploy").glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
