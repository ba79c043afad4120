"""Stage 2 - fine-tune data2vec-audio on MELD (SPEC section 2, Audio).

    python MELD/audio.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024  [--train False]

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, the audio, pretrained_model/data2vec-audio-base-960h
Writes  MELD/MELD/save_model/audio.bin, audio.json, audio_substitutions.tsv (unreadable audio -> silence)

MELD audio is decoded straight from the mp4 clips (AAC, 44.1/48 kHz stereo -> 16 kHz mono).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, unimodal  # noqa: E402

main = entry(unimodal.main, "MELD", __file__, __doc__, "audio")

if __name__ == "__main__":
    main()
