"""Stage 4 - fine-tune TimeSformer on the stored MELD frames (SPEC section 2, Video).

    python MELD/video.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, MELD/feature/video/*/*.npy, pretrained_model/timesformer-base-finetuned-k400
        (+ pretrained_model/videomae-base for the normalisation constants)
Writes  MELD/MELD/save_model/video.bin, MELD/MELD/save_model/video.json

`--train False` evaluates the saved video.bin on test (the reference loaded audio.bin here).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import MELD  # noqa: E402
from magtkd.stages import unimodal  # noqa: E402


def main(argv=None):
    return unimodal.main("video", MELD, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
