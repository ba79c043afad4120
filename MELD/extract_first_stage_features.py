"""Stage 7 - first-stage features of every MELD utterance (SPEC section 4).

    python MELD/extract_first_stage_features.py --batch_size 16

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, media/frames, MELD/MELD/save_model/{text,audio,video,text_KD_audio,text_KD_video}.bin
Writes  MELD/feature/first_stage_{train,dev,test}_features.pkl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import MELD  # noqa: E402
from magtkd.stages import extract  # noqa: E402


def main(argv=None):
    return extract.main(MELD, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
