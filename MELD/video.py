"""Stage 4 - fine-tune TimeSformer on 8 stored frames per MELD utterance (docs/METHOD.md §2).

    python MELD/video.py                    # --train False evaluates the saved checkpoint on test

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, MELD/feature/video/{split}/{dia}_{utt}.npy
        (from video_feature_extract.py), pretrained_model/{timesformer-base-finetuned-k400,videomae-base}
Writes  MELD/MELD/save_model/video.bin, video.json

MELD frames come from whole clips; substituted (black) clips are listed by stage 3.
"""

import sys
from pathlib import Path

import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import dataset, model, utils  # noqa: E402


def main(argv=None) -> dict:
    # Flags: the reference's names, MELD's defaults
    parser = utils.training_parser(MELD, HERE, __doc__, epochs=10, batch_size=4, learning_rate=1e-5)
    args = parser.parse_args(argv)
    utils.setup_logging()
    device = utils.resolve_device(args.device)
    utils.set_seed(args.seed)
    checkpoint = args.save_dir / "video.bin"

    # Data: one sample per utterance; its stored uint8 frames are normalised on load
    samples = dataset.load_samples(MELD, args.data_dir)
    utils.log_start("MELD video", args, device, {s: len(v) for s, v in samples.items()})

    # Model: TimeSformer -> CLS token -> Linear(hidden, 7)
    encoder, field = model.load_encoder("video", args.pretrained_dir, MELD.num_classes, args.feature_dir)

    # Objective: cross-entropy
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Loop: train with dev selection (--train False: evaluate the saved checkpoint on test); artifacts:
    # video.bin at each new best dev score, video.json after every epoch
    loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, args.seed)
    return utils.fit(stage="MELD video", model=encoder, step=step, loaders=loaders, args=args, device=device,
                     checkpoint=checkpoint, producer="MELD/video.py", label_names=MELD.labels)


if __name__ == "__main__":
    utils.run(main)
