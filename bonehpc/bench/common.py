"""Helpers of the timed sections: device sync, median, ratio, an endless batch stream, model building."""

from __future__ import annotations

import statistics
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import torch

from bonehpc.bench.options import BenchError


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU): the only host sync of a timed loop."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b rounded; None when either figure is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return round(a / b, digits)


class Endless:
    """A loader's batches epoch after epoch as ONE stream, so that consecutive `train_one_epoch` calls
    (warm-up, then timed windows) continue where the previous one stopped instead of restarting workers.

    Records the dtype, layout and device of the first batch (the fast-path check).
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.first: dict[str, Any] = {}
        self._stream = self._gen()

    def __len__(self) -> int:
        return 2**31 - 1

    def __iter__(self) -> Iterator[Any]:
        return self._stream

    def _gen(self) -> Generator[Any, None, None]:
        while True:
            n = 0
            for batch in self.loader:
                if not self.first:
                    x = batch[0]
                    self.first = {
                        "dtype": str(x.dtype).replace("torch.", ""),
                        "device": str(x.device),
                        "shape": list(x.shape),
                        "channels_last": bool(x.is_contiguous(memory_format=torch.channels_last))
                        and not x.is_contiguous(),
                    }
                n += 1
                yield batch
            if n == 0:
                raise BenchError(f"{self.loader!r} yields no batch (fewer images than one batch?)")
            self.loader.set_epoch(self.loader.epoch + 1)

    def close(self) -> None:
        self._stream.close()
        self.loader.close()


def build_model(name: str, dev: torch.device, channels_last: bool) -> torch.nn.Module:
    """A registry model on `dev` (channels_last memory when asked)."""
    from bonehpc.models import create_model

    model = create_model(name).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
