"""Stages 5-6 - distil the text teacher into the audio or video student on MELD (SPEC section 3).

    python MELD/KD.py --student audio --teacher text    (then --student video)

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, MELD/MELD/save_model/text.bin (teacher), audio.bin (audio student init), audio or frames
Writes  MELD/MELD/save_model/text_KD_audio.bin / text_KD_video.bin and their .json

MELD objective: CE + 0.1 L_logit + L_feat (--logit_weight 0.1, --feature_weight 1).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, kd  # noqa: E402

main = entry(kd.main, "MELD", __file__, __doc__)

if __name__ == "__main__":
    main()
