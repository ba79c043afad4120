"""Stage 7 - first-stage features of every IEMOCAP utterance (SPEC section 4).

    python IEMOCAP/extract_first_stage_features.py --batch_size 16

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, media/frames, IEMOCAP/IEMOCAP/save_model/{text,audio,video,text_KD_audio,text_KD_video}.bin
Writes  IEMOCAP/feature/first_stage_{train,dev,test}_features.pkl

IEMOCAP speakers in the pickles are 0/1 by order of appearance in the dialogue.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, extract  # noqa: E402

main = entry(extract.main, "IEMOCAP", __file__, __doc__)

if __name__ == "__main__":
    main()
