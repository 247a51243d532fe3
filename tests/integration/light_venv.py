"""A fresh venv with ``pip install .`` of this checkout, as a CI job that only talks to a
deepscope service installs it (tests/integration/test_light_client.py and
test_pipeline_script.py).

pip reads this machine's configuration (index, mirror, cache), so the build is offline where the
machine is, and its wheel cache makes a rerun take seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def light_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a job that has only the light venv: none of the stack's
    ``DEEPSCOPE_*`` settings and no venv of ours, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSCOPE_", "VIRTUAL_ENV"))}
    env.pop("PYTHONPATH", None)  # the checkout must not shadow the installed package
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **(extra or {})}


def run(
    argv: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def build_light_venv(base: Path, extras: str = "") -> Path:
    """``pip install .`` (or ``.[extras]``) into ``base/venv`` at constraints.txt's pins →
    the venv's bin directory.

    The checkout's package files are copied to ``base/src`` first, so the build's ``build/``
    and ``*.egg-info`` land in the copy, not in the working tree (concurrent runs stay apart)."""
    src = base / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "deepscope", src / "deepscope", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = base / "venv"
    env = light_env()
    proc = run([sys.executable, "-m", "venv", venv], cwd=base, env=env)
    assert proc.returncode == 0, proc.stderr
    bin_dir = venv / "bin"
    target = f".[{extras}]" if extras else "."
    proc = run(
        [bin_dir / "python", "-m", "pip", "install", "-q", "-c", "constraints.txt", target],
        cwd=src,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return bin_dir
