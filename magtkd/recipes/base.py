"""The per-dataset description every stage reads (labels, CSV schema, speaker rule, defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

SPLITS: tuple[str, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class FusionDefaults:
    """Per-dataset defaults of the fusion stage (SPEC section 5)."""

    audio_feature: str  # "audio" or "audio_kd"
    video_feature: str  # "video" or "video_kd"
    alpha: float  # weight of the audio-anchor KD term
    beta: float  # weight of the video-anchor KD term
    feature_loss: bool  # add L_feat to the anchor KD terms
    n_speaker: int  # rows of the speaker embedding, without the padding row


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that differs between IEMOCAP and MELD; stages take one of these."""

    name: str
    labels: tuple[str, ...]
    csv_names: Mapping[str, str]  # split -> prepared CSV file name inside the data folder
    required_columns: tuple[str, ...]
    audio_column: str  # column holding the file audio is decoded from (wav or mp4)
    video_column: str
    # Seconds added on both sides of [Start_Time, End_Time] for the video window;
    # None means the whole clip (SPEC section 2, "Window").
    video_window_pad: float | None
    speaker_of: Callable[[str], str]  # CSV ``Speaker`` value -> speaker key within a dialogue
    global_speaker_ids: bool  # fusion speaker ids: False = order in dialogue, True = speaker2id.json
    learning_rates: Mapping[str, float]  # stage -> default --learning_rate
    kd_logit_weight: float  # weight of L_logit in the KD student objective (SPEC section 3)
    kd_feature_weight: float  # weight of L_feat in the KD student objective
    fusion: FusionDefaults
    data_readme: str = ""  # what the data folder must contain (used in error messages)
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def label_id(self, emotion: str) -> int:
        return self.labels.index(emotion)

    # Default locations, relative to the dataset script folder (``<repo>/<DS>``),
    # so scripts work from any working directory (SPEC section 0 layout).
    def default_data_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve().parent / "datasets" / self.name

    def default_pretrained_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve().parent / "pretrained_model"

    def default_save_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve() / self.name / "save_model"

    def default_feature_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve() / "feature"


# Names of the four pretrained folders inside --pretrained_dir, with their hub ids.
PRETRAINED = {
    "roberta-large": "FacebookAI/roberta-large",
    "data2vec-audio-base-960h": "facebook/data2vec-audio-base-960h",
    "videomae-base": "MCG-NJU/videomae-base",
    "timesformer-base-finetuned-k400": "facebook/timesformer-base-finetuned-k400",
}
