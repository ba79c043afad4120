"""Export IEMOCAP's first-stage features for other ERC codebases: SDT, GraphSmile (docs/METHOD.md §9).

    python IEMOCAP/export_features.py --format sdt --out iemocap_multimodal_features.pkl
    python IEMOCAP/export_features.py --format graphsmile --out iemocap_features_magtkd.pkl

Reads   IEMOCAP/feature/first_stage_{train,dev,test}_features.pkl with their record first_stage_features.json
        (refused when incomplete or another dataset's), and datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv
        (speakers, utterance texts, the gold emotion each label is checked against)
Writes  FILE: the tuple the peer's dataloader.py unpacks (SDT's IEMOCAPDataset, GraphSmile's
        IEMOCAPDataset_BERT: the same 12 slots), and FILE's stem + .json beside it: what went into which slot

The community's conventions: labels hap 0, sad 1, neu 2, ang 3, exc 4, fru 5; dialogues keyed by name
(Ses01F_impro01) with speakers as the letters M/F; trainVid = the train and dev dialogues (120 on the
release), testVid = Session 5 (31). The text slots hold the text vectors, videoAudio --audio_feature's,
videoVisual --video_feature's (default: the fusion's, audio_kd and video). Tell the peer the widths the
record lists (768 each for the real models).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from IEMOCAP.config import COMMUNITY, IEMOCAP  # noqa: E402
from IEMOCAP.multimodal_fusion import DEFAULTS  # noqa: E402
from magtkd import cli, peer_features, runtime, utils  # noqa: E402


def main(argv=None) -> dict:
    # Flags: the layout and the file, the feature keys of the audio and video slots (the fusion's by default)
    args = cli.export_parser(IEMOCAP, HERE, __doc__, audio_feature=DEFAULTS["audio_feature"],
                             video_feature=DEFAULTS["video_feature"]).parse_args(argv)
    runtime.setup_logging()
    # Data: the three pickles matched to the CSVs' rows, written in the peer's layout with its conventions
    return peer_features.export_features(IEMOCAP, COMMUNITY, peer_features.FeatureExport.from_flags(vars(args)))


if __name__ == "__main__":
    utils.run(main)
