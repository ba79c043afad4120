"""Stage 8 - the multi-modal anchor gated transformer on IEMOCAP (SPEC section 5).

    python IEMOCAP/multimodal_fusion.py [--train False]   # train + select on dev / evaluate only

Reads   IEMOCAP/feature/first_stage_{train,dev,test}_features.pkl (--train False: test only + the .bin)
Writes  IEMOCAP/IEMOCAP/save_model/multimodal_fusion_best.bin, multimodal_fusion_best.json, multimodal_fusion_metrics.json

Defaults on IEMOCAP: A = audio_kd, V = video (raw video, as the reference);
alpha 0.7, beta 0.8, L_feat on; 2 speakers.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, fusion  # noqa: E402

main = entry(fusion.main, "IEMOCAP", __file__, __doc__)

if __name__ == "__main__":
    main()
