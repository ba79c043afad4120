"""Stage 4 - fine-tune TimeSformer on 8 stored frames per MELD utterance (docs/METHOD.md §2).

    python MELD/video.py                    # --train False evaluates the saved checkpoint on test

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, MELD/feature/video/{split}/{dia}_{utt}.npy
        (from video_feature_extract.py), pretrained_model/{timesformer-base-finetuned-k400,videomae-base}
Writes  MELD/MELD/save_model/video.bin, video.json,
        video_curves.png, video_confusion.png; --seeds S1 S2 ...: those per seed (video_seed<S>.*),
        the best dev seed's also under the names above, and video_seeds.json/.md (mean ± std)

MELD frames come from whole clips; substituted (black) clips are listed by stage 3.
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import cli, dataset, encoders, engine, loaders, pretrained, results, runtime, schedule, utils  # noqa: E402
from magtkd.artifacts import StageFiles  # noqa: E402

# Flags: the reference's names, MELD's defaults (docs/METHOD.md §2)
DEFAULTS = dict(epochs=10, batch_size=4, learning_rate=1e-5)

# Objective: cross-entropy on the CLS token's logits
objective = encoders.encoder_cross_entropy


def main(argv=None) -> dict:
    args = cli.training_parser(MELD, HERE, __doc__, **DEFAULTS).parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    seeds = cli.seed_list(args.seed, args.seeds, args.train)

    # Data (read once for all seeds): one sample per utterance; its stored uint8 frames are normalised on load
    samples = dataset.load_samples(MELD, args.data_dir)
    runtime.log_start("MELD video", vars(args), device, {s: len(v) for s, v in samples.items()})

    runs, files = {}, {}
    for seed in seeds:
        # Model: TimeSformer -> CLS token -> Linear(hidden, C)
        runtime.set_seed(seed, args.deterministic, fixed_shapes=True)
        encoder, field = pretrained.load_encoder("video", args.pretrained_dir, MELD.num_classes, args.feature_dir)
        encoder.to(device)
        batches = loaders.split_loaders(samples, [field], args.batch_size, args.num_workers, seed, device=device,
                                        eval_batch_size=args.eval_batch_size)
        data = loaders.SampleBatches(batches, device)
        files[seed] = StageFiles.first_stage(args.save_dir, "video", cli.seed_tag(seed, seeds))
        config = engine.FitConfig.from_flags(vars(args), seed=seed, stage="MELD video", script="MELD/video.py",
                                             dataset=MELD.name, labels=MELD.labels, files=files[seed],
                                             width=encoder.width, authors_batch=4)
        if not args.train:
            return engine.evaluate_checkpoint(encoder, data, config)

        # Optimizer and schedule: AdamW; the authors' curve over epochs, stepped per update
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=args.learning_rate)
        scheduler = schedule.reference_schedule(optimizer, data, config)
        runs[seed] = engine.fit(encoder, objective, data, optimizer, scheduler, config)

    # Several seeds: video_seeds.json/.md; the best dev seed's files also as video.bin/.json
    return results.finish_seeds(runs, files, StageFiles.first_stage(args.save_dir, "video"), MELD.labels)


if __name__ == "__main__":
    utils.run(main)
