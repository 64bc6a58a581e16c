"""`python -m bonehpc.cli.outputs ARGS` = `bonehpc outputs ARGS`: the module torchrun starts for the outputs job.

The parser lives in bonehpc/cli/train.py (with `bonehpc train`); this is only the module entry (exit 0, 2 or 3).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """`bonehpc outputs ARGS` (ARGS default: sys.argv[1:])."""
    from bonehpc.cli import main as bonehpc_main

    return bonehpc_main(["outputs", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
