"""Audio decoding in the supervised decoder child, the audio cache, and what the decoder does with
crashing, hanging and non-finite media (`magtkd.decoder`; docs/METHOD.md §2, §6)."""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from transformers import Wav2Vec2FeatureExtractor

from helpers import NON_FINITE, PLAIN_AV, crash_on, utterance_sample, write_float_wav
from magtkd import decoder, media
from magtkd.decoder import decode_audio_isolated, DecoderProcess
from magtkd.loaders import AudioField
from magtkd.media import MediaError, TARGET_SAMPLE_RATE
from magtkd.synthetic.media import index_frame, tone, write_video, write_wav


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


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


def test_a_float_wav_decodes_like_the_pcm_one(tmp_path):
    # The float writer above is read back exactly: the NaN test below tests the check, not the file.
    wave = tone(300, 0.5, 16000)[:, 0]
    write_float_wav(tmp_path / "float.wav", wave, 16000)
    assert np.array_equal(decoder.decode_audio_isolated(tmp_path / "float.wav"), wave.astype(np.float32))


@pytest.mark.parametrize("sample_rate", [16000, 22050])  # at the model's rate, and resampled
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_unreadable_media(tmp_path, sample_rate, bad):
    wave = tone(300, 0.5, sample_rate, channels=2)
    wave[1000, 1] = bad
    path = tmp_path / "nan.wav"
    write_float_wav(path, wave, sample_rate)
    with pytest.raises(MediaError) as err:
        decoder.decode_audio_isolated(path)
    assert err.value.reason == NON_FINITE and err.value.path == str(path)
    with pytest.raises(MediaError, match=r"non-finite samples \(NaN/inf\)"):
        media.decode_audio_native(path)


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
    sample = utterance_sample("train", 1, 2, tmp_path / "dia1_utt2.mp4")
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
    sample = utterance_sample("train", 1, 0, wav)
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


def hang_on(paths: frozenset, path: str, fn, args):
    """A `decoder.run_in_decoder` that hangs for ``paths``, else decodes."""
    if path in paths:
        time.sleep(60)
    return fn(*args)


@pytest.fixture
def clips(tmp_path):
    wav = tmp_path / "a.wav"
    write_wav(wav, tone(300, 0.25, 22050), 22050)
    mp4 = tmp_path / "b.mp4"
    write_video(mp4, (index_frame(i, 48, 64) for i in range(20)), 10, codec="libx264",
                audio=tone(440, 2.0, 44100, channels=2), sample_rate=44100)
    return wav, mp4


def test_an_injected_crash_loses_only_that_file(clips, monkeypatch):
    wav, mp4 = clips
    expected = decoder.decode_audio_isolated(wav)  # the per-process audio decoder child is running now
    monkeypatch.setattr(decoder, "run_in_decoder", functools.partial(crash_on, frozenset({str(mp4)})))
    with pytest.raises(MediaError) as err:  # reaches the child forked before the patch
        decoder.decode_audio_isolated(mp4)
    assert err.value.reason == "decoder crashed (signal 11)" and err.value.path == str(mp4)
    assert np.array_equal(decoder.decode_audio_isolated(wav), expected)  # a fresh child serves the next file
    with DecoderProcess(30) as child:  # video, and any other call, goes through the same hook
        with pytest.raises(MediaError, match=r"decoder crashed \(signal 11\)"):
            child.call(mp4, media.decode_windows, mp4, [None])
        assert child.call(wav, sum, [1, 2]) == 3


def test_an_injected_hang_times_out(clips, monkeypatch):
    wav, mp4 = clips
    monkeypatch.setattr(decoder, "run_in_decoder", functools.partial(hang_on, frozenset({str(mp4)})))
    with DecoderProcess(0.5) as child:
        with pytest.raises(MediaError, match=r"decoder timed out after 0.5 s"):
            child.call(mp4, media.decode_windows, mp4, [None])
        assert child.call(wav, media.decode_windows, wav, []) == []


def test_a_child_forked_during_a_patch_runs_plainly_after_it(clips, monkeypatch):
    wav, mp4 = clips
    monkeypatch.setattr(decoder, "run_in_decoder", functools.partial(crash_on, frozenset({str(mp4)})))
    with DecoderProcess(30).start() as child:  # forked with the patch in its memory
        monkeypatch.undo()
        clip = child.call(mp4, media.decode_windows, mp4, [None])[0]
        assert clip.shape[0] == 8


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_plain_pyav_crashes_on_the_cut_clip(bad_meld, kind):
    path = bad_meld["paths"][f"crash_{kind}"]
    if str(path) in bad_meld["hooked"]:
        pytest.skip(f"no cut of the generated clips crashes this PyAV build's {kind} decoding; isolation is "
                    "tested through decoder.run_in_decoder")
    run = subprocess.run([sys.executable, "-c", PLAIN_AV[kind], str(path)], capture_output=True)
    assert run.returncode < 0


def test_decoder_child_crash_and_timeout_lose_only_that_call(bad_meld, crash_hook, generated):
    healthy = next((generated / "datasets" / "MELD" / "train_splits").glob("*.mp4"))
    crash = bad_meld["paths"]["crash_video"]
    with DecoderProcess(30) as child:
        with pytest.raises(MediaError, match=r"decoder crashed \(signal 11\)") as err:
            child.call(crash, media.decode_windows, crash, [None])
        assert err.value.path == str(crash)
        clip = child.call(healthy, media.decode_windows, healthy, [None])[0]  # a fresh child serves the next file
        assert clip.shape[0] == 8
    with pytest.raises(MediaError, match=r"decoder crashed \(signal 11\)"):
        decoder.decode_audio_isolated(bad_meld["paths"]["crash_audio"])
    with DecoderProcess(0.5) as slow:
        with pytest.raises(MediaError, match=r"decoder timed out after 0.5 s"):
            slow.call("hang.mp4", time.sleep, 30)
        assert slow.call("next.mp4", sum, [1, 2]) == 3
    samples = decoder.decode_audio_isolated(healthy)
    native_sr, mono = media.decode_audio_native(healthy)  # the same decoding in this process
    assert np.array_equal(samples, media.resample_audio(healthy, mono, native_sr))
