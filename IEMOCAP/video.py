"""Stage 4 - fine-tune TimeSformer on 8 stored frames per IEMOCAP utterance (docs/METHOD.md §2).

    python IEMOCAP/video.py                 # --train False evaluates the saved checkpoint on test

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, IEMOCAP/feature/video/{split}/{dia}_{utt}.npy
        (from video_feature_extract.py), pretrained_model/{timesformer-base-finetuned-k400,videomae-base}
Writes  IEMOCAP/IEMOCAP/save_model/video.bin, video.json
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
    checkpoint = args.save_dir / "video.bin"

    # Data: one sample per utterance; its stored uint8 frames are normalised on load
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    utils.log_start("IEMOCAP video", args, device, {s: len(v) for s, v in samples.items()})

    # Model: TimeSformer -> CLS token -> Linear(hidden, 6)
    encoder, field = model.load_encoder("video", args.pretrained_dir, IEMOCAP.num_classes, args.feature_dir)

    # Objective: cross-entropy
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Loop: train with dev selection (--train False: evaluate the saved checkpoint on test); artifacts:
    # video.bin at each new best dev score, video.json after every epoch
    loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, args.seed)
    return utils.fit(stage="IEMOCAP video", model=encoder, step=step, loaders=loaders, args=args, device=device,
                     checkpoint=checkpoint, producer="IEMOCAP/video.py", label_names=IEMOCAP.labels)


if __name__ == "__main__":
    utils.run(main)
