"""Ablation tables on MELD: one command per table, every variant over seeds (docs/METHOD.md §5, Ablation tables).

    python MELD/ablation.py --table modalities --seeds 1 2 3     # the fusion on each subset of T, A, V
    python MELD/ablation.py --table components --seeds 1 2 3     # without gates / speaker embedding / ...
    python MELD/ablation.py --table kd --seeds 1 2 3             # the first-stage models (--train True: train them)
    python MELD/ablation.py --table prompt --seeds 1 2 3         # the text-prompt variants, through the fusion
    python MELD/ablation.py --table reproduction --seeds 2024 2025 2026   # the paper: both releases' attentions

Reads   MELD/feature/first_stage_{train,dev,test}_features.pkl (modalities, components, reproduction);
        MELD/MELD/save_model (kd: the first-stage checkpoints; prompt: audio, video and the KD students) and
        datasets/MELD (kd, prompt)
Writes  MELD/MELD/save_model/ablation/<table>/<variant>/ (each variant's runs, the stage's usual files, and
        ablation_variant.json: its setting, rows and test predictions; a finished variant is skipped when the
        table is run again with the same setting) and MELD/MELD/save_model/ablation/<table>.{json,md,png}
        (reproduction.{json,md,png}: each attention under both selections, the paper's figures, the paired test)

Every flag this script does not know is passed to each run of the stage (e.g. --epochs 4 --lr 1e-3).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD import KD, audio, extract_first_stage_features, multimodal_fusion, text, video  # noqa: E402
from MELD.config import MELD  # noqa: E402
from magtkd import ablation, cli, runtime, utils  # noqa: E402

# The stage scripts the tables run, by file name
SCRIPTS = {"text.py": text.main, "audio.py": audio.main, "video.py": video.main, "KD.py": KD.main,
           "extract_first_stage_features.py": extract_first_stage_features.main,
           "multimodal_fusion.py": multimodal_fusion.main}


def main(argv=None) -> dict:
    # Flags: the table, the seeds and MELD's folders; the rest passes through to the stage runs
    args, extra = cli.ablation_parser(MELD, HERE, __doc__).parse_known_args(argv)
    runtime.setup_logging()
    return ablation.run_ablation(MELD, ablation.Ablation.from_flags(vars(args), extra, SCRIPTS))


if __name__ == "__main__":
    utils.run(main)
