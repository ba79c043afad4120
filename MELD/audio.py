"""Stage 2 - fine-tune data2vec-audio on MELD utterance audio (docs/METHOD.md §2).

    python MELD/audio.py                    # --train False evaluates the saved checkpoint on test

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, the mp4 clips, pretrained_model/data2vec-audio-base-960h
Writes  MELD/MELD/save_model/audio.bin, audio.json, audio_substitutions.tsv (unreadable audio),
        audio_curves.png, audio_confusion.png; --seeds S1 S2 ...: those per seed (audio_seed<S>.*),
        the best dev seed's also under the names above, and audio_seeds.json/.md (mean ± std)
Caches  each clip's decoded 16 kHz samples in MELD/feature/audio_cache/ (read back by later epochs
        and stages; --audio_cache_dir DIR elsewhere, --audio_cache False: decode every time)

MELD audio is decoded straight from the mp4 clips (AAC, 44.1/48 kHz stereo -> 16 kHz mono),
normalised by the feature extractor and cut to 400000 samples; batches are right-padded with a mask.
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import cli, dataset, encoders, engine, loaders, pretrained, results, runtime, schedule, utils  # noqa: E402
from magtkd.artifacts import StageFiles, SubstitutionReport  # noqa: E402

# Flags: the reference's names, MELD's defaults (docs/METHOD.md §2)
DEFAULTS = dict(epochs=10, batch_size=4, learning_rate=1e-5)

# Objective: cross-entropy on the first frame's logits
objective = encoders.encoder_cross_entropy


def main(argv=None) -> dict:
    parser = cli.training_parser(MELD, HERE, __doc__, **DEFAULTS)
    cli.add_audio_cache_flags(parser)
    args = parser.parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    seeds = cli.seed_list(args.seed, args.seeds, args.train)
    usual = StageFiles.first_stage(args.save_dir, "audio")
    audio_cache = cli.audio_cache_dir(args.audio_cache, args.audio_cache_dir, args.feature_dir)

    # Data (read once for all seeds): one sample per utterance; missing, corrupt or silent clips become
    # silence and are reported
    samples = dataset.load_samples(MELD, args.data_dir)
    runtime.log_start("MELD audio", vars(args), device, {s: len(v) for s, v in samples.items()})
    report = SubstitutionReport()

    runs, files = {}, {}
    for seed in seeds:
        # Model: data2vec-audio (time masking length 3) -> first frame -> Linear(hidden, C)
        runtime.set_seed(seed, args.deterministic)
        encoder, field = pretrained.load_encoder("audio", args.pretrained_dir, MELD.num_classes,
                                                 audio_cache=audio_cache)
        encoder.to(device)
        batches = loaders.split_loaders(samples, [field], args.batch_size, args.num_workers, seed, device=device,
                                        eval_batch_size=args.eval_batch_size)
        data = loaders.SampleBatches(batches, device, report)
        files[seed] = StageFiles.first_stage(args.save_dir, "audio", cli.seed_tag(seed, seeds))
        config = engine.FitConfig.from_flags(vars(args), seed=seed, stage="MELD audio", script="MELD/audio.py",
                                             dataset=MELD.name, labels=MELD.labels, files=files[seed],
                                             width=encoder.width, authors_batch=4)
        if not args.train:
            result = engine.evaluate_checkpoint(encoder, data, config)
            report.write(usual.eval_substitutions)
            return result

        # Optimizer and schedule: AdamW; the authors' curve over epochs, stepped per update
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=args.learning_rate)
        scheduler = schedule.reference_schedule(optimizer, data, config)
        runs[seed] = engine.fit(encoder, objective, data, optimizer, scheduler, config)

    # Artifacts: the substitution report (all seeds); with several seeds audio_seeds.json/.md and the
    # best dev seed's files also as audio.bin/.json
    report.write(usual.substitutions)
    return results.finish_seeds(runs, files, usual, MELD.labels)


if __name__ == "__main__":
    utils.run(main)
