"""Stage 1 - fine-tune the RoBERTa prompt encoder on IEMOCAP (SPEC section 2, Text).

    python IEMOCAP/text.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024  [--train False]

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, pretrained_model/roberta-large
Writes  IEMOCAP/IEMOCAP/save_model/text.bin (state_dict) and text.json (args, per-epoch metrics, test report)

IEMOCAP prompts number the two speakers (F/M) by first appearance: <s1>, <s2>.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, unimodal  # noqa: E402

main = entry(unimodal.main, "IEMOCAP", __file__, __doc__, "text")

if __name__ == "__main__":
    main()
