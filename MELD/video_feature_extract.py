"""Stage 3 - decode and store 8 frames per MELD utterance (SPEC section 2, Video).

    python MELD/video_feature_extract.py --num_workers 4

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, the videos, pretrained_model/videomae-base (image processor only)
Writes  MELD/feature/video/{split}/{Dialogue_ID}_{Utterance_ID}.npy (uint8 8x3xHxW) + substitutions.tsv

MELD: one mp4 clip per utterance, the whole clip is the window; missing,
corrupt and overlong clips of the release are handled (black frames + report).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, frame_extract  # noqa: E402

main = entry(frame_extract.main, "MELD", __file__, __doc__)

if __name__ == "__main__":
    main()
