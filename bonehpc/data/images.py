"""Reading one image file safely: bytes -> 8-bit gray -> square (the packer and `bonehpc predict` share it).

Only regular files are read, and only inside the data root when one is given: a FIFO, a device or a
folder is rejected without being opened for reading (no hang, no unbounded read), and a symlink that
leaves the root is rejected before anything is read. File size and image size are capped, so a
decompression bomb (a tiny PNG that claims 100000 x 100000 pixels) is rejected from its header.
Every failure is a `RejectedImageError` with a short reason from REJECT_REASONS and a detail line that
never quotes the file's bytes (rejected.csv must not carry bytes of foreign files).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

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
MAX_DECODED_BYTES = 512 << 20
"""Largest decoded image in bytes (a 16k x 16k 16-bit gray image): within MAX_PIXELS, a 16-bit RGBA header
would otherwise make OpenCV allocate 8 bytes per pixel, 1.6 GB per worker."""
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}  # colour type -> channels OpenCV decodes (palette: BGR or BGRA)

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
        if len(data) >= 26:
            depth, ctype = data[24], data[25]
            _check_decoded_bytes("PNG", w, h, _PNG_CHANNELS.get(ctype, 4) * (2 if depth == 16 else 1))


def _check_decoded_bytes(fmt: str, w: int, h: int, bytes_per_pixel: int) -> None:
    if w * h * bytes_per_pixel > MAX_DECODED_BYTES:
        raise RejectedImageError(
            "too_large",
            f"{fmt} header claims {w}x{h} px at {bytes_per_pixel} bytes each, above the cap of "
            f"{MAX_DECODED_BYTES >> 20} MiB decoded",
        )


def _png_sbit(data: bytes) -> int | None:
    """The significant bits a PNG declares in its sBIT chunk (before the image data), or None."""
    end = data.find(b"IDAT")
    at = data.find(b"sBIT", 0, end if end > 0 else len(data))
    if at < 4:
        return None
    (length,) = struct.unpack(">I", data[at - 4 : at])
    values = data[at + 4 : at + 4 + min(length, 4)]
    return max(values) if values and 0 < max(values) <= 16 else None


def data_bits(img: np.ndarray, declared: int | None = None) -> int:
    """Bit depth of the data in a 16-bit image: what the file declares (PNG sBIT), else the smallest of
    8, 10, 12, 14, 16 that holds its largest value (a 12-bit detector's image stored in 16 bits is 12)."""
    if declared:
        return int(declared)
    need = int(img.max()).bit_length() if img.size else 8
    return next(b for b in (8, 10, 12, 14, 16) if need <= b)


_SAID: set[int] = set()


def to_gray8(img: np.ndarray, bits: int | None = None) -> np.ndarray:
    """An image as cv2.imdecode(IMREAD_UNCHANGED) returns it, as uint8 gray [H, W].

    BGR / BGRA (palette PNGs arrive as BGR) use the luma weights of cv2.cvtColor (a constant alpha is
    dropped); gray+alpha keeps the gray plane; 16-bit values are scaled by their data's bit depth (`bits`,
    else `data_bits`) to 0..255: full 16-bit data by x / 257, 12-bit data by x x 255 / 4095, so that 12-bit
    X-rays are not packed almost black; each bit depth other than 16 is logged once per process.

    Raises:
        RejectedImageError: ('unsupported') for other depths or channel counts, and an alpha that varies.
    """
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        channels = img.shape[2]
        if channels in (2, 4) and img[:, :, -1].min() != img[:, :, -1].max():
            # the picture then depends on the background it is shown over (an X-ray may even live in the
            # alpha plane alone): dropping alpha would pack something else than the file shows, silently
            raise RejectedImageError("unsupported", "transparent pixels (alpha varies); flatten the image first")
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
        b = data_bits(img, bits)
        if b != 16 and b not in _SAID:
            _SAID.add(b)
            log.info("16-bit image(s) holding %d-bit data: scaled by 255/%d to 8 bits", b, 2**b - 1)
        # 65535 / 257 == 255 exactly, so the full range of the data maps onto the full 8-bit range.
        return cv2.convertScaleAbs(img, alpha=255.0 / (2**b - 1))
    raise RejectedImageError("unsupported", f"pixel type {img.dtype}")


def _header(data: bytes, is_png: bool, max_pixels: int) -> int:
    """Check the size a non-PNG header claims (Pillow reads headers without decoding), before OpenCV decodes
    it: a 20000 x 20000 JPEG named .png is refused from its header, and a format Pillow cannot read the header
    of is not decoded at all. Returns the EXIF orientation (1: none)."""
    if is_png and b"eXIf" not in data:
        return 1  # the IHDR check covered the size; no EXIF chunk
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise RejectedImageError(
                        "too_large", f"{im.format} header claims {w}x{h} px, above the cap of {max_pixels} px"
                    )
                wide = 2 if im.mode.startswith("I;16") else 4 if im.mode in ("I", "F") else 1
                _check_decoded_bytes(str(im.format), w, h, max(len(im.getbands()), 3 if im.mode == "P" else 1) * wide)
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Image.DecompressionBombError as err:  # Pillow's own cap (~179 Mpx), checked when it opens
        n = re.search(r"\((\d+) pixels\)", str(err))
        claim = f"{n.group(1)} px" if n else "too many pixels"
        raise RejectedImageError("too_large", f"header claims {claim}, a decompression bomb") from None
    except RejectedImageError:
        raise
    except Exception:  # noqa: BLE001 - any failure to read a header means: not decoded
        if is_png:
            return 1  # an unreadable EXIF chunk: the IHDR check covered the size, OpenCV decodes the pixels
        # a format whose size cannot be read first is not decoded at all (OpenCV would decode e.g. a Radiance
        # HDR claiming 20000 x 20000 px in full, up to its own cap of 1 Gpx)
        if data.startswith(_KNOWN_SIGNATURES):
            raise RejectedImageError("corrupt", "image header cannot be read") from None
        raise RejectedImageError("not_an_image", "not a PNG or other image format whose header can be read") from None
    return orientation if orientation in ORIENTATIONS else 1


EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].T,
    8: lambda a: np.rot90(a, 1),
}
"""EXIF orientation -> the transform that shows the image upright (as Pillow's ImageOps.exif_transpose)."""


def decode_gray8(data: bytes, min_side: int = 0, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 gray [H, W] with OpenCV, upright (EXIF orientation applied, which
    IMREAD_UNCHANGED ignores); the size a header claims is checked before decoding. Every failure is a
    RejectedImageError."""
    is_png = data.startswith(_PNG_SIGNATURE)
    if is_png:
        _check_png(data, max_pixels)
    orientation = _header(data, is_png, max_pixels)
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
    gray = to_gray8(img, _png_sbit(data) if is_png else None)
    if orientation != 1:
        gray = np.ascontiguousarray(ORIENTATIONS[orientation](gray))
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
