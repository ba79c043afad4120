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
from magtkd import cli, dataset, encoders, engine, loaders, pretrained, results, runtime, schedule, utils  # noqa: E402
from magtkd.artifacts import StageFiles  # noqa: E402

# Flags: the reference's names, IEMOCAP's defaults (docs/METHOD.md §2)
DEFAULTS = dict(epochs=10, batch_size=4, learning_rate=1e-5)

# Objective: cross-entropy on the mask token's logits
objective = encoders.encoder_cross_entropy


def main(argv=None) -> dict:
    parser = cli.training_parser(IEMOCAP, HERE, __doc__, **DEFAULTS)
    cli.add_prompt_flag(parser, training=True)
    args = parser.parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    seeds = cli.seed_list(args.seed, args.seeds, args.train)
    # The prompt variant (docs/METHOD.md §2): --train False evaluates with the one text.json recorded
    prompt = (args.prompt or "full") if args.train else \
        pretrained.text_prompt(StageFiles.first_stage(args.save_dir, "text").metrics, args.prompt)
    flags = {**vars(args), "prompt": prompt}  # recorded as resolved

    # Data: one dialogue-prefix sample per utterance, in CSV order (read once, shared by all seeds)
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    runtime.log_start("IEMOCAP text", flags, device, {s: len(v) for s, v in samples.items()})

    runs, files = {}, {}
    for seed in seeds:
        # Model: RoBERTa-large (+ speaker tokens) -> Linear(hidden, D) -> Linear(D, C)
        runtime.set_seed(seed, args.deterministic)
        encoder, field = pretrained.load_encoder("text", args.pretrained_dir, IEMOCAP.num_classes,
                                                 prompt=prompt)
        encoder.to(device)
        batches = loaders.split_loaders(samples, [field], args.batch_size, args.num_workers, seed, device=device,
                                        eval_batch_size=args.eval_batch_size)
        data = loaders.SampleBatches(batches, device)
        files[seed] = StageFiles.first_stage(args.save_dir, "text", cli.seed_tag(seed, seeds))
        config = engine.FitConfig.from_flags(flags, seed=seed, stage="IEMOCAP text", script="IEMOCAP/text.py",
                                             dataset=IEMOCAP.name, labels=IEMOCAP.labels, files=files[seed],
                                             width=encoder.width, authors_batch=4)
        if not args.train:
            return engine.evaluate_checkpoint(encoder, data, config)

        # Optimizer and schedule: AdamW; the authors' curve over epochs, stepped per update
        optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=args.learning_rate)
        scheduler = schedule.reference_schedule(optimizer, data, config)
        runs[seed] = engine.fit(encoder, objective, data, optimizer, scheduler, config)

    # Several seeds: text_seeds.json/.md; the best dev seed's files also as text.bin/.json
    return results.finish_seeds(runs, files, StageFiles.first_stage(args.save_dir, "text"), IEMOCAP.labels)


if __name__ == "__main__":
    utils.run(main)
