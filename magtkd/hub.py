"""A trained pipeline as one model folder in the Hugging Face layout (docs/METHOD.md §9): the five first-stage
models and the fusion model as safetensors beside their metrics documents, a ``config.json`` and a model card
(``README.md``), so that ``hf upload`` publishes the folder as it is.

    python -m magtkd.hub export IEMOCAP --save_dir IEMOCAP/IEMOCAP/save_model --out magtkd-iemocap

``predict.py``, ``extract_first_stage_features.py`` and ``multimodal_fusion.py --train False`` read such a
folder with ``--model_dir`` (`model_source`). The folder keeps the save folder's names (``text.safetensors``
beside ``text.json``), so the readers of `magtkd.checkpoints` serve it as they serve a save folder
(`magtkd.checkpoints.checkpoint_file`); loading reads safetensors and JSON only, never code or a pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .artifacts import (FIRST_STAGE_MODELS, FUSION, StageFiles, WriteError, atomic_path, check_complete, copy_file,
                        read_record, write_json, write_text)
from .checkpoints import (SAFETENSORS, CheckpointError, checkpoint_file, load_trained_fusion, read_state_dict,
                          trained_fusion)
from .fusion_settings import FusionRequest, FusionSettings
from .spec import DatasetSpec
from .utils import UserError

log = logging.getLogger("magtkd")

FORMAT = "magtkd_model_folder"  # config.json's key saying what wrote the folder; its value is the layout's version
VERSION = 1
CONFIG = "config.json"
CARD = "README.md"


class ModelFolderError(UserError, ValueError):
    """A model folder that is not one, is incomplete, or was trained for another dataset."""


@dataclass(frozen=True)
class ModelFile:
    """One trained model of the pipeline: its checkpoint and metrics document, and the script that writes them."""

    key: str  # a feature key of FIRST_STAGE_MODELS, or "fusion"
    files: StageFiles
    script: str

    @property
    def weights(self) -> str:
        """Its safetensors file's name in the model folder: the checkpoint's name, ``.safetensors``."""
        return self.files.checkpoint.with_suffix(SAFETENSORS).name


def pipeline_models(dataset: str, save_dir: Path) -> list[ModelFile]:
    """The six models of a trained pipeline in ``save_dir``: the five first-stage ones, then the fusion."""
    models = [ModelFile(key, StageFiles.first_stage(save_dir, name), f"{dataset}/{script}")
              for key, (name, script) in FIRST_STAGE_MODELS.items()]
    return models + [ModelFile("fusion", StageFiles.fusion(save_dir), f"{dataset}/{FUSION}.py")]


# --------------------------------------------------------------------------- export


def export_model_folder(dataset: str, save_dir: Path, out: Path) -> dict[str, Any]:
    """Write the model folder of the pipeline trained in ``save_dir`` to ``out``, published whole or not at all
    (built in a hidden sibling folder and renamed; a model folder already at ``out`` is replaced)."""
    from .card import model_card  # the card's text: only the export needs it

    save_dir, out = Path(save_dir), Path(out)
    check_out(out, save_dir)
    models = pipeline_models(dataset, save_dir)
    docs = {m.key: required_record(m, dataset) for m in models}
    fusion = models[-1]
    settings = trained_fusion(fusion.files, dataset, FusionRequest(default_features=(
        docs["fusion"]["args"].get("audio_feature"), docs["fusion"]["args"].get("video_feature"))))
    load_trained_fusion(settings, fusion.files.checkpoint)  # the tensors rebuild the recorded model
    seeds = seeds_summary(fusion.files, docs["fusion"])
    config = model_config(dataset, docs, settings, seeds)
    log.info("export %s from %s to %s", dataset, save_dir, out)
    with staged_folder(out) as folder:
        for model in models:
            state = read_state_dict(model.files.checkpoint, model.script)
            write_safetensors(folder / model.weights, state, model.files.checkpoint.stem)
            copy_file(model.files.metrics, folder / model.files.metrics.name)
            config["models"][model.key] = {"weights": model.weights, "record": model.files.metrics.name,
                                           "script": model.script, "bytes": (folder / model.weights).stat().st_size}
            log.info("export %s: %s (%d tensors)", dataset, model.weights, len(state))
        if seeds is not None:
            copy_file(fusion.files.seeds_summary, folder / fusion.files.seeds_summary.name)
        write_json(folder / CONFIG, config)
        write_text(folder / CARD, model_card(config, docs))
    log.info("export %s: wrote %s (%s, %s and the six models)", dataset, out, CONFIG, CARD)
    return {"out": str(out), "config": config}


def check_out(out: Path, save_dir: Path) -> None:
    """``--out`` must be a new or empty folder, or a model folder written before; never the save folder."""
    if out.resolve() == save_dir.resolve() or save_dir.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is (inside) the save folder {save_dir}; write the model folder elsewhere")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a new folder")
    if out.is_dir() and any(out.iterdir()) and not is_model_folder(out):
        raise UserError(f"--out {out} is a folder holding other files; name a new or empty folder (a model folder "
                        "written by python -m magtkd.hub export is replaced)")


def is_model_folder(folder: Path) -> bool:
    doc = read_record(Path(folder) / CONFIG)
    return doc is not None and FORMAT in doc


def required_record(model: ModelFile, dataset: str) -> dict[str, Any]:
    """The model's metrics document: present (the card and config.json are filled from it), complete, and of
    ``dataset``; its checkpoint present."""
    checkpoint, record = model.files.checkpoint, model.files.metrics
    if not checkpoint_file(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} not found: it is written by {model.script}")
    doc = check_complete(record, f"checkpoint {checkpoint}", model.script)
    if doc is None:
        raise UserError(f"{record} not found: the model folder's config.json and card are filled from the metrics "
                        f"document {model.script} writes beside {checkpoint.name}; re-run it")
    if doc.get("dataset") != dataset:
        raise UserError(f"{checkpoint} was trained on {doc.get('dataset')} ({record}), not {dataset}")
    if not isinstance(doc.get("args"), dict) or not isinstance(doc.get("test"), dict):
        raise UserError(f"{record} has no args or test report: not a metrics document of {model.script}")
    return doc


def seeds_summary(files: StageFiles, doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fusion's seeds summary when it describes the kept checkpoint (its best seed's row is the metrics
    document's run); a summary left by an earlier run is not the kept model's and is left out (logged)."""
    summary = read_record(files.seeds_summary)
    if summary is None:
        return None
    best = next((row for row in summary.get("seeds", []) if row.get("seed") == summary.get("best_seed")), None)
    if best is None or best.get("test_weighted_f1") != doc["test"]["weighted_f1"] or \
            best.get("selected_epoch") != doc.get("selected_epoch"):
        log.warning("%s does not describe %s (an earlier run's?): the card reports the kept model only",
                    files.seeds_summary, files.checkpoint)
        return None
    return summary


def model_config(dataset: str, docs: Mapping[str, Mapping[str, Any]], settings: FusionSettings,
                 seeds: Mapping[str, Any] | None) -> dict[str, Any]:
    """config.json: what the models are (dataset, labels, sizes, the fusion's settings, attention, prompt),
    how they were trained and selected (every model's arguments), and the files (filled by the export)."""
    fusion = docs["fusion"]
    flags = {**fusion["args"], **settings.flags()}
    return {
        FORMAT: VERSION, "library_name": "magtkd", "dataset": dataset, "labels": list(fusion["labels"]),
        "width": settings.hidden,
        "fusion": {"hidden": settings.hidden, "n_classes": settings.n_classes, "n_speaker": settings.n_speaker,
                   **settings.flags()},
        "attention": attention_version(flags),
        "prompt": docs["text"]["args"].get("prompt") or "full",
        "sizes": fusion.get("sizes", {}),
        "selection": {"rule": fusion.get("selection"), "test_scored": fusion.get("test_scored"),
                      "selected_epoch": fusion.get("selected_epoch"), "seed": flags.get("seed"),
                      "seeds": [row["seed"] for row in seeds["seeds"]] if seeds else [flags.get("seed")]},
        "test": {"accuracy": fusion["test"]["accuracy"], "weighted_f1": fusion["test"]["weighted_f1"]},
        "seeds": dict(seeds) if seeds else None,
        "training_args": {key: dict(doc["args"]) for key, doc in docs.items()},
        "models": {},
    }


def attention_version(flags: Mapping[str, Any]) -> str:
    """Which attention mask the fusion model was trained with (docs/METHOD.md §5, §7)."""
    if flags.get("paper_attention"):
        return "paper: the May-2025 release's mask, behind the paper's figures (docs/METHOD.md §7)"
    return "fixed: padded keys masked, as in the authors' Nov-2025 fix (docs/METHOD.md §5)"


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], name: str) -> None:
    """``state`` as a safetensors file (``format: pt``, as Hugging Face writes them); tensors that share storage
    are stored each on its own, which safetensors requires (loading copies them into the model anyway)."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if pointer in seen and tensor.numel() else tensor
        seen.add(pointer)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "magtkd": name})


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden sibling folder to fill; renamed onto ``out`` when the block ends without error, removed else."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        yield stage
        if out.is_dir() and any(out.iterdir()):
            os.replace(out, old)  # a model folder written before (check_out): replaced as a whole
        elif out.is_dir():
            out.rmdir()
        os.replace(stage, out)
    except OSError as err:
        raise WriteError(f"cannot write the model folder {out}: {os.strerror(err.errno) if err.errno else err}") \
            from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- loading (--model_dir)


def model_source(spec: DatasetSpec, model_dir: Path | None, save_dir: Path) -> Path:
    """Where a script reads the trained models: ``save_dir``, or ``model_dir`` after checking it is a complete
    model folder of ``spec``'s dataset (config.json's dataset and labels, every file present at its size)."""
    if model_dir is None:
        return Path(save_dir)
    config = read_config(Path(model_dir))
    if config.get("dataset") != spec.name or list(config.get("labels") or []) != list(spec.labels):
        raise ModelFolderError(f"model folder {model_dir} holds {config.get('dataset')}'s models (labels "
                               f"{config.get('labels')}) but this script is {spec.name}'s (labels {list(spec.labels)})")
    models = config.get("models") if isinstance(config.get("models"), dict) else {}
    missing = [m.key for m in pipeline_models(spec.name, Path(model_dir)) if m.key not in models]
    if missing:
        raise ModelFolderError(f"{Path(model_dir) / CONFIG} lists no {', '.join(missing)} model: not a whole "
                               "pipeline's folder; export it again")
    for key, entry in models.items():
        check_file(Path(model_dir), entry, key)
    log.info("reading the trained %s models from the model folder %s (%s)", spec.name, model_dir,
             ", ".join(entry["weights"] for entry in models.values()))
    return Path(model_dir)


def read_config(model_dir: Path) -> dict[str, Any]:
    """A model folder's config.json, checked to be one written by `export_model_folder`."""
    path = model_dir / CONFIG
    if not model_dir.is_dir():
        raise ModelFolderError(f"model folder {model_dir} does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{model_dir} has no {CONFIG}: not a model folder (python -m magtkd.hub export "
                               "writes one)") from None
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"{path} is unreadable ({err}); download the model folder again") from err
    if not isinstance(config, dict) or FORMAT not in config:
        raise ModelFolderError(f"{path} is not a MAGTKD model folder's config.json (no {FORMAT!r}); it is written "
                               "by python -m magtkd.hub export")
    if config[FORMAT] != VERSION:
        raise ModelFolderError(f"{path}: model folder layout version {config[FORMAT]}, this code reads {VERSION}")
    return config


def check_file(model_dir: Path, entry: Mapping[str, Any], key: str) -> None:
    """A model's safetensors and record must be there, the weights at the size config.json recorded."""
    for name in (entry.get("weights"), entry.get("record")):
        if not name or not (model_dir / name).is_file():
            raise ModelFolderError(f"model folder {model_dir}: the {key} model's {name} is missing (an incomplete "
                                   "download?); download the folder again")
    size = (model_dir / entry["weights"]).stat().st_size
    if size != entry.get("bytes"):
        raise ModelFolderError(f"model folder {model_dir}: {entry['weights']} has {size} bytes, config.json says "
                               f"{entry.get('bytes')} (an incomplete download?); download the folder again")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m magtkd.hub export <DS> --save_dir DIR --out DIR``."""
    from .cli import hub_parser
    from .runtime import setup_logging

    args = hub_parser(__doc__).parse_args(argv)
    setup_logging()
    return export_model_folder(args.dataset, args.save_dir, args.out)


if __name__ == "__main__":
    from .utils import run

    run(main)
