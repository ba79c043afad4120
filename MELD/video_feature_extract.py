"""Stage 3 - decode and store 8 frames per MELD utterance (SPEC section 2, Video).

    python MELD/video_feature_extract.py --num_workers 4

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, the mp4 clips (whole clip), pretrained_model/videomae-base (image processor only)
Writes  MELD/feature/video/{train,dev,test}/{Dialogue_ID}_{Utterance_ID}.npy (uint8, 8x3xHxW),
        MELD/feature/video/substitutions.tsv (unreadable video -> black frames)

Each source video is decoded once; existing .npy files are skipped, so a killed run resumes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import MELD  # noqa: E402
from magtkd.stages import frame_extract  # noqa: E402


def main(argv=None):
    return frame_extract.main(MELD, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
