"""Stage 4 - fine-tune TimeSformer on 8 stored frames per IEMOCAP utterance (docs/METHOD.md §2).

    python IEMOCAP/video.py                 # --train False evaluates the saved checkpoint on test

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, IEMOCAP/feature/video/{split}/{dia}_{utt}.npy
        (from video_feature_extract.py), pretrained_model/{timesformer-base-finetuned-k400,videomae-base}
Writes  IEMOCAP/IEMOCAP/save_model/video.bin, video.json,
        video_curves.png, video_confusion.png; --seeds S1 S2 ...: those per seed (video_seed<S>.*),
        the best dev seed's also under the names above, and video_seeds.json/.md (mean ± std)
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
    checkpoint = args.save_dir / "video.bin"

    # Data (read once for all seeds): one sample per utterance; its stored uint8 frames are normalised on load
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    utils.log_start("IEMOCAP video", args, device, {s: len(v) for s, v in samples.items()})

    # Objective: cross-entropy (on the current seed's encoder, built below)
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Per seed: a fresh model, then train with dev selection (--train False: evaluate the saved checkpoint
    # on test); video<tag>.bin at each new best dev score, its .json after every epoch, plots at the end
    results = {}
    for seed in seeds:
        # Model: TimeSformer -> CLS token -> Linear(hidden, 6)
        utils.set_seed(seed, args.deterministic)
        encoder, field = model.load_encoder("video", args.pretrained_dir, IEMOCAP.num_classes, args.feature_dir)
        loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, seed)
        results[seed] = utils.fit(
            stage="IEMOCAP video", model=encoder, step=step, loaders=loaders, args=utils.seed_args(args, seed),
            device=device, checkpoint=args.save_dir / f"video{utils.seed_tag(seed, seeds)}.bin",
            producer="IEMOCAP/video.py", label_names=IEMOCAP.labels)

    # Artifacts of several seeds: video_seeds.json/.md; the best dev seed's files also as video.bin/.json
    return utils.finish_seeds(results, checkpoint, IEMOCAP.labels)


if __name__ == "__main__":
    utils.run(main)
