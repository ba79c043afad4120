"""Stored video frames: uint8 after resize/centre-crop, normalised on load (SPEC section 2).

The reference stored float32 normalised tensors (4.8 MB per utterance at 224 px);
uint8 ``(8, 3, H, W)`` is 4x smaller and the loaded tensor equals the image
processor's ``pixel_values`` (the resize runs on uint8 in both paths).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import atomic_path
from .media.video import FRAMES_PER_CLIP


class FrameCodec:
    """Resize/crop frames with the videomae image processor; normalise them on load."""

    def __init__(self, image_processor) -> None:
        self.processor = image_processor
        crop = image_processor.crop_size
        self.height, self.width = int(crop["height"]), int(crop["width"])
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def resize_crop(self, frames: np.ndarray) -> np.ndarray:
        """(8, H, W, 3) RGB uint8 -> (8, 3, h, w) uint8: the processor without rescale/normalise."""
        out = self.processor(list(frames), do_rescale=False, do_normalize=False, return_tensors="pt")
        pixels = out["pixel_values"][0]
        return pixels.round().clamp(0, 255).to(torch.uint8).numpy()

    def black(self) -> np.ndarray:
        """The substitute for an utterance whose frames cannot be read (SPEC section 6)."""
        return np.zeros((FRAMES_PER_CLIP, 3, self.height, self.width), dtype=np.uint8)

    def normalize(self, stored: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (8, 3, h, w) -> float32 ``pixel_values`` as the processor would give them."""
        pixels = torch.as_tensor(np.asarray(stored)).to(torch.float32) * self.scale
        return (pixels - self.mean) / self.std


def frame_file(feature_dir: Path, split: str, key: str) -> Path:
    """``<feature_dir>/video/<split>/<Dialogue_ID>_<Utterance_ID>.npy`` (SPEC section 0)."""
    return Path(feature_dir) / "video" / split / f"{key}.npy"


def save_frames(path: Path, frames: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(frames, dtype=np.uint8))


def load_frames(path: Path) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"frame file {path} not found: run video_feature_extract.py for this dataset first"
        )
    frames = np.load(path, allow_pickle=False)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"{path}: expected uint8 frames of shape (8, 3, H, W), got {frames.dtype} {frames.shape}")
    return frames
