"""First-stage data as torch sees it: the text, audio and video fields that turn a sample into model
input, the sample dataset and its loaders (sharded under torchrun), and `SampleBatches`, the engine's
view of them (docs/METHOD.md §2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import runtime
from .artifacts import SubstitutionReport, check_complete, frames_record
from .dataset import Sample
from .decoder import AudioCache
from .engine import FitConfig, check_finite_logits
from .frames import FrameCodec, frame_file, load_frames
from .media import TARGET_SAMPLE_RATE, MediaError
from .predictions import ID_COLUMNS, SplitOutputs, utterance_ids
from .prompt import build_prompt, encode_prompt, left_pad
from .runtime import GlobalBatch, autocast
from .spec import PROMPTS, SPLITS


MAX_AUDIO_SAMPLES = 400_000  # docs/METHOD.md §2: keep at most the first 400000 samples


class TextField:
    """Prompt ids (last 511 tokens + mask), left-padded; ``prompt``: the `build_prompt` variant."""

    name = "text"

    def __init__(self, tokenizer, prompt: str = "full") -> None:
        if prompt not in PROMPTS:
            raise ValueError(f"prompt variant must be one of {', '.join(PROMPTS)}, got {prompt!r}")
        self.tokenizer, self.prompt = tokenizer, prompt

    def load(self, sample: Sample) -> list[int]:
        return encode_prompt(self.tokenizer, build_prompt(sample.texts, sample.speakers, self.prompt))

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad(items, self.tokenizer.pad_token_id)
        return {"text_ids": ids, "text_mask": mask}


class AudioField:
    """16 kHz mono, whole clip -> data2vec feature extractor -> first 400000 samples; right-padded with a mask.

    ``cache_dir``: where decoded clips are stored for later epochs and stages (`AudioCache`); None decodes
    every time.
    """

    name = "audio"

    def __init__(self, feature_extractor, max_samples: int = MAX_AUDIO_SAMPLES,
                 cache_dir: str | Path | None = None) -> None:
        self.extractor = feature_extractor
        self.max_samples = max_samples
        self.cache = AudioCache(cache_dir)

    def load(self, sample: Sample) -> tuple[np.ndarray, tuple[str, str] | None]:
        utt = sample.utterance
        try:
            # Decoded once (then read from the cache), in a supervised child process: a clip that
            # crashes or hangs the decoder is substituted.
            notes: list[str] = []
            wave = self.cache.load(utt.audio_path, TARGET_SAMPLE_RATE, notes=notes)
            problem = (str(utt.audio_path), "; ".join(notes), "audio decoded before the error") if notes else None
        except MediaError as err:
            wave, problem = np.zeros(TARGET_SAMPLE_RATE, dtype=np.float32), (str(utt.audio_path), err.reason)
        # As the authors: normalise the WHOLE clip (its mean and variance), then keep
        # the first max_samples (docs/METHOD.md §2); a minutes-long clip costs a few MB.
        values = self.extractor(wave, sampling_rate=TARGET_SAMPLE_RATE, return_tensors="np")["input_values"][0]
        return np.asarray(values[: self.max_samples], dtype=np.float32), problem

    def collate(self, items: list[tuple[np.ndarray, Any]]) -> dict[str, Any]:
        waves = [w for w, _ in items]
        length = max(len(w) for w in waves)
        values = torch.zeros(len(waves), length)
        mask = torch.zeros(len(waves), length, dtype=torch.long)
        for i, w in enumerate(waves):
            values[i, : len(w)] = torch.from_numpy(w)
            mask[i, : len(w)] = 1
        return {"audio_values": values, "audio_mask": mask, "audio_problems": [p for _, p in items]}


class VideoField:
    """Stored uint8 frames (8, 3, H, W), as stored: `magtkd.encoders.VideoEncoder` normalises them on the
    model's device (a quarter of the fp32 bytes through workers, pinned memory and the copy; ``codec``'s
    statistics, `FrameCodec.normalize`)."""

    name = "video"

    def __init__(self, codec: FrameCodec, feature_dir: Path) -> None:
        self.codec = codec
        self.feature_dir = Path(feature_dir)
        check_complete(frames_record(self.feature_dir), f"the stored frames in {self.feature_dir / 'video'}",
                       "video_feature_extract.py")

    def load(self, sample: Sample) -> torch.Tensor:
        utt = sample.utterance
        return torch.from_numpy(load_frames(frame_file(self.feature_dir, utt.split, utt.key)))

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"video_pixels": torch.stack(items)}


class SampleDataset(Dataset):
    """Samples with the requested fields; items carry the label and the sample index."""

    def __init__(self, samples: Sequence[Sample], fields: Sequence[Any]) -> None:
        self.samples = list(samples)
        self.fields = list(fields)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item = {"index": index, "label": sample.utterance.label}
        for field in self.fields:
            item[field.name] = field.load(sample)
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "index": torch.tensor([it["index"] for it in items]),
            "labels": torch.tensor([it["label"] for it in items]),
        }
        for field in self.fields:
            batch.update(field.collate([it[field.name] for it in items]))
        return batch


def make_loader(dataset: SampleDataset, batch_size: int, shuffle: bool, num_workers: int | None,
                seed: int = 0, device: torch.device | None = None) -> DataLoader:
    """A loader over ``dataset`` feeding ``device``; ``shuffle`` draws from a generator seeded with ``seed``.

    Under torchrun each rank loads its shard: shuffled loaders through a DistributedSampler
    (``seed`` + epoch), ordered ones every ``world_size``-th sample without padding, so that
    gathering the ranks' outputs by ``batch["index"]`` covers every sample once. Workers
    (``num_workers``; None: `runtime.loader_workers`, 4 on CUDA) are persistent and prefetch the next
    batches while the model computes; for CUDA the batches come in page-locked memory, so the
    ``non_blocking`` copies of `to_device` overlap with compute (docs/METHOD.md §2, Input). Iterate it
    through `each_pass`, which keeps the shuffle of every epoch independent of the workers.
    """
    device = device or torch.device("cpu")
    workers = runtime.loader_workers(num_workers, device)
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if runtime.world_size() > 1:
        sampler = runtime.train_sampler(dataset, seed) if shuffle else runtime.EvalShardSampler(len(dataset))
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, collate_fn=dataset.collate, generator=generator, persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )


def each_pass(loader: DataLoader) -> DataLoader:
    """``loader``, for one more pass over it.

    Every pass of a plain loader draws one number from its generator (its workers' base seed) before the
    shuffle; a loader with persistent workers draws it only at its first pass. Drawing it here at every
    later pass keeps the generator's stream, and so the shuffle of every epoch and the saved random states,
    the same with and without workers (docs/METHOD.md §2, Input).
    """
    if loader.persistent_workers and loader.generator is not None and getattr(loader, "_iterator", None) is not None:
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    return loader


def split_loaders(samples: Mapping[str, Sequence[Sample]], fields: Sequence[Any], batch_size: int,
                  num_workers: int | None, seed: int, splits: Sequence[str] = SPLITS, *,
                  device: torch.device | None = None, eval_batch_size: int | None = None) -> dict[str, DataLoader]:
    """One loader per split with the given fields feeding ``device``; only ``train`` is shuffled (by a
    generator seeded with ``seed``); dev and test take ``eval_batch_size`` (``--eval_batch_size``; None:
    ``batch_size``)."""
    return {
        split: make_loader(SampleDataset(samples[split], fields),
                           batch_size if split == "train" else eval_batch_size or batch_size,
                           shuffle=(split == "train"), num_workers=num_workers, seed=seed, device=device)
        for split in splits
    }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def note_problems(batch: Mapping[str, Any], dataset: Any, report: SubstitutionReport | None,
                  replacement: str = "silence") -> None:
    """Record media substitutions carried by a batch (``*_problems`` lists) in the report."""
    if report is None:
        return
    for name, problems in batch.items():
        if not name.endswith("_problems"):
            continue
        for index, problem in zip(batch["index"].tolist(), problems):
            if problem is not None:
                utt = dataset.samples[index].utterance
                report.add_problem(f"{utt.split}/{utt.key}", problem, replacement)


def concat_chunks(chunks: list) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    if torch.is_tensor(chunks[0]):
        return torch.cat(chunks).numpy()
    return np.concatenate(chunks)


def in_dataset_order(index: np.ndarray, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gather per-sample ``outputs`` (rows aligned with ``index``) from every rank and sort them by index."""
    # A rank with an empty shard (more ranks than samples) contributes nothing.
    parts = [p for p in runtime.gather_objects((np.asarray(index), dict(outputs))) if len(p[0])] or [(index, outputs)]
    index = np.concatenate([p[0] for p in parts])
    order = np.argsort(index, kind="stable")
    if len(np.unique(index)) != len(index):
        raise RuntimeError("evaluation shards overlap: a sample was scored on more than one rank")
    return {key: np.concatenate([p[1][key] for p in parts])[order] for key in outputs}


class ObjectiveModule(nn.Module):
    """``objective(model, batch)`` as a module over ``model``, so DistributedDataParallel sees the
    forward pass that produces the loss (its gradient hooks sit on ``model``'s parameters)."""

    def __init__(self, model: nn.Module, objective: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Any) -> torch.Tensor:
        return self.objective(self.model, batch)


class SampleBatches:
    """First-stage data (`magtkd.engine.Batches`): one DataLoader per split (`loaders`); ``objective(model,
    batch)`` is the training loss, ``model.encode(batch)`` gives ``(representation, logits)`` for scoring.

    Under torchrun the model trains inside DistributedDataParallel; each rank scores its shard
    of dev/test and the predictions are gathered in dataset order.
    """

    def __init__(self, loaders: Mapping[str, Any], device: torch.device,
                 report: SubstitutionReport | None = None) -> None:
        self.loaders, self.device, self.report = loaders, device, report
        self.runner: nn.Module | None = None
        if device.type == "cuda":
            # Page-locked batches: the ``non_blocking`` copies of `to_device` are then truly asynchronous.
            for loader in loaders.values():
                loader.pin_memory = True

    @property
    def n_train(self) -> int:
        return len(self.loaders["train"].dataset)

    def updates_per_epoch(self, grad_accum: int) -> int:
        return math.ceil(len(self.loaders["train"]) / grad_accum)

    def global_batch(self, grad_accum: int) -> GlobalBatch:
        return GlobalBatch(self.loaders["train"].batch_size, runtime.world_size(), grad_accum)

    def generators(self) -> list[torch.Generator]:
        return [loader.generator for loader in self.loaders.values() if loader.generator is not None]

    def prepare(self, model: nn.Module, objective: Callable[..., torch.Tensor], seed: int) -> None:
        """Wrap ``objective`` over ``model`` for training (in DistributedDataParallel under torchrun); the
        loaders were seeded when they were built (`make_loader`).

        ``find_unused_parameters``: data2vec's mask embedding only gets a gradient when a
        time mask was drawn for the batch.
        """
        runner: nn.Module = ObjectiveModule(model, objective)
        if runtime.world_size() > 1:
            runner = nn.parallel.DistributedDataParallel(
                runner, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        self.runner = runner

    def micro_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        loader = self.loaders["train"]
        if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
            loader.sampler.set_epoch(epoch)  # a new shuffle of the shards every epoch
        return each_pass(loader)

    def loss(self, batch: dict[str, Any], config: FitConfig) -> torch.Tensor:
        note_problems(batch, self.loaders["train"].dataset, self.report)
        batch = to_device(batch, self.device)
        with autocast(self.device, config.amp, config.amp_dtype):
            return self.runner(batch)

    @torch.inference_mode()
    def evaluate(self, model: nn.Module, split: str, config: FitConfig) -> SplitOutputs:
        """Gold labels, argmax predictions and class probabilities of ``split`` with each utterance's ids,
        in dataset (CSV) order.

        The predictions and probabilities stay on the device until the pass ends and come back in one copy
        each; a row with non-finite logits predicts -1 there, so the same copy carries the finiteness check.
        """
        loader = self.loaders[split]
        index, labels, rows = [], [], []
        for batch in runtime.progress(each_pass(loader), desc=split):
            note_problems(batch, loader.dataset, self.report)
            index.append(batch["index"])
            labels.append(batch["labels"])  # the loader's host copy
            with autocast(self.device, config.amp, config.amp_dtype):
                _, logits = model.encode(to_device(batch, self.device))
            logits = logits.float()
            predicted = torch.where(torch.isfinite(logits).all(-1), logits.argmax(-1), -1)
            # one row per utterance: the prediction (exact in float32), then the class probabilities
            rows.append(torch.cat([predicted[:, None].float(), torch.softmax(logits, dim=-1)], dim=-1))
        outputs = torch.cat(rows).cpu() if rows else torch.zeros(0, 1)
        predicted = outputs[:, 0].long()
        check_finite_logits(bool((predicted >= 0).all()), config.stage, split)
        ordered = in_dataset_order(concat_chunks(index), {"labels": concat_chunks(labels),
                                                          "preds": predicted.numpy(), "probs": outputs[:, 1:].numpy()})
        samples = getattr(loader.dataset, "samples", None)
        ids = utterance_ids([s.utterance for s in samples]) if samples is not None else \
            {column: [""] * len(ordered["labels"]) for column in ID_COLUMNS}
        return SplitOutputs(ordered["labels"], ordered["preds"], ordered["probs"], ids)
