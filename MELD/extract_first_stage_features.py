"""Stage 7 - first-stage features of every MELD utterance (SPEC section 4).

    python MELD/extract_first_stage_features.py --batch_size 16

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, media/frames, MELD/MELD/save_model/{text,audio,video,text_KD_audio,text_KD_video}.bin
Writes  MELD/feature/first_stage_{train,dev,test}_features.pkl

MELD speakers in the pickles are the ids of datasets/MELD/speaker2id.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, extract  # noqa: E402

main = entry(extract.main, "MELD", __file__, __doc__)

if __name__ == "__main__":
    main()
