"""Atomic, durable file writes: the one implementation every module uses.

A writer puts the bytes in a temporary file next to the target (``.<name>.<random>.tmp``), fsyncs
it, moves it into place with ``os.replace`` and fsyncs the folder. A reader therefore sees the old
file or the new one, never half of one; a failure (disk full, a signal) leaves the old file and no
temporary file behind. New files get the mode ``0o666 & ~umask`` like any ``open()``, so group
members on shared storage can read what the owner's umask lets them read (``mkstemp`` would make
them 0600). Torch-free; callers that write tensors pass a writer callback.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from bonehpc.errors import InputTooLargeError

TMP_SUFFIX = ".tmp"
MAX_TEXT_BYTES = 256 << 20
"""The largest CSV or JSON file bonehpc reads (MURA's largest CSV is ~3 MB; a manifest of a million images
~150 MB): a larger one, e.g. a sparse file of terabytes, is refused before a byte is read into memory."""


def tmp_name_for(path: Path) -> Path:
    """The temporary sibling used while `path` is written (``.<name>.<hex>.tmp``)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def is_tmp_of(candidate: Path, name: str) -> bool:
    """True when `candidate` is a leftover temporary file of the file called `name`."""
    return candidate.name.startswith(f".{name}.") and candidate.name.endswith(TMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (ignored where the file system refuses it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_bytes_bounded(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a CSV or JSON file, refused when over `max_bytes` (checked before reading, and while
    reading: a file that grows, or one whose size the file system does not report, is still bounded).

    Raises:
        InputTooLargeError: the file is larger than `max_bytes`.
        OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = b"" if size > max_bytes else f.read(max_bytes + 1)
    if size > max_bytes or len(data) > max_bytes:
        raise InputTooLargeError(
            f"{path}: {max(size, len(data)):,} bytes, more than bonehpc reads from a CSV or JSON file ({max_bytes:,})"
        )
    return data


def read_text_bounded(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """`read_bytes_bounded` decoded as UTF-8 (UnicodeDecodeError when it is not)."""
    return read_bytes_bounded(path, max_bytes).decode("utf-8")


def load_json_bounded(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> Any:
    """The JSON document in `path`: ValueError (never RecursionError or MemoryError) for one that is not JSON,
    nested deeper than the parser's stack, or larger than `max_bytes`; OSError when it cannot be read."""
    data = read_bytes_bounded(path, max_bytes)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deep") from None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, mkdir: bool = True) -> Path:
    """Call ``write(f)`` on a binary file that replaces `path` atomically once it returns."""
    p = Path(path)
    if mkdir:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name_for(p)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p


def atomic_write_bytes(path: str | Path, data: bytes, **kw: Any) -> Path:
    return atomic_write(path, lambda f: f.write(data), **kw)


def atomic_write_text(path: str | Path, text: str, **kw: Any) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), **kw)


def atomic_write_json(
    path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False, **kw: Any
) -> Path:
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str)
    return atomic_write_text(path, text + "\n", **kw)


def atomic_write_csv(path: str | Path, df: Any, **kw: Any) -> Path:
    """Write a pandas DataFrame as CSV (no index column, ``\\n`` line ends)."""
    return atomic_write_text(path, df.to_csv(index=False, lineterminator="\n"), **kw)
