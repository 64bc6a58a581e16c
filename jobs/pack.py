"""Packing on the cluster: one array task per shard (PackShardTask), then FinalizePackTask (index + manifest)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any


class PackShardTask:
    """Pack shard `shard_index` of the plan saved in `out` by bonehpc.data.pack.plan_pack (resumable)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def __call__(self, shard_index: int) -> dict[str, Any]:
        from bonehpc.data.pack import load_plan, pack_shard

        result = pack_shard(load_plan(self.out), shard_index)
        return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else {"result": str(result)}


class FinalizePackTask:
    """Write index.csv, rejected.csv and manifest.json once every shard of the plan in `out` is packed."""

    def __init__(self, out: str, max_reject_frac: float, submitted_at: float | None = None) -> None:
        self.out = out
        self.max_reject_frac = max_reject_frac
        self.submitted_at = submitted_at or time.time()

    def __call__(self) -> dict[str, Any]:
        from bonehpc.data.pack import finalize_pack, load_plan

        summary = finalize_pack(
            load_plan(self.out), max_reject_frac=self.max_reject_frac, elapsed_s=time.time() - self.submitted_at
        )
        return dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else {"summary": str(summary)}
