"""Stage 3 - decode and store 8 frames per IEMOCAP utterance (SPEC section 2, Video).

    python IEMOCAP/video_feature_extract.py --num_workers 4

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, the videos, pretrained_model/videomae-base (image processor only)
Writes  IEMOCAP/feature/video/{split}/{Dialogue_ID}_{Utterance_ID}.npy (uint8 8x3xHxW) + substitutions.tsv

IEMOCAP: one AVI per dialogue, decoded once for all of its utterances;
each utterance's window is [max(start - 1 s, 0), end + 1 s].
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, frame_extract  # noqa: E402

main = entry(frame_extract.main, "IEMOCAP", __file__, __doc__)

if __name__ == "__main__":
    main()
