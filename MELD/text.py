"""Stage 1 - fine-tune the RoBERTa prompt encoder on MELD (SPEC section 2, Text).

    python MELD/text.py --epochs 10 --learning_rate 1e-5 --batch_size 4 --seed 2024  [--train False]

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, pretrained_model/roberta-large
Writes  MELD/MELD/save_model/text.bin (state_dict) and text.json (args, per-epoch metrics, test report)

MELD prompts number up to nine speakers per dialogue by first appearance (<s1>..<s9>),
not by their global speaker ids as the reference did.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, unimodal  # noqa: E402

main = entry(unimodal.main, "MELD", __file__, __doc__, "text")

if __name__ == "__main__":
    main()
