"""`python -m bonehpc.bench ddp-worker ...`: one torchrun process of the DDP benchmark (see `bonehpc bench ddp`)."""

import sys

from bonehpc.bench import ddp_worker

if len(sys.argv) > 1 and sys.argv[1] == "ddp-worker":
    raise SystemExit(ddp_worker(sys.argv[2:]))
raise SystemExit("usage: python -m bonehpc.bench ddp-worker ... (the benchmarks themselves: bonehpc bench)")
