"""Stage 2 - fine-tune data2vec-audio on IEMOCAP (SPEC section 2, Audio).

    python IEMOCAP/audio.py --epochs 10 --learning_rate 5e-6 --batch_size 4 --seed 2024

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, the utterance wavs, pretrained_model/data2vec-audio-base-960h
Writes  IEMOCAP/IEMOCAP/save_model/audio.bin, IEMOCAP/IEMOCAP/save_model/audio.json, IEMOCAP/IEMOCAP/save_model/audio_substitutions.tsv (unreadable audio -> silence)

`--train False` evaluates the saved audio.bin on test.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import IEMOCAP  # noqa: E402
from magtkd.stages import unimodal  # noqa: E402


def main(argv=None):
    return unimodal.main("audio", IEMOCAP, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
