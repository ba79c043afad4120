"""Decoder faults: fault injection into the supervised decoder child through `media.run_in_decoder`."""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pytest

from magtkd import media
from magtkd.media import DecoderProcess, MediaError
from magtkd.synthetic.media import index_frame, tone, write_video, write_wav

# ---------------------------------------------------------------- fault injection: media.run_in_decoder


def crash_on(paths: frozenset, path: str, fn, args):
    """A `media.run_in_decoder` that kills the decoder child (SIGSEGV) for ``paths``, else decodes."""
    if path in paths:
        os.kill(os.getpid(), signal.SIGSEGV)
    return fn(*args)


def hang_on(paths: frozenset, path: str, fn, args):
    """A `media.run_in_decoder` that hangs for ``paths``, else decodes."""
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
    expected = media.decode_audio_isolated(wav)  # the per-process audio decoder child is running now
    monkeypatch.setattr(media, "run_in_decoder", functools.partial(crash_on, frozenset({str(mp4)})))
    with pytest.raises(MediaError) as err:  # reaches the child forked before the patch
        media.decode_audio_isolated(mp4)
    assert err.value.reason == "decoder crashed (signal 11)" and err.value.path == str(mp4)
    assert np.array_equal(media.decode_audio_isolated(wav), expected)  # a fresh child serves the next file
    with DecoderProcess(30) as decoder:  # video, and any other call, goes through the same hook
        with pytest.raises(MediaError, match=r"decoder crashed \(signal 11\)"):
            decoder.call(mp4, media.decode_windows, mp4, [None])
        assert decoder.call(wav, sum, [1, 2]) == 3


def test_an_injected_hang_times_out(clips, monkeypatch):
    wav, mp4 = clips
    monkeypatch.setattr(media, "run_in_decoder", functools.partial(hang_on, frozenset({str(mp4)})))
    with DecoderProcess(0.5) as decoder:
        with pytest.raises(MediaError, match=r"decoder timed out after 0.5 s"):
            decoder.call(mp4, media.decode_windows, mp4, [None])
        assert decoder.call(wav, media.decode_windows, wav, []) == []


def test_a_child_forked_during_a_patch_runs_plainly_after_it(clips, monkeypatch):
    wav, mp4 = clips
    monkeypatch.setattr(media, "run_in_decoder", functools.partial(crash_on, frozenset({str(mp4)})))
    with DecoderProcess(30).start() as decoder:  # forked with the patch in its memory
        monkeypatch.undo()
        clip = decoder.call(mp4, media.decode_windows, mp4, [None])[0]
        assert clip.shape[0] == 8
