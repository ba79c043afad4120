"""Stage 7 - run the five first-stage models over every MELD utterance (docs/METHOD.md §4).

    python MELD/extract_first_stage_features.py
    python MELD/extract_first_stage_features.py --model_dir DIR   # a model folder's models (magtkd.hub)

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, speaker2id.json, the mp4 clips, the stored frames,
        and MELD/MELD/save_model/{text,audio,video,text_KD_audio,text_KD_video}.bin
Writes  MELD/feature/first_stage_{train,dev,test}_features.pkl (keys vids, text, audio, video,
        audio_kd, video_kd, speakers, labels, dia2utt) and first_stage_substitutions.tsv
Caches  each clip's decoded 16 kHz samples in MELD/feature/audio_cache/ (read back by later epochs
        and stages; --audio_cache_dir DIR elsewhere, --audio_cache False: decode every time)

Speakers in the pickles are the global ids of datasets/MELD/speaker2id.json.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import cli, dataset, extract, hub, runtime, utils  # noqa: E402
from magtkd.artifacts import SubstitutionReport  # noqa: E402


def main(argv=None) -> dict:
    # Flags: the folders, the batch size (features do not depend on it) and autocast
    parser = cli.paths_parser(MELD, HERE, __doc__, writes=("feature_dir",))
    parser.add_argument("--batch_size", type=utils.positive_int, default=16, help="utterances per forward pass")
    cli.add_amp_flag(parser)
    cli.add_audio_cache_flags(parser)
    cli.add_prompt_flag(parser)  # the text model's prompt: text.json's
    cli.add_model_dir_flag(parser)
    args = parser.parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    # The five models: --save_dir's, or a model folder's (--model_dir, checked: its dataset, every file)
    models = hub.model_source(MELD, args.model_dir, args.save_dir)

    # Data: every utterance of every split in the pickles' order (CSV order grouped by dialogue), the speakers
    dialogues = {s: dataset.group_dialogues(dataset.load_split(MELD, args.data_dir, s)) for s in dataset.SPLITS}
    samples = {s: dataset.build_samples([u for _, dialogue in dialogues[s] for u in dialogue]) for s in dataset.SPLITS}
    speaker2id = dataset.load_speaker2id(args.data_dir) if MELD.global_speaker_ids else None  # checked first
    runtime.log_start("MELD extract_first_stage_features", vars(args), device,
                      {s: len(v) for s, v in samples.items()})

    # Models: the five first-stage checkpoints, one input group at a time (each clip decoded once)
    report = SubstitutionReport()
    vectors = extract.first_stage_features(
        MELD, samples, pretrained_dir=args.pretrained_dir, save_dir=models, feature_dir=args.feature_dir,
        device=device, batch_size=args.batch_size, num_workers=args.num_workers, amp=args.amp, report=report,
        audio_cache=cli.audio_cache_dir(args.audio_cache, args.audio_cache_dir, args.feature_dir), prompt=args.prompt)

    # Artifacts: one pickle per split and the substitution report, published as one set by rank 0
    # (under torchrun the ranks' representations were gathered in order)
    paths = extract.write_feature_pickles(MELD, dialogues, vectors, args.feature_dir, report, vars(args),
                                          speaker2id)
    return {"paths": {k: str(v) for k, v in paths.items()}, "substituted": len(report)}


if __name__ == "__main__":
    utils.run(main)
