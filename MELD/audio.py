"""Stage 2 - fine-tune data2vec-audio on MELD utterance audio (docs/METHOD.md §2).

    python MELD/audio.py                    # --train False evaluates the saved checkpoint on test

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv, the mp4 clips, pretrained_model/data2vec-audio-base-960h
Writes  MELD/MELD/save_model/audio.bin, audio.json, audio_substitutions.tsv (unreadable audio)

MELD audio is decoded straight from the mp4 clips (AAC, 44.1/48 kHz stereo -> 16 kHz mono),
normalised by the feature extractor and cut to 400000 samples; batches are right-padded with a mask.
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
    checkpoint = args.save_dir / "audio.bin"

    # Data: one sample per utterance; missing, corrupt or silent clips become silence and is reported
    samples = dataset.load_samples(MELD, args.data_dir)
    utils.log_start("MELD audio", args, device, {s: len(v) for s, v in samples.items()})
    report = utils.SubstitutionReport()

    # Model: data2vec-audio (time masking length 3) -> first frame -> Linear(hidden, 7)
    encoder, field = model.load_encoder("audio", args.pretrained_dir, MELD.num_classes)

    # Objective: cross-entropy
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Loop: train with dev selection (--train False: evaluate the saved checkpoint on test)
    loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, args.seed)
    result = utils.fit(stage="MELD audio", model=encoder, step=step, loaders=loaders, args=args, device=device,
                       checkpoint=checkpoint, producer="MELD/audio.py", label_names=MELD.labels, report=report)

    # Artifacts: audio.bin + audio.json (written by fit), the substitution report
    report.write(utils.substitution_report_path(checkpoint, args.train))
    return result


if __name__ == "__main__":
    utils.run(main)
