"""Stage 2 - fine-tune data2vec-audio on IEMOCAP (SPEC section 2, Audio).

    python IEMOCAP/audio.py --epochs 10 --learning_rate 5e-6 --batch_size 4 --seed 2024  [--train False]

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, the audio, pretrained_model/data2vec-audio-base-960h
Writes  IEMOCAP/IEMOCAP/save_model/audio.bin, audio.json, audio_substitutions.tsv (unreadable audio -> silence)

IEMOCAP audio comes from the per-utterance 16 kHz wavs (Wav_Path);
learning rate 5e-6 as in the reference.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, unimodal  # noqa: E402

main = entry(unimodal.main, "IEMOCAP", __file__, __doc__, "audio")

if __name__ == "__main__":
    main()
