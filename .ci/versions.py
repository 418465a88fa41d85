"""Print the installed versions of the dependencies whose ranges pyproject.toml declares; with
``--expect FILE`` (a pip constraints file of ``name==version`` lines), fail unless each one is installed
at exactly that version, so the lower-bound stage cannot silently test something newer."""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import PackageNotFoundError, version

RANGED = ("torch", "transformers", "lightning", "bitsandbytes", "peft", "torchmetrics", "jsonargparse", "safetensors")


def pins(path: str) -> dict[str, str]:
    found = {}
    for line in open(path, encoding="utf-8"):
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+)", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect", help="constraints file whose pins must be what is installed")
    args = parser.parse_args()
    expected = pins(args.expect) if args.expect else {}
    wrong = []
    for name in sorted(set(RANGED) | set(expected)):
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        print(f"  {name:14s} {installed}")
        # torch's local build tag (+cpu) is not part of the version a constraint pins.
        if name in expected and installed.split("+")[0] != expected[name]:
            wrong.append(f"{name} {installed} (pinned {expected[name]})")
    if wrong:
        print(f"installed versions differ from {args.expect}: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
