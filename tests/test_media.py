"""Media writers (synthetic data) and decoders (all stages): docs/METHOD.md §2, §6."""

from __future__ import annotations

import logging
import pickle

import av
import numpy as np
import pytest

from transformers import Wav2Vec2FeatureExtractor

from magtkd import decoder, media
from magtkd.dataset import Sample, Utterance
from magtkd.loaders import AudioField, SampleDataset
from magtkd.decoder import decode_audio_isolated
from magtkd.media import (FRAMES_PER_CLIP, MediaError, TARGET_SAMPLE_RATE, clip_step, decode_windows, kept_indices, window_frames, window_step)
from magtkd.artifacts import SubstitutionReport
from magtkd.loaders import note_problems
from magtkd.synthetic.media import index_frame, read_index, tone, write_video, write_wav

FPS = 10
N_FRAMES = 200


# ---------------------------------------------------------------- helpers


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


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


# ---------------------------------------------------------------- sampling rule


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


# ---------------------------------------------------------------- writers


@pytest.mark.parametrize("suffix, codec", [(".avi", "mpeg4"), (".mp4", "libx264")])
@pytest.mark.parametrize("size", [(48, 64), (120, 160)])
def test_index_round_trip_through_lossy_codecs(tmp_path, suffix, codec, size):
    indices = [0, 1, 2, 5, 255, 256, 1023, 1024, 2047, 2048, 3000, 3999, 4000, 4095, 1365, 2730]
    rng = np.random.default_rng(0)
    colors = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in indices]
    path = tmp_path / f"clip{suffix}"
    write_video(path, (index_frame(i, *size, color=c) for i, c in zip(indices, colors)), 25, codec=codec)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == {"mpeg4": "mpeg4", "libx264": "h264"}[codec]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert [f.shape for f in frames] == [(*size, 3)] * len(indices)
    assert [read_index(f) for f in frames] == indices
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_write_video_with_audio_and_wav(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, np.stack([index_frame(i, 48, 64) for i in range(10)]), 10, codec="libx264",
                audio=tone(440, 1.0, 48000, channels=2), sample_rate=48000)
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.streams.audio[0].channels == 2
        assert container.streams.audio[0].rate == 48000
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "clip.xyz", [index_frame(0, 48, 64)], 10)
    write_wav(tmp_path / "a.wav", tone(100, 0.5, 8000, channels=2), 8000)
    with av.open(str(tmp_path / "a.wav")) as container:
        stream = container.streams.audio[0]
        assert (stream.rate, stream.channels, stream.codec_context.name) == (8000, 2, "pcm_s16le")


# ---------------------------------------------------------------- windowed video decoding


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


# ---------------------------------------------------------------- audio decoding


@pytest.mark.parametrize("sr", [44100, 48000])
def test_decode_audio_from_stereo_aac_mp4(tmp_path, sr):
    seconds, freq = 2.0, 440.0
    path = tmp_path / f"clip_{sr}.mp4"
    write_video(path, (index_frame(i, 48, 64) for i in range(20)), 10, codec="libx264",
                audio=tone(freq, seconds, sr, channels=2), sample_rate=sr)
    x = decode_audio_isolated(path)
    assert x.dtype == np.float32 and x.ndim == 1
    aac_frame = 1024 * TARGET_SAMPLE_RATE / sr
    assert abs(len(x) - seconds * TARGET_SAMPLE_RATE) <= 2 * aac_frame
    assert abs(_peak_hz(x, TARGET_SAMPLE_RATE) - freq) < 2.0
    # Mean down-mix of two identical channels keeps the amplitude (0.3).
    assert np.abs(x[4000:-4000]).max() == pytest.approx(0.3, abs=0.02)


def test_decode_wav_at_target_rate_is_exact(tmp_path):
    samples = tone(300, 1.0, 16000, noise=0.05, rng=np.random.default_rng(2))[:, 0]
    write_wav(tmp_path / "mono.wav", samples, 16000)
    x = decode_audio_isolated(tmp_path / "mono.wav")
    assert x.shape == samples.shape
    assert np.abs(x - samples).max() <= 1.5 / 32767
    stereo = np.stack([samples, -0.5 * samples], axis=1)
    write_wav(tmp_path / "stereo.wav", stereo, 16000)
    assert np.abs(decode_audio_isolated(tmp_path / "stereo.wav") - stereo.mean(axis=1)).max() <= 1.5 / 32767


def test_audio_field_normalises_the_whole_clip_then_keeps_the_head(tmp_path):
    # docs/METHOD.md §2, as the authors: mean/variance of the WHOLE clip, then the first max_samples.
    # A quiet first second and a loud rest make the two orders differ clearly.
    rng = np.random.default_rng(5)
    wave = np.concatenate([0.05 * tone(250, 1.0, 16000)[:, 0], 0.6 * tone(400, 3.0, 16000)[:, 0]])
    wave = wave + 0.01 * rng.standard_normal(len(wave)).astype(np.float32)
    path = tmp_path / "long.wav"
    write_wav(path, wave, 16000)
    full = decode_audio_isolated(path)
    assert full.shape == wave.shape  # the whole clip is decoded
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    values, problem = AudioField(extractor, max_samples=8000).load(_utterance_sample("test", 0, 0, path))
    assert problem is None and values.shape == (8000,)
    whole = (full - full.mean()) / np.sqrt(full.var() + 1e-7)
    head_only = (full[:8000] - full[:8000].mean()) / np.sqrt(full[:8000].var() + 1e-7)
    assert np.abs(values - whole[:8000]).max() < 1e-4
    assert np.abs(values - head_only).max() > 1.0  # normalising only the kept part would differ


def _utterance_sample(split: str, dialogue: int, utterance: int, path) -> Sample:
    utt = Utterance(split=split, row=utterance + 1, dialogue_id=dialogue, utterance_id=utterance, text="hi",
                    speaker="Joey", speaker_key="Joey", emotion="joy", label=3, audio_path=path,
                    video_path=path, start=None, end=None)
    return Sample(utt, ("hi",), (0,))


def test_bad_audio_raises_and_audio_field_substitutes_silence(tmp_path, caplog):
    missing = tmp_path / "missing.wav"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    silent_video = tmp_path / "video_only.mp4"
    write_video(silent_video, (index_frame(i, 48, 64) for i in range(5)), 10, codec="libx264")
    for path, reason in [(missing, "not found"), (corrupt, "cannot open"), (silent_video, "no audio stream")]:
        with pytest.raises(MediaError, match=path.name) as err:
            decode_audio_isolated(path)
        assert reason in err.value.reason and err.value.path == str(path)

    # The audio stages load through AudioField: an unreadable file becomes one second of
    # silence, the problem travels with the batch, and note_problems puts it in the report.
    good = tmp_path / "good.wav"
    write_wav(good, tone(300, 0.25, 16000), 16000)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    samples = [_utterance_sample("train", 1, 0, corrupt), _utterance_sample("train", 1, 1, corrupt),
               _utterance_sample("dev", 1, 1, good)]
    dataset = SampleDataset(samples, [AudioField(extractor)])
    items = [dataset[i] for i in range(len(samples))]
    first, problem = items[0]["audio"]
    assert first.dtype == np.float32 and first.shape == (TARGET_SAMPLE_RATE,) and not first.any()
    assert problem[0] == str(corrupt) and "cannot open" in problem[1]
    assert items[2]["audio"][0].shape == (4000,) and items[2]["audio"][1] is None
    assert AudioField(extractor, max_samples=100).load(samples[1])[0].shape == (100,)

    batch = dataset.collate(items)
    assert batch["audio_problems"] == [problem, problem, None]
    assert batch["audio_mask"].sum(-1).tolist() == [TARGET_SAMPLE_RATE, TARGET_SAMPLE_RATE, 4000]
    report = SubstitutionReport()
    with caplog.at_level(logging.WARNING, logger="magtkd"):
        note_problems(batch, dataset, report)
    assert [(s.key, s.path, s.replacement) for s in report.items] == [
        ("train/1_0", str(corrupt), "silence"), ("train/1_1", str(corrupt), "silence")]
    assert all("cannot open" in s.reason for s in report.items)
    assert sum(str(corrupt) in r.getMessage() for r in caplog.records) == 1  # warned once per file
    note_problems(batch, dataset, None)  # no report: nothing to record, no error


# ---------------------------------------------------------------- stored frames: resize/crop


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


# ---------------------------------------------------------------- audio cache (decoded once)


def _count_decodes(monkeypatch, fail: bool = False) -> list:
    """Count (or refuse) calls of the decoder the audio cache uses."""

    calls: list = []
    real = decoder.decode_audio_isolated

    def decode(path, *args, **kwargs):
        calls.append(str(path))
        if fail:
            raise AssertionError(f"decoded {path} again")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(decoder, "decode_audio_isolated", decode)
    return calls


def _clips(tmp_path):
    wav = tmp_path / "utt.wav"  # IEMOCAP: a wav at 22.05 kHz, so that the cached samples are resampled ones
    write_wav(wav, tone(330, 0.7, 22050, noise=0.05, rng=np.random.default_rng(1)), 22050)
    mp4 = tmp_path / "dia1_utt2.mp4"  # MELD: stereo AAC in an mp4
    write_video(mp4, (index_frame(i, 48, 64) for i in range(8)), 10, codec="libx264",
                audio=tone(440, 0.8, 48000, channels=2), sample_rate=48000)
    return wav, mp4


def test_audio_cache_hit_is_bit_identical_and_does_not_decode(tmp_path, monkeypatch):
    from magtkd.decoder import AudioCache

    cache = AudioCache(tmp_path / "cache")
    for path in _clips(tmp_path):
        direct = decoder.decode_audio_isolated(path)
        calls = _count_decodes(monkeypatch)
        first = cache.load(path)
        assert calls == [str(path)] and first.dtype == np.float32 and np.array_equal(first, direct)
        assert cache.entry(path).is_file()
        monkeypatch.undo()
        _count_decodes(monkeypatch, fail=True)
        again = AudioCache(tmp_path / "cache").load(path)  # a later stage: a new cache object, same folder
        assert again.dtype == np.float32 and np.array_equal(again, direct)
        monkeypatch.undo()
    assert not list((tmp_path / "cache").glob(".*.tmp"))

    # The field the audio stages load through gives the same values with and without the cache.
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    sample = _utterance_sample("train", 1, 2, tmp_path / "dia1_utt2.mp4")
    plain, _ = AudioField(extractor).load(sample)
    _count_decodes(monkeypatch, fail=True)
    cached, problem = AudioField(extractor, cache_dir=tmp_path / "cache").load(sample)
    assert problem is None and np.array_equal(plain, cached)


def test_audio_cache_decodes_a_changed_file_again(tmp_path, monkeypatch):
    import os

    from magtkd.decoder import AudioCache

    wav, _ = _clips(tmp_path)
    cache = AudioCache(tmp_path / "cache")
    calls = _count_decodes(monkeypatch)
    before = cache.load(wav)
    cache.load(wav)
    assert len(calls) == 1
    stat = wav.stat()
    os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: same size, new mtime
    assert np.array_equal(cache.load(wav), before) and len(calls) == 2
    write_wav(wav, tone(500, 0.5, 22050), 22050)  # replaced by another clip
    after = cache.load(wav)
    assert len(calls) == 3 and after.shape != before.shape
    native_sr, mono = media.decode_audio_native(wav)  # the same decoding, not counted
    assert np.array_equal(after, media.resample_audio(wav, mono, native_sr))
    cache.load(wav)
    assert len(calls) == 3


def test_audio_cache_corrupt_entry_is_decoded_again_and_failures_are_not_stored(tmp_path, monkeypatch, caplog):
    from magtkd.decoder import AudioCache

    wav, _ = _clips(tmp_path)
    cache = AudioCache(tmp_path / "cache")
    expected = cache.load(wav)
    entry = cache.entry(wav)
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk
    calls = _count_decodes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="magtkd"):
        assert np.array_equal(cache.load(wav), expected)
    assert calls == [str(wav)]
    assert any(str(entry) in r.getMessage() and "decoding the file again" in r.getMessage() for r in caplog.records)
    assert np.array_equal(AudioCache(tmp_path / "cache").load(wav), expected) and len(calls) == 1  # rewritten

    # An unreadable clip raises every time (each stage reports it) and leaves no entry.
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for _ in range(2):
        with pytest.raises(MediaError, match="cannot open"):
            cache.load(corrupt)
    assert calls.count(str(corrupt)) == 2 and not cache.entry(corrupt).exists()
    with pytest.raises(MediaError, match="not found"):
        cache.load(tmp_path / "missing.wav")


def test_audio_cache_replays_partial_decode_notes_and_writes_atomically(tmp_path, monkeypatch, caplog):
    from magtkd.decoder import AudioCache

    wav, _ = _clips(tmp_path)
    real = decoder.decode_audio_isolated

    def partial(path, sample_rate, notes):
        notes.append("partial decode: audio stopped at 0.40 s (injected)")
        return real(path, sample_rate)[:6400]

    monkeypatch.setattr(decoder, "decode_audio_isolated", partial)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    field = AudioField(extractor, cache_dir=tmp_path / "cache")
    sample = _utterance_sample("train", 1, 0, wav)
    first = field.load(sample)
    _count_decodes(monkeypatch, fail=True)
    second = field.load(sample)  # from the cache: the substitution is reported again
    assert first[1] == second[1] == (str(wav), "partial decode: audio stopped at 0.40 s (injected)",
                                     "audio decoded before the error")
    assert np.array_equal(first[0], second[0]) and len(first[0]) == 6400

    # A write that fails midway leaves neither an entry nor a temporary file; the clip is still returned.
    monkeypatch.undo()
    other = tmp_path / "other.wav"
    write_wav(other, tone(200, 0.3, 16000), 16000)

    def broken_savez(handle, **arrays):
        handle.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    cache = AudioCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="magtkd"):
        assert np.array_equal(cache.load(other), decoder.decode_audio_isolated(other))
    assert not cache.entry(other).exists() and not list((tmp_path / "cache").glob(".*.tmp"))
    assert any("cannot write the audio cache" in r.getMessage() for r in caplog.records)


def test_audio_cache_flags():
    import argparse
    from pathlib import Path

    from magtkd.cli import add_audio_cache_flags, audio_cache_dir

    parser = add_audio_cache_flags(argparse.ArgumentParser())

    def folder(argv):
        args = parser.parse_args(argv)
        return audio_cache_dir(args.audio_cache, args.audio_cache_dir, Path("feat"))

    assert folder([]) == Path("feat") / "audio_cache"
    assert folder(["--audio_cache_dir", "/x/c"]) == Path("/x/c")
    assert folder(["--audio_cache", "False"]) is None
