#!/usr/bin/env python3
"""What the image installs, read from pyproject.toml (the ranges) and constraints.txt (the pins).

    requirements.py torch [PYPROJECT] [CONSTRAINTS]
                        torch and torchvision pinned as constraints.txt pins them, one line,
                        space-separated (the server extra names them; the ranges there must
                        admit the pins)
    requirements.py rest [PYPROJECT] [EXTRA ...]
                        every other requirement: the base dependencies, the extras' (an extra
                        naming ``deepscope[...]`` brings those extras' too) and the build
                        system's, one per line (pip -r; install it with -c constraints.txt)
    requirements.py lock [PYPROJECT] [EXTRA ...]
                        constraints.txt for the environment this Python runs in: every
                        distribution that the base dependencies and the extras (default: all)
                        need, transitively, as ``name==version``, sorted (``make constraints``)

The Dockerfile installs torch first, from the variant's index, then the rest, both with ``-c
constraints.txt``; ``make`` installs ``-c constraints.txt -e '.[dev]'``. ``torch`` and ``rest``
use the standard library only (Python >= 3.11: tomllib); ``lock`` reads the installed
distributions' metadata and needs ``packaging`` (pip's own environment has it).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

TORCH = ("torch", "torchvision")
PROJECT = "deepscope"
SERVER = "server"
#: What ``lock`` writes above the pins.
LOCK_HEADER = """\
# The exact versions `make` (pip install -c constraints.txt -e '.[dev]'), CI and the Docker
# image install; pyproject.toml has the ranges. Regenerate after changing the environment:
# `make constraints` (deploy/requirements.py lock). Pins that the platform or the variant does
# not need (the CUDA wheels on a CPU-only torch) are ignored by pip.
"""


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement (PEP 503)."""
    raw = re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", raw).lower()


def _self_extras(requirement: str) -> list[str] | None:
    """``deepscope[a,b]`` → ``["a", "b"]``; None for any other requirement."""
    if _name(requirement) != PROJECT:
        return None
    match = re.search(r"\[([^\]]*)\]", requirement)
    return [e.strip() for e in match.group(1).split(",") if e.strip()] if match else []


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def load_pins(path: Path) -> dict[str, str]:
    """constraints.txt → {normalized name: version} (comments and blank lines skipped)."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: {line!r} is not name==version")
        pins[_name(name)] = version.strip()
    return pins


def expand(data: dict[str, Any], extras: list[str]) -> list[str]:
    """The requirements of the extras, with ``deepscope[...]`` replaced by those extras'."""
    optional = data["project"].get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (has: {sorted(optional)})")
        for requirement in optional[extra]:
            nested = _self_extras(requirement)
            if nested is None:
                out.append(requirement)
            else:
                todo += nested
    return list(dict.fromkeys(out))


def torch_pins(data: dict[str, Any], pins: dict[str, str]) -> list[str]:
    """torch and torchvision as ``name==version``: named by the server extra, pinned by
    constraints.txt."""
    named = {_name(r) for r in expand(data, [SERVER])} & set(TORCH)
    if named != set(TORCH):
        raise SystemExit(f"the server extra names {sorted(named)}, expected {list(TORCH)}")
    missing = [t for t in TORCH if t not in pins]
    if missing:
        raise SystemExit(f"constraints.txt pins no {', '.join(missing)}")
    return [f"{t}=={pins[t]}" for t in TORCH]


def rest(data: dict[str, Any], extras: list[str]) -> list[str]:
    out = [d for d in data["project"]["dependencies"] if _name(d) not in TORCH]
    out += [d for d in expand(data, extras) if _name(d) not in TORCH]
    out += data.get("build-system", {}).get("requires", [])
    return list(dict.fromkeys(out))


def lock(data: dict[str, Any], extras: list[str]) -> list[str]:
    """Every installed distribution the project's requirements need, as ``name==version``."""
    from importlib import metadata

    from packaging.requirements import Requirement

    roots = list(data["project"]["dependencies"]) + expand(data, extras)
    roots += data.get("build-system", {}).get("requires", [])
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(r, frozenset()) for r in roots]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        text, parent_extras = todo.pop()
        req = Requirement(text)
        # A dependency's marker may say `extra == "x"`: it applies when its parent was
        # required with that extra.
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in (parent_extras or {""})
        ):
            continue
        name = _name(req.name)
        key = (name, frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is required but not installed here") from None
        found[name] = dist.version
        todo += [(r, frozenset(req.extras)) for r in dist.requires or []]
    found.pop(PROJECT, None)
    return [f"{name}=={found[name]}" for name in sorted(found)]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("torch", "rest", "lock"):
        print(__doc__, file=sys.stderr)
        return 2
    what, args = argv[0], argv[1:]
    path = Path("pyproject.toml")
    if args and args[0].endswith(".toml"):
        path, args = Path(args[0]), args[1:]
    data = load(path)
    if what == "torch":
        constraints = Path(args[0]) if args else path.with_name("constraints.txt")
        print(" ".join(torch_pins(data, load_pins(constraints))))
    elif what == "rest":
        print("\n".join(rest(data, args)))
    else:
        extras = args or sorted(data["project"].get("optional-dependencies", {}))
        print(LOCK_HEADER + "\n".join(lock(data, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
