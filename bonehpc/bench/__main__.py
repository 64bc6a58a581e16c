"""`python -m bonehpc.bench ddp-worker ...`: one torchrun process of the DDP benchmark (see `bonehpc bench ddp`)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "ddp-worker":
    from bonehpc.bench.ddp_worker import ddp_worker

    raise SystemExit(ddp_worker(sys.argv[2:]))
raise SystemExit("usage: python -m bonehpc.bench ddp-worker ... (the benchmarks themselves: bonehpc bench)")
