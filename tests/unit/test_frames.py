"""Stored frames (`magtkd.frames`; docs/METHOD.md §2): resize/crop as the image processor, and the
frame-count report of a MELD clip."""

from __future__ import annotations

import numpy as np
import pytest

from magtkd import media
from magtkd.dataset import load_split
from magtkd.frames import frame_file
from magtkd.media import FRAMES_PER_CLIP
from magtkd.pretrained import load_image_processor
from MELD.config import MELD


@pytest.mark.parametrize("edge, crop", [(224, 224), (32, 32), (40, 36)])
def test_resize_crop_equals_the_image_processor(edge, crop):
    # FrameCodec.resize_crop calls the processor's resize/crop on the 8 frames at once (issue 15's
    # speed-up); the stored pixels must be exactly those of the processor called on the frame list.
    import torch
    from transformers import VideoMAEImageProcessor

    from magtkd.frames import FrameCodec

    processor = VideoMAEImageProcessor(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop})
    codec = FrameCodec(processor)
    rng = np.random.default_rng(edge)
    for height, width in [(480, 640), (239, 321), (100, 60), (20, 30)]:
        frames = rng.integers(0, 256, (FRAMES_PER_CLIP, height, width, 3), dtype=np.uint8)
        frames[:, : height // 2] = frames[:, :1]  # smooth rows too, not only noise
        out = processor(list(frames), do_rescale=False, do_normalize=False, return_tensors="pt")
        expected = out["pixel_values"][0].round().clamp(0, 255).to(torch.uint8).numpy()
        got = codec.resize_crop(frames)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        assert got.shape == expected.shape == (FRAMES_PER_CLIP, 3, crop, crop)
        assert np.array_equal(got, expected), (height, width)


def test_meld_clip_with_wrong_frame_count_metadata_is_reported(generated, tmp_path, monkeypatch):
    from magtkd import frames as dataset

    utt = load_split(MELD, generated / "datasets" / "MELD", "dev")[0]
    dataset._init_worker(load_image_processor(generated / "pretrained_model"))
    (job,) = dataset.plan_jobs(MELD, [utt], tmp_path)
    assert job.windows == (None,) and dataset.run_job(job) == []  # metadata agrees with the decoded count
    with media.av.open(str(utt.video_path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert 8 < decoded < 24
    # Metadata too high: the authors' step (metadata // 8) still decides; the clip is listed with both counts.
    monkeypatch.setattr(media, "metadata_frame_count", lambda container, stream, fps: 24)
    assert dataset.run_job(job) == [(f"dev/{utt.key}", str(utt.video_path),
                                     f"metadata frame count 24, decoded {decoded}", dataset.FRAME_COUNT_NOTE)]
    assert frame_file(tmp_path, "dev", utt.key).is_file()
    # So high that no frame is kept (step beyond the clip): black frames, both counts in the reason.
    monkeypatch.setattr(media, "metadata_frame_count", lambda container, stream, fps: 1000)
    assert dataset.run_job(job) == [(f"dev/{utt.key}", str(utt.video_path), "no frame in the utterance's time "
                                     f"window; metadata frame count 1000, decoded {decoded}", "black frames")]
