"""Stages 5-6 - distil the text teacher into the audio / video student on MELD (SPEC section 3).

    python MELD/KD.py --student audio --teacher text
    python MELD/KD.py --student video --teacher text

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, MELD/MELD/save_model/text.bin (teacher), MELD/MELD/save_model/audio.bin (audio student init),
        audio or stored frames, the pretrained folders
Writes  MELD/MELD/save_model/text_KD_audio.bin / text_KD_video.bin and their .json metrics

Student objective on MELD: CE + 0.1 L_logit + L_feat (--logit_weight, --feature_weight).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import MELD  # noqa: E402
from magtkd.stages import kd  # noqa: E402


def main(argv=None):
    return kd.main(MELD, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
