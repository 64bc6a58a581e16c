"""Live curves: TensorBoard event files beside a run's metrics.jsonl; a failing writer only warns.

metrics.jsonl stays the record of a run. The event files are a view of it for `tensorboard --logdir
runs/<exp>` (`make tensorboard EXP=...`): every numeric key of an epoch record becomes a scalar of the same
name (train/loss, lr, train/img_per_s, val/...) at step = epoch, and tune trials add their intermediate
values. Only rank 0 writes. A missing tensorboard package, a full disk or any other writer error is logged
once as a warning and the writer is switched off; the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SKIP_KEYS = ("epoch",)
"""Keys of an epoch record that are the step, not a curve."""


class Curves:
    """A TensorBoard writer for one folder that never raises.

    Args:
        log_dir: the folder of the event files (a run's folder, beside metrics.jsonl).
        purge_step: a resumed run passes its first epoch: events at or after it, written before the
            interruption, are hidden by TensorBoard, so a redone epoch is not drawn twice.
    """

    def __init__(self, log_dir: str | Path, purge_step: int = 0) -> None:
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step or None)
        except Exception as err:  # noqa: BLE001 - no curves is a warning, never a failed run
            self._off(err)

    @property
    def enabled(self) -> bool:
        """False when the writer could not start or failed since."""
        return self._writer is not None

    def _off(self, err: BaseException) -> None:
        log.warning(
            "TensorBoard curves of %s are off (%s: %s); metrics.jsonl is still written",
            self.log_dir,
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):  # already reported above
                writer.close()

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        """Every numeric value of `values` (bools and SKIP_KEYS left out) as a scalar at `step`, then flush.

        Flushing each call keeps the curves live; it is once per epoch.
        """
        if self._writer is None:
            return
        try:
            for key, value in values.items():
                if key in SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                self._writer.add_scalar(f"{prefix}{key}", float(value), int(step))
            self._writer.flush()
        except Exception as err:  # noqa: BLE001 - e.g. OSError(ENOSPC) from the writer thread
            self._off(err)

    def close(self) -> None:
        """Flush and close (errors only warn)."""
        if self._writer is None:
            return
        try:
            self._writer.close()
        except Exception as err:  # noqa: BLE001
            self._off(err)
        self._writer = None
