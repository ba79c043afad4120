"""Keep the README true to the code: rewrite its generated blocks in place, between their markers.

    python docs/update_readme.py flags                     # every flag table, from the scripts' parsers
    python docs/update_readme.py demo demo demo_t2@"--threads 2"   # the demo figures, from demo runs
    python docs/update_readme.py ablation demo             # time the README's ablation example, paste its table
    python docs/update_readme.py flags --check             # exit status 1 naming the blocks that differ

``flags``: one table per script (``<!-- flags: text.py -->`` ... ``<!-- /flags -->``), each row what
``--help`` shows for the flag (IEMOCAP's; MELD's where it differs), taken from the parsers the scripts
build (`magtkd.flag_parser.parser_of`), so the README lists every flag with its help and default once; the
tests compare the README with this output. ``demo RUN [RUN ...]``: the demo block (``<!-- demo-results
-->``) from ``RUN/results.json`` and ``RUN/results.md`` of ``python -m magtkd.synthetic.demo --workdir
RUN``; a further ``RUN@LABEL`` (e.g. another ``--threads``) adds its figures as the spread. ``ablation
DIR``: runs the tiny ablation example on the demo ``DIR``'s IEMOCAP features, timed, and writes its table
and time into the ``<!-- ablation-example -->`` block. ``--machine`` and ``--date`` describe where the
figures were measured (docs/METHOD.md §0, "The README's figures").
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from magtkd import cli, flag_parser  # noqa: E402

README = REPO / "README.md"
DATASETS = ("IEMOCAP", "MELD")
SCRIPTS = ("preprocessing.py", "text.py", "audio.py", "video_feature_extract.py", "video.py", "KD.py",
           "extract_first_stage_features.py", "multimodal_fusion.py", "predict.py", "ablation.py", "pipeline.py")
MACHINE = "the shared 2-core CPU VM"
# One torch thread, as the demo runs its stages (`--threads 1`): tiny models run fastest on one, and a
# second thread on a shared machine mostly waits.
ABLATION_THREADS = "1"
ABLATION_EXAMPLE = ("IEMOCAP/ablation.py --table modalities --seeds 1 2 --feature_dir {dir}/IEMOCAP/feature "
                    "--save_dir {dir}/IEMOCAP/save_model --device cpu --epochs 20 --lr 1e-3 --batch_size 2 "
                    "--dropout 0.1 --schedule_epochs False")


# --------------------------------------------------------------------------- blocks between markers


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between ``<!-- name -->`` and its closing marker replaced by ``body``."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name.split(':')[0]} -->"
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no block {begin} ... {end}")
    return pattern.sub(lambda _: f"{begin}\n{body.rstrip()}\n{end}", text, count=1)


def block(text: str, name: str) -> str | None:
    """The lines between ``<!-- name -->`` and its closing marker (None without the block)."""
    end = f"<!-- /{name.split(':')[0]} -->"
    found = re.search(re.escape(f"<!-- {name} -->") + r"\n(.*?)" + re.escape(end), text, re.S)
    return None if found is None else found.group(1)


# --------------------------------------------------------------------------- flag tables


def parsers(script: str) -> dict[str, flag_parser.Parser]:
    """The parser ``<DS>/<script>`` builds, per dataset."""
    return {ds: flag_parser.parser_of(importlib.import_module(f"{ds}.{Path(script).stem}").main) for ds in DATASETS}


def help_row(parser: flag_parser.Parser, action: argparse.Action) -> tuple[str, str]:
    """The flag as ``--help`` names it and its help text as ``--help`` shows it (paths relative to the
    repository: the defaults resolve against the script's folder)."""
    formatter = parser._get_formatter()
    text = formatter._expand_help(action) if action.help else ""
    return formatter._format_action_invocation(action), text.replace(f"{REPO}/", "")


def flag_table(script: str) -> str:
    """The README's table of ``<DS>/<script>``'s flags."""
    rows = {ds: [help_row(p, a) for a in p._actions if a.dest != "help"] for ds, p in parsers(script).items()}
    first, second = DATASETS
    if [flag for flag, _ in rows[first]] != [flag for flag, _ in rows[second]]:
        raise SystemExit(f"{first}/{script} and {second}/{script} have different flags")

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

    lines = [f"| flag | what it does, as `--help` shows it ({first}) | {second}, where it differs |", "|---|---|---|"]
    for (flag, one), (_, other) in zip(rows[first], rows[second]):
        lines.append(f"| `{flag}` | {cell(one)} | {cell(other) if other != one else ''} |")
    return "\n".join(lines)


def flag_blocks() -> dict[str, str]:
    """Every script's table; the pipeline's defaults as without its environment variables (`cli.PIPELINE_ENV`)."""
    saved = {v: os.environ.pop(v) for v in cli.PIPELINE_ENV.values() if v in os.environ}
    try:
        return {f"flags: {script}": flag_table(script) for script in SCRIPTS}
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------- the demo's figures


def demo_run(spec: str) -> tuple[str, list[str], str, str | None]:
    """``DIR`` or ``DIR@LABEL`` of a demo run -> (label, its results.md table, the kept model's line, the
    total seconds): the figures as the demo wrote them."""
    folder, _, label = spec.partition("@")
    text = (Path(folder) / "results.md").read_text(encoding="utf-8")
    head = text.split("\n## ", 1)[0].splitlines()
    table = [line for line in head if line.startswith("|")]
    kept = next((line for line in head if line.startswith("Kept model")), "")
    total = re.search(r"Total wall time ([\d.]+) s", text)
    return label or folder, table, kept, total and total.group(1)


def figures(row: str) -> list[str]:
    """A results.md table row without its seconds (the last column: the machine's load, not the model)."""
    return row.strip("|").split("|")[:-1]


def demo_block(runs: Sequence[str], machine: str, date: str) -> str:
    """The README's demo block: the first run's results.md table and kept-model line as the demo wrote them;
    each further run (another ``--threads``) as the spread: the same figures, or its own table."""
    _, table, kept, total = demo_run(runs[0])
    lines = [f"The demo on the generated tiny data (`python -m magtkd.synthetic.demo --workdir demo`), measured "
             f"{date} on {machine}" + (f" ({float(total):.0f} s of wall time, the two datasets side by side)"
                                       if total else "") + "; the table and the kept model as its `results.md` "
             "gives them (mean ± std over the fusion seeds: the figures to quote; seconds: each dataset's stages):",
             "", *table, "", kept]
    for spec in runs[1:]:
        label, other, other_kept, _ = demo_run(spec)
        same = [figures(r) for r in other] == [figures(r) for r in table] and other_kept == kept
        lines += ["", f"The same demo with `{label}` on the same machine: "
                      + ("the same figures (every column but the seconds) and the same kept model." if same
                         else "other figures:"), *([] if same else ["", *other, "", other_kept])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the ablation example


def ablation_block(demo: Path, machine: str, date: str) -> str:
    """Run the README's tiny ablation example on ``demo``'s IEMOCAP features (timed) and return its block."""
    command = ABLATION_EXAMPLE.format(dir=demo)
    save = demo / "IEMOCAP" / "save_model" / "ablation"
    for stale in [save / "modalities", save / "modalities.md"]:
        if stale.exists():
            raise SystemExit(f"{stale} exists: the example would reuse finished variants; remove it to time a full run")
    started = time.perf_counter()
    subprocess.run([sys.executable, *shlex.split(command)], check=True, cwd=REPO,
                   env={**os.environ, "OMP_NUM_THREADS": ABLATION_THREADS})
    seconds = time.perf_counter() - started
    table = "\n".join(line for line in (save / "modalities.md").read_text(encoding="utf-8").splitlines()
                      if line.startswith("|"))
    shown = (ABLATION_EXAMPLE.format(dir="demo").replace(" --save_dir", " \\\n    --save_dir", 1)
             .replace(" --schedule_epochs", " \\\n    --schedule_epochs", 1))
    return (f"Tiny-data example (the demo's IEMOCAP features and checkpoints, `python -m magtkd.synthetic.demo "
            f"--workdir demo`; measured {date} on {machine}: {seconds:.0f} s of wall time for the 14 fusion "
            f"runs):\n\n```bash\nOMP_NUM_THREADS={ABLATION_THREADS} python {shown}\n```\n\n{table}")


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=flag_parser.HelpFormatter)
    p.add_argument("what", choices=("flags", "demo", "ablation"), help="the blocks to rewrite")
    p.add_argument("runs", nargs="*", help="demo: DIR or DIR@LABEL of demo runs (the first is quoted); ablation: "
                                           "the demo DIR; default: none")
    p.add_argument("--check", action="store_true", help="write nothing; exit status 1 naming the blocks that differ")
    p.add_argument("--machine", default=MACHINE, help="where the figures were measured")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="when; default: today")
    args = p.parse_args(argv)
    makers: dict[str, Callable[[], dict[str, str]]] = {
        "flags": flag_blocks,
        "demo": lambda: {"demo-results": demo_block(args.runs, args.machine, args.date)},
        "ablation": lambda: {"ablation-example": ablation_block(Path(args.runs[0]), args.machine, args.date)},
    }
    if args.what != "flags" and not args.runs:
        p.error(f"{args.what} needs the demo folder(s)")
    text = README.read_text(encoding="utf-8")
    blocks = makers[args.what]()
    differ = [name for name, body in blocks.items() if (block(text, name) or "").rstrip() != body.rstrip()]
    if args.check:
        print("\n".join(f"README.md: block <!-- {name} --> differs" for name in differ) or "README.md is up to date")
        return 1 if differ else 0
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    README.write_text(text, encoding="utf-8")
    print(f"README.md: {len(blocks)} block(s) rewritten, {len(differ)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
