"""Export MELD's first-stage features for other ERC codebases: SDT, GraphSmile (docs/METHOD.md §9).

    python MELD/export_features.py --format sdt --out meld_multimodal_features.pkl
    python MELD/export_features.py --format graphsmile --out meld_features_magtkd.pkl

Reads   MELD/feature/first_stage_{train,dev,test}_features.pkl with their record first_stage_features.json
        (refused when incomplete or another dataset's), and datasets/MELD/{train,dev,test}_meld_emo.csv
        (speakers, utterance texts, the gold emotion each label is checked against, the Sentiment column)
Writes  FILE: the tuple the peer's dataloader.py unpacks (SDT's MELDDataset: 13 slots; GraphSmile's
        MELDDataset_BERT: 14, with videoSentiments), and FILE's stem + .json beside it: what went into which slot

The community's conventions: labels neutral 0, surprise 1, fear 2, sadness 3, joy 4, disgust 5, anger 6;
sentiments neutral 0, positive 1, negative 2; speakers one-hot (9 wide) by order of appearance in the
dialogue; dialogue keys = Dialogue_ID, dev's + 1039 and test's + 1153 on the release (the largest earlier
id + 1); trainVid = train (1038 dialogues), testVid = test (280), the last slot (validVid) = dev (114).
The text slots hold the text vectors, videoAudio --audio_feature's, videoVisual --video_feature's (default:
the fusion's, audio_kd and video_kd). Tell the peer the widths the record lists (768 each for the real models).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import COMMUNITY, MELD  # noqa: E402
from MELD.multimodal_fusion import DEFAULTS  # noqa: E402
from magtkd import cli, peer_features, runtime, utils  # noqa: E402


def main(argv=None) -> dict:
    # Flags: the layout and the file, the feature keys of the audio and video slots (the fusion's by default)
    args = cli.export_parser(MELD, HERE, __doc__, audio_feature=DEFAULTS["audio_feature"],
                             video_feature=DEFAULTS["video_feature"]).parse_args(argv)
    runtime.setup_logging()
    # Data: the three pickles matched to the CSVs' rows, written in the peer's layout with its conventions
    return peer_features.export_features(MELD, COMMUNITY, peer_features.FeatureExport.from_flags(vars(args)))


if __name__ == "__main__":
    utils.run(main)
