"""Fails when the minimal local-backend venv (`make test-local-minimal`) has a package that a
`.[local]` install does not bring: the test would then prove nothing about such an install."""

from __future__ import annotations

import importlib.util
import sys

DEV_ONLY = ("triton", "transformers", "openai")


def main() -> int:
    present = [name for name in DEV_ONLY if importlib.util.find_spec(name) is not None]
    if present:
        print(f"error: the minimal venv has {', '.join(present)}", file=sys.stderr)
        return 1
    print(f"minimal venv: none of {', '.join(DEV_ONLY)} installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
