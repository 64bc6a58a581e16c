"""Write a synthetic MURA-v1.1 data set: `python -m data_prep.synth --out data/synth --patients 100 --seed 0`.

The same as `bonehpc synth ...`; kept as a script for pipelines that call data_prep/ directly.
"""

from __future__ import annotations

import sys

from bonehpc.cli import main as bonehpc_main


def main(argv: list[str] | None = None) -> int:
    """Run `bonehpc synth` with these arguments."""
    return bonehpc_main(["synth", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
