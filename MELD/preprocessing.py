"""Stage 0 (MELD): official CSVs -> {train,dev,test}_meld_emo.csv + speaker2id.json (SPEC section 1).

    python MELD/preprocessing.py [--data_dir datasets/MELD]

Reads  <data_dir>/{train,dev,test}_sent_emo.csv and the clip folders train_splits,
       dev_splits_complete, output_repeated_splits_test
Writes <data_dir>/{train,dev,test}_meld_emo.csv (official rows, values byte-exact, plus
       Video_Path), <data_dir>/speaker2id.json and <data_dir>/preparation_report.tsv
       (missing clips, rows kept; clips no row names).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magtkd.prepare.meld import main as prepare_main  # noqa: E402


def main(argv=None):
    return prepare_main(argv, Path(__file__).parent)


if __name__ == "__main__":
    main()
