"""Stage 8 - multi-modal anchor gated transformer on MELD (SPEC section 5).

    python MELD/multimodal_fusion.py                  # train (30 epochs), select on dev, report test
    python MELD/multimodal_fusion.py --train False    # evaluate the saved checkpoint on test only

Reads   MELD/feature/first_stage_{train,dev,test}_features.pkl (stage 7, or the authors' download;
        --train False reads only the test pickle) and, with --train False,
        MELD/MELD/save_model/multimodal_fusion_best.bin (ours or the reference's)
Writes  MELD/MELD/save_model/multimodal_fusion_best.bin (best dev weighted F1),
        multimodal_fusion_best.json (test labels/preds), multimodal_fusion_metrics.json (training only)

Defaults on MELD: A = audio_kd, V = video_kd; alpha 0.01, beta 0.08, L_feat off.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import MELD  # noqa: E402
from magtkd.stages import fusion  # noqa: E402


def main(argv=None):
    return fusion.main(MELD, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
