"""Media writers (synthetic data) and decoders (all stages): docs/METHOD.md §2, §6."""

from __future__ import annotations

import logging
import pickle

import av
import numpy as np
import pytest

from transformers import Wav2Vec2FeatureExtractor

from magtkd import media as media_mod
from magtkd.dataset import AudioField, Sample, SampleDataset, Utterance
from magtkd.media import (
    FRAMES_PER_CLIP, TARGET_SAMPLE_RATE, MediaError, decode_audio, decode_windows, sample_positions,
)
from magtkd.utils import SubstitutionReport, note_problems
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


def _expected(window, n_frames: int = N_FRAMES, fps: int = FPS) -> list[int] | None:
    """Frame indices the docs/METHOD.md §2 rule selects: frames with t0 <= i/fps < t1, then sample_positions."""
    inside = [i for i in range(n_frames) if window is None or window[0] <= i / fps < window[1]]
    if not inside:
        return None
    return [inside[p] for p in sample_positions(len(inside))]


@pytest.fixture(scope="module")
def indexed_avi(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "dialogue.avi"
    write_video(path, (index_frame(i, 48, 64, color=(30 + i % 200, 90, 160)) for i in range(N_FRAMES)), FPS)
    return path


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


# ---------------------------------------------------------------- sampling rule


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, []),
        (1, [0] * 8),
        (3, [0, 1, 2, 2, 2, 2, 2, 2]),
        (8, [0, 1, 2, 3, 4, 5, 6, 7]),
        (17, [1, 3, 5, 7, 9, 11, 13, 15]),
        (100, [11, 23, 35, 47, 59, 71, 83, 95]),
    ],
)
def test_sample_positions(n, expected):
    assert FRAMES_PER_CLIP == 8
    assert sample_positions(n) == expected


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


def test_decode_windows_selects_exact_frames_with_one_open(indexed_avi, monkeypatch):
    windows = [
        (0.0, 1.0),  # frames 0..9: boundary frame 10 (t = 1.0) excluded
        (0.0, 1.5),  # 15 frames (step 1); an inclusive end would give 16 (step 2)
        (0.5, 1.3),  # frames 5..12; an exclusive start would give 7 frames
        (1.0, 5.0),  # overlaps the next one
        (2.05, 2.35),  # 3 frames -> last repeated
        (2.0, 12.0),
        (18.0, 40.0),  # runs past the end
        (25.0, 30.0),  # entirely beyond the end
        (3.0, 3.0),  # empty
        None,  # whole clip
        (0.0, 1.0),  # duplicate of the first
    ]
    log = _count_opens(monkeypatch, media_mod)
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
    assert _expected((2.05, 2.35)) == [21, 22, 23, 23, 23, 23, 23, 23]
    assert _expected((0.0, 1.5)) == list(range(8))
    assert _expected((0.5, 1.3)) == list(range(5, 13))


def test_decode_windows_h264_mp4_with_audio(tmp_path):
    # MELD-like clip: H.264 (B-frames reorder decoding) plus a stereo AAC stream.
    path = tmp_path / "dia0_utt0.mp4"
    n = 40
    write_video(path, (index_frame(i, 48, 64) for i in range(n)), 25, codec="libx264",
                audio=tone(300, n / 25, 44100, channels=2), sample_rate=44100)
    whole, part = decode_windows(path, [None, (0.2, 0.9)])
    assert _indices(whole) == _expected(None, n_frames=n, fps=25)
    assert _indices(part) == _expected((0.2, 0.9), n_frames=n, fps=25)


def test_decode_windows_stops_after_last_window(indexed_avi, monkeypatch):
    log = _count_opens(monkeypatch, media_mod)
    clips = decode_windows(indexed_avi, [(0.5, 2.0), (1.0, 4.0)])
    assert [_indices(c) for c in clips] == [_expected((0.5, 2.0)), _expected((1.0, 4.0))]
    assert log["frames"] <= 41 + 10  # frames up to t = 4.0, plus decoder look-ahead slack
    assert log["frames"] < N_FRAMES


def test_decode_windows_keeps_frames_decoded_before_a_failure(indexed_avi, monkeypatch):
    _count_opens(monkeypatch, media_mod, fail_after=45)  # frames 0..44 decode, then an error
    clips = decode_windows(indexed_avi, [(0.0, 2.0), (4.2, 6.0), (5.0, 8.0), None])
    assert _indices(clips[0]) == _expected((0.0, 2.0))
    assert _indices(clips[1]) == [42, 43, 44, 44, 44, 44, 44, 44]  # partial window: what was read
    assert clips[2] is None
    assert _indices(clips[3]) == _expected(None, n_frames=45)


def test_candidate_positions_cover_every_count_in_range():
    for lo, hi in [(0, 70), (60, 75), (186, 214), (2790, 2970)]:
        kept = media_mod._candidates(lo, hi)
        for n in range(lo, hi + 1):
            assert set(sample_positions(n)) <= kept, (lo, hi, n)
    assert len(media_mod._candidates(2790, 2970)) < 0.1 * 2790


def test_long_window_holds_few_frames(indexed_avi, monkeypatch):
    held = []
    real_pick = media_mod._pick

    def recording_pick(window):
        held.append((window.count, len(window.frames)))
        return real_pick(window)

    monkeypatch.setattr(media_mod, "_pick", recording_pick)
    log = _count_opens(monkeypatch, media_mod)
    whole, early = decode_windows(indexed_avi, [None, (0.0, 3.0)])
    assert _indices(whole) == _expected(None) and _indices(early) == _expected((0.0, 3.0))
    assert log["opens"] == 1
    assert sorted(held) == [(30, 30), (N_FRAMES, held[-1][1])]  # a short window holds all
    assert held[-1][1] <= 48  # the 200-frame clip holds only its candidate positions


def test_mispredicted_frame_count_is_decoded_again_exactly(indexed_avi, monkeypatch):
    # Wrong rate metadata (as in variable-frame-rate files): the first pass holds
    # the wrong positions, a second pass with the exact count fixes them.
    monkeypatch.setattr(media_mod, "_estimate_frames", lambda stream, start, end: 600.0)
    log = _count_opens(monkeypatch, media_mod)
    windows = [None, (2.0, 14.0), (0.0, 0.5)]
    clips = decode_windows(indexed_avi, windows)
    assert [_indices(c) for c in clips] == [_expected(w) for w in windows]
    assert log["opens"] == 2


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
    x = decode_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    aac_frame = 1024 * TARGET_SAMPLE_RATE / sr
    assert abs(len(x) - seconds * TARGET_SAMPLE_RATE) <= 2 * aac_frame
    assert abs(_peak_hz(x, TARGET_SAMPLE_RATE) - freq) < 2.0
    # Mean down-mix of two identical channels keeps the amplitude (0.3).
    assert np.abs(x[4000:-4000]).max() == pytest.approx(0.3, abs=0.02)


def test_decode_wav_at_target_rate_is_exact(tmp_path):
    samples = tone(300, 1.0, 16000, noise=0.05, rng=np.random.default_rng(2))[:, 0]
    write_wav(tmp_path / "mono.wav", samples, 16000)
    x = decode_audio(tmp_path / "mono.wav")
    assert x.shape == samples.shape
    assert np.abs(x - samples).max() <= 1.5 / 32767
    stereo = np.stack([samples, -0.5 * samples], axis=1)
    write_wav(tmp_path / "stereo.wav", stereo, 16000)
    assert np.abs(decode_audio(tmp_path / "stereo.wav") - stereo.mean(axis=1)).max() <= 1.5 / 32767


def test_decode_audio_max_samples_stops_early(tmp_path, monkeypatch):
    path = tmp_path / "long.mp4"
    write_video(path, (index_frame(i, 48, 64) for i in range(30)), 1, codec="libx264",
                audio=tone(250, 30.0, 44100, channels=2), sample_rate=44100)
    full = decode_audio(path)
    log = _count_opens(monkeypatch, media_mod)
    head = decode_audio(path, max_samples=16000)
    assert head.shape == (16000,)
    assert np.abs(head - full[:16000]).max() < 1e-4
    assert log["opens"] == 1 and log["frames"] < 100  # ~1300 AAC frames in the clip
    write_wav(tmp_path / "long.wav", tone(250, 3.0, 16000), 16000)
    assert decode_audio(tmp_path / "long.wav", max_samples=1234).shape == (1234,)


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
            decode_audio(path)
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
