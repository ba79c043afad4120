"""Torch datasets over utterance samples; each run loads only the modalities it needs.

A *field* turns a :class:`~magtkd.data.Sample` into one modality's input and
collates a list of them into padded tensors. The KD stage, for example, asks for
``text`` + ``audio`` only (the reference decoded audio AND video for every batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import Sample
from .frames import FrameCodec, frame_file, load_frames
from .media.audio import MediaError, TARGET_SAMPLE_RATE, decode_audio
from .prompt import build_prompt, encode_prompt, left_pad

MAX_AUDIO_SAMPLES = 400_000  # SPEC section 2: keep at most the first 400000 samples


class TextField:
    """Prompt ids (last 511 tokens + mask), left-padded."""

    name = "text"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def load(self, sample: Sample) -> list[int]:
        return encode_prompt(self.tokenizer, build_prompt(sample.texts, sample.speakers))

    def collate(self, items: list[list[int]]) -> dict[str, torch.Tensor]:
        ids, mask = left_pad(items, self.tokenizer.pad_token_id)
        return {"text_ids": ids, "text_mask": mask}


class AudioField:
    """16 kHz mono -> data2vec feature extractor -> first 400000 samples; right-padded with a mask."""

    name = "audio"

    def __init__(self, feature_extractor, max_samples: int = MAX_AUDIO_SAMPLES) -> None:
        self.extractor = feature_extractor
        self.max_samples = max_samples

    def load(self, sample: Sample) -> tuple[np.ndarray, tuple[str, str] | None]:
        utt = sample.utterance
        try:
            # Decoding stops early for clips that run for minutes (MELD's bad cuts);
            # the normalisation then sees the same samples it would keep anyway.
            wave = decode_audio(utt.audio_path, TARGET_SAMPLE_RATE, max_samples=self.max_samples)
            problem = None
        except MediaError as err:
            wave, problem = np.zeros(TARGET_SAMPLE_RATE, dtype=np.float32), (str(utt.audio_path), err.reason)
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
    """Stored uint8 frames -> normalised ``pixel_values`` (8, 3, H, W)."""

    name = "video"

    def __init__(self, codec: FrameCodec, feature_dir: Path) -> None:
        self.codec = codec
        self.feature_dir = Path(feature_dir)

    def load(self, sample: Sample) -> torch.Tensor:
        utt = sample.utterance
        return self.codec.normalize(load_frames(frame_file(self.feature_dir, utt.split, utt.key)))

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


def make_loader(dataset: SampleDataset, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        collate_fn=dataset.collate, generator=generator, persistent_workers=False,
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
