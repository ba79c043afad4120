"""What a dataset is to the shared code: its description (``<DS>/config.py`` fills a `DatasetSpec`),
the split names, the label padding, the text-prompt variants (docs/METHOD.md §1, §2), and how the other ERC
codebases' feature pickles see the dataset (`CommunityConventions`, docs/METHOD.md §9).

A ground-floor module: standard library only, so a dataset's ``config.py`` and every parser
import it without loading torch or any media or Hugging Face library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping


SPLITS: tuple[str, ...] = ("train", "dev", "test")


DATASETS: tuple[str, ...] = ("IEMOCAP", "MELD")  # the dataset folders of the repository


SPEAKER_MAP = "speaker2id.json"  # MELD: speaker name -> global id, written by MELD/preprocessing.py


LABEL_PAD = -1  # label of unlabelled utterances (a conversation) and of padded positions in a fusion batch


# The text prompt variants of text.py --prompt (docs/METHOD.md §2, Prompt variants); `magtkd.prompt.build_prompt`
# builds them.
PROMPTS = ("full", "no_template", "no_speakers", "no_context")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the shared code needs to know about one dataset; ``<DS>/config.py`` defines it."""

    name: str
    labels: tuple[str, ...]  # index order = class id
    csv_names: Mapping[str, str]  # split -> prepared CSV file name inside the data folder
    required_columns: tuple[str, ...]
    audio_column: str  # column holding the file audio is decoded from (wav or mp4)
    video_column: str
    # Seconds added on both sides of [Start_Time, End_Time] for the video window;
    # None means the whole clip (docs/METHOD.md §2, "Video").
    video_window_pad: float | None
    speaker_of: Callable[[str], str]  # CSV ``Speaker`` value -> speaker key within a dialogue
    global_speaker_ids: bool  # fusion speaker ids: False = order in dialogue, True = speaker2id.json
    n_speaker: int  # fusion speaker-embedding rows without the padding row (docs/METHOD.md §5)
    data_readme: str = ""  # what the data folder must contain (used in error messages)
    raw_files: tuple[str, ...] = ()  # glob patterns (in the data folder) of the raw release preparation reads

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def label_id(self, emotion: str) -> int:
        return self.labels.index(emotion)

    # Default locations, relative to the dataset script folder (``<repo>/<DS>``),
    # so scripts work from any working directory (docs/METHOD.md §0 layout).
    def default_data_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve().parent / "datasets" / self.name

    def default_pretrained_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve().parent / "pretrained_model"

    def default_save_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve() / self.name / "save_model"

    def default_feature_dir(self, script_dir: Path) -> Path:
        return Path(script_dir).resolve() / "feature"


@dataclass(frozen=True)
class CommunityConventions:
    """How the ERC codebases that read the community's per-dialogue feature pickles (SDT, M3Net, GraphSmile,
    MMGCN and their descendants) see a dataset; ``<DS>/config.py`` fills one and ``<DS>/export_features.py``
    writes by it (docs/METHOD.md §9)."""

    loader: str  # which of the peers' dataset classes reads the file: "IEMOCAP" or "MELD"
    labels: tuple[str, ...]  # their label order (position = their class id)
    train_splits: tuple[str, ...]  # our splits whose dialogues are their training dialogues (trainVid)
    valid_splits: tuple[str, ...]  # our splits in the layout's validation slot, where it has one
    speakers: str  # "letter": the speaker's letter ('M'/'F'); "one_hot": by appearance in the dialogue
    speaker_slots: int = 0  # width of a one-hot speaker vector
    dialogue_keys: str = "offset"  # "name": the dialogue's name; "offset": Dialogue_ID + the earlier splits' ids
    sentiments: tuple[str, ...] = ()  # their sentiment order, from the CSVs' Sentiment column (MELD)
