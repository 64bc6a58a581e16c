"""Inference on new X-rays: image and study probabilities from a checkpoint, a run or a fold ensemble, plus Grad-CAM.

Preprocessing is the evaluation path of training, step for step: the packer's reader and square fit
(`bonehpc.data.images.read_gray8` / `fit_square`: OpenCV decode to 8-bit gray, letterbox or stretch to the
pack size stored in the checkpoint's config), then
the eval preset (`bonehpc.augment`: resize to data.image_size, gray -> 3 channels, normalise). A study is
the folder that holds its images; studies come from `bonehpc.metrics.study_table` (the one aggregation:
probability = mean of its images' probabilities, abnormal when > 0.5, MURA protocol). Images that cannot
be read are listed with a reason, never fatal.

Each member's probability is first corrected for the class weighting of its training loss (the logit shift
its checkpoint records, `bonehpc.metrics.correct_prior`), so probabilities mean what they say. Calibration is
opt-in (`calibrate=True`, CLI ``--calibrate``): each member's image probability p becomes
sigmoid(logit(p) / T + b) with the temperature T and bias b of its role that `bonehpc evaluate` fitted on the
experiment's out-of-fold predictions
(`bonehpc.metrics.CALIBRATION_FILE`). Images and studies are called abnormal above the threshold (`threshold`,
CLI ``--threshold oof|youden|0.5|<value>``): by default the role's out-of-fold operating point stored in
CALIBRATION_FILE (the cut maximising out-of-fold study kappa, on the calibrated scale with ``--calibrate``),
0.5 (MURA protocol) when the experiment has none; the source is in ``.attrs["threshold_source"]``.

Bad arguments (unknown or absent device, an output path that is a folder or not writable, a Grad-CAM
folder that is a file, an empty CSV, an existing output bonehpc did not write) are a PredictError before
anything is computed; outputs are written atomically, so a failure leaves no half-written file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from bonehpc.augment import build_preset
from bonehpc.augment.albu import apply_albu, build_albu_transform
from bonehpc.checkpoint import BEST, build_model_from_checkpoint, load_checkpoint
from bonehpc.config import ExperimentConfig, from_dict
from bonehpc.constants import THRESHOLD
from bonehpc.data.images import RejectedImageError, fit_square, letterbox_geometry, read_gray8
from bonehpc.fsio import atomic_write_bytes, atomic_write_csv, read_bytes_bounded
from bonehpc.metrics import (
    BIAS_RANGE,
    CALIBRATION_FILE,
    TEMPERATURE_RANGE,
    apply_temperature,
    checkpoint_logit_shift,
    correct_prior,
    read_calibration,
    read_thresholds,
    study_table,
)
from bonehpc.paths import read_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_COLUMNS = ["path", "study", "status", "reason", "prob"]
STUDY_COLUMNS = ["study", "n_images", "n_unreadable", "prob", "pred", "status"]


class PredictError(ValueError):
    """The model or the input cannot be used; the message names the path and the problem."""


@dataclass
class Predictor:
    """The networks (one, or one per fold for an ensemble) and the config that fixes their preprocessing."""

    models: list[nn.Module]
    cfg: ExperimentConfig
    sources: list[Path]
    device: torch.device
    temperature: float | None = None  # applied to every member's image probability when set
    bias: float = 0.0  # the out-of-fold recalibration's intercept, applied with the temperature
    shifts: list[float | None] | None = None  # per member: the logit shift of its class weights (None: unknown)


def _member_paths(model: Path, role: str) -> list[Path]:
    if model.is_file():
        return [model]
    if not model.is_dir():
        raise PredictError(f"model not found: {model} (expected a checkpoint, a run folder or an experiment folder)")
    if (model / BEST).is_file():
        return [model / BEST]
    folds = sorted(
        (p for p in model.glob(f"fold*/{role}/{BEST}") if re.fullmatch(r"fold\d+", p.parent.parent.name)),
        key=lambda p: int(p.parent.parent.name[4:]),
    )
    if not folds:
        raise PredictError(
            f"{model}: no {BEST} here and no fold*/{role}/{BEST} (give a checkpoint, a run folder with {BEST}, "
            "or an experiment folder whose folds are trained)"
        )
    if (model / "config.yaml").is_file():
        from bonehpc.config import read_yaml

        k = (read_yaml(model / "config.yaml").get("data") or {}).get("num_folds")
        if isinstance(k, int) and len(folds) < k:
            log.warning("fold ensemble of %s: only %d of %d folds have a %s %s", model, len(folds), k, role, BEST)
    return folds


def resolve_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or a PredictError naming the problem (unknown name, no GPU, no such GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PredictError(f"device {str(device)!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PredictError(f"device {dev}: no CUDA GPU is available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PredictError(f"device {dev}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise PredictError(f"device {dev}: only cpu and cuda devices are supported")
    return dev


def _experiment_of(model: Path) -> Path | None:
    """The experiment folder that holds a model path (itself, or up to three levels above), by its calibration."""
    for folder in [model, *model.parents][:4]:
        if (folder / CALIBRATION_FILE).is_file():
            return folder
    return None


def _temperature(model: Path, paths: list[Path], role: str) -> tuple[float, float]:
    """The out-of-fold (temperature, bias) of the model's role (the run folder's name for a single checkpoint);
    a calibration file without a bias (written before it was fitted) gives bias 0."""
    exp = _experiment_of(model)
    if exp is None:
        raise PredictError(
            f"--calibrate: no {CALIBRATION_FILE} at {model} or the folders above it (`bonehpc evaluate` writes one "
            "in the experiment folder); run without --calibrate"
        )
    run_role = paths[0].parent.name if len(paths) == 1 else role
    doc = read_json(exp / CALIBRATION_FILE) or {}
    entry = doc.get("roles", {}).get(run_role) if isinstance(doc.get("roles"), dict) else None
    if not isinstance(entry, dict) or "temperature" not in entry:
        raise PredictError(f"--calibrate: {exp / CALIBRATION_FILE} has no temperature for role {run_role!r}")
    for key, (low, high) in (("temperature", TEMPERATURE_RANGE), ("bias", BIAS_RANGE)):
        v = entry.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
            raise PredictError(
                f"--calibrate: {exp / CALIBRATION_FILE}: {key} of role {run_role!r} is {v!r:.40}, not a number "
                f"in [{low}, {high}] (the range `bonehpc evaluate` fits in); re-run `bonehpc evaluate`"
            )
    return read_calibration(exp)[run_role]


def resolve_threshold(model: Path, paths: list[Path], role: str, spec: str, calibrate: bool) -> tuple[float, str]:
    """(threshold, where it comes from) for `spec`: "oof" (the role's out-of-fold operating point, study kappa),
    "youden" (its Youden's J cut), "0.5" or any number in (0, 1); "default": oof when the experiment has one,
    else 0.5 (MURA protocol). The stored cuts are on the calibrated scale when `calibrate`."""
    spec = str(spec).strip().lower()
    if spec not in ("default", "oof", "youden"):
        try:
            value = float(spec)
        except ValueError:
            raise PredictError(f"--threshold must be oof, youden, 0.5 or a number in (0, 1), got {spec!r}") from None
        if not 0.0 < value < 1.0:
            raise PredictError(f"--threshold must be in (0, 1), got {value}")
        return value, "given" if value != THRESHOLD else "0.5 (MURA protocol)"
    exp = _experiment_of(model)
    run_role = paths[0].parent.name if len(paths) == 1 else role
    op = read_thresholds(exp).get(run_role) if exp is not None else None
    if exp is None or op is None:
        if spec == "default":
            return THRESHOLD, "0.5 (MURA protocol; no out-of-fold operating point stored for this model)"
        raise PredictError(
            f"--threshold {spec}: no out-of-fold operating point of role {run_role!r} in a {CALIBRATION_FILE} at "
            f"{model} or the folders above it (`bonehpc evaluate` stores one); use --threshold 0.5"
        )
    rec = op.get("youden") if spec == "youden" else op
    stored = rec.get("value_calibrated" if calibrate else "value") if isinstance(rec, dict) else None
    if isinstance(stored, bool) or not isinstance(stored, (int, float)) or not 0.0 < stored < 1.0:
        raise PredictError(
            f"--threshold {spec}: {exp / CALIBRATION_FILE}: the operating point of role {run_role!r} is "
            f"{stored!r:.40}, not a number in (0, 1); re-run `bonehpc evaluate` or give --threshold 0.5"
        )
    value = float(stored)
    what = "Youden's J" if spec == "youden" else "study kappa"
    scale = ", calibrated scale" if calibrate else ""
    return value, f"out-of-fold operating point of {run_role} ({what}{scale}; {exp / CALIBRATION_FILE})"


def load_predictor(
    model: str | Path, role: str = "student", device: str | torch.device = "cpu", calibrate: bool = False
) -> Predictor:
    """Load a checkpoint, a run folder (its best.pt) or an experiment folder (the fold ensemble of `role`).

    Args:
        calibrate: apply the out-of-fold temperature of the role saved in the experiment (PredictError when
            there is none).

    Raises:
        PredictError: nothing usable at that path, ensemble members disagree on preprocessing, a bad device,
            or no temperature to calibrate with.
    """
    if role not in ("teacher", "student", "baseline"):
        raise PredictError(f"role must be teacher, student or baseline, got {role!r}")
    dev = resolve_device(device)
    paths = _member_paths(Path(model), role)
    temperature, bias = _temperature(Path(model), paths, role) if calibrate else (None, 0.0)
    models, cfg, shifts = [], None, []
    for p in paths:
        state = load_checkpoint(p, map_location="cpu")
        shifts.append(checkpoint_logit_shift(state))
        if shifts[-1] is None:
            log.warning("%s records no probability correction (trained before it was recorded): used as is", p)
        try:
            c = from_dict(state.get("config") or {})
        except ValueError as err:
            raise PredictError(f"{p}: the config stored in the checkpoint is not valid here: {err}") from None
        if cfg is not None and (c.data.pack_size, c.data.image_size, c.data.fit, c.augment.mean, c.augment.std) != (
            cfg.data.pack_size,
            cfg.data.image_size,
            cfg.data.fit,
            cfg.augment.mean,
            cfg.augment.std,
        ):
            raise PredictError(f"{p}: preprocessing differs from {paths[0]}; cannot ensemble them")
        cfg = cfg or c
        models.append(build_model_from_checkpoint(state).float().to(dev).eval())
    assert cfg is not None
    log.info(
        "loaded %d model(s) from %s (pack %d px -> input %d px%s)",
        len(models),
        model,
        cfg.data.pack_size,
        cfg.data.image_size,
        f", temperature {temperature:.3f}, bias {bias:+.3f}" if temperature else "",
    )
    return Predictor(models, cfg, paths, dev, temperature, shifts=shifts, bias=bias)


def list_inputs(inputs: str | Path) -> list[Path]:
    """Image paths from a folder (searched recursively for PNG/JPEG) or a CSV of paths.

    The CSV is either MURA's image-paths CSV (no header, one path per row, relative to the folder that holds
    ``MURA-v1.1/``) or any CSV with a ``path`` column; relative paths are resolved against the CSV's folder,
    then its parent, then the working directory.
    """
    src = Path(inputs)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PredictError(f"{src}: no {'/'.join(IMAGE_SUFFIXES)} files found (searched recursively)")
        return files
    if not src.is_file():
        raise PredictError(f"input not found: {src} (expected a folder of images or a CSV of paths)")
    if src.suffix.lower() != ".csv":
        raise PredictError(f"{src}: input must be a folder or a .csv of image paths")
    try:
        df = pd.read_csv(io.BytesIO(read_bytes_bounded(src)), header=None, dtype=str)
    except pd.errors.EmptyDataError:
        raise PredictError(f"{src}: empty CSV (no image paths)") from None
    except (UnicodeDecodeError, pd.errors.ParserError, OSError) as err:
        raise PredictError(f"{src}: not a readable CSV of image paths ({type(err).__name__})") from None
    if df.empty:
        raise PredictError(f"{src}: empty CSV")
    first = [str(x).strip().lower() for x in df.iloc[0]]
    if "path" in first:
        col = first.index("path")
        raw = df.iloc[1:, col]
    else:
        raw = df.iloc[:, 0]
    out = []
    for r in raw.dropna().astype(str).str.strip():
        p = Path(r)
        if not p.is_absolute():
            bases = (src.parent, src.parent.parent, Path.cwd())
            p = next((b / p for b in bases if (b / p).exists()), src.parent.parent / p)
        out.append(p)
    if not out:
        raise PredictError(f"{src}: no paths in the CSV")
    return out


def _read(path: Path, cfg: ExperimentConfig) -> tuple[np.ndarray | None, str]:
    """The image at its own resolution as the packer reads it (8-bit gray), or (None, reason)."""
    try:
        return read_gray8(path, cfg.data.min_side), ""
    except RejectedImageError as err:
        return None, f"{err.reason}: {err.detail}"


def _writable(path: Path, what: str) -> None:
    """PredictError unless `path` can be created (its folder, or the nearest existing folder above it, is
    writable). Permission bits decide for a normal user; root, whom they do not stop, gets a real probe (an
    immutable folder or a read-only mount stops root too), so call this last, right before writing."""
    f = path.parent
    while not f.exists() and f != f.parent:
        f = f.parent
    if not f.is_dir():
        raise PredictError(f"{what} {path}: {f} is a file, not a folder")
    if not os.access(f, os.W_OK | os.X_OK):
        raise PredictError(f"{what} {path}: cannot write in {f} (permission denied or read-only)")
    if os.geteuid() == 0:
        try:
            fd, name = tempfile.mkstemp(prefix=".bonehpc-probe-", dir=f)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            raise PredictError(f"{what} {path}: cannot write in {f} ({err.strerror})") from None


def _ours(path: Path, header: list[str]) -> bool:
    """True when `path` starts with the header bonehpc predict writes."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline().strip()
    except OSError:
        return False
    return first.split(",")[: len(header)] == header


def check_outputs(out_csv: Path, gradcam_dir: Path | None) -> None:
    """Refuse outputs that must not be written (a folder, a file bonehpc did not write, a Grad-CAM path that is
    a file) before any work; `check_writable` comes last."""
    for path, header in ((out_csv, IMAGE_COLUMNS), (studies_csv_path(out_csv), STUDY_COLUMNS)):
        if path.is_dir():
            raise PredictError(f"--out {path} is a folder; give the path of a CSV file")
        if path.exists() and not _ours(path, header):
            raise PredictError(
                f"{path} exists and was not written by bonehpc predict; it is left alone (remove it or choose "
                "another --out)"
            )
    if gradcam_dir is not None and gradcam_dir.exists() and not gradcam_dir.is_dir():
        raise PredictError(f"--gradcam {gradcam_dir} is a file; give a folder for the overlays")


def _within(path: Path, folder: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def check_apart(inputs: Path, files: list[Path], out_csv: Path, gradcam_dir: Path | None) -> None:
    """Outputs are never written where inputs are read: overlays inside an input folder would be inputs of
    the next predict (and could replace an image), an --out equal to the input CSV would replace it."""
    for path in (out_csv, studies_csv_path(out_csv)):
        if os.path.realpath(path) == os.path.realpath(inputs) or any(_within(path, f) for f in files):
            raise PredictError(f"--out {path} is an input of this predict; write it elsewhere")
    if gradcam_dir is None:
        return
    if inputs.is_dir() and _within(gradcam_dir, inputs):
        raise PredictError(
            f"--gradcam {gradcam_dir} is inside the input folder {inputs}: the overlays would become inputs of the "
            "next predict; give a folder outside it"
        )
    inside = next((f for f in files if _within(f, gradcam_dir)), None)
    if inside is not None:
        raise PredictError(f"--gradcam {gradcam_dir} holds input {inside}; give a folder without inputs")


def overlay_name(image: str | Path, study: str) -> str:
    """The Grad-CAM file of one image: readable (the study's last folders and the image name) and unique
    (a hash of the image's full resolved path: two images with the same last folders get two files)."""
    tag = hashlib.sha256(os.path.realpath(image).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    short = "_".join(PurePath(study).parts[-3:])
    return f"{_safe(short)}__{_safe(Path(image).stem)}__{tag}.png"


def check_writable(out_csv: Path, gradcam_dir: Path | None) -> None:
    """PredictError when an output cannot be written (read-only folder, immutable folder, read-only mount)."""
    _writable(out_csv, "--out")
    if gradcam_dir is not None:
        _writable(gradcam_dir / "overlay.png", "--gradcam")


def _cam_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage (hybrid: the last conv stage, before the 1x1 projection and the transformer)."""
    from bonehpc.models.hybrid import HybridNet

    if isinstance(model, HybridNet):
        return model.stem[-1]
    info = getattr(model, "feature_info", None)
    if info is not None:
        try:
            return model.get_submodule(info.module_name()[-1] if hasattr(info, "module_name") else info[-1]["module"])
        except (AttributeError, KeyError, IndexError, TypeError):
            pass
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise PredictError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


def gradcam(model: nn.Module, images: torch.Tensor, layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM of the abnormal log-odds (logit 1 - logit 0): float [B, H, W] in 0..1 at the input size.

    Hooks on `layer` (default: `_cam_layer`) keep its output and the gradient that flows into it.
    """
    layer = layer or _cam_layer(model)
    store: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        store["act"] = out
        out.register_hook(lambda g: store.__setitem__("grad", g))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # puts the activations in the graph
            logits = model(x)
            (logits[:, 1] - logits[:, 0]).sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    act, grad = store["act"].detach(), store["grad"].detach()
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).cpu().numpy()


def cam_on_source(cam: np.ndarray, shape: tuple[int, int], pack_size: int, fit: str) -> np.ndarray:
    """A Grad-CAM map of the model input (the whole pack square, resized) mapped onto the source image:
    float [H, W] at the source's own resolution (the letterbox padding is cut away)."""
    h, w = shape
    square = cv2.resize(cam.astype(np.float32), (pack_size, pack_size), interpolation=cv2.INTER_LINEAR)
    if fit == "letterbox":
        nh, nw, top, left = letterbox_geometry(h, w, pack_size)
        square = square[top : top + nh, left : left + nw]
    return np.clip(cv2.resize(square, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def side_by_side(gray: np.ndarray, cam: np.ndarray, gap: int = 8) -> np.ndarray:
    """BGR image: the source (left) and the Grad-CAM overlay on it (right), both at the source's resolution."""
    src = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(src, 0.6, heat, 0.4, 0)
    spacer = np.full((gray.shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([src, spacer, overlay], axis=1)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def study_of(path: Path) -> str:
    """The study of an image: its folder, with a trailing slash (MURA's spelling of study paths)."""
    return str(PurePath(path).parent) + "/"


def predict(
    model: str | Path,
    inputs: str | Path,
    out_csv: str | Path,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    gradcam_dir: str | Path | None = None,
    role: str = "student",
    calibrate: bool = False,
    threshold: str = "default",
) -> pd.DataFrame:
    """Abnormal probabilities per image and per study; writes out_csv and <out_csv stem>_studies.csv.

    Args:
        model: a checkpoint file, a run folder (uses its best.pt) or an experiment folder (the fold
            ensemble of `role`: image probabilities averaged over the folds' best.pt).
        inputs: a folder of images (searched recursively) or a CSV of image paths (MURA format accepted).
        out_csv: per-image CSV: path, study, status (ok | unreadable), reason, prob, pred.
        batch_size: images per forward pass.
        device: torch device (cpu, cuda, cuda:N).
        gradcam_dir: when set, Grad-CAM overlays (PNG, source and overlay side by side at the source's
            resolution) of every image of the studies called abnormal.
        role: teacher, student or baseline, for an experiment folder.
        calibrate: apply the experiment's out-of-fold temperature (see the module docstring).
        threshold: "default", "oof", "youden", "0.5" or a number (`resolve_threshold`).

    Returns:
        The per-image DataFrame (the study table is in ``.attrs["studies"]``).

    Raises:
        PredictError: bad arguments or inputs (checked before any work; nothing is written).
    """
    if batch_size <= 0:
        raise PredictError(f"batch_size must be > 0, got {batch_size}")
    out = Path(out_csv)
    cams = Path(gradcam_dir) if gradcam_dir is not None else None
    check_outputs(out, cams)
    resolve_device(device)
    pred = load_predictor(model, role, device, calibrate=calibrate)
    cut, source = resolve_threshold(Path(model), pred.sources, role, threshold, calibrate)
    log.info("threshold %.4f: %s", cut, source)
    files = list_inputs(inputs)
    check_apart(Path(inputs), files, out, cams)
    check_writable(out, cams)  # last: root's probe touches the folder
    df = _score(pred, files, batch_size, cut)
    studies = _studies(df, cut)
    bad = int((df.status != "ok").sum())
    if bad:
        log.warning("%d of %d images could not be read; they are listed in %s with the reason", bad, len(df), out)
    if cams is not None:
        df["gradcam"] = ""
        _write_gradcams(pred, df, studies, cams, batch_size)
    atomic_write_csv(out, df)
    atomic_write_csv(studies_csv_path(out), studies)
    df.attrs["studies"] = studies
    df.attrs["temperature"] = pred.temperature  # None: the models' own probabilities
    df.attrs["bias"] = pred.bias
    df.attrs["threshold"], df.attrs["threshold_source"] = cut, source
    log.info("%d images (%d unreadable), %d studies -> %s", len(df), bad, len(studies), out)
    return df


def _probs(pred: Predictor, x: torch.Tensor) -> np.ndarray:
    """Abnormal probability per image: the members' (temperature-scaled) probabilities averaged."""
    with torch.inference_mode():
        each = torch.stack([torch.softmax(m(x).float(), dim=1)[:, 1] for m in pred.models]).cpu().numpy()
    each = np.stack([correct_prior(e, s or 0.0) for e, s in zip(each, pred.shifts or [None] * len(each), strict=True)])
    if pred.temperature is not None:
        each = apply_temperature(each, pred.temperature, pred.bias)
    return each.mean(axis=0)


def _score(pred: Predictor, files: list[Path], batch_size: int, threshold: float = THRESHOLD) -> pd.DataFrame:
    """One row per input file (IMAGE_COLUMNS + pred), unreadable files listed with their reason."""
    transform = build_albu_transform(build_preset(pred.cfg, train=False))
    rows: list[dict[str, object]] = []
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if batch:
            probs = _probs(pred, torch.stack([t for _, t in batch]).to(pred.device))
            for (i, _), p in zip(batch, probs, strict=True):
                rows[i]["prob"] = float(p)
            batch.clear()

    for path in files:
        img, reason = _read(path, pred.cfg)
        status = "unreadable" if img is None else "ok"
        rows.append({"path": str(path), "study": study_of(path), "status": status, "reason": reason, "prob": np.nan})
        if img is None:
            log.warning("unreadable image %s: %s", path, reason)
            continue
        batch.append(
            (len(rows) - 1, apply_albu(transform, fit_square(img, pred.cfg.data.pack_size, pred.cfg.data.fit)))
        )
        if len(batch) >= batch_size:
            flush()
    flush()
    df = pd.DataFrame(rows, columns=IMAGE_COLUMNS)
    df["pred"] = (df["prob"] > threshold).astype(int).where(df["status"] == "ok")
    return df


def studies_csv_path(out_csv: str | Path) -> Path:
    """preds.csv -> preds_studies.csv."""
    p = Path(out_csv)
    return p.with_name(f"{p.stem}_studies{p.suffix or '.csv'}")


def _studies(df: pd.DataFrame, threshold: float = THRESHOLD) -> pd.DataFrame:
    """STUDY_COLUMNS per study folder: `metrics.study_table` of the readable images, plus the unreadable count."""
    ok = df[df.status == "ok"]
    if len(ok):
        st = study_table(ok[["study", "prob"]], threshold).set_index("study")
    else:
        st = pd.DataFrame(columns=["prob", "n_images", "pred"], index=pd.Index([], name="study"))
    st = st.reindex(sorted(df["study"].unique()))
    st["n_unreadable"] = df[df.status != "ok"].groupby("study").size().reindex(st.index).fillna(0).astype(int)
    st["n_images"] = st["n_images"].fillna(0).astype(int)
    st["status"] = np.where(st["n_images"] > 0, "ok", "no readable image")
    st["pred"] = st["pred"].where(st["n_images"] > 0)
    return st.rename_axis("study").reset_index()[STUDY_COLUMNS]


def _write_gradcams(pred: Predictor, df: pd.DataFrame, studies: pd.DataFrame, out_dir: Path, batch_size: int) -> None:
    flagged = set(studies.loc[studies["pred"] == 1, "study"])
    idx = list(df.index[(df.status == "ok") & df.study.isin(flagged)])
    transform = build_albu_transform(build_preset(pred.cfg, train=False))
    pack, fit = pred.cfg.data.pack_size, pred.cfg.data.fit
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        sources = [read_gray8(str(df.at[i, "path"]), pred.cfg.data.min_side) for i in chunk]  # read before: ok
        x = torch.stack([apply_albu(transform, fit_square(g, pack, fit)) for g in sources]).to(pred.device)
        cams = np.mean([gradcam(m, x) for m in pred.models], axis=0)
        for i, cam, gray in zip(chunk, cams, sources, strict=True):
            path = out_dir / overlay_name(str(df.at[i, "path"]), str(df.at[i, "study"]))
            ok, png = cv2.imencode(".png", side_by_side(gray, cam_on_source(cam, gray.shape, pack, fit)))
            if not ok:
                raise PredictError(f"{path}: PNG encoding failed")
            atomic_write_bytes(path, png.tobytes())
            df.at[i, "gradcam"] = str(path)
    log.info("Grad-CAM overlays of %d images in %d abnormal studies -> %s", len(idx), len(flagged), out_dir)
