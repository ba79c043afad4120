"""What decoding in a supervised child process costs on healthy files (docs/METHOD.md §6).

    python benchmarks/bench_isolation.py              # 200 MELD-like clips (3 s, 320x240, 25 fps, AAC)
    python benchmarks/bench_isolation.py --clips 50 --seconds 2


MELD has ~13700 short clips, so a per-clip cost shows there first. For the same
clips this prints:

1. frames, before: the stage's per-video job (`frames.run_job`: decode, resize/crop,
   atomic .npy writes) called in this process, as the stage did before decoding was
   isolated; after: the same job run through a `decoder.DecoderProcess` (a long-lived
   supervised child), alternating clip by clip with the in-process call so that the
   machine's load hits both alike; then the whole stage call `frames.extract_frames`
   with 0 and 2 workers (decoder start-up, lock and records included);
2. audio, before: `media.decode_audio_native` + `media.resample_audio` in this process; after:
   `decoder.decode_audio_isolated` (PyAV in the supervised child, resampling here),
   alternating likewise.
 Writes its clips
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
from magtkd import decoder, media, pretrained  # noqa: E402
from magtkd.dataset import Utterance  # noqa: E402
from magtkd.frames import _init_worker, extract_frames, plan_jobs, run_job  # noqa: E402
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
    from magtkd.flag_parser import HelpFormatter  # every flag's default shown once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--clips", type=int, default=200, help="generated clips decoded")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each clip")
    p.add_argument("--size", default="320x240", help="video frame size WxH")
    p.add_argument("--fps", type=int, default=25, help="video frames per second")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of this process (the decoder child uses 1; 1 here compares like with like)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    size = tuple(int(x) for x in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="bench_isolation_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        utterances = make_clips(work / "clips", args.clips, args.seconds, size, args.fps)
        write_models(work / "pretrained", ["a b c"])
        processor = pretrained.load_image_processor(work / "pretrained")
        setup_s = time.perf_counter() - t0

        def fresh(name: str) -> tuple[list, Path]:
            feature_dir = work / name
            return plan_jobs(MELD, utterances, feature_dir), feature_dir / "video" / "substitutions.tsv"

        jobs, _ = fresh("warm")  # warm the page cache and the processor
        _init_worker(processor)
        for job in jobs[:5]:
            run_job(job)

        # Per clip, alternating in-process and supervised child (the same job into two folders), so a
        # change in the machine's load hits both sides alike.
        before_jobs, _ = fresh("before")
        child_jobs, _ = fresh("child")
        t0 = time.perf_counter()
        child = decoder.DecoderProcess(decoder.VIDEO_TIMEOUT_S, _init_worker, (processor,)).start()
        start_s = time.perf_counter() - t0
        before_s = child_s = 0.0
        for plain_job, child_job in zip(before_jobs, child_jobs):
            t0 = time.perf_counter()
            run_job(plain_job)
            t1 = time.perf_counter()
            child.call(child_job.video, run_job, child_job)
            t2 = time.perf_counter()
            before_s, child_s = before_s + t1 - t0, child_s + t2 - t1
        child.close()
        after_s = {}
        for workers in (0, 2):
            jobs, report = fresh(f"after{workers}")
            t0 = time.perf_counter()
            extract_frames(jobs, processor, workers, report)
            after_s[workers] = time.perf_counter() - t0

        audio_before = audio_after = 0.0
        same = True
        for u in utterances:  # alternating, as above
            t0 = time.perf_counter()
            native_sr, mono = media.decode_audio_native(u.audio_path)
            plain = media.resample_audio(u.audio_path, mono, native_sr)
            t1 = time.perf_counter()
            isolated = decoder.decode_audio_isolated(u.audio_path)
            t2 = time.perf_counter()
            audio_before, audio_after = audio_before + t1 - t0, audio_after + t2 - t1
            same = same and np.array_equal(plain, isolated)

    n = args.clips
    print(f"isolation benchmark on CPU ({os.cpu_count()} cores, torch threads here {args.threads or 'default'}, "
          f"1-min load average {os.getloadavg()[0]:.1f}); "
          f"{n} clips of {args.seconds:g} s, {args.size} @ {args.fps} fps H.264 + AAC; setup {setup_s:.1f} s")
    print(f"1. frames, before: run_job in-process        {before_s:7.2f} s  ({1000 * before_s / n:6.1f} ms/clip)")
    print(f"   after: run_job in the supervised child     {child_s:7.2f} s  ({1000 * child_s / n:6.1f} ms/clip, "
          f"{100 * (child_s / before_s - 1):+.1f}%); starting the child {1000 * start_s:.0f} ms once")
    print(f"   whole stage call extract_frames, 0 workers {after_s[0]:7.2f} s  ({1000 * after_s[0] / n:6.1f} ms/clip)")
    print(f"   whole stage call extract_frames, 2 workers {after_s[2]:7.2f} s  ({1000 * after_s[2] / n:6.1f} ms/clip)")
    print(f"2. audio, before: in-process decode          {audio_before:7.2f} s  ({1000 * audio_before / n:6.1f} ms/clip)")
    print(f"   after: decode_audio_isolated              {audio_after:7.2f} s  ({1000 * audio_after / n:6.1f} ms/clip, "
          f"{100 * (audio_after / audio_before - 1):+.1f}%); identical samples: {same}")
    decoder._audio_decoder and decoder._audio_decoder.close()


if __name__ == "__main__":
    main()
