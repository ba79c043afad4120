"""``<DS>/video.py`` (stage 4, docs/METHOD.md §2): one epoch on the frames stage 3 stored from the
generated data."""

from __future__ import annotations

import pytest

from helpers import flags, generated_paths, one_epoch_then_evaluate, script


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_video_trains_one_epoch_on_stored_frames_and_its_checkpoint_evaluates_alike(dataset, generated, tmp_path):
    paths = generated_paths(generated, dataset, tmp_path)
    script(dataset, "video_feature_extract").main(flags(paths, num_workers=0))
    one_epoch_then_evaluate(dataset, "video", "video", paths)
