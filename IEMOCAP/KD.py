"""Stages 5-6 - distil the text teacher into the audio or video student on IEMOCAP (SPEC section 3).

    python IEMOCAP/KD.py --student audio --teacher text    (then --student video)

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, IEMOCAP/IEMOCAP/save_model/text.bin (teacher), audio.bin (audio student init), audio or frames
Writes  IEMOCAP/IEMOCAP/save_model/text_KD_audio.bin / text_KD_video.bin and their .json

IEMOCAP objective: CE + L_logit (--logit_weight 1, --feature_weight 0).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, kd  # noqa: E402

main = entry(kd.main, "IEMOCAP", __file__, __doc__)

if __name__ == "__main__":
    main()
