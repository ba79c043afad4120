"""Stage 1 - fine-tune the RoBERTa-large prompt encoder on IEMOCAP (docs/METHOD.md §2).

    python IEMOCAP/text.py                  # --train False evaluates the saved checkpoint on test

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, pretrained_model/roberta-large
Writes  IEMOCAP/IEMOCAP/save_model/text.bin (epoch with the best dev weighted F1) and text.json,
        text_curves.png, text_confusion.png; --seeds S1 S2 ...: those per seed (text_seed<S>.*),
        the best dev seed's also under the names above, and text_seeds.json/.md (mean ± std)

The prompt holds the dialogue so far with speaker tokens and ends in ``Now<sK> feels <mask>``;
the representation is the mask token's hidden state projected to the audio/video width.
"""

import sys
from pathlib import Path

import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from IEMOCAP.config import IEMOCAP  # noqa: E402
from magtkd import dataset, model, utils  # noqa: E402


def main(argv=None) -> dict:
    # Flags: the reference's names, IEMOCAP's defaults
    parser = utils.training_parser(IEMOCAP, HERE, __doc__, epochs=10, batch_size=4, learning_rate=1e-5)
    args = parser.parse_args(argv)
    utils.setup_logging()
    device = utils.resolve_device(args.device)
    seeds = utils.seed_list(args)
    checkpoint = args.save_dir / "text.bin"

    # Data: one dialogue-prefix sample per utterance, in CSV order (read once, shared by all seeds)
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    utils.log_start("IEMOCAP text", args, device, {s: len(v) for s, v in samples.items()})

    # Objective: cross-entropy on the mask token's logits (of the current seed's encoder, built below)
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Per seed: a fresh model, then train with dev selection (--train False: evaluate the saved checkpoint
    # on test); text<tag>.bin at each new best dev score, its .json after every epoch, plots at the end
    results = {}
    for seed in seeds:
        # Model: RoBERTa-large (+ speaker tokens) -> Linear(hidden, D) -> Linear(D, 6)
        utils.set_seed(seed, args.deterministic)
        encoder, field = model.load_encoder("text", args.pretrained_dir, IEMOCAP.num_classes)
        loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, seed)
        results[seed] = utils.fit(
            stage="IEMOCAP text", model=encoder, step=step, loaders=loaders, args=utils.seed_args(args, seed),
            device=device, checkpoint=args.save_dir / f"text{utils.seed_tag(seed, seeds)}.bin",
            producer="IEMOCAP/text.py", label_names=IEMOCAP.labels)

    # Artifacts of several seeds: text_seeds.json/.md; the best dev seed's files also as text.bin/.json
    return utils.finish_seeds(results, checkpoint, IEMOCAP.labels)


if __name__ == "__main__":
    utils.run(main)
