"""Stage 3 - decode 8 frames per IEMOCAP utterance and store them as uint8 (docs/METHOD.md §2).

    python IEMOCAP/video_feature_extract.py --num_workers 4

Reads   datasets/IEMOCAP/IEMOCAP_{train,dev,test}.csv, the dialogue videos, pretrained_model/videomae-base
        (its image processor only)
Writes  IEMOCAP/feature/video/{train,dev,test}/{Dialogue_ID}_{Utterance_ID}.npy (uint8 (8, 3, H, W) after
        resize and centre crop) and IEMOCAP/feature/video/substitutions.tsv

Each utterance's window is [max(start - 1, 0), end + 1] seconds of its dialogue video, and its 8 frames
are the ones the authors' OpenCV loop picks (1-based frame positions, step from the window's duration,
last frame repeated past the end of the video); each dialogue video is decoded once for all its
utterances. --channel_order bgr stores the authors' BGR frames. Resumable: complete .npy files are skipped.
"""

import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from IEMOCAP.config import IEMOCAP  # noqa: E402
from magtkd import cli, dataset, frames, pretrained, runtime, utils  # noqa: E402
from magtkd.artifacts import FRAMES_REPORT  # noqa: E402

log = logging.getLogger("magtkd")


def main(argv=None) -> dict:
    # Flags: the folders, --num_workers (source videos decoded in parallel), --channel_order
    parser = cli.paths_parser(IEMOCAP, HERE, __doc__, writes=("feature_dir",))
    parser.add_argument("--channel_order", choices=("rgb", "bgr"), default="rgb",
                        help="rgb: what the image processor was trained on (our fix); bgr: the authors' "
                             "OpenCV frames (docs/METHOD.md §7)")
    args = parser.parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device("cpu", args.dist_timeout)  # frames decode on CPU; torchrun: joins the group

    # Data: the utterances whose frames are still missing, grouped by source video
    utterances = [u for split in dataset.SPLITS for u in dataset.load_split(IEMOCAP, args.data_dir, split)]
    jobs = frames.plan_jobs(IEMOCAP, utterances, args.feature_dir, args.channel_order)
    todo = sum(len(j.keys) for j in jobs)
    runtime.log_start("IEMOCAP video_feature_extract", vars(args), device,
                      {"utterances": len(utterances), "to_extract": todo, "source_videos": len(jobs)})

    # "Model": the videomae-base image processor's resize and centre crop
    processor = pretrained.load_image_processor(args.pretrained_dir)

    # Loop and artifacts: one decode per source video; frames written atomically, then the report
    started = time.time()
    report_path = args.feature_dir / "video" / FRAMES_REPORT
    report = frames.extract_frames(jobs, processor, args.num_workers, report_path, vars(args))
    seconds = time.time() - started
    log.info("IEMOCAP: stored %d utterances from %d videos in %.1f s; %d substituted (see %s)",
             todo, len(jobs), seconds, len(report), report_path)
    return {"extracted": todo, "videos": len(jobs), "substituted": len(report), "seconds": seconds}


if __name__ == "__main__":
    utils.run(main)
