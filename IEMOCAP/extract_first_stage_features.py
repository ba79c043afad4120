"""Stage 7 - first-stage features of every IEMOCAP utterance (SPEC section 4).

    python IEMOCAP/extract_first_stage_features.py --batch_size 16

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, media/frames, IEMOCAP/IEMOCAP/save_model/{text,audio,video,text_KD_audio,text_KD_video}.bin
Writes  IEMOCAP/feature/first_stage_{train,dev,test}_features.pkl
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import IEMOCAP  # noqa: E402
from magtkd.stages import extract  # noqa: E402


def main(argv=None):
    return extract.main(IEMOCAP, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
