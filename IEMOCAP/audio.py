"""Stage 2 - fine-tune data2vec-audio on IEMOCAP utterance audio (docs/METHOD.md §2).

    python IEMOCAP/audio.py                 # --train False evaluates the saved checkpoint on test

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, the wavs, pretrained_model/data2vec-audio-base-960h
Writes  IEMOCAP/IEMOCAP/save_model/audio.bin, audio.json, audio_substitutions.tsv (unreadable wavs),
        audio_curves.png, audio_confusion.png; --seeds S1 S2 ...: those per seed (audio_seed<S>.*),
        the best dev seed's also under the names above, and audio_seeds.json/.md (mean ± std)
Caches  each clip's decoded 16 kHz samples in IEMOCAP/feature/audio_cache/ (read back by later epochs
        and stages; --audio_cache_dir DIR elsewhere, --audio_cache False: decode every time)

Audio is decoded to 16 kHz mono, normalised by the feature extractor and cut to
400000 samples; batches are right-padded with an attention mask.
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from IEMOCAP.config import IEMOCAP  # noqa: E402
from magtkd import dataset, engine, model, pretrained, results, utils  # noqa: E402
from magtkd.artifacts import StageFiles, SubstitutionReport  # noqa: E402

# Objective: cross-entropy on the first frame's logits
objective = model.encoder_cross_entropy


def main(argv=None) -> dict:
    # Flags: the reference's names, IEMOCAP's defaults (audio learns at 5e-6 here)
    parser = utils.training_parser(IEMOCAP, HERE, __doc__, epochs=10, batch_size=4, learning_rate=5e-6)
    utils.add_audio_cache_flags(parser)
    args = parser.parse_args(argv)
    utils.setup_logging()
    device = utils.resolve_device(args.device)
    seeds = utils.seed_list(args)
    usual = StageFiles.first_stage(args.save_dir, "audio")

    # Data (read once for all seeds): one sample per utterance; unreadable audio becomes silence and is reported
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    utils.log_start("IEMOCAP audio", args, device, {s: len(v) for s, v in samples.items()})
    report = SubstitutionReport()

    runs, files = {}, {}
    for seed in seeds:
        # Model: data2vec-audio (time masking length 3) -> first frame -> Linear(hidden, 6)
        utils.set_seed(seed, args.deterministic)
        encoder, field = pretrained.load_encoder("audio", args.pretrained_dir, IEMOCAP.num_classes,
                                                 audio_cache=utils.audio_cache_dir(args))
        encoder.to(device)
        loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, seed)
        data = engine.SampleBatches(loaders, device, report)
        files[seed] = StageFiles.first_stage(args.save_dir, "audio", utils.seed_tag(seed, seeds))
        config = engine.FitConfig.first_stage(args, IEMOCAP, stage="IEMOCAP audio", script="IEMOCAP/audio.py",
                                              files=files[seed], seed=seed, width=encoder.width)
        if not args.train:
            result = engine.evaluate_checkpoint(encoder, data, config)
            report.write(usual.eval_substitutions)
            return result

        # Optimizer and schedule: AdamW; the authors' warmup counted in samples, stepped per update (curve logged in epochs)
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=args.learning_rate)
        scheduler = engine.reference_schedule(optimizer, data.n_train, data.updates_per_epoch(args.grad_accum),
                                              args.epochs, args.per_batch_schedule,
                                              global_batch=data.global_batch(args.grad_accum), authors_batch=4,
                                              epoch_anchored=args.schedule_epochs)
        runs[seed] = engine.fit(encoder, objective, data, optimizer, scheduler, config)

    # Artifacts: the substitution report (all seeds); with several seeds audio_seeds.json/.md and the
    # best dev seed's files also as audio.bin/.json
    report.write(usual.substitutions)
    return results.finish_seeds(runs, files, usual, IEMOCAP.labels)


if __name__ == "__main__":
    utils.run(main)
