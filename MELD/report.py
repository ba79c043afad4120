"""A case-study page of the MELD results in one HTML file that opens offline (docs/METHOD.md §0, "Report").

    python MELD/report.py --out report.html
    python -m magtkd.report MELD --data_dir D --save_dir S --feature_dir F --out report.html   # the same

Reads   MELD/MELD/save_model/: the metrics documents, seeds summaries and test predictions CSVs
        (<name>_predictions_test.csv) of the fusion and the five first-stage models, and
        multimodal_fusion_best.bin; MELD/feature/first_stage_test_features.pkl (the fused representations
        of the t-SNE); the test CSV in datasets/MELD/ (texts, when no predictions CSV has them)
Writes  report.html (default: MELD/MELD/save_model/report.html): the headline figures over seeds with the
        selection protocol, per-class F1 and confusion matrices, what the fusion fixes and breaks relative
        to the text model, the gates and anchors' shares, the worst test dialogues as conversations, and a
        t-SNE of the fused representations; everything inline (no script, no network)
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from MELD.multimodal_fusion import DEFAULTS  # noqa: E402
from magtkd import cli, report, runtime, utils  # noqa: E402
from magtkd.fusion_settings import FusionRequest  # noqa: E402


def main(argv=None) -> dict:
    # Flags: the folders the page reads, the file it writes, how much it shows
    args = cli.report_parser(MELD, HERE, __doc__).parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    # The kept fusion model as trained (its metrics document), else this dataset's feature keys
    request = FusionRequest(default_features=(DEFAULTS["audio_feature"], DEFAULTS["video_feature"]))
    return report.write_report(MELD, report.Report.from_flags(vars(args)), request, device)


if __name__ == "__main__":
    utils.run(main)
