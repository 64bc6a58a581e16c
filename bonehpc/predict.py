"""Inference on new X-rays: image and study probabilities from a checkpoint, a run or a fold ensemble, plus Grad-CAM.

Preprocessing is the evaluation path of training, step for step: the packer's reader and square fit
(`bonehpc.data.pack.read_gray8` / `fit_square`: OpenCV decode to 8-bit gray, letterbox or stretch to the
pack size stored in the checkpoint's config), then
the eval preset (`bonehpc.augment`: resize to data.image_size, gray -> 3 channels, normalise). A study is
the folder that holds its images; its probability is the mean of its images' probabilities and it is
called abnormal when that mean is > 0.5 (MURA protocol). Images that cannot be read are listed with a
reason, never fatal.
"""

from __future__ import annotations

import logging
import re
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

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
THRESHOLD = 0.5


class PredictError(ValueError):
    """The model or the input cannot be used; the message names the path and the problem."""


@dataclass
class Predictor:
    """The networks (one, or one per fold for an ensemble) and the config that fixes their preprocessing."""

    models: list[nn.Module]
    cfg: ExperimentConfig
    sources: list[Path]
    device: torch.device


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


def load_predictor(model: str | Path, role: str = "student", device: str | torch.device = "cpu") -> Predictor:
    """Load a checkpoint, a run folder (its best.pt) or an experiment folder (the fold ensemble of `role`).

    Raises:
        PredictError: nothing usable at that path, or ensemble members disagree on preprocessing.
    """
    if role not in ("teacher", "student"):
        raise PredictError(f"role must be teacher or student, got {role!r}")
    dev = torch.device(device)
    paths = _member_paths(Path(model), role)
    models, cfg = [], None
    for p in paths:
        state = load_checkpoint(p, map_location="cpu")
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
        "loaded %d model(s) from %s (pack %d px -> input %d px)",
        len(models),
        model,
        cfg.data.pack_size,
        cfg.data.image_size,
    )
    return Predictor(models, cfg, paths, dev)


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
    df = pd.read_csv(src, header=None, dtype=str)
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
    """The image as the packer stores it (same reader, same square fit at data.pack_size), or (None, reason)."""
    from bonehpc.data.pack import RejectedImageError, fit_square, read_gray8

    try:
        gray = read_gray8(path)
    except RejectedImageError as err:
        return None, f"{err.reason}: {err.detail}"
    return fit_square(gray, cfg.data.pack_size, cfg.data.fit), ""


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


def _overlay(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), 0.6, heat, 0.4, 0)


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
) -> pd.DataFrame:
    """Abnormal probabilities per image and per study; writes out_csv and <out_csv stem>_studies.csv.

    Args:
        model: a checkpoint file, a run folder (uses its best.pt) or an experiment folder (the fold
            ensemble of `role`: image probabilities averaged over the folds' best.pt).
        inputs: a folder of images (searched recursively) or a CSV of image paths (MURA format accepted).
        out_csv: per-image CSV: path, study, status (ok | unreadable), reason, prob, pred.
        batch_size: images per forward pass.
        device: torch device.
        gradcam_dir: when set, Grad-CAM overlays (PNG) of every image of the studies called abnormal.
        role: teacher or student, for an experiment folder.

    Returns:
        The per-image DataFrame (the study table is in ``.attrs["studies"]``).
    """
    if batch_size <= 0:
        raise PredictError(f"batch_size must be > 0, got {batch_size}")
    pred = load_predictor(model, role, device)
    files = list_inputs(inputs)
    transform = build_albu_transform(build_preset(pred.cfg, train=False))
    rows: list[dict[str, object]] = []
    squares: dict[int, np.ndarray] = {}
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        x = torch.stack([t for _, t in batch]).to(pred.device)
        with torch.inference_mode():
            probs = torch.stack([torch.softmax(m(x).float(), dim=1)[:, 1] for m in pred.models]).mean(0)
        for (i, _), p in zip(batch, probs.cpu().numpy(), strict=True):
            rows[i]["prob"] = float(p)
        batch.clear()

    for path in files:
        img, reason = _read(path, pred.cfg)
        rows.append(
            {
                "path": str(path),
                "study": study_of(path),
                "status": "unreadable" if img is None else "ok",
                "reason": reason,
                "prob": np.nan,
            }
        )
        if img is None:
            log.warning("unreadable image %s: %s", path, reason)
            continue
        i = len(rows) - 1
        if gradcam_dir is not None:
            squares[i] = img
        batch.append((i, apply_albu(transform, img)))
        if len(batch) >= batch_size:
            flush()
    flush()

    df = pd.DataFrame(rows, columns=["path", "study", "status", "reason", "prob"])
    df["pred"] = (df["prob"] > THRESHOLD).astype(int).where(df["status"] == "ok")
    studies = _studies(df)
    bad = int((df.status != "ok").sum())
    if bad:
        log.warning("%d of %d images could not be read; they are listed in %s with the reason", bad, len(df), out_csv)
    if gradcam_dir is not None:
        df["gradcam"] = ""
        _write_gradcams(pred, df, studies, squares, transform, Path(gradcam_dir), batch_size)
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    studies.to_csv(studies_csv_path(out), index=False)
    df.attrs["studies"] = studies
    log.info("%d images (%d unreadable), %d studies -> %s", len(df), bad, len(studies), out)
    return df


def studies_csv_path(out_csv: str | Path) -> Path:
    """preds.csv -> preds_studies.csv."""
    p = Path(out_csv)
    return p.with_name(f"{p.stem}_studies{p.suffix or '.csv'}")


def _studies(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df.status == "ok"]
    g = ok.groupby("study", sort=True)["prob"]
    st = pd.DataFrame({"n_images": g.size(), "prob": g.mean()})
    st = st.reindex(sorted(df["study"].unique()))
    st["n_unreadable"] = df[df.status != "ok"].groupby("study").size().reindex(st.index).fillna(0).astype(int)
    st["n_images"] = st["n_images"].fillna(0).astype(int)
    st["status"] = np.where(st["n_images"] > 0, "ok", "no readable image")
    st["pred"] = (st["prob"] > THRESHOLD).astype(int).where(st["n_images"] > 0)
    return st.rename_axis("study").reset_index()[["study", "n_images", "n_unreadable", "prob", "pred", "status"]]


def _write_gradcams(
    pred: Predictor,
    df: pd.DataFrame,
    studies: pd.DataFrame,
    squares: dict[int, np.ndarray],
    transform: object,
    out_dir: Path,
    batch_size: int,
) -> None:
    flagged = set(studies.loc[studies["pred"] == 1, "study"])
    idx = [i for i in df.index[(df.status == "ok") & df.study.isin(flagged)] if i in squares]
    out_dir.mkdir(parents=True, exist_ok=True)
    size = pred.cfg.data.image_size
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        x = torch.stack([apply_albu(transform, squares[i]) for i in chunk]).to(pred.device)  # type: ignore[arg-type]
        cams = np.mean([gradcam(m, x) for m in pred.models], axis=0)
        for i, cam in zip(chunk, cams, strict=True):
            gray = cv2.resize(squares[i], (size, size), interpolation=cv2.INTER_LINEAR)
            # the study's last folders (body part / patient / study) keep names short and unique enough
            study = "_".join(PurePath(str(df.at[i, "study"])).parts[-3:])
            name = f"{_safe(study)}__{_safe(Path(str(df.at[i, 'path'])).stem)}.png"
            cv2.imwrite(str(out_dir / name), _overlay(gray, cam))
            df.at[i, "gradcam"] = str(out_dir / name)
    log.info("Grad-CAM overlays of %d images in %d abnormal studies -> %s", len(idx), len(flagged), out_dir)
