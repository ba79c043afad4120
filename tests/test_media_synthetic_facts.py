"""The synthetic generator's copy of the release facts (`magtkd.synthetic.release`) equals the
recipe configs' (IEMOCAP/config.py, MELD/config.py), and the generator imports no recipe folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import IEMOCAP.config as iemocap_config
import MELD.config as meld_config
from magtkd.synthetic import release


def test_iemocap_facts_equal_the_recipe_config():
    assert release.IEMOCAP_LABELS == iemocap_config.LABELS
    assert release.IEMOCAP_DEV_DIALOGUES == iemocap_config.DEV_DIALOGUES
    assert release.IEMOCAP_TEST_SESSIONS == iemocap_config.TEST_SESSIONS
    for speaker in ("Ses01F_impro01_F000", "Ses01F_impro01_M012", "Ses05M_script01_1_F003", "Ses03M_impro08a_MXX0"):
        assert release.speaker_letter(speaker) == iemocap_config.speaker_letter(speaker)


def test_meld_facts_equal_the_recipe_config():
    assert release.MELD_LABELS == meld_config.LABELS
    assert release.MELD_OFFICIAL_CSV == meld_config.OFFICIAL_CSV
    assert release.MELD_CLIP_DIRS == meld_config.CLIP_DIRS
    assert release.MELD_OFFICIAL_COLUMNS == meld_config.OFFICIAL_COLUMNS


def test_the_generator_imports_no_recipe_folder():
    code = ("import sys, magtkd.synthetic.__main__, magtkd.synthetic.iemocap, magtkd.synthetic.meld; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IEMOCAP', 'MELD')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.stdout.strip() == "[]"
