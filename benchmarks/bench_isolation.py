"""What decoding in a supervised child process costs on healthy files (docs/METHOD.md §6).

    python benchmarks/bench_isolation.py              # 200 MELD-like clips (3 s, 320x240, 25 fps, AAC)
    python benchmarks/bench_isolation.py --clips 50 --seconds 2

MELD has ~13700 short clips, so a per-clip cost shows there first. For the same
clips this prints:

1. frames, before: the stage's per-video job (`dataset.run_job`: decode, resize/crop,
   atomic .npy writes) called in this process one after the other, as the stage did
   before decoding was isolated;
   after: `dataset.extract_frames` with 0 workers (every job in one long-lived
   supervised decoder process), and with 2 workers (two decoder processes);
2. audio, before: `media.decode_audio` in this process; after:
   `media.decode_audio_isolated` (PyAV in the supervised child, resampling here).

Both "after" figures include starting the decoder processes. Writes its clips
to a temporary folder and deletes it at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from MELD.config import MELD  # noqa: E402
from magtkd import dataset, media, model  # noqa: E402
from magtkd.dataset import Utterance  # noqa: E402
from magtkd.synthetic.media import index_frame, tone, write_video  # noqa: E402
from magtkd.synthetic.models import write_models  # noqa: E402


def make_clips(folder: Path, n: int, seconds: float, size: tuple[int, int], fps: int) -> list[Utterance]:
    folder.mkdir(parents=True)
    w, h = size
    utterances = []
    for i in range(n):
        path = folder / f"dia{i}_utt0.mp4"
        frames = (index_frame(k, h, w, (40 + i % 200, 80, 120)) for k in range(int(seconds * fps)))
        write_video(path, frames, fps, codec="libx264", audio=tone(220.0 + i, seconds, 44100, channels=2),
                    sample_rate=44100, audio_codec="aac")
        utterances.append(Utterance("test", i + 1, i, 0, "x", "A", "A", "neutral", 4, path, path, None, None))
    return utterances


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--size", default="320x240")
    p.add_argument("--fps", type=int, default=25)
    args = p.parse_args(argv)
    size = tuple(int(x) for x in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="bench_isolation_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        utterances = make_clips(work / "clips", args.clips, args.seconds, size, args.fps)
        write_models(work / "pretrained", ["a b c"])
        processor = model.load_image_processor(work / "pretrained")
        setup_s = time.perf_counter() - t0

        def fresh(name: str) -> tuple[list, Path]:
            feature_dir = work / name
            return dataset.plan_jobs(MELD, utterances, feature_dir), feature_dir / "video" / "substitutions.tsv"

        jobs, _ = fresh("warm")  # warm the page cache and the processor
        dataset._init_worker(processor)
        for job in jobs[:5]:
            dataset.run_job(job)

        jobs, _ = fresh("before")
        t0 = time.perf_counter()
        for job in jobs:
            dataset.run_job(job)
        before_s = time.perf_counter() - t0
        after_s = {}
        for workers in (0, 2):
            jobs, report = fresh(f"after{workers}")
            t0 = time.perf_counter()
            dataset.extract_frames(jobs, processor, workers, report)
            after_s[workers] = time.perf_counter() - t0

        paths = [u.audio_path for u in utterances]
        t0 = time.perf_counter()
        plain = [media.decode_audio(p, max_samples=dataset.MAX_AUDIO_SAMPLES) for p in paths]
        audio_before = time.perf_counter() - t0
        t0 = time.perf_counter()
        isolated = [media.decode_audio_isolated(p, max_samples=dataset.MAX_AUDIO_SAMPLES) for p in paths]
        audio_after = time.perf_counter() - t0
        same = all(np.array_equal(a, b) for a, b in zip(plain, isolated))

    n = args.clips
    print(f"isolation benchmark on CPU ({os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f}); "
          f"{n} clips of {args.seconds:g} s, {args.size} @ {args.fps} fps H.264 + AAC; setup {setup_s:.1f} s")
    print(f"1. frames, before: run_job in-process        {before_s:7.2f} s  ({1000 * before_s / n:6.1f} ms/clip)")
    print(f"   after: extract_frames, 0 workers (1 child) {after_s[0]:7.2f} s  ({1000 * after_s[0] / n:6.1f} ms/clip, "
          f"{100 * (after_s[0] / before_s - 1):+.1f}%)")
    print(f"   after: extract_frames, 2 workers            {after_s[2]:7.2f} s  ({1000 * after_s[2] / n:6.1f} ms/clip)")
    print(f"2. audio, before: decode_audio in-process    {audio_before:7.2f} s  ({1000 * audio_before / n:6.1f} ms/clip)")
    print(f"   after: decode_audio_isolated              {audio_after:7.2f} s  ({1000 * audio_after / n:6.1f} ms/clip, "
          f"{100 * (audio_after / audio_before - 1):+.1f}%); identical samples: {same}")
    media._audio_decoder and media._audio_decoder.close()


if __name__ == "__main__":
    main()
