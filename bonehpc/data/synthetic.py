"""Procedural data set in the exact MURA-v1.1 layout, for tests, demos and benchmarks without the real data.

Each image is drawn as a radiograph: attenuation of soft tissue, bones (bright cortex, darker medulla,
denser joint ends) and optional metal or plaster is summed and mapped through an exponential detector
response, then exposure, noise, an L/R lead marker and sometimes a collimation border are applied.
Abnormal studies carry a fracture (gap, displacement and angulation of one long bone) that is either
healing (callus and swelling), fixed with a metal plate and screws, or in a cast; the finding is large
enough to survive a letterbox down to 64 px. Every image has its own random stream derived from the
seed and its place in the tree, so the output is byte-identical for the same arguments.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bonehpc import __version__
from bonehpc.fsio import load_json_bounded

log = logging.getLogger(__name__)

MURA_DIR = "MURA-v1.1"
SPLITS = ("train", "valid")
FIRST_VALID_PATIENT = 11185
"""Real MURA-v1.1 numbers its 11,184 train patients from 1 and its valid patients from 11185 on."""

SYNTHETIC_MARKER = "bonehpc_synthetic.json"
"""Written into MURA-v1.1/ of every synthetic set: {"synthetic": true, settings, bad_files, lost_studies}."""
DEFAULT_BAD_FRAC = 0.01
"""`bonehpc synth` writes this fraction of unusable image files unless told otherwise (--bad-frac)."""
BAD_KINDS = ("truncated", "empty", "not_an_image")

ABNORMAL_RATE = 0.4
# Relative study frequency of the body parts, from the MURA-v1.1 train image counts per part.
PART_WEIGHTS = {
    "ELBOW": 4931,
    "FINGER": 5106,
    "FOREARM": 1825,
    "HAND": 5543,
    "HUMERUS": 1272,
    "SHOULDER": 8379,
    "WRIST": 9752,
}
BODY_PARTS = tuple(PART_WEIGHTS)
STUDIES_PER_PATIENT = ((1, 0.72), (2, 0.20), (3, 0.08))
VIEWS_PER_STUDY = ((1, 0.12), (2, 0.38), (3, 0.35), (4, 0.15))
FINDINGS = (("healing", 0.3), ("plate", 0.4), ("cast", 0.3))


# ----------------------------------------------------------------------------------------------
# Anatomy templates. Coordinates are in a frame whose nominal height is 1 (y from -0.5 at the
# proximal end to 0.5 at the distal end, x to the right); bones may run past the frame like a
# real field of view cuts them. Widths are in the same units.


@dataclass(frozen=True)
class Bone:
    """One bone as a capsule from p0 to p1 (kind: long, short (carpal-like) or head (round))."""

    p0: tuple[float, float]
    p1: tuple[float, float]
    width: float
    kind: str = "long"
    breakable: bool = False


@dataclass(frozen=True)
class Anatomy:
    """Bones and soft-tissue capsules of one body part, and the nominal width of its field."""

    width: float
    bones: tuple[Bone, ...]
    tissue: tuple[tuple[tuple[float, float], tuple[float, float], float], ...]
    fracture_t: tuple[float, float] = (0.3, 0.7)


def _hand_bones() -> tuple[Bone, ...]:
    bones = [Bone((-0.07, -0.52), (-0.06, -0.42), 0.1), Bone((0.07, -0.52), (0.06, -0.43), 0.07)]
    for x, y in ((-0.08, -0.37), (-0.02, -0.38), (0.04, -0.37), (0.09, -0.36), (-0.06, -0.31), (0.0, -0.31)):
        bones.append(Bone((x, y), (x + 0.015, y + 0.01), 0.05, "short"))
    bones.append(Bone((0.06, -0.31), (0.07, -0.3), 0.05, "short"))
    for i, xb in enumerate((-0.09, -0.03, 0.03, 0.09)):
        head = (xb * 1.35, 0.0)
        bones.append(Bone((xb, -0.27), head, 0.045, breakable=True))
        direction = np.array([head[0] - xb, 0.27])
        direction /= np.linalg.norm(direction)
        start = np.array(head) + direction * 0.03
        for length, width, brk in ((0.17 - 0.01 * abs(i - 1.5), 0.04, True), (0.1, 0.034, False), (0.07, 0.03, False)):
            end = start + direction * length
            bones.append(Bone((float(start[0]), float(start[1])), (float(end[0]), float(end[1])), width, "long", brk))
            start = end + direction * 0.025
    bones.append(Bone((-0.13, -0.29), (-0.24, -0.12), 0.05, breakable=True))
    bones.append(Bone((-0.255, -0.095), (-0.31, 0.02), 0.042))
    bones.append(Bone((-0.32, 0.045), (-0.345, 0.11), 0.036))
    return tuple(bones)


def _hand_tissue() -> tuple[tuple[tuple[float, float], tuple[float, float], float], ...]:
    caps = [((0.0, -0.55), (0.0, -0.02), 0.36), ((-0.2, -0.25), (-0.33, 0.1), 0.09)]
    for xb in (-0.09, -0.03, 0.03, 0.09):
        caps.append(((xb * 1.35, 0.0), (xb * 1.35 + xb * 0.35 * 1.4, 0.45), 0.07))
    return tuple(caps)


ANATOMY: dict[str, Anatomy] = {
    "HUMERUS": Anatomy(
        width=0.45,
        bones=(
            Bone((0.02, -0.43), (0.03, -0.41), 0.22, "head"),
            Bone((0.0, -0.38), (0.0, 0.4), 0.11, breakable=True),
            Bone((-0.1, 0.43), (0.1, 0.43), 0.08, "short"),
            Bone((-0.05, 0.5), (-0.06, 0.65), 0.06),
            Bone((0.05, 0.48), (0.06, 0.65), 0.06),
            Bone((-0.22, -0.52), (-0.17, -0.36), 0.08, "short"),
        ),
        tissue=(((0.0, -0.6), (0.0, 0.62), 0.4),),
    ),
    "FOREARM": Anatomy(
        width=0.4,
        bones=(
            Bone((-0.07, -0.42), (-0.06, 0.42), 0.075, breakable=True),
            Bone((0.07, -0.46), (0.055, 0.4), 0.07, breakable=True),
            Bone((-0.1, -0.53), (0.1, -0.53), 0.1, "short"),
            Bone((-0.08, 0.5), (-0.04, 0.5), 0.06, "short"),
            Bone((0.0, 0.5), (0.05, 0.5), 0.06, "short"),
        ),
        tissue=(((0.0, -0.62), (0.0, 0.62), 0.34),),
    ),
    "ELBOW": Anatomy(
        width=0.5,
        bones=(
            Bone((0.0, -0.58), (0.0, -0.06), 0.17, breakable=True),
            Bone((-0.13, -0.03), (0.13, -0.03), 0.11, "short"),
            Bone((-0.07, 0.05), (-0.12, 0.58), 0.09, breakable=True),
            Bone((0.06, 0.01), (0.07, 0.58), 0.1, breakable=True),
            Bone((0.07, -0.05), (0.11, 0.0), 0.1, "short"),
        ),
        tissue=(((0.0, -0.62), (0.0, 0.0), 0.44), ((0.0, 0.0), (-0.03, 0.62), 0.4)),
        fracture_t=(0.35, 0.6),
    ),
    "WRIST": Anatomy(
        width=0.6,
        bones=(
            Bone((-0.08, -0.56), (-0.06, -0.04), 0.2, breakable=True),
            Bone((0.14, -0.56), (0.13, -0.06), 0.11, breakable=True),
            *(Bone((x, 0.06), (x + 0.03, 0.07), 0.08, "short") for x in (-0.13, -0.05, 0.03, 0.1)),
            *(Bone((x, 0.16), (x + 0.03, 0.17), 0.075, "short") for x in (-0.12, -0.045, 0.025, 0.09)),
            *(Bone((x, 0.25), (x * 1.3, 0.63), 0.055) for x in (-0.13, -0.06, 0.0, 0.06, 0.12)),
            Bone((-0.17, 0.16), (-0.3, 0.42), 0.06),
        ),
        tissue=(((0.0, -0.62), (0.0, 0.1), 0.5), ((-0.03, 0.1), (0.0, 0.66), 0.56)),
        fracture_t=(0.55, 0.8),
    ),
    "HAND": Anatomy(width=0.75, bones=_hand_bones(), tissue=_hand_tissue(), fracture_t=(0.35, 0.65)),
    "FINGER": Anatomy(
        width=0.36,
        bones=(
            Bone((0.0, -0.66), (0.0, -0.43), 0.15),
            Bone((0.0, -0.38), (0.0, 0.0), 0.13, breakable=True),
            Bone((0.0, 0.04), (0.0, 0.27), 0.11, breakable=True),
            Bone((0.0, 0.31), (0.0, 0.47), 0.1),
            Bone((0.26, -0.66), (0.3, -0.05), 0.1),
        ),
        tissue=(((0.0, -0.66), (0.0, 0.5), 0.27), ((0.26, -0.66), (0.31, 0.1), 0.2)),
        fracture_t=(0.35, 0.65),
    ),
    "SHOULDER": Anatomy(
        width=1.0,
        bones=(
            Bone((0.1, -0.06), (0.11, -0.04), 0.34, "head"),
            Bone((0.14, 0.06), (0.18, 0.62), 0.17, breakable=True),
            Bone((-0.1, -0.13), (-0.1, 0.06), 0.07, "short"),
            Bone((-0.12, 0.05), (-0.36, 0.52), 0.08),
            Bone((-0.58, -0.4), (0.12, -0.3), 0.08, breakable=True),
            Bone((-0.02, -0.27), (0.22, -0.22), 0.07, "short"),
            Bone((-0.13, -0.2), (-0.03, -0.14), 0.05, "short"),
            *(Bone((-0.62, y), (-0.3, y + 0.12), 0.035, "short") for y in (-0.05, 0.13, 0.31)),
        ),
        tissue=(((-0.25, -0.2), (0.2, 0.62), 0.75), ((-0.6, -0.2), (-0.5, 0.62), 0.6)),
        fracture_t=(0.15, 0.35),
    ),
}


# ----------------------------------------------------------------------------------------------
# The plan: patients, studies, views and labels (all drawn from one stream, before any image).


@dataclass
class StudyPlan:
    """One study: where it goes, its label and (for abnormal studies) its finding."""

    split: str
    patient: int
    part: str
    number: int
    label: int
    views: int
    finding: str = ""
    seed_key: tuple[int, ...] = field(default_factory=tuple)

    @property
    def folder(self) -> str:
        suffix = "positive" if self.label else "negative"
        return f"{MURA_DIR}/{self.split}/XR_{self.part}/patient{self.patient:05d}/study{self.number}_{suffix}/"


def _choose(rng: np.random.Generator, table: tuple[tuple[int, float], ...] | tuple[tuple[str, float], ...]) -> object:
    values = [v for v, _ in table]
    probs = np.array([p for _, p in table], dtype=float)
    return values[int(rng.choice(len(values), p=probs / probs.sum()))]


def plan_studies(
    patients: int, seed: int, valid_frac: float = 0.2, abnormal_rate: float = ABNORMAL_RATE
) -> list[StudyPlan]:
    """The studies of a synthetic set (train patients first), without drawing any image.

    Every split has each body part as the main part of at least one patient (when it has seven
    patients or more) and exactly round(abnormal_rate x studies) abnormal studies (at least one abnormal and
    one normal study when the split has two or more).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    n_valid = min(patients - 1, max(1, round(patients * valid_frac)))
    weights = np.array([PART_WEIGHTS[p] for p in BODY_PARTS], dtype=float)
    weights /= weights.sum()
    plans: list[StudyPlan] = []
    for split_index, (split, n_patients, first) in enumerate(
        (("train", patients - n_valid, 1), ("valid", n_valid, FIRST_VALID_PATIENT))
    ):
        mains = list(rng.permutation(BODY_PARTS))[:n_patients]
        mains += [BODY_PARTS[i] for i in rng.choice(len(BODY_PARTS), size=n_patients - len(mains), p=weights)]
        mains = [mains[i] for i in rng.permutation(n_patients)]
        split_plans: list[StudyPlan] = []
        for i, main in enumerate(mains):
            patient = first + i
            numbers: dict[str, int] = {}
            for k in range(int(_choose(rng, STUDIES_PER_PATIENT))):  # type: ignore[call-overload]
                part = main if k == 0 or rng.random() < 0.6 else BODY_PARTS[int(rng.choice(len(BODY_PARTS), p=weights))]
                numbers[part] = numbers.get(part, 0) + 1
                views = int(_choose(rng, VIEWS_PER_STUDY))  # type: ignore[call-overload]
                key = (seed, split_index, patient, BODY_PARTS.index(part), numbers[part])
                split_plans.append(StudyPlan(split, patient, part, numbers[part], 0, views, seed_key=key))
        n_abnormal = round(abnormal_rate * len(split_plans))
        if len(split_plans) >= 2:  # both classes in each split, whatever the rate
            n_abnormal = min(max(n_abnormal, 1), len(split_plans) - 1)
        abnormal = rng.permutation(len(split_plans))[:n_abnormal]
        for j in sorted(abnormal):
            split_plans[j].label = 1
            split_plans[j].finding = str(_choose(rng, FINDINGS))
        plans += split_plans
    return plans


# ----------------------------------------------------------------------------------------------
# Drawing.


@dataclass(frozen=True)
class Fracture:
    """Where one bone breaks, how its distal fragment moves (in bone widths), and the hardware size.

    Drawn once per study, so every view of the study shows the same finding.
    """

    bone: int
    t: float
    gap: float
    shift: float
    angle_deg: float
    extent: float = 0.7
    """Length of a plate or cast as a fraction of the bone length."""
    screws: int = 6
    """Screw positions along a plate (the one over the fracture gap is left out)."""


Op = tuple[Any, ...]
"""A drawing primitive: ("line", a, b, thickness, value), ("circle", c, r, value) or
("ellipse", c, (ax, ay), angle_deg, value, thickness)."""


class _Canvas:
    """An attenuation map that bones, tissue and hardware are added to, piece by piece."""

    SHIFT = 4  # sub-pixel bits of the cv2 drawing calls

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.att = np.zeros((height, width), np.float32)

    def add(self, draw: list[Op], value: float, bbox: tuple[float, float, float, float], blur: float = 0.0) -> None:
        """Draw primitives into a scratch patch covering bbox (x0, y0, x1, y1) and add value x patch."""
        pad = int(3 * blur) + 2
        x0 = max(0, int(math.floor(bbox[0])) - pad)
        y0 = max(0, int(math.floor(bbox[1])) - pad)
        x1 = min(self.w, int(math.ceil(bbox[2])) + pad + 1)
        y1 = min(self.h, int(math.ceil(bbox[3])) + pad + 1)
        if x1 <= x0 or y1 <= y0:
            return
        patch: np.ndarray = np.zeros((y1 - y0, x1 - x0), np.float32)
        f = 1 << self.SHIFT
        for item in draw:
            op = item[0]
            if op == "line":
                _, a, b, thick, v = item
                pa = (round((a[0] - x0) * f), round((a[1] - y0) * f))
                pb = (round((b[0] - x0) * f), round((b[1] - y0) * f))
                cv2.line(patch, pa, pb, float(v), max(1, round(thick)), cv2.LINE_AA, self.SHIFT)
            elif op == "circle":
                _, c, r, v = item
                pc = (round((c[0] - x0) * f), round((c[1] - y0) * f))
                cv2.circle(patch, pc, max(1, round(r * f)), float(v), -1, cv2.LINE_AA, self.SHIFT)
            elif op == "ellipse":
                _, c, axes, angle, v, thick = item
                pc = (round((c[0] - x0) * f), round((c[1] - y0) * f))
                ax = (max(1, round(axes[0] * f)), max(1, round(axes[1] * f)))
                cv2.ellipse(patch, pc, ax, angle, 0, 360, float(v), thick, cv2.LINE_AA, self.SHIFT)
        if blur > 0:
            patch = cv2.GaussianBlur(patch, (0, 0), blur)
        self.att[y0:y1, x0:x1] += value * patch


def _bbox(points: list[np.ndarray], margin: float) -> tuple[float, float, float, float]:
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return min(xs) - margin, min(ys) - margin, max(xs) + margin, max(ys) + margin


def _bone_piece(a: np.ndarray, b: np.ndarray, w: float, end_a: bool, end_b: bool) -> list[Op]:
    """Cortex, medulla and (at true joint ends, not at fracture ends) denser epiphyses of one bone piece."""
    d = b - a
    ops: list[Op] = [("line", a, b, w, 1.0)]
    for p, is_end in ((a, end_a), (b, end_b)):
        if is_end:
            ops.append(("circle", p, 0.62 * w, 1.0))
    ia = a + d * (0.12 if end_a else 0.0) + (0 if end_a else 1) * d / max(np.linalg.norm(d), 1e-6) * 0.1 * w
    ib = b - d * (0.12 if end_b else 0.0) - (0 if end_b else 1) * d / max(np.linalg.norm(d), 1e-6) * 0.1 * w
    ops.append(("line", ia, ib, 0.5 * w, 0.42))
    for p, is_end in ((a, end_a), (b, end_b)):
        if is_end:
            ops.append(("circle", p, 0.46 * w, 0.72))
    return ops


def render_image(
    part: str,
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    view: int,
    fracture: Fracture | None,
    finding: str,
) -> np.ndarray:
    """One synthetic radiograph (uint8, height x width) of a body part; finding '' for a normal image."""
    anatomy = ANATOMY[part]
    canvas = _Canvas(height, width)
    landscape = width > height
    long_side, short_side = max(height, width), min(height, width)
    scale = min(long_side / 1.0, short_side / anatomy.width) * rng.uniform(0.85, 1.08)
    theta = math.radians(rng.normal(0, 7) + (90 if landscape else 0) + (180 if rng.random() < 0.1 else 0))
    squeeze = 1.0 if view % 2 == 1 else rng.uniform(0.6, 0.85)  # lateral views overlap the bones
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    center = np.array([width / 2, height / 2]) + rng.normal(0, 0.04, 2) * np.array([width, height])

    def tx(p: tuple[float, float] | np.ndarray) -> np.ndarray:
        q = np.array([p[0] * squeeze * mirror, p[1]], dtype=float)
        return np.asarray(rot @ q * scale + center)

    density = rng.uniform(0.8, 1.1)
    tissue_scale = rng.uniform(0.9, 1.2)
    swelling: list[Op] = []
    fx: tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray] | None = None

    # Bones, with the fracture applied to one of them.
    for index, bone in enumerate(anatomy.bones):
        a, b = tx(bone.p0), tx(bone.p1)
        w = bone.width * scale * (squeeze * 0.3 + 0.7)
        if bone.kind == "head":
            c = (a + b) / 2
            ops: list[Op] = [("circle", c, w / 2, 1.0), ("circle", c, 0.4 * w, 0.6)]
            canvas.add(ops, density, _bbox([c], w / 2 + 2), blur=0.6)
            continue
        if bone.kind == "short":
            ops = [("line", a, b, w, 1.0), ("line", a, b, 0.55 * w, 0.62)]
            canvas.add(ops, density, _bbox([a, b], w), blur=0.6)
            continue
        if fracture is None or fracture.bone != index:
            canvas.add(_bone_piece(a, b, w, True, True), density, _bbox([a, b], w), blur=0.6)
            continue
        d = b - a
        unit = d / np.linalg.norm(d)
        normal = np.array([-unit[1], unit[0]])
        m = a + d * fracture.t
        gap = fracture.gap * w
        pa_end = m - unit * gap / 2
        ang = math.radians(fracture.angle_deg)
        r2 = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        pb_start = m + unit * gap / 2 + normal * fracture.shift * w
        pb_end = pb_start + r2 @ (b - m)
        canvas.add(_bone_piece(a, pa_end, w, True, False), density, _bbox([a, pa_end], w), blur=0.6)
        canvas.add(_bone_piece(pb_start, pb_end, w, False, True), density, _bbox([pb_start, pb_end], w), blur=0.6)
        # Findings are sized by the bone, but never below a fixed share of the field: a finding on a
        # thin finger bone must still cover several pixels once the image is shrunk to 64 px.
        fw = max(w, 0.09 * scale)
        fx = (m, unit, normal, fw, d)
        if finding == "healing":
            # Callus: a dense fusiform cuff around the break; the swelling widens the soft tissue there.
            angle = math.degrees(math.atan2(unit[1], unit[0]))
            ops = [
                ("ellipse", m, (2.4 * fw, 1.5 * fw), angle, 1.0, -1),
                ("ellipse", m, (1.8 * fw, 0.9 * fw), angle, 0.7, -1),
            ]
            canvas.add(ops, 1.5 * density, _bbox([m], 2.5 * fw), blur=0.1 * fw)
            swelling.append(("ellipse", m, (4.0 * fw, 2.8 * fw), angle, 1.0, -1))

    # Soft tissue: blurred capsules (plus the swelling of a healing fracture).
    tissue_ops: list[Op] = [
        ("line", tx(p0), tx(p1), wd * scale * squeeze * tissue_scale, 1.0) for p0, p1, wd in anatomy.tissue
    ]
    tissue = _Canvas(height, width)
    tissue.add(tissue_ops + swelling, 1.0, (0, 0, width, height), blur=max(1.0, 0.02 * short_side))
    canvas.att += np.minimum(tissue.att, 1.0) * rng.uniform(0.22, 0.38)

    if fx is not None and fracture is not None and finding in ("plate", "cast"):
        _add_hardware(canvas, fx, fracture, finding, tissue_scale)
    img = _expose(canvas.att, rng, long_side)
    img, field_box = _collimate(img, rng)
    img = _lead_marker(img, rng, field_box, short_side)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _add_hardware(
    canvas: _Canvas,
    fx: tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray],
    fracture: Fracture,
    finding: str,
    tissue_scale: float,
) -> None:
    """A plate with screws, or a fibreglass cast, over the fracture `fx` (middle, axis, normal, width, bone)."""
    height, width = canvas.att.shape
    m, unit, normal, w, d = fx
    length = max(float(np.linalg.norm(d)), 4 * w) * fracture.extent
    if finding == "plate":
        side = normal * 0.7 * w
        p0, p1 = m - unit * length / 2 + side, m + unit * length / 2 + side
        ops = [("line", p0, p1, 0.45 * w, 1.0)]
        for s in np.linspace(0.06, 0.94, fracture.screws):
            if abs(s - 0.5) < 0.06:
                continue  # no screw through the fracture gap
            h = p0 + (p1 - p0) * s
            ops.append(("line", h + normal * 0.2 * w, h - normal * 1.6 * w, 0.2 * w, 1.0))
            head = h + normal * 0.3 * w
            ops.append(("line", head - unit * 0.18 * w, head + unit * 0.18 * w, 0.3 * w, 1.0))
        canvas.add(ops, 6.0, _bbox([p0, p1], 2 * w), blur=0.5)
    else:
        cw = 3.4 * w * tissue_scale
        p0, p1 = m - unit * length * 0.7, m + unit * length * 0.7
        ops = [("line", p0, p1, cw, 1.0)]
        edge = normal * cw / 2
        rim = [("line", p0 + edge, p1 + edge, 0.3 * w, 1.0), ("line", p0 - edge, p1 - edge, 0.3 * w, 1.0)]
        bbox = _bbox([p0, p1], cw)
        cast = _Canvas(height, width)
        cast.add(ops, 0.9, bbox, blur=0.06 * w)
        cast.add(rim, 0.9, bbox, blur=0.06 * w)
        # Fibreglass cast: a fine mesh modulates the plaster density.
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        period = max(2.5, 0.25 * w)
        mesh = 1.0 + 0.25 * np.sin(xx * (2 * math.pi / period)) * np.sin(yy * (2 * math.pi / period))
        canvas.att += cast.att * mesh


def _expose(att: np.ndarray, rng: np.random.Generator, long_side: int) -> np.ndarray:
    """Attenuation -> float image in 0..1: detector response, exposure, heel effect, noise, blur."""
    height, width = att.shape
    gain = rng.uniform(0.8, 1.3)
    img: np.ndarray = 1.0 - np.exp(-gain * att)
    background = rng.uniform(0.01, 0.08)
    img = background + (1 - background) * img
    vertical = rng.random() < 0.5
    ramp = np.linspace(rng.uniform(0.9, 1.0), rng.uniform(1.0, 1.1), height if vertical else width, dtype=np.float32)
    img *= ramp[:, None] if vertical else ramp[None, :]
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img += rng.normal(0, rng.uniform(0.012, 0.035), img.shape).astype(np.float32) * (0.4 + 0.6 * img)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), max(0.3, 0.0015 * long_side))
    return img


def _collimate(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Sometimes a collimated border (unexposed or burnt out); returns the image and the open field x0, y0, x1, y1."""
    height, width = img.shape
    x0, y0, x1, y1 = 0, 0, width, height
    if rng.random() < 0.35:
        x0, x1 = int(rng.uniform(0.02, 0.12) * width), width - int(rng.uniform(0.02, 0.12) * width)
        y0, y1 = int(rng.uniform(0.02, 0.12) * height), height - int(rng.uniform(0.02, 0.12) * height)
        mask = np.ones_like(img, dtype=bool)
        mask[y0:y1, x0:x1] = False
        level = rng.uniform(0.7, 0.92) if rng.random() < 0.6 else rng.uniform(0.0, 0.06)
        img[mask] = level + rng.normal(0, 0.01, int(mask.sum()))
    return img, (x0, y0, x1, y1)


def _lead_marker(
    img: np.ndarray, rng: np.random.Generator, field_box: tuple[int, int, int, int], short_side: int
) -> np.ndarray:
    """An L/R lead marker inside the open field (also on normal images: bright compact objects alone do not
    mean abnormal)."""
    height, width = img.shape
    x0, y0, x1, y1 = field_box
    if rng.random() < 0.85:
        letter = "L" if rng.random() < 0.5 else "R"
        target = rng.uniform(0.07, 0.11) * short_side
        font_scale = target / 22.0
        thick = max(1, round(font_scale * 2.2))
        (tw, th), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thick)
        mx = (
            x0 + 3 + int(rng.uniform(0.02, 0.08) * width)
            if rng.random() < 0.5
            else x1 - tw - 3 - int(rng.uniform(0.02, 0.08) * width)
        )
        my = (
            y0 + th + 3 + int(rng.uniform(0.02, 0.08) * height)
            if rng.random() < 0.5
            else y1 - 3 - int(rng.uniform(0.02, 0.08) * height)
        )
        value = float(rng.uniform(0.88, 1.0))
        ink = np.zeros(img.shape, np.uint8)  # cv2 text drawing needs an 8-bit image
        if rng.random() < 0.4:
            cv2.rectangle(ink, (mx - 2, my - th - 2), (mx + tw + 2, my + 3), 204, max(1, thick // 2))
        cv2.putText(ink, letter, (mx, my), cv2.FONT_HERSHEY_SIMPLEX, font_scale, 255, thick, cv2.LINE_AA)
        img = np.maximum(img, ink.astype(np.float32) * (value / 255.0))
    return img


def _image_size(part: str, max_side: int, rng: np.random.Generator) -> tuple[int, int]:
    long_side = max_side if rng.random() < 0.45 else int(round(rng.uniform(0.55, 1.0) * max_side))
    aspect = float(np.clip(ANATOMY[part].width * rng.uniform(0.95, 1.7), 0.3, 1.0))
    short = max(8, int(round(long_side * aspect)))
    long_side = max(long_side, short)
    return (long_side, short) if rng.random() < 0.8 else (short, long_side)


def random_fracture(part: str, finding: str, rng: np.random.Generator) -> Fracture:
    """The finding of one abnormal study: which breakable bone breaks where, and how (finding: healing, plate, cast)."""
    anatomy = ANATOMY[part]
    candidates = [i for i, b in enumerate(anatomy.bones) if b.breakable]
    bone = int(candidates[int(rng.integers(len(candidates)))])
    t = float(rng.uniform(*anatomy.fracture_t))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if finding == "plate":  # fixed: reduced, nearly anatomic
        shift, angle = rng.uniform(0.0, 0.2), rng.uniform(0, 5)
    elif finding == "cast":
        shift, angle = rng.uniform(0.3, 0.6), rng.uniform(8, 18)
    else:
        shift, angle = rng.uniform(0.6, 1.0), rng.uniform(18, 35)
    gap = float(rng.uniform(0.3, 0.45))
    return Fracture(
        bone, t, gap, float(sign * shift), float(sign * angle), float(rng.uniform(0.6, 0.85)), int(rng.integers(5, 9))
    )


def plan_bad_files(plans: list[StudyPlan], bad_frac: float, seed: int) -> dict[str, str]:
    """Image path -> kind of damage (BAD_KINDS) for `bad_frac` of the images, at least one of each kind.

    One train study whose patient has no other study loses every image (so packing drops a whole
    patient, the case that breaks pipelines reading the CSVs instead of the shard index); the rest are
    spread over both splits. Empty when bad_frac is 0.
    """
    if bad_frac <= 0:
        return {}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    paths = {id(p): [f"{p.folder}image{v}.png" for v in range(1, p.views + 1)] for p in plans}
    train = [p for p in plans if p.split == "train"]
    per_patient = Counter(p.patient for p in train)
    bad: list[str] = []
    lost = None
    if len(per_patient) >= 2:
        alone = [p for p in train if per_patient[p.patient] == 1] or train
        fewest = min(p.views for p in alone)
        candidates = [p for p in alone if p.views == fewest]
        lost = candidates[int(rng.integers(len(candidates)))]
        bad += paths[id(lost)]
    others = [path for p in plans if p is not lost for path in paths[id(p)]]
    n_bad = max(len(BAD_KINDS), int(bad_frac * sum(p.views for p in plans)))
    extra = min(len(others), max(0, n_bad - len(bad)))
    bad += [others[i] for i in sorted(rng.choice(len(others), size=extra, replace=False))]
    return {path: BAD_KINDS[i % len(BAD_KINDS)] for i, path in enumerate(bad)}


def damage(png: bytes, kind: str) -> bytes:
    """The bytes of an unusable image file of `kind` made from a good PNG."""
    if kind == "truncated":
        return png[: len(png) // 2]
    if kind == "empty":
        return b""
    if kind == "not_an_image":
        return b"Radiology report (text saved under an image name by mistake).\n"
    raise ValueError(f"unknown kind of damage {kind!r}; expected one of {BAD_KINDS}")


def read_marker(mura_root: Path | str) -> dict[str, Any] | None:
    """The synthetic marker of a data set (MURA-v1.1/bonehpc_synthetic.json), or None for real data."""
    root = Path(mura_root)
    for folder in (root / MURA_DIR, root):
        path = folder / SYNTHETIC_MARKER
        if path.is_file():
            try:
                doc = load_json_bounded(path)  # a marker from elsewhere: never a RecursionError
            except (OSError, ValueError):
                return None
            return doc if isinstance(doc, dict) and doc.get("synthetic") is True else None
    return None


def _check_settings(
    patients: int, max_side: int, valid_frac: float, rgb_frac: float, bad_frac: float, abnormal_rate: float
) -> None:
    """ValueError naming the first setting of `generate` out of its range."""
    if patients < 2:
        raise ValueError(f"patients: need at least 2 (one per split), got {patients}")
    if max_side < 16:
        raise ValueError(f"max_side: need at least 16 px, got {max_side}")
    if not 0 < valid_frac < 1:
        raise ValueError(f"valid_frac: must be in (0, 1), got {valid_frac}")
    if not 0 <= rgb_frac <= 1:
        raise ValueError(f"rgb_frac: must be in [0, 1], got {rgb_frac}")
    if not 0 <= bad_frac <= 0.5:
        raise ValueError(f"bad_frac: must be in [0, 0.5], got {bad_frac}")
    if not 0 < abnormal_rate < 1:
        raise ValueError(f"abnormal_rate: must be in (0, 1), got {abnormal_rate}")


def generate(
    out: Path | str,
    patients: int,
    seed: int,
    max_side: int = 512,
    valid_frac: float = 0.2,
    rgb_frac: float = 0.1,
    *,
    bad_frac: float = 0.0,
    overwrite: bool = False,
    abnormal_rate: float = ABNORMAL_RATE,
) -> Path:
    """Write a synthetic MURA-v1.1 tree with its four official CSVs under `out`.

    Args:
        out: Folder that will contain `MURA-v1.1/` (created if needed).
        patients: Number of patients over both splits (at least 2).
        seed: Seed; the same arguments give byte-identical files.
        max_side: Longest image side in pixels (images vary below it; at least 16).
        valid_frac: Fraction of patients in the valid split (disjoint from train, numbered from 11185).
        rgb_frac: Fraction of images saved as 3-channel RGB PNGs (the rest are 8-bit grayscale).
        bad_frac: Fraction of image files written unusable (truncated, empty, not an image; at least
            one of each, and one train study loses every image): see plan_bad_files. `bonehpc synth`
            uses DEFAULT_BAD_FRAC; 0 writes none.
        abnormal_rate: Fraction of abnormal studies in each split (default ABNORMAL_RATE, about MURA's; e.g.
            0.15 for a skewed collection).
        overwrite: Replace an existing synthetic `out/MURA-v1.1` (one with the synthetic marker; any
            other folder there is never deleted); otherwise an existing one is an error.

    Returns:
        The `out/MURA-v1.1` folder.

    Raises:
        ValueError: On invalid arguments.
        FileExistsError: When `out/MURA-v1.1` exists and overwrite is false.
    """
    _check_settings(patients, max_side, valid_frac, rgb_frac, bad_frac, abnormal_rate)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder")
    final = out / MURA_DIR
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another folder or pass overwrite=True (--overwrite)")
    if final.exists() and read_marker(out) is None:
        raise FileExistsError(f"{final} is not a synthetic data set (no {SYNTHETIC_MARKER}); it is never overwritten")
    out.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename at the end, so an interrupted run never leaves a partial tree.
    staging = out / f".{MURA_DIR}.partial"
    if staging.exists():
        shutil.rmtree(staging)

    start = time.perf_counter()
    plans = plan_studies(patients, seed, valid_frac, abnormal_rate)
    bad = plan_bad_files(plans, bad_frac, seed)
    image_rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    study_rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    n_images = 0
    for plan in plans:
        paths = _write_study(staging, plan, max_side, rgb_frac, bad)
        image_rows[plan.split] += paths
        n_images += len(paths)
        study_rows[plan.split].append(f"{plan.folder},{plan.label}")
    for split in SPLITS:
        (staging / f"{split}_image_paths.csv").write_text("".join(r + "\n" for r in image_rows[split]))
        (staging / f"{split}_labeled_studies.csv").write_text("".join(r + "\n" for r in study_rows[split]))
    _write_marker(
        staging,
        plans,
        bad,
        patients=patients,
        seed=seed,
        max_side=max_side,
        valid_frac=valid_frac,
        rgb_frac=rgb_frac,
        bad_frac=bad_frac,
        abnormal_rate=abnormal_rate,
        n_images=n_images,
    )
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    log.info(
        "synthetic MURA: %d patients, %d studies, %d images (%d unusable on purpose) in %s (%.1f s)",
        patients,
        len(plans),
        n_images,
        len(bad),
        final,
        time.perf_counter() - start,
    )
    return final


def _write_study(staging: Path, plan: StudyPlan, max_side: int, rgb_frac: float, bad: dict[str, str]) -> list[str]:
    """Draw and write the images of one study under `staging` (damaged where `bad` says); returns their paths."""
    study_dir = staging.parent / plan.folder.replace(MURA_DIR, staging.name, 1)
    study_dir.mkdir(parents=True, exist_ok=True)
    study_rng = np.random.default_rng(np.random.SeedSequence(list(plan.seed_key) + [0]))
    fracture = random_fracture(plan.part, plan.finding, study_rng) if plan.label else None
    paths = []
    for view in range(1, plan.views + 1):
        rng = np.random.default_rng(np.random.SeedSequence(list(plan.seed_key) + [view]))
        height, width = _image_size(plan.part, max_side, rng)
        img = render_image(plan.part, height, width, rng, view=view, fracture=fracture, finding=plan.finding)
        if rng.random() < rgb_frac:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:  # pragma: no cover - cv2 only fails here on out-of-memory
            raise RuntimeError(f"PNG encoding failed for {plan.folder}image{view}.png")
        path = f"{plan.folder}image{view}.png"
        data = buf.tobytes()
        (study_dir / f"image{view}.png").write_bytes(damage(data, bad[path]) if path in bad else data)
        paths.append(path)
    return paths


def _write_marker(folder: Path, plans: list[StudyPlan], bad: dict[str, str], **settings: Any) -> None:
    """MURA-v1.1/bonehpc_synthetic.json: says the data are synthetic, with the settings and the bad files."""
    studies = Counter(path.rsplit("/", 1)[0] + "/" for path in bad)
    views = {p.folder: p.views for p in plans}
    doc = {
        "synthetic": True,
        "generator": "bonehpc synth",
        "bonehpc_version": __version__,
        **settings,
        "bad_files": [{"path": path, "kind": kind} for path, kind in bad.items()],
        "lost_studies": sorted(s for s, n in studies.items() if n == views[s]),
    }
    (folder / SYNTHETIC_MARKER).write_text(json.dumps(doc, indent=1) + "\n")
