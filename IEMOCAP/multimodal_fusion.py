"""Stage 8 - multi-modal anchor gated transformer on IEMOCAP (SPEC section 5).

    python IEMOCAP/multimodal_fusion.py                  # train (30 epochs), select on dev, report test
    python IEMOCAP/multimodal_fusion.py --train False    # evaluate the saved checkpoint on test only

Reads   IEMOCAP/feature/first_stage_{train,dev,test}_features.pkl (stage 7, or the authors' download;
        --train False reads only the test pickle) and, with --train False,
        IEMOCAP/IEMOCAP/save_model/multimodal_fusion_best.bin (ours or the reference's)
Writes  IEMOCAP/IEMOCAP/save_model/multimodal_fusion_best.bin (best dev weighted F1),
        multimodal_fusion_best.json (test labels/preds), multimodal_fusion_metrics.json (training only)

Defaults on IEMOCAP: A = audio_kd, V = video (raw video, as the reference); alpha 0.7, beta 0.8, L_feat on.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magtkd.recipes import IEMOCAP  # noqa: E402
from magtkd.stages import fusion  # noqa: E402


def main(argv=None):
    return fusion.main(IEMOCAP, Path(__file__).parent, argv, __doc__)


if __name__ == "__main__":
    main()
