"""The Markdown table of a benchmark result: each figure next to the one it is compared with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bonehpc.bench.common import ratio
from bonehpc.bench.options import TARGETS

Row = tuple[str, str, str, str, str, str]


def _fmt(x: Any) -> str:
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    return str(x)


class _Rows(list[Row]):
    def add(self, measure: str, a: Any, vs: str = "", b: Any = None, r: Any = None, target: str = "") -> None:
        self.append((measure, _fmt(a), vs, _fmt(b), _fmt(r) + ("x" if r is not None else ""), target))


def _pack(rows: _Rows, s: dict[str, Any]) -> None:
    what = f"pack {s['images']} PNGs -> {s['pack_size']} px shards ({s['workers']} procs)"
    rows.add(what, s["pack_img_per_s"], "decode only", s["decode_img_per_s"], s["ratio"], f">= {TARGETS['pack']:g}x")


def _reads(rows: _Rows, s: dict[str, Any]) -> None:
    what = f"warm random shard reads ({s['images']}, {s['pack_size']} px)"
    rows.add(what, s["shard_img_per_s"], "PNG decode", s["png_img_per_s"], s["ratio"], f">= {TARGETS['reads']:g}x")


def _loader(rows: _Rows, s: dict[str, Any]) -> None:
    for b, lb in s["backends"].items():
        if "loader_img_s" in lb:
            w = lb["num_workers"]
            rows.add(f"loader {b} alone ({w} worker{'s' if w != 1 else ''}, {lb['device']})", lb["loader_img_s"])
        else:
            rows.add(f"loader {b}", lb.get("skipped") or lb.get("error"))


def _train(rows: _Rows, s: dict[str, Any]) -> None:
    if str(s.get("compile", "")).startswith("not measured"):
        rows.add("train torch.compile", s["compile"])
    rate = {(r["role"], r.get("mode"), r.get("source")): r.get("img_s") for r in s["runs"]}
    for r in s["runs"]:
        role, mode, source = r["role"], r.get("mode"), r.get("source")
        if role == "outputs":  # the outputs job: the frozen teacher alone, inference mode
            what = f"outputs job {r.get('teacher', '')} inference {mode}"
        else:
            teacher = f"+{r['teacher']}{' cached logits' if role == 'kd_cached' else ''}" if r.get("teacher") else ""
            what = f"train {role.replace('_', ' ')} {r.get('model', '')}{teacher} {mode}"
        if source is not None:  # None: the model did not build
            what += " ceiling (device batch)" if source == "ceiling" else f" {source} e2e"
        if "img_s" not in r:
            rows.add(what, r.get("skipped") or r.get("error"))
            continue
        if role == "outputs":  # the outputs job's inference next to the teacher's training step, same source
            vs, b = "teacher train", rate.get(("teacher", mode, source))
        elif source != "ceiling":
            vs, b = "ceiling", rate.get((role, mode, "ceiling"))
        elif role in ("kd", "kd_cached"):
            vs, b = "student ceiling", rate.get(("student", mode, "ceiling"))
        elif mode == "compile":
            vs, b = "eager ceiling", rate.get((role, "eager", "ceiling"))
        else:
            rows.add(what, r["img_s"])
            continue
        rows.add(what, r["img_s"], vs, b, ratio(r["img_s"], b))


def _infer(rows: _Rows, s: dict[str, Any]) -> None:
    t, st = s["models"]["teacher"], s["models"]["student"]
    rows.add(f"infer teacher {t['model']}", t["img_s"])
    target = f">= {TARGETS['infer']:g}x"
    rows.add(f"infer student {st['model']}", st["img_s"], "teacher", t["img_s"], s["ratio"], target)


def _ddp(rows: _Rows, s: dict[str, Any]) -> None:
    if "skipped" in s:
        rows.add("ddp", s["skipped"])
        return
    n = s["procs"]
    target = f"{n}x ideal" if s["kind"].startswith("gpu") else "CPU: same cores"
    what = f"ddp {s['model']} {n} procs ({s['kind']})"
    rows.add(what, s["runs"][str(n)]["img_s"], "1 proc", s["runs"]["1"]["img_s"], s["ratio"], target)


def _parity(rows: _Rows, s: dict[str, Any]) -> None:
    if "skipped" in s:
        rows.add("parity albumentations vs DALI", s["skipped"])
        return
    out = s["dali_output"]
    target = "<= 1 level" + (" + fp16" if "cuda" in out["device"] else "")
    rows.add(
        f"parity albu vs DALI {out['dtype']} {out['device']} (gray levels)", s["max_diff_gray_levels"], target=target
    )


_SECTION_ROWS: dict[str, Callable[[_Rows, dict[str, Any]], None]] = {
    "pack": _pack,
    "reads": _reads,
    "loader": _loader,
    "train": _train,
    "infer": _infer,
    "ddp": _ddp,
    "parity": _parity,
}


def table_rows(result: dict[str, Any]) -> list[Row]:
    """(measure, img/s, compared with, its img/s, ratio, target) rows of a result, sections in SECTIONS order."""
    secs = result.get("sections", {})
    rows = _Rows()
    for name, add_rows in _SECTION_ROWS.items():
        if name in secs:
            add_rows(rows, secs[name])
    for name, err in result.get("errors", {}).items():
        rows.add(f"{name}: FAILED", err)
    return list(rows)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of every figure with the one it is compared with, and a header naming the machine."""
    m = result.get("machine", {})
    head = (
        f"machine: {m.get('host')} | {m.get('cpu')} x{m.get('cpu_cores_usable')} | GPU: "
        f"{', '.join(m.get('gpus') or []) or 'none'} | torch {m.get('torch')} | DALI {m.get('dali')} | "
        f"load avg {m.get('load_avg_1_5_15')} -> {m.get('load_avg_end_1_5_15')} | {m.get('date')}"
    )
    lines = [head, "", "| measure | img/s | compared with | img/s | ratio | target |", "|---|---:|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return "\n".join(lines)
