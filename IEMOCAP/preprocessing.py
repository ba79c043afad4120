"""Stage 0 - raw IEMOCAP release -> the split CSVs every stage reads (SPEC section 1).

    python IEMOCAP/preprocessing.py --data_dir datasets/IEMOCAP

Reads   <data_dir>/Session{1..5}/dialog/{transcriptions,EmoEvaluation}/*.txt
Writes  <data_dir>/IEMOCAP_{train,dev,test}.csv

Split: Sessions 1-4 train + dev (the 12 standard dev dialogues), Session 5 test;
labels ang exc fru hap neu sad; xxx/oth/sur/fea/dis utterances are dropped.
The authors' CSVs differ by 53 utterances relabelled xxx -> hap (printed at the end).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.prepare import iemocap as prep_iemocap  # noqa: E402
from magtkd.stages import entry  # noqa: E402

main = entry(prep_iemocap.run, "IEMOCAP", __file__, __doc__)

if __name__ == "__main__":
    main()
