"""Pack a MURA-layout data set into HDF5 shards: `python -m data_prep.pack --mura-root data/synth --out data/shards`.

The same as `bonehpc pack ...`; kept as a script for pipelines that call data_prep/ directly.
"""

from __future__ import annotations

import sys

from bonehpc.cli import main as bonehpc_main


def main(argv: list[str] | None = None) -> int:
    """Run `bonehpc pack` with these arguments."""
    return bonehpc_main(["pack", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
