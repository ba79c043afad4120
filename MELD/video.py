"""Stage 4 - fine-tune TimeSformer on the stored MELD frames (SPEC section 2, Video).

    python MELD/video.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024  [--train False]

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, MELD/feature/video/*/*.npy, pretrained_model/timesformer-base-finetuned-k400
Writes  MELD/MELD/save_model/video.bin, video.json

MELD frames come from whole clips; substituted (black) clips are listed by stage 3.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, unimodal  # noqa: E402

main = entry(unimodal.main, "MELD", __file__, __doc__, "video")

if __name__ == "__main__":
    main()
