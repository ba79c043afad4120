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
    seeds = utils.seed_list(args)
    checkpoint = args.save_dir / "video.bin"

    # Data (read once for all seeds): one sample per utterance; its stored uint8 frames are normalised on load
    samples = dataset.load_samples(MELD, args.data_dir)
    utils.log_start("MELD video", args, device, {s: len(v) for s, v in samples.items()})

    # Objective: cross-entropy (on the current seed's encoder, built below)
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Per seed: a fresh model, then train with dev selection (--train False: evaluate the saved checkpoint
    # on test); video<tag>.bin at each new best dev score, its .json after every epoch, plots at the end
    results = {}
    for seed in seeds:
        # Model: TimeSformer -> CLS token -> Linear(hidden, 7)
        utils.set_seed(seed, args.deterministic)
        encoder, field = model.load_encoder("video", args.pretrained_dir, MELD.num_classes, args.feature_dir)
        loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, seed)
        results[seed] = utils.fit(
            stage="MELD video", model=encoder, step=step, loaders=loaders, args=utils.seed_args(args, seed),
            device=device, checkpoint=args.save_dir / f"video{utils.seed_tag(seed, seeds)}.bin",
            producer="MELD/video.py", label_names=MELD.labels)

    # Artifacts of several seeds: video_seeds.json/.md; the best dev seed's files also as video.bin/.json
    return utils.finish_seeds(results, checkpoint, MELD.labels)


if __name__ == "__main__":
    utils.run(main)
