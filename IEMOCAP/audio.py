"""Stage 2 - fine-tune data2vec-audio on IEMOCAP utterance audio (docs/METHOD.md §2).

    python IEMOCAP/audio.py                 # --train False evaluates the saved checkpoint on test

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, the wavs, pretrained_model/data2vec-audio-base-960h
Writes  IEMOCAP/IEMOCAP/save_model/audio.bin, audio.json, audio_substitutions.tsv (unreadable wavs)

Audio is decoded to 16 kHz mono, normalised by the feature extractor and cut to
400000 samples; batches are right-padded with an attention mask.
"""

import sys
from pathlib import Path

import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from IEMOCAP.config import IEMOCAP  # noqa: E402
from magtkd import dataset, model, utils  # noqa: E402


def main(argv=None) -> dict:
    # Flags: the reference's names, IEMOCAP's defaults (audio learns at 5e-6 here)
    parser = utils.training_parser(IEMOCAP, HERE, __doc__, epochs=10, batch_size=4, learning_rate=5e-6)
    args = parser.parse_args(argv)
    utils.setup_logging()
    device = utils.resolve_device(args.device)
    utils.set_seed(args.seed)
    checkpoint = args.save_dir / "audio.bin"

    # Data: one sample per utterance; unreadable audio becomes silence and is reported
    samples = dataset.load_samples(IEMOCAP, args.data_dir)
    utils.log_start("IEMOCAP audio", args, device, {s: len(v) for s, v in samples.items()})
    report = utils.SubstitutionReport()

    # Model: data2vec-audio (time masking length 3) -> first frame -> Linear(hidden, 6)
    encoder, field = model.load_encoder("audio", args.pretrained_dir, IEMOCAP.num_classes)

    # Objective: cross-entropy
    def step(batch: dict, train: bool):
        _, logits = encoder.encode(batch)
        return F.cross_entropy(logits.float(), batch["labels"]), logits

    # Loop: train with dev selection (--train False: evaluate the saved checkpoint on test)
    loaders = dataset.loaders(samples, [field], args.batch_size, args.num_workers, args.seed)
    result = utils.fit(stage="IEMOCAP audio", model=encoder, step=step, loaders=loaders, args=args, device=device,
                       checkpoint=checkpoint, producer="IEMOCAP/audio.py", label_names=IEMOCAP.labels, report=report)

    # Artifacts: audio.bin + audio.json (written by fit), the substitution report
    report.write(utils.substitution_report_path(checkpoint, args.train))
    return result


if __name__ == "__main__":
    utils.run(main)
