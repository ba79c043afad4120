"""Stage 1 - fine-tune the RoBERTa prompt encoder on MELD (SPEC section 2, Text).

    python MELD/text.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, pretrained_model/roberta-large
Writes  MELD/MELD/save_model/text.bin (state_dict), MELD/MELD/save_model/text.json (arguments, per-epoch metrics, test report)

`--train False` evaluates the saved text.bin on test. Folders: --data_dir --pretrained_dir --save_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import MELD  # noqa: E402
from magtkd.stages import unimodal  # noqa: E402


def main(argv=None):
    return unimodal.main("text", MELD, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
