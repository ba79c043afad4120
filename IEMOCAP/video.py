"""Stage 4 - fine-tune TimeSformer on the stored IEMOCAP frames (SPEC section 2, Video).

    python IEMOCAP/video.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024  [--train False]

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, IEMOCAP/feature/video/*/*.npy, pretrained_model/timesformer-base-finetuned-k400
Writes  IEMOCAP/IEMOCAP/save_model/video.bin, video.json

IEMOCAP frames come from the dialogue-video windows stored by stage 3.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, unimodal  # noqa: E402

main = entry(unimodal.main, "IEMOCAP", __file__, __doc__, "video")

if __name__ == "__main__":
    main()
