"""Write the synthetic datasets and the tiny pretrained stand-ins.

    python -m magtkd.synthetic --out DIR [--seed 0] [--what all|data|models] [--size tiny|real]

Writes ``DIR/datasets/IEMOCAP`` and ``DIR/datasets/MELD`` (raw releases in the
real formats, `magtkd.synthetic.iemocap` / `magtkd.synthetic.meld`) and
``DIR/pretrained_model/<four folders>`` (`magtkd.synthetic.models`), i.e. the
repository layout of docs/METHOD.md §0, so every stage runs against ``DIR`` with
``--data_dir DIR/datasets/<DS> --pretrained_dir DIR/pretrained_model``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Sequence

from ..cli import HelpFormatter
from ..runtime import setup_logging

log = logging.getLogger("magtkd.synthetic")

WHAT = ("all", "data", "models")


def generate(out: Path, seed: int = 0, what: str = "all", size: str = "tiny") -> dict[str, Path]:
    """Write the selected parts under ``out``; return ``{part: folder}``.

    Parts: ``IEMOCAP`` and ``MELD`` (``what`` in all/data) and the four
    pretrained folder names (``what`` in all/models), ``size`` tiny or real
    (the real architectures, about 2.6 GB of random weights; `magtkd.synthetic.models`).
    """
    if what not in WHAT:
        raise ValueError(f"what={what!r}; expected one of {', '.join(WHAT)}")
    out = Path(out)
    written: dict[str, Path] = {}
    start = time.perf_counter()
    if what in ("all", "data"):
        # Imported here: the dataset generators pull in the media stack, which
        # writing the models alone does not need.
        from .iemocap import write_iemocap
        from .meld import write_meld

        for name, writer in (("IEMOCAP", write_iemocap), ("MELD", write_meld)):
            t0 = time.perf_counter()
            root = out / "datasets" / name
            writer(root, seed)
            written[name] = root
            log.info("wrote synthetic %s into %s (%.1f s)", name, root, time.perf_counter() - t0)
    if what in ("all", "models"):
        from .models import write_models
        from .text import corpus

        t0 = time.perf_counter()
        folders = write_models(out / "pretrained_model", corpus(), seed, size)
        written.update(folders)
        log.info("wrote %d %s pretrained stand-ins into %s (%.1f s)", len(folders), size, out / "pretrained_model",
                 time.perf_counter() - t0)
    log.info("synthetic %s (seed %d) done in %.1f s", what, seed, time.perf_counter() - start)
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m magtkd.synthetic", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write datasets/ and pretrained_model/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and models")
    parser.add_argument("--what", choices=WHAT, default="all", help="what to generate")
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny",
                        help="model stand-ins: tiny (seconds on a CPU) or the real architectures (~2.6 GB)")
    args = parser.parse_args(None if argv is None else list(argv))
    setup_logging()
    return generate(args.out, args.seed, args.what, args.size)


if __name__ == "__main__":
    main()
