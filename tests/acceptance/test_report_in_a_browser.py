"""The case-study page as a user looks at it (docs/METHOD.md §0, "Report"): ``python -m magtkd.report`` on the
demo's outputs writes one HTML file that a real headless browser (Debian's ``chromium``; ``.ci/run`` installs
it) renders offline, with its tables, figures and conversations and no console error; on a single seed the
headline is that run's figure."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers import PNG_SIGNATURE, REPO, SUBPROCESS_ENV, script, stage_paths
from magtkd.artifacts import StageFiles

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Headless, no sandbox (root in CI), no GPU, and nothing that would reach the network on its own; host names
# resolve to nothing, so a page that needed the network would fail to load it.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0"]
SECTIONS = {"headline", "classes", "fixes", "gates", "conversations", "tsne"}


class Page(HTMLParser):
    """What a test looks for in a page: sections, tables, images, headings, scripts and outside references."""

    def __init__(self) -> None:
        super().__init__()
        self.sections, self.tables, self.images, self.h3, self.outside, self.scripts = [], 0, [], [], [], 0
        self._in_h3 = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.sections += [attrs["id"]] if tag == "section" else []
        self.tables += tag == "table"
        self.scripts += tag in ("script", "iframe", "object", "embed", "link")
        self.images += [attrs.get("src", "")] if tag == "img" else []
        self.outside += [v for k, v in attrs.items() if k in ("src", "href") and v and not v.startswith(("data:", "#"))]
        self._in_h3 = tag == "h3"

    def handle_data(self, data: str) -> None:
        if self._in_h3:
            self.h3.append(data)
            self._in_h3 = False


def parsed(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def browse(page: Path, tmp: Path, *how: str) -> subprocess.CompletedProcess:
    """Chromium on the file with a fresh profile; ``how``: --dump-dom or --screenshot=..."""
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}", *how, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def iemocap_report(demo, tmp_path_factory) -> dict:
    """``python -m magtkd.report IEMOCAP`` (the documented command, as a process from the repository root) on
    the demo's folders."""
    tmp = tmp_path_factory.mktemp("report")
    paths, out = stage_paths(demo["workdir"], "IEMOCAP"), tmp / "report.html"
    done = subprocess.run([sys.executable, "-m", "magtkd.report", "IEMOCAP", "--data_dir", str(paths["data_dir"]),
                           "--save_dir", str(paths["save_dir"]), "--feature_dir", str(paths["feature_dir"]),
                           "--out", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "tmp": tmp, "log": done.stderr, "paths": paths}


def test_the_page_is_one_self_contained_file(iemocap_report):
    text = iemocap_report["out"].read_text(encoding="utf-8")
    page = parsed(text)
    assert set(page.sections) == SECTIONS
    assert page.scripts == 0 and page.outside == []  # nothing to run, nothing to fetch
    assert len(page.images) == 4  # per-class bars, confusion matrices, shares, t-SNE
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_SIGNATURE
    # The headline is the seeds summary's mean ± std; the worst dialogues are conversations
    seeds = json.loads(StageFiles.fusion(iemocap_report["paths"]["save_dir"]).seeds_summary.read_text())
    mean, std = seeds["mean"]["test_weighted_f1"], seeds["std"]["test_weighted_f1"]
    assert f"weighted F1 <b>{mean:.4f} ± {std:.4f}</b>" in text
    assert sum(h.startswith("Dialogue ") for h in page.h3) == 3
    assert "report: wrote" in iemocap_report["log"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; "
                                             ".ci/run installs it)")
def test_a_headless_browser_renders_the_page_offline_without_errors(iemocap_report):
    out, tmp = iemocap_report["out"], iemocap_report["tmp"]
    dumped = browse(out, tmp, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = parsed(dumped.stdout)  # the document as the browser built it
    assert set(dom.sections) == SECTIONS and dom.tables >= 8 and len(dom.images) == 4
    assert sum(h.startswith("Dialogue ") for h in dom.h3) == 3
    console = [line for line in dumped.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []  # the page logged nothing: no error, no failed load
    shot = tmp / "report.png"
    drawn = browse(out, tmp, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars")
    assert drawn.returncode == 0 and shot.read_bytes()[:8] == PNG_SIGNATURE, drawn.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        assert len(image.convert("RGB").getcolors(1 << 20)) > 200  # tables, figures and text, not a blank page


def test_on_a_single_seed_the_headline_is_that_run(demo, tmp_path):
    """MELD's kept model alone (no seeds summary): the page reports its one run."""
    paths = stage_paths(demo["workdir"], "MELD")
    save = tmp_path / "save_model"
    save.mkdir()
    usual = StageFiles.fusion(paths["save_dir"])
    for path in (usual.checkpoint, usual.metrics, usual.predictions_csv("test"), usual.predictions_csv("dev")):
        shutil.copy2(path, save / path.name)
    result = script("MELD", "report").main(["--data_dir", str(paths["data_dir"]), "--save_dir", str(save),
                                            "--feature_dir", str(paths["feature_dir"]), "--device", "cpu",
                                            "--dialogues", "1"])
    assert Path(result["out"]) == save / "report.html" and result["models"] == ["multimodal_fusion"]
    text = (save / "report.html").read_text(encoding="utf-8")
    doc = json.loads(usual.metrics.read_text())
    assert f"weighted F1 <b>{doc['test']['weighted_f1']:.4f}</b>" in text
    assert "Needs the test predictions CSVs of the fusion and of text.py" in text  # no text model here
    assert len(result["dialogues"]) == 1 and len(parsed(text).images) == 4
