"""The report's index.html in real headless Chromium: it renders offline and every image loads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_report import build_tiny_experiment  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (`make test` installs it: apt-get install -y chromium)"
)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
# Counts the <img> elements whose bitmap decoded (naturalWidth > 0) and writes the count into the DOM.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-images', imgs.length + '/' + ok);
});</script>"""


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory: pytest.TempPathFactory, synth_root: Path, shards_dir: Path) -> Path:
    return build_tiny_experiment(tmp_path_factory.getbasetemp() / "tiny_experiment", synth_root, shards_dir)


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_renders_in_headless_chromium(tiny_experiment: Path, tmp_path: Path) -> None:
    import cv2

    from bonehpc.report import build_report

    exp = tmp_path / "tiny"
    shutil.copytree(tiny_experiment, exp, ignore=shutil.ignore_patterns("*.pt"))
    index = build_report(exp)
    html = index.read_text()
    n_img = len(re.findall(r"<img\b", html))
    assert n_img >= 6
    # A copy with the probe, so the browser itself reports how many images decoded.
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert m, "the load probe did not run"
    assert int(m.group(1)) == n_img and int(m.group(2)) == n_img, f"images decoded: {m.group(0)}"
    assert all(s.startswith("data:image/png;base64,") for s in re.findall(r'<img[^>]*\ssrc="([^"]*)"', dom.stdout))
    # the confidence-interval tables are in the rendered DOM
    for table in ("holdout_ci", "cv_pooled_ci", "body_part_kappa_ci", "teacher_minus_student_ci", "calibration_ece"):
        assert f'id="{table}"' in dom.stdout, table
    assert "95 % CI" in dom.stdout

    shot = tmp_path / "report.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,2400", index.as_uri()], tmp_path / "p2")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape == (2400, 1280)
    assert img.std() > 20 and (img < 128).mean() > 0.005, "the screenshot looks blank"
    assert np.unique(img).size > 50  # text, tables and plots, not a flat page
