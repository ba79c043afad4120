"""Stage 1 - fine-tune the RoBERTa prompt encoder on IEMOCAP (SPEC section 2, Text).

    python IEMOCAP/text.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, pretrained_model/roberta-large
Writes  IEMOCAP/IEMOCAP/save_model/text.bin (state_dict), IEMOCAP/IEMOCAP/save_model/text.json (arguments, per-epoch metrics, test report)

`--train False` evaluates the saved text.bin on test. Folders: --data_dir --pretrained_dir --save_dir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import IEMOCAP  # noqa: E402
from magtkd.stages import unimodal  # noqa: E402


def main(argv=None):
    return unimodal.main("text", IEMOCAP, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
