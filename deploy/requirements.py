#!/usr/bin/env python3
"""What the image installs, read from pyproject.toml (one source of truth for the pins).

    requirements.py torch [PYPROJECT]        torch and torchvision pins, one line, space-separated
    requirements.py rest [PYPROJECT] [EXTRA ...]
                                             every other dependency, the extras' and the build
                                             system's requirements, one per line (pip -r)

The Dockerfile installs torch first, from the variant's index, then the rest; the deploy test
downloads the same list into its wheelhouse. Standard library only (Python >= 3.11: tomllib).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

TORCH = ("torch", "torchvision")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def torch_pins(data: dict[str, Any]) -> list[str]:
    deps = data["project"]["dependencies"]
    pins = [d for d in deps if _name(d) in TORCH]
    found = {_name(p) for p in pins}
    if found != set(TORCH):
        raise SystemExit(f"pyproject.toml pins {sorted(found)}, expected {list(TORCH)}")
    return pins


def rest(data: dict[str, Any], extras: list[str]) -> list[str]:
    project = data["project"]
    out = [d for d in project["dependencies"] if _name(d) not in TORCH]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (has: {sorted(optional)})")
        out += optional[extra]
    out += data.get("build-system", {}).get("requires", [])
    return list(dict.fromkeys(out))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("torch", "rest"):
        print(__doc__, file=sys.stderr)
        return 2
    what, args = argv[0], argv[1:]
    path = Path("pyproject.toml")
    if args and args[0].endswith(".toml"):
        path, args = Path(args[0]), args[1:]
    data = load(path)
    if what == "torch":
        print(" ".join(torch_pins(data)))
    else:
        print("\n".join(rest(data, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
