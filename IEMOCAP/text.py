"""Stage 1 - fine-tune the RoBERTa-large prompt encoder on IEMOCAP (docs/METHOD.md §2).

    python IEMOCAP/text.py                  # --train False evaluates the saved checkpoint on test

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, pretrained_model/roberta-large
Writes  IEMOCAP/IEMOCAP/save_model/text.bin (epoch with the best dev weighted F1) and text.json,
        text_curves.png, text_confusion.png; --seeds S1 S2 ...: those per seed (text_seed<S>.*),
        the best dev seed's also under the names above, and text_seeds.json/.md (mean ± std)

The prompt holds the dialogue so far with speaker tokens and ends in ``Now<sK> feels <mask>``;
the representation is the mask token's hidden state projected to the audio/video width.
--prompt no_template|no_speakers|no_context: the ablation variants (docs/METHOD.md §2, Prompt variants),
recorded in text.json, whose prompt KD.py, extract_first_stage_features.py and predict.py then build.
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from IEMOCAP.config import IEMOCAP  # noqa: E402
from magtkd import dataset, engine, model, pretrained, results, utils  # noqa: E402
from magtkd.artifacts import StageFiles  # noqa: E402

# Objective: cross-entropy on the mask token's logits
objective = model.encoder_cross_entropy


def main(argv=None) -> dict:
    # Flags: the reference's names, IEMOCAP's defaults
    parser = utils.training_parser(IEMOCAP, HERE, __doc__, epochs=10, batch_size=4, learning_rate=1e-5)
    utils.add_prompt_flag(parser, training=True)
    args = parser.parse_args(argv)
    utils.setup_logging()
    device = utils.resolve_device(args.device)
    seeds = utils.seed_list(args)
    # The prompt variant (docs/METHOD.md §2): --train False evaluates with the one text.json recorded
    args.prompt = (args.prompt or "full") if args.train else \
        pretrained.text_prompt(StageFiles.first_stage(args.save_dir, "text").metrics, args.prompt)

    # Data: one dialogue-prefix sample per utterance, in CSV order (read once, shared by all seeds)
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    utils.log_start("IEMOCAP text", args, device, {s: len(v) for s, v in samples.items()})

    runs, files = {}, {}
    for seed in seeds:
        # Model: RoBERTa-large (+ speaker tokens) -> Linear(hidden, D) -> Linear(D, 6)
        utils.set_seed(seed, args.deterministic)
        encoder, field = pretrained.load_encoder("text", args.pretrained_dir, IEMOCAP.num_classes,
                                                   prompt=args.prompt)
        encoder.to(device)
        data = engine.SampleBatches(dataset.loaders(samples, [field], args.batch_size, args.num_workers, seed), device)
        files[seed] = StageFiles.first_stage(args.save_dir, "text", utils.seed_tag(seed, seeds))
        config = engine.FitConfig.first_stage(args, IEMOCAP, stage="IEMOCAP text", script="IEMOCAP/text.py",
                                              files=files[seed], seed=seed, width=encoder.width)
        if not args.train:
            return engine.evaluate_checkpoint(encoder, data, config)

        # Optimizer and schedule: AdamW; the authors' warmup counted in samples, stepped per update (curve logged in epochs)
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=args.learning_rate)
        scheduler = engine.reference_schedule(optimizer, data.n_train, data.updates_per_epoch(args.grad_accum),
                                              args.epochs, args.per_batch_schedule,
                                              global_batch=data.global_batch(args.grad_accum), authors_batch=4,
                                              epoch_anchored=args.schedule_epochs)
        runs[seed] = engine.fit(encoder, objective, data, optimizer, scheduler, config)

    # Several seeds: text_seeds.json/.md; the best dev seed's files also as text.bin/.json
    return results.finish_seeds(runs, files, StageFiles.first_stage(args.save_dir, "text"), IEMOCAP.labels)


if __name__ == "__main__":
    utils.run(main)
