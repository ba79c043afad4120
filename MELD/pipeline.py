"""MELD from the raw release to fusion results: preparation and the eight stages (docs/METHOD.md §0).

    bash MELD/run.sh [--data_dir D] [--pretrained_dir P] [--epochs N] [--fusion_epochs N] [--force]
    python MELD/pipeline.py ...        # the same (run.sh runs this)

Reads   the official CSVs and clips in datasets/MELD/ and the four pretrained folders in pretrained_model/
Writes  every stage's outputs (see each script's --help) and MELD/MELD/save_model/pipeline.json
        (the seconds of each stage that ran)

Stages whose outputs are complete and newer than their inputs are skipped (--force re-runs them; a
stage interrupted midway is re-run, and so is a training stage whose outputs were made with other
flags); the run stops at the first failing stage, naming it. Relative folders are taken from the
directory the command is called from. Every flag can also come from its environment variable:
DATA_DIR PRETRAINED_DIR SAVE_DIR FEATURE_DIR DEVICE NUM_WORKERS EPOCHS FUSION_EPOCHS LEARNING_RATE
SEEDS ("2024 2025") FUSION_ARGS ("--lr 1e-3") NPROC_PER_NODE.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD import (KD, audio, extract_first_stage_features, multimodal_fusion, preprocessing, text,  # noqa: E402
                     video, video_feature_extract)
from MELD.config import MELD  # noqa: E402
from magtkd import pipeline, utils  # noqa: E402

# The stage scripts by file name: run as processes, or their main() with --in_process
SCRIPTS = {"preprocessing.py": preprocessing.main, "text.py": text.main, "audio.py": audio.main,
           "video_feature_extract.py": video_feature_extract.main, "video.py": video.main, "KD.py": KD.main,
           "extract_first_stage_features.py": extract_first_stage_features.main,
           "multimodal_fusion.py": multimodal_fusion.main}


def main(argv=None) -> dict:
    return pipeline.main(MELD, HERE, SCRIPTS, __doc__, argv)


if __name__ == "__main__":
    utils.run(main)
