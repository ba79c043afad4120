"""Stage 0 (IEMOCAP): raw release -> IEMOCAP_{train,dev,test}.csv (SPEC section 1).

    python IEMOCAP/preprocessing.py [--data_dir datasets/IEMOCAP]

Reads  <data_dir>/Session{1..5}/dialog/transcriptions/*.txt and
       <data_dir>/Session{1..5}/dialog/EmoEvaluation/*.txt
Writes <data_dir>/IEMOCAP_train.csv, IEMOCAP_dev.csv, IEMOCAP_test.csv (media paths
relative to <data_dir>) and prints the counts per split.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magtkd.prepare.iemocap import main as prepare_main  # noqa: E402


def main(argv=None):
    return prepare_main(argv, Path(__file__).parent)


if __name__ == "__main__":
    main()
