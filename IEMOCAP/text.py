"""Stage 1 - fine-tune the RoBERTa-large prompt encoder on IEMOCAP (docs/METHOD.md §2).

    python IEMOCAP/text.py                  # --train False evaluates the saved checkpoint on test

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, pretrained_model/roberta-large
Writes  IEMOCAP/IEMOCAP/save_model/text.bin (epoch with the best dev weighted F1) and text.json

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
    utils.set_seed(args.seed)
    checkpoint = args.save_dir / "text.bin"

    # Data: one dialogue-prefix sample per utterance, in CSV order
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    utils.log_start("IEMOCAP text", args, device, {s: len(v) for s, v in samples.items()})

    # Model: RoBERTa-large (+ speaker tokens) -> Linear(hidden, D) -> Linear(D, 6)
    encoder, field = model.load_encoder("text", args.pretrained_dir, IEMOCAP.num_classes)

    # Objective: cross-entropy on the mask token's logits
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Loop: train with dev selection (--train False: evaluate the saved checkpoint on test); artifacts:
    # text.bin at each new best dev score, text.json after every epoch
    loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, args.seed)
    return utils.fit(stage="IEMOCAP text", model=encoder, step=step, loaders=loaders, args=args, device=device,
                     checkpoint=checkpoint, producer="IEMOCAP/text.py", label_names=IEMOCAP.labels)


if __name__ == "__main__":
    utils.run(main)
