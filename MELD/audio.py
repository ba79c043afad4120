"""Stage 2 - fine-tune data2vec-audio on MELD (SPEC section 2, Audio).

    python MELD/audio.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, the audio of the mp4 clips, pretrained_model/data2vec-audio-base-960h
Writes  MELD/MELD/save_model/audio.bin, MELD/MELD/save_model/audio.json, MELD/MELD/save_model/audio_substitutions.tsv (unreadable audio -> silence)

`--train False` evaluates the saved audio.bin on test.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import MELD  # noqa: E402
from magtkd.stages import unimodal  # noqa: E402


def main(argv=None):
    return unimodal.main("audio", MELD, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
