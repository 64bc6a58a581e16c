"""Reading one image file safely: bytes -> 8-bit gray -> square (the packer and `bonehpc predict` share it).

Only regular files are read, and only inside the data root when one is given: a FIFO, a device or a
folder is rejected without being opened for reading (no hang, no unbounded read), and a symlink that
leaves the root is rejected before anything is read. File size and image size are capped, so a
decompression bomb (a tiny PNG that claims 100000 x 100000 pixels) is rejected from its header.
Every failure is a `RejectedImageError` with a short reason from REJECT_REASONS and a detail line that
never quotes the file's bytes (rejected.csv must not carry bytes of foreign files).
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import cv2
import numpy as np

REJECT_REASONS = (
    "missing",
    "unreadable",
    "not_regular",
    "outside_root",
    "too_large",
    "empty",
    "truncated",
    "corrupt",
    "not_an_image",
    "unsupported",
    "too_small",
)
FITS = ("letterbox", "stretch")
MAX_FILE_BYTES = 256 << 20
"""Largest image file read (256 MiB; MURA's PNGs are below 1 MiB)."""
MAX_PIXELS = 200_000_000
"""Largest decoded image (width x height); a header claiming more is a decompression bomb."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_KNOWN_SIGNATURES = (_PNG_SIGNATURE, b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


class RejectedImageError(Exception):
    """One image cannot be used; `reason` is one of REJECT_REASONS, `detail` says why in words."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _inside(path: Path, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def read_image_bytes(path: str | Path, root: str | Path | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular image file (inside `root` after resolving symlinks, when root is given).

    Raises:
        RejectedImageError: missing, unreadable, not_regular, outside_root, too_large or empty.
    """
    p = Path(path)
    if root is not None and not _inside(p, Path(root)):
        raise RejectedImageError("outside_root", "resolves (symlink or '..') to a place outside the data root")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise RejectedImageError("missing", "file does not exist") from None
    except OSError as err:
        raise RejectedImageError("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RejectedImageError("not_regular" if not stat.S_ISDIR(st.st_mode) else "unreadable", _kind(st.st_mode))
    if st.st_size > max_bytes:
        raise RejectedImageError("too_large", f"{st.st_size} bytes, above the cap of {max_bytes}")
    try:
        # O_NONBLOCK: should the file be swapped for a FIFO after the stat, opening it does not hang.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise RejectedImageError("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RejectedImageError("not_regular", "replaced by a non-regular file while being read")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise RejectedImageError("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise RejectedImageError("too_large", f"more than {max_bytes} bytes")
    if not data:
        raise RejectedImageError("empty", "file has 0 bytes")
    return data


def _check_png(data: bytes, max_pixels: int) -> None:
    """Truncation and the header's size claim of a PNG (bytes after the IEND chunk are allowed)."""
    if data.rfind(_PNG_IEND) < 0:
        raise RejectedImageError("truncated", f"PNG without its end chunk ({len(data)} bytes)")
    if len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        if w * h > max_pixels:
            raise RejectedImageError("too_large", f"PNG header claims {w}x{h} px, above the cap of {max_pixels} px")


def to_gray8(img: np.ndarray) -> np.ndarray:
    """An image as cv2.imdecode(IMREAD_UNCHANGED) returns it, as uint8 gray [H, W].

    BGR / BGRA (palette PNGs arrive as BGR) use the luma weights of cv2.cvtColor (alpha is dropped);
    gray+alpha keeps the gray plane; 16-bit values are scaled to 0..255 (x / 257, rounded), not
    truncated.

    Raises:
        RejectedImageError: ('unsupported') for other depths or channel counts.
    """
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif channels == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        elif channels == 2:
            img = np.ascontiguousarray(img[:, :, 0])
        else:
            raise RejectedImageError("unsupported", f"{channels} channels")
    if img.ndim != 2:
        raise RejectedImageError("unsupported", f"shape {img.shape}")
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        # 65535 / 257 == 255 exactly, so the full 16-bit range maps onto the full 8-bit range.
        return cv2.convertScaleAbs(img, alpha=1.0 / 257.0)
    raise RejectedImageError("unsupported", f"pixel type {img.dtype}")


def decode_gray8(data: bytes, min_side: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 gray [H, W] with OpenCV; every failure is a RejectedImageError."""
    is_png = data.startswith(_PNG_SIGNATURE)
    if is_png:
        _check_png(data, max_pixels)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as err:
        raise RejectedImageError("corrupt", f"OpenCV: {str(err).strip().splitlines()[-1]}") from None
    if img is None:
        if is_png or data.startswith(_KNOWN_SIGNATURES):
            raise RejectedImageError("corrupt", f"{'PNG' if is_png else 'image'} data cannot be decoded")
        raise RejectedImageError("not_an_image", "not a PNG or other image format OpenCV reads")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise RejectedImageError("too_large", f"{img.shape[0]}x{img.shape[1]} px, above the cap of {max_pixels} px")
    gray = to_gray8(img)
    h, w = gray.shape
    if min(h, w) < min_side:
        raise RejectedImageError("too_small", f"{h}x{w} px, shorter side below min_side={min_side}")
    return gray


def read_gray8(path: str | Path, min_side: int = 0, *, root: str | Path | None = None) -> np.ndarray:
    """Read an image file as uint8 gray [H, W]; every failure is a RejectedImageError with a reason.

    Args:
        path: image file (a regular file; inside `root` when root is given).
        min_side: reject images whose shorter side is below this (0: no limit).
        root: the data root the file must stay inside after resolving symlinks (None: no check).
    """
    return decode_gray8(read_image_bytes(path, root), min_side)


def letterbox_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an h x w image scaled to fit a size x size square, centred."""
    scale = size / max(h, w)
    nh = min(size, max(1, round(h * scale)))
    nw = min(size, max(1, round(w * scale)))
    return nh, nw, (size - nh) // 2, (size - nw) // 2


def fit_square(img: np.ndarray, size: int, fit: str = "letterbox") -> np.ndarray:
    """A uint8 gray image made size x size with cv2.INTER_AREA: letterbox (aspect kept, 0 padding) or stretch."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"fit_square needs uint8 gray [H, W], got {img.dtype} {img.shape}")
    h, w = img.shape
    if fit == "stretch":
        return img if (h, w) == (size, size) else cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    nh, nw, top, left = letterbox_geometry(h, w, size)
    small = img if (nh, nw) == (h, w) else cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    out = np.zeros((size, size), np.uint8)
    out[top : top + nh, left : left + nw] = small
    return out
