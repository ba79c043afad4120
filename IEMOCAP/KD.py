"""Stages 5-6 - distil the text teacher into the audio / video student on IEMOCAP (SPEC section 3).

    python IEMOCAP/KD.py --student audio --teacher text
    python IEMOCAP/KD.py --student video --teacher text

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, IEMOCAP/IEMOCAP/save_model/text.bin (teacher), IEMOCAP/IEMOCAP/save_model/audio.bin (audio student init),
        audio or stored frames, the pretrained folders
Writes  IEMOCAP/IEMOCAP/save_model/text_KD_audio.bin / text_KD_video.bin and their .json metrics

Student objective on IEMOCAP: CE + L_logit (--logit_weight, --feature_weight).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import IEMOCAP  # noqa: E402
from magtkd.stages import kd  # noqa: E402


def main(argv=None):
    return kd.main(IEMOCAP, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
