"""A folder flag pointed one level too high (`magtkd.artifacts.found_below`; docs/METHOD.md §0): the authors'
download nests MELD's features as ``MAGTKD/MELD/MELD/feature``; the error for a missing pickle or checkpoint
names the folders below that hold it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import dataset_spec
from magtkd.artifacts import feature_path, found_below
from magtkd.checkpoints import CheckpointError, read_state_dict
from magtkd.extract import check_first_stage_checkpoints
from magtkd.pickles import load_features
from magtkd.synthetic.features import write_synthetic_features
from magtkd.utils import FeatureFileError


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unpacked archive: MAGTKD/IEMOCAP/feature, MAGTKD/MELD/MELD/feature and the checkpoints beside them."""
    root = tmp_path_factory.mktemp("unpacked") / "MAGTKD"
    write_synthetic_features(root / "IEMOCAP" / "feature", dataset_spec("IEMOCAP"), 2, 4, 0)
    write_synthetic_features(root / "MELD" / "MELD" / "feature", dataset_spec("MELD"), 2, 4, 0)
    (root / "MELD" / "MELD" / "save_model").mkdir()
    torch.save({"w": torch.zeros(1)}, root / "MELD" / "MELD" / "save_model" / "text.bin")
    (root / ".hidden" / "feature").mkdir(parents=True)
    feature_path(root / ".hidden" / "feature", "test").write_bytes(b"")
    return root


def test_a_feature_dir_above_the_pickles_names_where_they_are(download: Path):
    with pytest.raises(FeatureFileError) as err:
        load_features(feature_path(download / "MELD", "test"))
    nested = download / "MELD" / "MELD" / "feature"
    assert f"pass --feature_dir {nested}" in str(err.value)
    assert found_below(download, "first_stage_train_features.pkl") == [download / "IEMOCAP" / "feature", nested]
    with pytest.raises(FeatureFileError) as err:
        load_features(feature_path(download / "MELD" / "MELD" / "save_model", "test"))
    assert "below it" not in str(err.value)  # nothing below: the plain message


def test_a_save_dir_above_the_checkpoints_names_where_they_are(download: Path):
    with pytest.raises(CheckpointError, match=f"pass --save_dir {download / 'MELD' / 'MELD' / 'save_model'}"):
        read_state_dict(download / "MELD" / "text.bin", "MELD/text.py")
    with pytest.raises(CheckpointError, match="pass --save_dir .*MELD/save_model"):
        check_first_stage_checkpoints(dataset_spec("MELD"), download)


def test_the_search_stops_at_its_depth_and_skips_hidden_folders(tmp_path: Path):
    deep = tmp_path / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    (deep / "x.pkl").write_bytes(b"")
    (tmp_path / "a" / "x.pkl").write_bytes(b"")
    assert found_below(tmp_path, "x.pkl") == [tmp_path / "a"]  # e is 5 levels down: not searched
    assert found_below(tmp_path / "a", "x.pkl") == [deep]  # the folder itself is not below itself; e is 4 down
