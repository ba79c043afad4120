"""Decoding in a supervised child process, and the cache of decoded audio (docs/METHOD.md §6).

PyAV/FFmpeg can crash the whole process (a segfault on an mp4 cut inside its
moov atom) or hang on a broken file; no exception handler helps there. So
decoding runs in a long-lived child process that the parent supervises: a
crash or a hang past the timeout loses only the file in flight (a MediaError
naming the signal or the timeout), and the child is restarted for the next
file. Healthy files pay one pipe round trip each. Decoded 16 kHz clips are
stored once (`AudioCache`) and read back by later epochs and stages.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .artifacts import atomic_path
from .media import TARGET_SAMPLE_RATE, MediaError, decode_audio_native, resample_audio

log = logging.getLogger("magtkd")


AUDIO_TIMEOUT_S = 300.0  # one clip's whole audio (MELD has clips that run for minutes)
VIDEO_TIMEOUT_S = 900.0  # one source video (an IEMOCAP dialogue video runs for minutes)


def run_in_decoder(path: str, fn: Callable[..., Any], args: tuple) -> Any:
    """What the decoder child does with one request for ``path``: ``fn(*args)``.

    `DecoderProcess.call` looks this name up at each call and sends the function
    to the child along with the request, so replacing it in the calling process
    changes what the child runs, whether the child was forked before or after.
    Tests monkeypatch it to inject a fault (a crash, a hang) for chosen files;
    the replacement must pickle (a module-level function, or a
    `functools.partial` of one).
    """
    return fn(*args)


# Sent to the child only when replaced: the original, pickled by name, would
# resolve to the child's own module attribute, still a test's replacement if
# the child was forked while one was in place.
_PLAIN_RUN = run_in_decoder


def _serve(conn: Any, parent_end: Any, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    """The decoder child's loop: run ``fn(*args)`` calls sent by the parent, reply ``(ok, value)``."""
    parent_end.close()  # so the parent's death reads as end-of-file here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    faulthandler.disable()  # a crash here is reported by the parent, naming the file
    # A forked child must not enter OpenMP regions the parent's thread pool owned (GNU OpenMP
    # deadlocks after fork); one intra-op thread keeps torch ops inline, as in DataLoader workers.
    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        path, runner, fn, args = request
        try:
            reply = (True, (runner or _PLAIN_RUN)(path, fn, args))
        except Exception as exc:  # returned to the parent, which raises it there
            reply = (False, exc if _picklable(exc) else MediaError(path, f"{type(exc).__name__}: {exc}"))
        conn.send(reply)


def _picklable(exc: BaseException) -> bool:
    import pickle

    try:
        pickle.dumps(exc)
    except Exception:
        return False
    return True


class DecoderProcess:
    """A supervised child process that runs decoding calls one at a time.

    ``call(path, fn, *args)`` returns ``fn(*args)`` computed in the child, or
    raises what it raised. If the child dies (signal, abort) or exceeds
    ``timeout`` seconds, a `MediaError` for ``path`` says so ("decoder crashed
    (signal 11)", "decoder timed out after 120 s") and the next call starts a
    fresh child. ``initializer(*initargs)`` runs in each new child.
    """

    def __init__(self, timeout: float, initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
        self.timeout = float(timeout)
        self.initializer, self.initargs = initializer, initargs
        self._process: Any = None
        self._conn: Any = None
        self._owner = os.getpid()

    def _start(self) -> None:
        # fork: the child starts at once with the parent's imports (the pools and
        # DataLoader workers of this project fork the same way on Linux).
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, parent, self.initializer, self.initargs),
                                        daemon=True)
        # DataLoader workers are daemonic, and multiprocessing refuses children of daemonic
        # processes; this child is tied to its parent by the pipe (it exits at end-of-file) and
        # is daemonic itself, so the worker's exit still ends it.
        config = multiprocessing.current_process()._config
        daemonic = config.get("daemon")
        config["daemon"] = False
        try:
            self._process.start()
        finally:
            config["daemon"] = daemonic
        child.close()
        self._conn = parent

    def start(self) -> "DecoderProcess":
        """Start the child now (else the first `call` does)."""
        if self._owner != os.getpid():  # inherited through a fork: the child belongs to the parent
            self._process, self._conn, self._owner = None, None, os.getpid()
        if self._process is None or not self._process.is_alive():
            self._discard()
            self._start()
        return self

    def call(self, path: str | os.PathLike, fn: Callable[..., Any], *args: Any) -> Any:
        self.start()
        try:
            runner = run_in_decoder
            self._conn.send((str(path), None if runner is _PLAIN_RUN else runner, fn, args))
            ready = self._conn.poll(self.timeout)
            if not ready:
                self._discard(kill=True)
                raise MediaError(path, f"decoder timed out after {self.timeout:g} s")
            ok, value = self._conn.recv()
        except (EOFError, ConnectionError, BrokenPipeError):
            code = self._discard()
            reason = (f"decoder crashed (signal {-code})" if code is not None and code < 0
                      else f"decoder process exited (status {code})")
            raise MediaError(path, reason) from None
        if not ok:
            raise value
        return value

    def _discard(self, kill: bool = False) -> int | None:
        """Forget the current child (killed first when ``kill``); returns its exit code."""
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if kill and process.is_alive():
            process.kill()
        process.join(5)
        return process.exitcode

    def close(self) -> None:
        if self._conn is not None and self._owner == os.getpid():
            try:
                self._conn.send(None)
            except OSError:
                pass
            if self._process is not None:
                self._process.join(5)
        self._discard(kill=True)

    def __enter__(self) -> "DecoderProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_audio_decoder: DecoderProcess | None = None  # one per process (DataLoader workers get their own)


def decode_audio_isolated(
    path: str | os.PathLike, target_sr: int = TARGET_SAMPLE_RATE, notes: list[str] | None = None,
) -> np.ndarray:
    """The whole first audio stream of ``path`` as float32 mono of shape (n,) at ``target_sr``.

    `decode_audio_native` runs in a supervised child (`DecoderProcess`): a crash
    or hang while decoding ``path`` raises a `MediaError` for ``path`` instead of
    taking the process down. `resample_audio` runs here, in the calling process
    (the child runs no torch). Raises `MediaError` as `decode_audio_native` does;
    its notes on a partial decode are appended to ``notes`` when given.
    """
    global _audio_decoder
    if _audio_decoder is None or _audio_decoder._owner != os.getpid():
        _audio_decoder = DecoderProcess(AUDIO_TIMEOUT_S)
    _audio_decoder.timeout = AUDIO_TIMEOUT_S
    native_sr, mono, child_notes = _audio_decoder.call(path, _decode_audio_with_notes, str(path))
    if notes is not None:
        notes.extend(child_notes)
    return resample_audio(path, mono, native_sr, target_sr)


def _decode_audio_with_notes(path: str) -> tuple[int, np.ndarray, list[str]]:
    notes: list[str] = []
    native_sr, mono = decode_audio_native(path, notes)
    return native_sr, mono, notes


class AudioCache:
    """Each source file's decoded 16 kHz mono samples, stored the first time a stage decodes it.

    One ``<folder>/<sha1 of the resolved source path>.npz`` per source file holds the
    float32 samples exactly as `decode_audio_isolated` returned them (so a hit
    gives bit-identical samples) and a JSON record of the source path, size,
    modification time (ns), sample rate and the decoder's notes. A hit needs all of
    these to match the file as it is now; a changed file (size or mtime) is decoded
    again and its entry replaced. Notes of a partial decode are stored and handed
    back on every hit, so each stage reports the substitution again. Failed decodes
    (`MediaError`) are not stored: the failure may be passing (a timeout on a busy
    machine) and is reported anew by each stage that meets it. An entry that cannot
    be read is decoded again (warning naming it); entries are written atomically,
    so DataLoader workers and torchrun ranks can share the folder. If the folder
    cannot be written the clip is still returned (warning, once per folder).
    ``folder=None``: decode every time.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self._warned = False
        if self.folder is not None and self.folder.is_dir():
            # Temporary files of a killed run; an hour's age spares another process's write in flight.
            cutoff = time.time() - 3600
            for stray in self.folder.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if stray.stat().st_mtime < cutoff:
                        stray.unlink()

    def entry(self, source: str | Path) -> Path:
        assert self.folder is not None
        digest = hashlib.sha1(str(Path(source).resolve()).encode("utf-8", "surrogateescape")).hexdigest()
        return self.folder / f"{digest}.npz"

    def load(self, source: str | Path, sample_rate: int = TARGET_SAMPLE_RATE,
             notes: list[str] | None = None) -> np.ndarray:
        """The samples of ``source`` (cached, or decoded in the supervised child and stored); raises
        `MediaError` as `decode_audio_isolated` does. The decoder's notes are appended to ``notes``."""
        notes = [] if notes is None else notes
        if self.folder is None:
            return decode_audio_isolated(source, sample_rate, notes=notes)
        source = Path(source)
        key = self._key(source, sample_rate)
        entry = self.entry(source)
        if key is not None and entry.is_file():
            hit = self._read(entry, key)
            if hit is not None:
                notes.extend(hit[1])
                return hit[0]
        decoded_notes: list[str] = []
        samples = decode_audio_isolated(source, sample_rate, notes=decoded_notes)
        notes.extend(decoded_notes)
        # Keyed by the file as it was before decoding: a file replaced meanwhile is decoded again next time.
        if key is not None and key == self._key(source, sample_rate):
            self._write(entry, samples, {**key, "notes": decoded_notes})
        return samples

    @staticmethod
    def _key(source: Path, sample_rate: int) -> dict[str, Any] | None:
        try:
            stat = source.stat()
        except OSError:
            return None  # missing: the decoder raises the MediaError naming it
        return {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "sample_rate": int(sample_rate)}

    @staticmethod
    def _read(entry: Path, key: dict[str, Any]) -> tuple[np.ndarray, list[str]] | None:
        try:
            with np.load(entry, allow_pickle=False) as data:
                record = json.loads(str(data["record"]))
                if any(record.get(k) != v for k, v in key.items()):
                    return None  # the source changed (or another file hashed here): decode again
                samples = data["samples"]
            if samples.dtype != np.float32 or samples.ndim != 1 or not isinstance(record.get("notes"), list):
                raise ValueError(f"unexpected content (samples {samples.dtype} {samples.shape})")
            if not np.isfinite(samples).all():  # stored before decoding checked this: decode (and refuse) again
                raise ValueError("non-finite samples")
        except Exception as exc:  # truncated, not an .npz, or malformed: the source is decoded again
            log.warning("audio cache entry %s for %s cannot be read (%s: %s); decoding the file again",
                        entry, key["source"], type(exc).__name__, exc)
            return None
        return samples, [str(n) for n in record["notes"]]

    def _write(self, entry: Path, samples: np.ndarray, record: dict[str, Any]) -> None:
        try:
            with atomic_path(entry) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, samples=np.ascontiguousarray(samples, dtype=np.float32),
                             record=np.array(json.dumps(record)))
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the audio cache in %s (%s); clips are decoded again each time",
                            self.folder, exc)
                self._warned = True
