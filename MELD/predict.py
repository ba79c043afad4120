"""Predict the emotions of your own conversation with the trained MELD models (docs/METHOD.md §0).

    python MELD/predict.py --conversation my_conversation.csv --out predictions.csv

Reads   the conversation CSV in MELD's prepared-CSV schema (Dialogue_ID, Utterance_ID, Speaker,
        Utterance, Video_Path; audio is decoded from the clip; Emotion optional and ignored; paths
        relative to --data_dir or absolute), datasets/MELD/speaker2id.json, pretrained_model/, and
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

import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import dataset, model, utils  # noqa: E402

log = logging.getLogger("magtkd")


def main(argv=None) -> dict:
    # Flags: the stage folders, the conversation and the output, batch size, autocast, fusion settings
    parser = utils.paths_parser(MELD, HERE, __doc__)
    parser.add_argument("--conversation", type=Path, required=True, help="the conversation CSV")
    parser.add_argument("--out", type=Path, required=True, help="the predictions CSV to write")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="utterances per first-stage forward pass and dialogues per fusion batch")
    parser.add_argument("--amp", type=utils.str2bool, default=False,
                        help="bf16 autocast on CUDA (first stage); default fp32, as the extraction stage")
    parser.add_argument("--channel_order", choices=("rgb", "bgr"), default="rgb",
                        help="frame channel order; use the one video_feature_extract.py used for training")
    parser.add_argument("--audio_feature", choices=("audio", "audio_kd"), default=None,
                        help="feature key feeding the audio stream A (default: as trained, else audio_kd)")
    parser.add_argument("--video_feature", choices=("video", "video_kd"), default=None,
                        help="feature key feeding the video stream V (default: as trained, else video_kd)")
    parser.add_argument("--n_head", type=int, default=None, help="attention heads (default: as trained, else 8)")
    parser.add_argument("--unknown_speakers", choices=("padding", "error"), default="padding",
                        help="speakers not in speaker2id.json: the model's padding row (warning) or an error")
    utils.add_audio_cache_flags(parser)
    args = parser.parse_args(argv)
    utils.setup_logging()
    device = utils.resolve_device(args.device)
    stage = "MELD predict"

    # Data: the conversation in file order, its dialogues in the feature pickle's order, the speaker map
    utterances = dataset.load_conversation(MELD, args.conversation, args.data_dir)
    dialogues = dataset.group_dialogues(utterances)
    ordered = [u for _, dialogue in dialogues for u in dialogue]
    split, work_dir = ordered[0].split, args.feature_dir / "predict"
    speaker2id = dataset.load_speaker2id(args.data_dir)

    # Models, checked before any work: the fusion checkpoint is MELD's, the five first-stage ones exist
    checkpoint = args.save_dir / utils.FUSION_CHECKPOINT
    sizes = model.fusion_sizes_for(MELD, checkpoint, speaker2id)
    model.check_first_stage_checkpoints(MELD, args.save_dir)
    trained = utils.recorded_fusion_args(args.save_dir)
    audio_key = args.audio_feature or trained.get("audio_feature", "audio_kd")
    video_key = args.video_feature or trained.get("video_feature", "video_kd")
    n_head = args.n_head or int(trained.get("n_head", 8))
    padding = int(sizes["n_speaker"]) if args.unknown_speakers == "padding" else None
    speakers = [s for _, dialogue in dialogues
                for s in dataset.fusion_speaker_ids(MELD, dialogue, speaker2id, padding)]
    utils.log_start(stage, args, device, {"dialogues": len(dialogues), "utterances": len(ordered),
                                          "audio_feature": audio_key, "video_feature": video_key, "n_head": n_head})

    # Frames (stage 3) into this conversation's own folder: resumable, never the dataset's frames
    jobs = dataset.plan_jobs(MELD, ordered, work_dir, args.channel_order)
    frames = dataset.extract_frames(jobs, model.load_image_processor(args.pretrained_dir), args.num_workers,
                                    work_dir / "video" / split / "substitutions.tsv")

    # Features (stage 7): the five first-stage models, written as a feature pickle
    report = utils.SubstitutionReport()
    vectors = model.first_stage_features(
        MELD, {split: dataset.build_samples(ordered)}, pretrained_dir=args.pretrained_dir, save_dir=args.save_dir,
        feature_dir=work_dir, device=device, batch_size=args.batch_size, num_workers=args.num_workers,
        amp=args.amp, report=report, audio_cache=utils.audio_cache_dir(args))[split]
    features = dataset.assemble_features([u.dialogue_id for u in ordered], [u.utterance_id for u in ordered],
                                         [u.label for u in ordered], speakers, vectors)
    pickle_path = dataset.save_features(dataset.feature_path(work_dir, split), features)

    # Fusion (stage 8) on the pickle, in evaluation mode (no dropout)
    data = dataset.load_dialogues(pickle_path, audio_key, video_key, device)
    width = model.fusion_width(None, n_head, data.width, str(pickle_path))
    if sizes["hidden"] != width:
        raise SystemExit(f"fusion checkpoint {checkpoint} has width {sizes['hidden']} but the first-stage "
                         f"features in {pickle_path} have width {width}")
    fusion = model.AnchorGatedTransformer(width, MELD.num_classes, int(sizes["n_speaker"]), n_head, 0.0,
                                          bool(sizes["separate_text_blocks"]))
    model.load_fusion_checkpoint(fusion, checkpoint)
    logits = utils.dialogue_logits(fusion.to(device), data, args.batch_size, progress=True)

    # Artifacts: the substitution report, then the predictions in file order (each written atomically)
    report.extend(frames)
    table = dataset.prediction_table(MELD, utterances, ordered, logits)
    report_path = report.write(args.out.with_name(f"{args.out.stem}_substitutions.tsv"))
    utils.write_text(args.out, table.to_csv(index=False, float_format="%.6f"))
    print(dataset.prediction_summary(table))
    log.info("%s: wrote %s (%d utterances); %d media substitutions listed in %s", stage, args.out, len(table),
             len(report), report_path)
    return {"paths": {"predictions": str(args.out), "substitutions": str(report_path), "features": str(pickle_path)},
            "emotions": table["emotion"].tolist(), "substituted": len(report)}


if __name__ == "__main__":
    utils.run(main)
