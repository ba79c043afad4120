"""``<DS>/report.py`` / ``python -m magtkd.report <DS>`` (docs/METHOD.md §0, "Report") on a fusion trained on
small hand-made pickles: the page's sections from the fusion's results alone (the first-stage sections say
what they need), its figures inline, and one-line errors for a folder without results or a wrong dataset."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, script
from magtkd.artifacts import StageFiles
from magtkd.synthetic.features import write_synthetic_features
from magtkd.utils import UserError
from MELD.config import MELD

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fusion_only(tmp_path_factory, one_thread):
    """A MELD fusion trained for a few epochs on hand-made pickles (width 16), nothing else."""
    root = tmp_path_factory.mktemp("report")
    write_synthetic_features(root / "feature", MELD, {"train": 12, "dev": 5, "test": 6}, width=16, seed=4)
    script("MELD", "multimodal_fusion").main([
        "--feature_dir", str(root / "feature"), "--save_dir", str(root / "save"), "--epochs", "3", "--batch_size",
        "4", "--lr", "3e-3", "--dropout", "0.1", "--n_head", "2", "--device", "cpu"])
    return root


def test_a_page_from_the_fusion_alone(fusion_only, tmp_path):
    out = tmp_path / "page" / "report.html"
    result = script("MELD", "report").main(["--save_dir", str(fusion_only / "save"), "--feature_dir",
                                            str(fusion_only / "feature"), "--data_dir", str(tmp_path / "none"),
                                            "--out", str(out), "--device", "cpu", "--dialogues", "2"])
    text = out.read_text(encoding="utf-8")
    assert result["out"] == str(out) and result["models"] == ["multimodal_fusion"] and len(result["dialogues"]) == 2
    assert result["sections"] == ["Headline figures", "Per-class F1 and confusion matrices",
                                  "What the fusion fixes and breaks relative to the text model",
                                  "What the gates and anchors do", "The 2 worst test dialogues of the fusion",
                                  "t-SNE of the fused representations"]
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text and "http" not in text
    assert text.count('src="data:image/png;base64,') == 4
    assert "Needs the test predictions CSVs of the fusion and of text.py" in text  # no first stage here
    assert "T → A'" in text and "A' → T'" in text  # the paths of the gate and share table
    doc = StageFiles.fusion(fusion_only / "save").metrics
    assert doc.is_file() and f"{len(result['dialogues'])} worst" in text


def test_no_fusion_results_is_one_line_naming_the_folder_and_what_to_run(tmp_path):
    with pytest.raises(UserError, match=r"holds no fusion results .*run multimodal_fusion.py"):
        script("MELD", "report").main(["--save_dir", str(tmp_path), "--device", "cpu"])


def test_python_m_magtkd_report_runs_the_dataset_s_script_and_names_the_datasets(fusion_only, tmp_path):
    usage = subprocess.run([sys.executable, "-m", "magtkd.report", "SEMAINE"], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert usage.returncode == 2 and "usage: python -m magtkd.report {IEMOCAP,MELD}" in usage.stderr
    wrong = subprocess.run([sys.executable, "-m", "magtkd.report", "IEMOCAP", "--save_dir", str(fusion_only / "save"),
                            "--feature_dir", str(fusion_only / "feature"), "--out", str(tmp_path / "r.html"),
                            "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=300)
    # MELD's model read as IEMOCAP's: the page is refused in one line (the checkpoint's record names MELD)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "MELD" in wrong.stderr.strip().splitlines()[-1] and not (tmp_path / "r.html").exists()
