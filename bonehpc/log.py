"""Logging of training runs: a console handler on rank 0, a log file per rank, and MetricLogger progress lines."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from typing import Any, TypeVar

import torch

FORMAT = "%(levelname).1s%(asctime)s %(process)d %(name)s] %(message)s"
DATEFMT = "%m%d %H:%M:%S"
_HANDLER_TAG = "_bonehpc_run_handler"

T = TypeVar("T")


def log_file_name(rank: int) -> str:
    """train.log for rank 0, train.rank{N}.log for the others."""
    return "train.log" if rank == 0 else f"train.rank{rank}.log"


def setup_logging(run_dir: str | Path | None, rank: int = 0, level: int = logging.INFO) -> Path | None:
    """Route the `bonehpc` loggers to the console (rank 0 only) and to a per-rank file in `run_dir`.

    Calling it again (a second run in the same process) replaces the handlers of the previous call.

    Returns:
        The path of this rank's log file, or None without a run dir.
    """
    logger = logging.getLogger("bonehpc")
    for h in list(logger.handlers):
        if getattr(h, _HANDLER_TAG, False):
            logger.removeHandler(h)
            h.close()
    logger.setLevel(level)
    fmt = logging.Formatter(FORMAT, DATEFMT)
    handlers: list[logging.Handler] = []
    # The console handler is added only when nothing above us prints already (the CLI configures root).
    if rank == 0 and not logging.getLogger().handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    path = None
    if run_dir is not None:
        path = Path(run_dir) / log_file_name(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="a", encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h.setLevel(level)
        setattr(h, _HANDLER_TAG, True)
        logger.addHandler(h)
    # Ranks > 0 log to their file only; without this their records would also reach the root console.
    logger.propagate = rank == 0
    return path


def close_logging() -> None:
    """Remove the handlers that setup_logging added (file handles are closed)."""
    logger = logging.getLogger("bonehpc")
    for h in list(logger.handlers):
        if getattr(h, _HANDLER_TAG, False):
            logger.removeHandler(h)
            h.close()
    logger.propagate = True


def _batch_size(item: Any) -> int:
    first = item[0] if isinstance(item, (tuple, list)) and item else item
    return int(first.shape[0]) if hasattr(first, "shape") and len(first.shape) else 1


class MetricLogger:
    """Progress lines every N steps: step/total, eta, img/s, data time, step time, max CUDA memory, meters.

    Meters are plain floats that the caller supplies at log points (`update`), so nothing forces a
    host-device sync on the other steps.
    """

    def __init__(self, logger: logging.Logger, delimiter: str = "  ") -> None:
        self.logger = logger
        self.delimiter = delimiter
        self.meters: dict[str, float] = {}
        self.images = 0
        self.elapsed = 0.0
        self.data_time = 0.0

    def update(self, **values: float) -> None:
        self.meters.update(values)

    @property
    def img_per_s(self) -> float:
        return self.images / self.elapsed if self.elapsed > 0 else 0.0

    def log_every(
        self,
        iterable: Iterable[T],
        every: int,
        header: str = "",
        total: int | None = None,
        on_log: Any = None,
    ) -> Iterator[T]:
        """Yield the items of `iterable`, logging a progress line every `every` items and after the last.

        Args:
            iterable: the batches.
            every: steps between lines.
            header: text at the start of each line (e.g. "epoch 3").
            total: steps expected (default len(iterable)).
            on_log: optional callable run just before each line is written (e.g. to sync meters in).
        """
        if total is None:
            total = len(iterable) if isinstance(iterable, Sized) else 0
        width = len(str(total)) if total else 1
        start = end = time.perf_counter()
        window_start, window_images, window_data = start, 0, 0.0
        i = 0
        for i, item in enumerate(iterable, 1):
            got = time.perf_counter()
            data_time = got - end
            self.data_time += data_time
            window_data += data_time
            n = _batch_size(item)
            self.images += n
            window_images += n
            yield item
            end = time.perf_counter()
            if i % every == 0 or (total and i == total):
                if on_log is not None:
                    on_log()
                end = time.perf_counter()
                self.elapsed = end - start
                window = end - window_start
                self._line(header, i, total, width, window, window_images, window_data)
                window_start, window_images, window_data = end, 0, 0.0
                end = time.perf_counter()
        self.elapsed = time.perf_counter() - start
        if i and not (i % every == 0 or (total and i == total)):
            if on_log is not None:
                on_log()
            self._line(header, i, total, width, time.perf_counter() - window_start, window_images, window_data)

    def _line(self, header: str, i: int, total: int, width: int, window: float, images: int, data: float) -> None:
        per_step = self.elapsed / i
        parts = [f"{header} [{i:>{width}}/{total or '?'}]"]
        if total:
            parts.append(f"eta {datetime.timedelta(seconds=int(per_step * (total - i)))}")
        parts.append(f"img/s {images / window if window > 0 else 0.0:.1f}")
        parts.append(f"data {1000 * self.data_time / i:.1f}ms")
        parts.append(f"step {1000 * per_step:.1f}ms")
        parts += [f"{k} {v:.4g}" for k, v in self.meters.items()]
        if torch.cuda.is_available():
            parts.append(f"max mem {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
        self.logger.info(self.delimiter.join(parts))
