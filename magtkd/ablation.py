"""``<DS>/ablation.py``: the ablation tables. Every variant (row) of a table over seeds, each run by the
dataset's own stage scripts, in its own folder, skipped when it finished before with the same setting;
then the table with mean ± std and the paired bootstrap (`magtkd.comparison`; docs/METHOD.md §5,
Ablation tables).

The dataset's scripts come in as data (`Ablation.scripts`: file name -> ``main(argv)``), so this module
never imports a dataset folder.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .artifacts import StageFiles, copy_file, feature_path, read_record, write_json
from .cli import ABLATION_TABLES, seed_tag
from .comparison import write_ablation, write_reproduction
from .dataset import load_samples
from .pickles import load_features
from .results import authors_kept_row, seed_row
from .spec import PROMPTS, DatasetSpec
from .utils import StageMain, UserError

log = logging.getLogger("magtkd")



@dataclass(frozen=True)
class Ablation:
    """One ``<DS>/ablation.py`` run: the table, the seeds, the folders, and the dataset's stage scripts."""

    table: str
    seeds: tuple[int, ...]
    train: bool  # kd table: train the first-stage models (True) or test the saved ones
    device: str | None
    data_dir: Path
    pretrained_dir: Path
    save_dir: Path
    feature_dir: Path
    text_args: str  # prompt table: flags for text.py
    extra: tuple[str, ...]  # flags passed through to every run of the stage
    scripts: Mapping[str, StageMain]  # "text.py" -> text.main, ...

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], extra: Sequence[str], scripts: Mapping[str, StageMain]) -> "Ablation":
        """ablation.py's parsed flags (``vars(args)``), the flags it passes through and the scripts it runs."""
        names = [f.name for f in fields(cls) if f.name not in ("extra", "scripts")]
        values = {name: flags[name] for name in names}
        if len(set(values["seeds"])) != len(values["seeds"]):
            raise UserError(f"--seeds lists a seed twice: {' '.join(map(str, values['seeds']))}")
        return cls(**{**values, "seeds": tuple(values["seeds"])}, extra=tuple(extra), scripts=scripts)

    @property
    def device_argv(self) -> list[str]:
        return ["--device", self.device] if self.device else []

    def stage(self, spec: DatasetSpec, script: str, argv: list[str]) -> dict[str, Any]:
        """Run the dataset's ``script`` with ``argv`` in this process."""
        log.info("[%s] %s %s", spec.name, script, " ".join(argv))
        return self.scripts[script](argv)


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table: the folder ``key``, the printed ``name``, the stage flags that make it,
    and the row it is tested against (``baseline``; None: it is the reference)."""
    key: str
    name: str
    argv: tuple[str, ...] = ()
    baseline: str | None = None
    script: str = "multimodal_fusion.py"
    model: str = "multimodal_fusion"  # the checkpoint's name (kd: the first-stage model)
    text_argv: tuple[str, ...] = ()  # prompt table: the flags of text.py that make it (the fusion gets none)




ABLATION_RECORD = "ablation_variant.json"  # per variant folder: its setting, seeds' rows and predictions


_SUBSETS = ("T", "A", "V", "T+A", "T+V", "A+V", "T+A+V")


CAPTIONS = {
    "modalities": "The fusion on each subset of modalities (docs/METHOD.md §5, Ablation variants), trained on "
                  "the same first-stage feature pickles; tested against T+A+V.",
    "components": "The full model without each component: gates (identity), speaker embedding, the fusion's "
                  "distillation terms (alpha = beta = 0), the distilled first-stage features (audio / video "
                  "instead of audio_kd / video_kd), and the concat baseline instead of the anchors; tested "
                  "against the full model.",
    "kd": "The first-stage models themselves on test (the utterance-level classifiers of docs/METHOD.md §2-3); "
          "each distilled student is tested against its undistilled model.",
    "reproduction": "The fusion with the attention of each of the authors' releases (May 2025, behind the paper's "
                    "figures; Nov 2025, the fix, our default), each with their padding speaker row (2) and the "
                    "rest of their computation, draw for draw (docs/METHOD.md §5), trained on the same first-stage "
                    "feature pickles once per seed; each run is read under both selections (the training does not "
                    "depend on which epoch is kept): the authors' protocol, the first epoch with the best test "
                    "weighted F1 rounded to 2 decimals of %, and ours, the best dev weighted F1.",
    "prompt": "Each text-prompt variant (docs/METHOD.md §2): text.py trained with it (one model, the first seed), "
              "the first-stage features extracted with it (audio, video and the KD students unchanged: the "
              "pipeline's checkpoints), and the fusion trained on them per seed; tested against the full prompt "
              "under the same protocol.",
}


def ablation_variants(table: str, spec: DatasetSpec) -> list[Variant]:
    """The rows of ``table`` (one of :data:`ABLATION_TABLES`), the reference first where it has one."""
    if table == "modalities":
        return [Variant(key, key, ("--modalities", *key.split("+")), None if key == "T+A+V" else "T+A+V")
                for key in _SUBSETS]
    if table == "components":
        rows = [("full", "full model", ()), ("no_gates", "without gates", ("--gates", "False")),
                ("no_speaker_embedding", "without speaker embedding", ("--speaker_embedding", "False")),
                ("no_fusion_kd", "without fusion KD (alpha = beta = 0)", ("--alpha", "0", "--beta", "0")),
                ("no_kd_features", "without distilled features (audio, video)",
                 ("--audio_feature", "audio", "--video_feature", "video")),
                ("concat", "concat fusion instead of anchors", ("--fusion", "concat"))]
        return [Variant(key, name, argv, None if key == "full" else "full") for key, name, argv in rows]
    if table == "kd":
        return [Variant("text", "text", (), None, "text.py", "text"),
                Variant("audio", "audio", (), None, "audio.py", "audio"),
                Variant("audio_kd", "audio distilled (text -> audio)", ("--student", "audio", "--teacher", "text"),
                        "audio", "KD.py", "text_KD_audio"),
                Variant("video", "video", (), None, "video.py", "video"),
                Variant("video_kd", "video distilled (text -> video)", ("--student", "video", "--teacher", "text"),
                        "video", "KD.py", "text_KD_video")]
    if table == "prompt":
        return [Variant(key, f"prompt {key}", (), None if key == "full" else "full", text_argv=("--prompt", key))
                for key in PROMPTS]
    if table == "reproduction":  # the May-2025 attention first, tested against the Nov-2025 one
        return [Variant("paper", "May 2025 (paper attention)",
                        ("--paper_attention", "True", "--padding_speaker", "authors"), "fixed"),
                Variant("fixed", "Nov 2025 (fixed attention)",
                        ("--paper_attention", "False", "--padding_speaker", "authors"))]
    raise UserError(f"--table {table}: expected one of {', '.join(ABLATION_TABLES)}")


def run_ablation(spec: DatasetSpec, run: Ablation) -> dict[str, Any]:
    """Every variant of ``run.table`` over ``run.seeds`` (each in ``<save_dir>/ablation/<table>/<variant>/``;
    a finished one with the same setting is skipped), then the table (`magtkd.comparison.write_ablation`)."""
    table_dir = Path(run.save_dir) / "ablation" / run.table
    runs = {}
    for variant in ablation_variants(run.table, spec):
        folder = table_dir / variant.key
        setting = {"table": run.table, "variant": variant.key, "argv": [*variant.argv, *run.extra],
                   "seeds": list(run.seeds), "train": bool(run.train), "feature_dir": str(run.feature_dir)}
        if run.table == "prompt":  # the text model is part of the setting: new text flags re-run the variant
            setting["text_argv"] = [*variant.text_argv, *shlex.split(run.text_args)]
        record = read_record(folder / ABLATION_RECORD)
        if record is not None and record.get("complete") is True and record.get("setting") == setting:
            log.info("ablation %s: %s finished before with this setting, skipped", run.table, variant.key)
            runs[variant.key] = record
            continue
        log.info("ablation %s: running %s (%s)", run.table, variant.key, " ".join(setting["argv"]) or "defaults")
        if run.table == "kd":
            rows = _first_stage_variant(spec, run, variant, folder)
        else:
            feature_dir = _prompt_features(spec, run, setting["text_argv"], folder) if run.table == "prompt" \
                else Path(run.feature_dir)
            rows = _fusion_variant(spec, run, variant, folder, feature_dir)
        runs[variant.key] = {"complete": True, "setting": setting, **rows}
        write_json(folder / ABLATION_RECORD, runs[variant.key])
    folder, variants = Path(run.save_dir) / "ablation", ablation_variants(run.table, spec)
    if run.table == "reproduction":
        return write_reproduction(folder, spec.name, variants, runs, CAPTIONS[run.table])
    return write_ablation(folder, run.table, spec.name, variants, runs, CAPTIONS[run.table])


def _fusion_variant(spec: DatasetSpec, run: Ablation, variant: Variant, folder: Path,
                    feature_dir: Path) -> dict[str, Any]:
    """Train the fusion variant once per seed into ``folder``; its seeds' rows and test predictions."""
    argv = [*variant.argv, *run.extra, "--feature_dir", str(feature_dir), "--save_dir", str(folder),
            "--data_dir", str(run.data_dir), "--seeds", *map(str, run.seeds)] + run.device_argv
    run.stage(spec, variant.script, argv)
    test = load_features(feature_path(feature_dir, "test"), keys=())
    dialogues = [i for i, vid in enumerate(test["vids"]) for _ in test["labels"][vid]]
    seeds = []
    for seed in run.seeds:
        files = StageFiles.fusion(folder, seed_tag(seed, run.seeds))
        doc, out = read_record(files.metrics), read_record(files.predictions)
        kept = authors_kept_row(doc["epochs"])  # the epoch the authors' rule keeps, for the reproduction table
        seeds.append({**seed_row(seed, doc, doc["labels"]), "test_selected_epoch": kept["epoch"],
                      "test_selected_accuracy": kept["test"]["accuracy"], "labels": out["labels"],
                      "preds": out["preds"]})
    return {"labels": list(doc["labels"]), "dialogues": dialogues, "seeds": seeds}


def _first_stage_variant(spec: DatasetSpec, run: Ablation, variant: Variant, folder: Path) -> dict[str, Any]:
    """A first-stage model's test predictions per seed: ``--train True`` trains it into ``folder`` (the KD
    teacher and the audio student's start are the pipeline's ``text.bin`` / ``audio.bin``); ``--train False``
    evaluates ``<save_dir>/<name>_seed<S>.bin`` (or the one ``<name>.bin``, with the seed it recorded)."""
    save_dir = Path(run.save_dir)
    paths = ["--data_dir", str(run.data_dir), "--pretrained_dir", str(run.pretrained_dir),
             "--feature_dir", str(run.feature_dir), *run.device_argv]
    if run.train:
        folder.mkdir(parents=True, exist_ok=True)
        for needed in (["text"] + (["audio"] if variant.model == "text_KD_audio" else [])) \
                if variant.script == "KD.py" else []:
            for suffix in (".bin", ".json"):
                link_file(save_dir / f"{needed}{suffix}", folder / f"{needed}{suffix}")
        run.stage(spec, variant.script, [*variant.argv, *run.extra, *paths, "--save_dir", str(folder),
                                         "--seeds", *map(str, run.seeds)])
        save_dir = folder
    samples = load_samples(spec, run.data_dir, ("test",))["test"]
    seeds: list[dict[str, Any]] = []
    for seed in run.seeds:
        source = _trained_model(spec, run, variant, save_dir, seed)
        doc = read_record(source.with_suffix(".json"))
        recorded = int(doc["args"]["seed"])
        if any(row["seed"] == recorded for row in seeds):
            log.warning("ablation kd: %s holds one model (seed %d), not one per seed", source, recorded)
            continue
        evaluation = folder / f"seed{recorded}"
        evaluation.mkdir(parents=True, exist_ok=True)
        for suffix in (".bin", ".json"):  # the script evaluates <save_dir>/<name>.bin
            link_file(source.with_suffix(suffix), evaluation / f"{variant.model}{suffix}")
        out = run.stage(spec, variant.script, [*variant.argv, *run.extra, *paths, "--save_dir", str(evaluation),
                                               "--train", "False"])
        seeds.append({**seed_row(recorded, {**doc, "test": out}, list(spec.labels)),
                      "labels": out["labels"], "preds": out["preds"]})
    return {"labels": list(spec.labels), "dialogues": [s.utterance.dialogue_id for s in samples], "seeds": seeds}


def _trained_model(spec: DatasetSpec, run: Ablation, variant: Variant, save_dir: Path, seed: int) -> Path:
    """``<save_dir>/<name>_seed<S>`` (or the one ``<name>``) whose .bin and .json exist, without suffix."""
    tagged = save_dir / f"{variant.model}{seed_tag(seed, run.seeds)}"
    source = tagged if tagged.with_suffix(".bin").is_file() else save_dir / variant.model
    if read_record(source.with_suffix(".json")) is None or not source.with_suffix(".bin").is_file():
        raise UserError(f"{source}.bin (or its .json) not found: train {spec.name}/{variant.script} "
                        f"with --seeds {' '.join(map(str, run.seeds))}, or run the table with --train True")
    return source


def _prompt_features(spec: DatasetSpec, run: Ablation, text_flags: list[str], folder: Path) -> Path:
    """The prompt table's first stage: text.py trained with ``text_flags`` (the row's setting: its prompt and
    ``--text_args``; the first seed), then the
    feature pickles extracted with it and the pipeline's other four checkpoints; returns their folder."""
    save_dir, models = Path(run.save_dir), folder / "save_model"
    feature_dir = folder / "feature"
    paths = ["--data_dir", str(run.data_dir), "--pretrained_dir", str(run.pretrained_dir)] + run.device_argv
    text_argv = [*text_flags, *paths, "--feature_dir", str(run.feature_dir),
                 "--save_dir", str(models), "--seed", str(run.seeds[0])]
    run.stage(spec, "text.py", text_argv)
    for name in ("audio", "video", "text_KD_audio", "text_KD_video"):
        for suffix in (".bin", ".json"):
            link_file(save_dir / f"{name}{suffix}", models / f"{name}{suffix}")
    # Extraction reads the stored frames under --feature_dir: the pipeline's, linked in
    feature_dir.mkdir(parents=True, exist_ok=True)
    frames = Path(run.feature_dir) / "video"
    if frames.exists() and not (feature_dir / "video").exists():
        os.symlink(frames.absolute(), feature_dir / "video", target_is_directory=True)
    run.stage(spec, "extract_first_stage_features.py", [*paths, "--save_dir", str(models),
                                                     "--feature_dir", str(feature_dir)])
    return feature_dir


def link_file(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy across file systems): checkpoints are large."""
    if not src.is_file():
        raise UserError(f"{src} not found: the ablation needs the pipeline's {src.name} (run {src.parent.parent.name}"
                              f"/run.sh first, or pass its --save_dir)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        copy_file(src, dst)
