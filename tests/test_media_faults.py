"""Decoder faults: non-finite samples are unreadable media (issue 24 item 1); fault injection
into the supervised decoder child through `decoder.run_in_decoder`."""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pytest
from transformers import Wav2Vec2FeatureExtractor

from magtkd import decoder, media
from magtkd.dataset import Sample, Utterance
from magtkd.loaders import AudioField
from magtkd.decoder import DecoderProcess
from magtkd.media import MediaError, TARGET_SAMPLE_RATE
from magtkd.synthetic.media import index_frame, tone, write_video, write_wav

NON_FINITE = "non-finite samples (NaN/inf) in the decoded audio"


def write_float_wav(path, samples: np.ndarray, sample_rate: int) -> None:
    """A WAVE_FORMAT_IEEE_FLOAT (3) file of float32 ``samples`` (n,) or (n, channels), header by hand."""
    data = np.ascontiguousarray(samples, dtype="<f4")
    channels = 1 if data.ndim == 1 else data.shape[1]
    payload = data.tobytes()
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (3).to_bytes(2, "little") + channels.to_bytes(2, "little")
           + sample_rate.to_bytes(4, "little") + (sample_rate * 4 * channels).to_bytes(4, "little")
           + (4 * channels).to_bytes(2, "little") + (32).to_bytes(2, "little"))
    body = b"WAVE" + fmt + b"data" + len(payload).to_bytes(4, "little") + payload
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)


def _utterance_sample(path) -> Sample:
    utt = Utterance(split="test", row=1, dialogue_id=0, utterance_id=0, text="hi", speaker="Joey",
                    speaker_key="Joey", emotion="joy", label=3, audio_path=path, video_path=path,
                    start=None, end=None)
    return Sample(utt, ("hi",), (0,))


# ---------------------------------------------------------------- non-finite samples


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


def test_resampling_checks_its_result_too():
    with pytest.raises(MediaError) as err:
        media.resample_audio("clip.wav", np.array([0.0, np.inf, 0.0] * 100, dtype=np.float32), 22050)
    assert err.value.reason == NON_FINITE and err.value.path == "clip.wav"
    ok = media.resample_audio("clip.wav", np.zeros(22050, dtype=np.float32), 22050)
    assert ok.dtype == np.float32 and ok.shape == (TARGET_SAMPLE_RATE,)


def test_audio_field_substitutes_silence_for_non_finite_samples(tmp_path):
    path = tmp_path / "nan.wav"
    wave = tone(300, 0.5, 16000)[:, 0]
    wave[::7] = np.nan
    write_float_wav(path, wave, 16000)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=TARGET_SAMPLE_RATE, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    values, problem = AudioField(extractor).load(_utterance_sample(path))
    assert values.shape == (TARGET_SAMPLE_RATE,) and not values.any()  # one second of silence
    assert problem[0] == str(path) and NON_FINITE in problem[1]


# ---------------------------------------------------------------- fault injection: decoder.run_in_decoder


def crash_on(paths: frozenset, path: str, fn, args):
    """A `decoder.run_in_decoder` that kills the decoder child (SIGSEGV) for ``paths``, else decodes."""
    if path in paths:
        os.kill(os.getpid(), signal.SIGSEGV)
    return fn(*args)


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
