"""Predict the emotions of your own conversation with the trained MELD models (docs/METHOD.md §0).

    python MELD/predict.py --conversation my_conversation.csv --out predictions.csv
    python MELD/predict.py --model_dir DIR --conversation my_conversation.csv --out predictions.csv

Reads   the conversation CSV in MELD's prepared-CSV schema (Dialogue_ID, Utterance_ID, Speaker,
        Utterance, Video_Path; audio is decoded from the clip; Emotion optional and ignored; relative
        paths: the CSV's folder first, then --data_dir; or absolute), datasets/MELD/speaker2id.json, pretrained_model/, and
        MELD/MELD/save_model/{text,audio,video,text_KD_audio,text_KD_video}.bin,
        multimodal_fusion_best.bin (+ multimodal_fusion_metrics.json: the settings it was trained with)
Writes  predictions.csv (Dialogue_ID, Utterance_ID, Speaker, Utterance, emotion, p_<label> for each
        of the 7 labels; the file's order, several dialogues allowed), predictions_substitutions.tsv
        beside it (unreadable media and what replaced it), and under MELD/feature/predict/ the
        conversation's frames (video/conversation-<digest>/) and feature pickle
Caches  each clip's decoded 16 kHz samples in MELD/feature/audio_cache/ (read back by later epochs
        and stages; --audio_cache_dir DIR elsewhere, --audio_cache False: decode every time)

The pipeline's own code runs: frame extraction (stage 3), the five first-stage models (stage 7)
and the fusion model in evaluation mode (stage 8). Speakers not in speaker2id.json get the fusion
model's padding speaker row, with a warning (--unknown_speakers error refuses them instead).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from MELD.multimodal_fusion import DEFAULTS  # noqa: E402
from magtkd import cli, hub, predict, runtime, utils  # noqa: E402
from magtkd.fusion_settings import FusionRequest  # noqa: E402

# What --unknown_speakers applies to on MELD (docs/METHOD.md §5: a row per speaker2id.json name)
UNKNOWN_SPEAKERS = "speakers not in speaker2id.json"


def main(argv=None) -> dict:
    # Flags: the stage folders, the conversation and the output, batch size, autocast, fusion settings
    args = cli.predict_parser(MELD, HERE, __doc__, unknown_speakers=UNKNOWN_SPEAKERS).parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    # The six models: --save_dir's, or a model folder's (--model_dir, checked: its dataset, every file)
    models = hub.model_source(MELD, args.model_dir, args.save_dir)
    run = predict.Prediction.from_flags({**vars(args), "save_dir": models},
                                        cli.audio_cache_dir(args.audio_cache, args.audio_cache_dir, args.feature_dir))
    # The fusion model as trained (its metrics document), else this dataset's feature keys; a flag may
    # only repeat what the model was trained with
    request = FusionRequest.from_flags(vars(args), (DEFAULTS["audio_feature"], DEFAULTS["video_feature"]))
    # Stages 3, 7 and 8 on the conversation
    return predict.predict_conversation(MELD, run, request, device)


if __name__ == "__main__":
    utils.run(main)
