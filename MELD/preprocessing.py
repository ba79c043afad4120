"""Stage 0 - raw MELD release -> the split CSVs every stage reads (SPEC section 1).

    python MELD/preprocessing.py --data_dir datasets/MELD

Reads   <data_dir>/{train,dev,test}_sent_emo.csv and the clip folders
Writes  <data_dir>/{train,dev,test}_meld_emo.csv, <data_dir>/speaker2id.json

Every official row and column is kept, text byte-exact; Video_Path is added.
Missing clips are listed in preparation_report.tsv (rows kept).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.prepare import meld as prep_meld  # noqa: E402
from magtkd.stages import entry  # noqa: E402

main = entry(prep_meld.run, "MELD", __file__, __doc__)

if __name__ == "__main__":
    main()
