"""Stage 8 - the multi-modal anchor gated transformer on MELD (SPEC section 5).

    python MELD/multimodal_fusion.py [--train False]   # train + select on dev / evaluate only

Reads   MELD/feature/first_stage_{train,dev,test}_features.pkl (--train False: test only + the .bin)
Writes  MELD/MELD/save_model/multimodal_fusion_best.bin, multimodal_fusion_best.json, multimodal_fusion_metrics.json

Defaults on MELD: A = audio_kd, V = video_kd, alpha 0.01, beta 0.08, no L_feat;
304 speakers, with its own padding row (the reference padded with Joey's id 2).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.stages import entry, fusion  # noqa: E402

main = entry(fusion.main, "MELD", __file__, __doc__)

if __name__ == "__main__":
    main()
