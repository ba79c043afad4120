"""Windowed video decoding and the authors' frame rule (`magtkd.media`; docs/METHOD.md §2, §6)."""

from __future__ import annotations

import pickle
from pathlib import Path

import av
import numpy as np
import pytest

from helpers import NON_FINITE, all_utterances, authors_loop
from IEMOCAP.config import IEMOCAP
from magtkd import media
from magtkd.media import (clip_step, decode_windows, FRAMES_PER_CLIP, kept_indices, MediaError, TARGET_SAMPLE_RATE,
                          window_frames, window_step)
from magtkd.synthetic.media import index_frame, read_index, tone, write_video, write_wav


FPS = 10

N_FRAMES = 200


class _CountingContainer:
    """Wraps a PyAV input container: counts decode calls / frames, can fail midway."""

    def __init__(self, container, log: dict, fail_after: int | None) -> None:
        self._c = container
        self._log = log
        self._fail_after = fail_after

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._c.close()

    @property
    def streams(self):
        return self._c.streams

    def decode(self, *args, **kwargs):
        self._log["decodes"] += 1
        for n, frame in enumerate(self._c.decode(*args, **kwargs)):
            if self._fail_after is not None and n >= self._fail_after:
                raise av.error.InvalidDataError(1094995529, "injected corruption")
            self._log["frames"] += 1
            yield frame


def _count_opens(monkeypatch, module, fail_after: int | None = None) -> dict:
    log = {"opens": 0, "decodes": 0, "frames": 0}
    real_open = module._open

    def counting_open(path):
        log["opens"] += 1
        return _CountingContainer(real_open(path), log, fail_after)

    monkeypatch.setattr(module, "_open", counting_open)
    return log


def _indices(clip: np.ndarray) -> list[int]:
    return [read_index(frame) for frame in clip]


def _expected(window, n_frames: int = N_FRAMES, fps: int = FPS, frame_count: int | None = None):
    """The authors' OpenCV loop, written out over a video of ``n_frames`` frames (docs/METHOD.md §2).

    Reads frames in order; OpenCV reports position ``i + 1`` after reading frame ``i``.
    IEMOCAP window (ts, te): in the window when ts*fps <= position <= te*fps,
    step = floor(fps * (te - ts) / 8). Whole clip (None): step = frame_count // 8.
    A frame is kept when the running count in the window (1 for its first frame)
    is a multiple of step (a step of 0 counts as 1); the first 8; the last kept
    one repeated; None when nothing is kept.
    """
    if window is None:
        step = (n_frames if frame_count is None else frame_count) // 8
    else:
        step = int(fps * (window[1] - window[0]) / 8)
    step = max(step, 1)
    kept, count = [], 0
    for i in range(n_frames):
        position = i + 1
        if window is None or window[0] * fps <= position <= window[1] * fps:
            count += 1
            if count % step == 0:
                kept.append(i)
                if len(kept) == 8:
                    break
    return kept + [kept[-1]] * (8 - len(kept)) if kept else None


@pytest.fixture(scope="module")
def indexed_avi(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "dialogue.avi"
    write_video(path, (index_frame(i, 48, 64, color=(30 + i % 200, 90, 160)) for i in range(N_FRAMES)), FPS)
    return path


def test_window_rule_pieces():
    assert FRAMES_PER_CLIP == 8
    # 1-based positions: [1.0 s, 2.0 s] at 10 fps are positions 10..20, i.e. frames 9..19.
    assert window_frames(10, 1.0, 2.0) == (9, 19)
    assert window_frames(10, 0.0, 1.0) == (0, 9)
    assert window_frames(10, 2.05, 2.35) == (20, 22)
    assert window_frames(29.97, 3.5, 6.25) == (104, 186)  # ceil(104.895) - 1, floor(187.31) - 1
    # Step from the window's duration, not from the frames in it; 0 becomes 1.
    assert window_step(10, 1.0, 2.0) == 1 and window_step(10, 0.0, 8.0) == 10
    assert window_step(29.97, 3.5, 6.25) == 10  # floor(82.42 / 8)
    assert window_step(10, 2.05, 2.35) == 1
    assert clip_step(100) == 12 and clip_step(7) == 1 and clip_step(0) == 1
    assert kept_indices(104, 186, 10) == [113, 123, 133, 143, 153, 163, 173, 183]
    assert kept_indices(0, 1e9, 12) == [11, 23, 35, 47, 59, 71, 83, 95]
    assert kept_indices(20, 22, 1) == [20, 21, 22]  # the caller repeats 22
    assert kept_indices(5, 4, 1) == []
    with pytest.raises(ValueError):
        kept_indices(0, 10, 0)


def test_decode_windows_selects_the_authors_frames_with_one_open(indexed_avi, monkeypatch):
    windows = [
        (0.0, 1.0),  # positions 1..10 = frames 0..9, step 1
        (0.0, 1.5),  # frames 0..14, step 1
        (0.5, 1.3),  # positions 5..13 = frames 4..12
        (1.0, 5.0),  # overlaps the next one; step 5
        (2.05, 2.35),  # frames 20..22 -> last repeated
        (2.0, 12.0),
        (15.0, 21.0),  # runs past the end of the 200-frame video: 7 kept, the last repeated
        (18.0, 40.0),  # past the end, and the first multiple of its step (27) lies beyond it
        (25.0, 30.0),  # entirely beyond the end
        (3.0, 3.0),  # position 30 only: one frame
        (3.01, 3.05),  # no position inside
        None,  # whole clip, step 200 // 8
        (0.0, 1.0),  # duplicate of the first
    ]
    log = _count_opens(monkeypatch, media)
    clips = decode_windows(indexed_avi, windows)
    assert log["opens"] == 1 and log["decodes"] == 1
    assert len(clips) == len(windows)
    for window, clip in zip(windows, clips):
        expected = _expected(window)
        if expected is None:
            assert clip is None, window
        else:
            assert clip.shape == (8, 48, 64, 3) and clip.dtype == np.uint8
            assert _indices(clip) == expected, window
    # The rule by hand, where it differs from "timestamps in [ts, te), step = frames // 8":
    assert _indices(clips[4]) == [20, 21, 22, 22, 22, 22, 22, 22]
    assert _indices(clips[2]) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert _indices(clips[3]) == [13, 18, 23, 28, 33, 38, 43, 48]
    assert _indices(clips[6]) == [155, 162, 169, 176, 183, 190, 197, 197]
    assert clips[7] is None and clips[8] is None and clips[10] is None
    assert _indices(clips[9]) == [29] * 8
    assert _indices(clips[11]) == [24, 49, 74, 99, 124, 149, 174, 199]


def test_decode_windows_channel_order(indexed_avi):
    rgb, bgr = decode_windows(indexed_avi, [(0.0, 1.0)], "rgb")[0], decode_windows(indexed_avi, [(0.0, 1.0)], "bgr")[0]
    assert np.array_equal(bgr, rgb[..., ::-1])
    corner = rgb[0, -1, -1]  # background (30 + i, 90, 160) survives coding to within a few levels
    assert abs(int(corner[0]) - 30) < 8 and abs(int(corner[2]) - 160) < 8
    with pytest.raises(ValueError, match="channel_order"):
        decode_windows(indexed_avi, [None], "yuv")


def test_decode_windows_h264_mp4_with_audio(tmp_path):
    # MELD-like clip: H.264 (B-frames reorder decoding) plus a stereo AAC stream.
    path = tmp_path / "dia0_utt0.mp4"
    n = 40
    write_video(path, (index_frame(i, 48, 64) for i in range(n)), 25, codec="libx264",
                audio=tone(300, n / 25, 44100, channels=2), sample_rate=44100)
    counts: dict = {}
    whole, part = decode_windows(path, [None, (0.2, 0.9)], frame_counts=counts)
    assert _indices(whole) == _expected(None, n_frames=n, fps=25) == [4, 9, 14, 19, 24, 29, 34, 39]
    assert _indices(part) == _expected((0.2, 0.9), n_frames=n, fps=25)
    assert counts == {0: (n, n)}  # metadata and decoded counts agree


def test_whole_clip_step_follows_the_metadata_count(indexed_avi, monkeypatch):
    # Wrong metadata (real MELD clips have it): the authors' rule still decides, from the metadata
    # count, and both counts are returned for the report.
    monkeypatch.setattr(media, "metadata_frame_count", lambda container, stream, fps: 100)
    counts: dict = {}
    (whole,) = decode_windows(indexed_avi, [None], frame_counts=counts)
    assert _indices(whole) == _expected(None, frame_count=100) == [11, 23, 35, 47, 59, 71, 83, 95]
    assert counts == {0: (100, N_FRAMES)}
    monkeypatch.setattr(media, "metadata_frame_count", lambda container, stream, fps: 1000)
    (whole,) = decode_windows(indexed_avi, [None], frame_counts=counts)
    assert _indices(whole) == _expected(None, frame_count=1000) == [124] * 8  # step 125: one frame


def test_decode_windows_stops_after_last_kept_frame(indexed_avi, monkeypatch):
    log = _count_opens(monkeypatch, media)
    clips = decode_windows(indexed_avi, [(0.5, 2.0), (1.0, 4.0)])
    assert [_indices(c) for c in clips] == [_expected((0.5, 2.0)), _expected((1.0, 4.0))]
    assert _indices(clips[1]) == [11, 14, 17, 20, 23, 26, 29, 32]  # frames 9..39, step 3
    assert log["frames"] <= 33 + 10  # frames up to the last kept one, plus decoder look-ahead slack
    assert log["frames"] < N_FRAMES


def test_decode_windows_keeps_frames_decoded_before_a_failure(indexed_avi, monkeypatch):
    _count_opens(monkeypatch, media, fail_after=45)  # frames 0..44 decode, then an error
    clips = decode_windows(indexed_avi, [(0.0, 2.0), (4.2, 6.0), (5.0, 8.0), None])
    assert _indices(clips[0]) == _expected((0.0, 2.0))
    assert _indices(clips[1]) == [42, 44, 44, 44, 44, 44, 44, 44]  # partial window: what was read
    assert clips[2] is None
    assert _indices(clips[3]) == [24] * 8


def test_windows_hold_only_their_kept_frames(indexed_avi, monkeypatch):
    held = []
    real_finish = media._finish

    def recording_finish(window):
        held.append(len(window.frames))
        return real_finish(window)

    monkeypatch.setattr(media, "_finish", recording_finish)
    whole, long = decode_windows(indexed_avi, [None, (0.0, 19.0)])
    assert _indices(whole) == _expected(None) and _indices(long) == _expected((0.0, 19.0))
    assert held == [8, 8]  # 200- and 190-frame windows hold 8 frames each


def test_decode_windows_media_errors(tmp_path):
    missing = tmp_path / "missing.avi"
    with pytest.raises(MediaError, match="missing.avi") as err:
        decode_windows(missing, [None])
    assert err.value.path == str(missing) and "not found" in err.value.reason
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # crosses DataLoader workers
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="corrupt.mp4"):
        decode_windows(corrupt, [(0.0, 1.0)])
    wav = tmp_path / "audio_only.wav"
    write_wav(wav, tone(200, 0.2, 16000), 16000)
    with pytest.raises(MediaError, match="no video stream"):
        decode_windows(wav, [None])
    assert decode_windows(missing, []) == []


def test_decoded_frames_are_the_method_window_and_positions(generated):
    utts = all_utterances(IEMOCAP, generated / "datasets" / "IEMOCAP")
    by_video: dict[Path, list] = {}
    for utt in utts:
        by_video.setdefault(utt.video_path, []).append(utt)
    video, group = max(by_video.items(), key=lambda item: len(item[1]))
    windows = [(max(u.start - 1.0, 0.0), u.end + 1.0) for u in group]
    clips = media.decode_windows(video, windows)  # all windows of the dialogue in one call
    assert len(clips) == len(group)
    for (t0, t1), clip in zip(windows, clips):
        assert [read_index(frame) for frame in clip] == authors_loop(video, t0, t1)
    # Single windows elsewhere, and short windows (n < 8: all frames, last repeated).
    for utt in utts[::17]:
        window = (max(utt.start - 1.0, 0.0), utt.end + 1.0)
        (clip,) = media.decode_windows(utt.video_path, [window])
        assert [read_index(f) for f in clip] == authors_loop(utt.video_path, *window)
    # Short windows (positions 1..4; position 10 only; none): last frame repeated, or no frame.
    short = media.decode_windows(video, [(0.0, 0.45), (1.0, 1.05), (0.0, 0.0)])
    assert [read_index(f) for f in short[0]] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert [read_index(f) for f in short[1]] == [9] * 8
    assert short[2] is None  # no position in the window (the stage substitutes black frames)


def test_a_track_lost_to_truncation_is_not_reported_as_a_clip_without_that_stream(generated, tmp_path):
    clip = next((generated / "datasets" / "MELD" / "train_splits").glob("*.mp4"))
    data = clip.read_bytes()
    moov = data.rfind(b"moov") - 4
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: moov + 200])
    assert media.missing_stream(cut, "audio").reason == (
        f"no audio stream: file truncated ('moov' box at byte {moov} needs "
        f"{int.from_bytes(data[moov:moov + 4], 'big')} bytes, the file ends 200 bytes in)")
    assert media.missing_stream(clip, "video").reason == "no video stream"  # whole: the stream is simply absent
    wav = next((generated / "datasets" / "IEMOCAP").rglob("*.wav"))  # not an mp4: nothing to say about boxes
    assert media.missing_stream(wav, "audio").reason == "no audio stream"


def test_resampling_checks_its_result_too():
    with pytest.raises(MediaError) as err:
        media.resample_audio("clip.wav", np.array([0.0, np.inf, 0.0] * 100, dtype=np.float32), 22050)
    assert err.value.reason == NON_FINITE and err.value.path == "clip.wav"
    ok = media.resample_audio("clip.wav", np.zeros(22050, dtype=np.float32), 22050)
    assert ok.dtype == np.float32 and ok.shape == (TARGET_SAMPLE_RATE,)
