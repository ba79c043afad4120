"""A trained pipeline as one model folder (`magtkd.hub`, docs/METHOD.md §9): the export writes safetensors equal
to the checkpoints, a config.json and a card filled from the metrics documents, and publishes the folder whole;
``--model_dir`` reads it through the save folder's readers (the same fusion model, the same logits) and
refuses a folder of the other dataset or an incomplete one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_dialogues
from IEMOCAP.config import IEMOCAP
from magtkd import hub, results
from magtkd.artifacts import FIRST_STAGE_MODELS, StageFiles
from magtkd.checkpoints import CheckpointError, load_trained_fusion, read_state_dict, trained_fusion
from magtkd.fusion_data import dialogue_logits
from magtkd.fusion_settings import FusionRequest
from magtkd.model import AnchorGatedTransformer
from magtkd.utils import UserError
from MELD.config import MELD

WIDTH, HEADS = 8, 2
LABELS = list(IEMOCAP.labels)


def record(files: StageFiles, stage: str, args: dict, seed: int, sizes: dict | None = None) -> dict:
    """A complete metrics document with a real test report (gold and predictions drawn from ``seed``)."""
    rng = np.random.default_rng(seed)
    gold, preds = rng.integers(0, 6, 40), rng.integers(0, 6, 40)
    best = {"epoch": 3, "dev": {"accuracy": 0.5, "weighted_f1": 0.4 + seed / 1e5},
            "test": results.test_report(gold, preds, LABELS)}
    doc = results.metrics_document(stage=stage, script=f"IEMOCAP/{stage}.py", dataset="IEMOCAP", labels=LABELS,
                                   width=WIDTH, args={**args, "seed": seed}, sizes=sizes or {}, files=files,
                                   epochs=[], best=best, complete=True,
                                   test_every_epoch=stage == "multimodal_fusion")
    files.metrics.write_text(json.dumps(doc), encoding="utf-8")
    return doc


def write_save_folder(folder: Path, seeds: tuple[int, ...] = (2024, 2025)) -> Path:
    """Six checkpoints with their metrics documents as a trained IEMOCAP pipeline leaves them; the fusion trained
    with several seeds (the best dev seed kept) and 2 heads, which only its record says."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for key, (name, _) in FIRST_STAGE_MODELS.items():
        tied = torch.randn(5, WIDTH, generator=g)
        state = {"backbone.embed.weight": tied, "backbone.head.weight": tied,  # tensors sharing storage
                 "classifier.weight": torch.randn(6, WIDTH, generator=g), "classifier.bias": torch.zeros(6)}
        files = StageFiles.first_stage(folder, name)
        torch.save(state, files.checkpoint)
        record(files, name, {"epochs": 2, "learning_rate": 1e-5, "prompt": "full"}, 7)
    torch.manual_seed(0)
    fusion = AnchorGatedTransformer(WIDTH, 6, 2, n_head=HEADS)
    files = StageFiles.fusion(folder)
    torch.save(fusion.state_dict(), files.checkpoint)
    args = {"n_head": HEADS, "audio_feature": "audio_kd", "video_feature": "video", "lr": 1e-4, "epochs": 30,
            "batch_size": 16, "dropout": 0.5, "alpha": 0.7, "beta": 0.8, "feature_loss": True}
    sizes = {"train_dialogues": 3, "dev_dialogues": 2, "test_dialogues": 2, "train_utterances": 30,
             "dev_utterances": 20, "test_utterances": 40, "variant": fusion.variant.as_dict()}
    docs = {seed: record(StageFiles.fusion(folder, f"_seed{seed}"), "multimodal_fusion", args, seed, sizes)
            for seed in seeds}
    best = max(seeds, key=lambda s: docs[s]["dev_weighted_f1"])
    record(files, "multimodal_fusion", args, best, sizes)
    rows = [results.seed_row(s, docs[s], LABELS) for s in seeds]
    summary = {**results.seeds_summary(rows), "best_seed": best}
    files.seeds_summary.write_text(json.dumps(summary), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    save_dir = write_save_folder(root / "save_model")
    result = hub.export_model_folder("IEMOCAP", save_dir, root / "magtkd-iemocap")
    return {"save_dir": save_dir, "out": root / "magtkd-iemocap", "result": result, "root": root}


def test_export_writes_the_checkpoints_as_safetensors_beside_their_records(exported):
    from safetensors.torch import load_file

    out, save_dir = exported["out"], exported["save_dir"]
    config = json.loads((out / hub.CONFIG).read_text(encoding="utf-8"))
    for model in hub.pipeline_models("IEMOCAP", save_dir):
        saved = torch.load(model.files.checkpoint, weights_only=True)
        stored = load_file(out / model.weights)
        assert stored.keys() == saved.keys()
        assert all(torch.equal(stored[k], saved[k]) and stored[k].dtype == saved[k].dtype for k in saved)
        assert (out / model.files.metrics.name).read_bytes() == model.files.metrics.read_bytes()
        entry = config["models"][model.key]
        assert entry == {"weights": model.weights, "record": model.files.metrics.name, "script": model.script,
                         "bytes": (out / model.weights).stat().st_size}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [hub.CONFIG, hub.CARD, "multimodal_fusion_seeds.json"]
        + [e[k] for e in config["models"].values() for k in ("weights", "record")])
    assert not list(out.parent.glob(".magtkd-iemocap.*"))  # nothing left of the staging folder


def test_config_holds_the_fusion_settings_sizes_selection_and_every_models_arguments(exported):
    config = json.loads((exported["out"] / hub.CONFIG).read_text(encoding="utf-8"))
    fusion = json.loads(StageFiles.fusion(exported["save_dir"]).metrics.read_text(encoding="utf-8"))
    assert config[hub.FORMAT] == hub.VERSION and config["dataset"] == "IEMOCAP" and config["labels"] == LABELS
    assert config["fusion"] == {"hidden": WIDTH, "n_classes": 6, "n_speaker": 2, "modalities": ["T", "A", "V"],
                                "gates": True, "speaker_embedding": True, "fusion": "anchor", "n_head": HEADS,
                                "audio_feature": "audio_kd", "video_feature": "video", "separate_text_blocks": False,
                                "paper_attention": False, "padding_speaker": "own"}
    assert config["sizes"] == fusion["sizes"] and config["prompt"] == "full"
    assert config["attention"].startswith("fixed")
    assert config["test"] == {"accuracy": fusion["test"]["accuracy"], "weighted_f1": fusion["test"]["weighted_f1"]}
    assert config["selection"]["seed"] == fusion["args"]["seed"] and config["selection"]["seeds"] == [2024, 2025]
    assert config["training_args"]["fusion"] == fusion["args"]
    assert config["training_args"]["audio_kd"]["learning_rate"] == 1e-5


def test_the_model_folder_rebuilds_the_same_fusion_model_and_logits(exported):
    request = FusionRequest(default_features=("audio_kd", "video"))
    models = {}
    for folder in (exported["save_dir"], hub.model_source(IEMOCAP, exported["out"], Path("unused"))):
        settings = trained_fusion(StageFiles.fusion(folder), "IEMOCAP", request)
        assert settings.n_head == HEADS  # from the record (the copied metrics document)
        models[folder] = load_trained_fusion(settings, StageFiles.fusion(folder).checkpoint)
    first, second = models.values()
    data = random_dialogues([3, 5, 2], n_speaker=2)
    assert torch.equal(dialogue_logits(first, data, 2), dialogue_logits(second, data, 2))


def test_model_source_is_the_save_folder_without_model_dir(tmp_path):
    assert hub.model_source(IEMOCAP, None, tmp_path) == tmp_path


def test_a_model_folder_of_the_other_dataset_or_incomplete_is_refused(exported, tmp_path):
    with pytest.raises(hub.ModelFolderError, match="holds IEMOCAP's models .* this script is MELD's"):
        hub.model_source(MELD, exported["out"], tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(exported["out"], copy)
    weights = copy / "video.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(hub.ModelFolderError, match="video.safetensors has 100 bytes, config.json says"):
        hub.model_source(IEMOCAP, copy, tmp_path)
    weights.unlink()
    with pytest.raises(hub.ModelFolderError, match="video.safetensors is missing"):
        hub.model_source(IEMOCAP, copy, tmp_path)
    (copy / hub.CONFIG).write_text("{}", encoding="utf-8")
    with pytest.raises(hub.ModelFolderError, match="not a MAGTKD model folder"):
        hub.model_source(IEMOCAP, copy, tmp_path)
    with pytest.raises(hub.ModelFolderError, match="no config.json"):
        hub.model_source(IEMOCAP, exported["save_dir"], tmp_path)


def test_a_truncated_safetensors_file_is_one_error_naming_it(exported, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "text.safetensors").write_bytes((exported["out"] / "text.safetensors").read_bytes()[:60])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*text\.safetensors"):
        read_state_dict(folder / "text.bin", "IEMOCAP/text.py")


def test_export_refuses_an_incomplete_record_another_dataset_and_a_foreign_out_folder(exported, tmp_path):
    save_dir = tmp_path / "save"
    shutil.copytree(exported["save_dir"], save_dir)
    with pytest.raises(UserError, match="was trained on IEMOCAP"):
        hub.export_model_folder("MELD", save_dir, tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="holding other files"):
        hub.export_model_folder("IEMOCAP", save_dir, foreign)
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "mine"
    with pytest.raises(UserError, match="inside\\) the save folder"):
        hub.export_model_folder("IEMOCAP", save_dir, save_dir / "card")
    audio = StageFiles.first_stage(save_dir, "audio").metrics
    audio.write_text(json.dumps({**json.loads(audio.read_text(encoding="utf-8")), "complete": False}), encoding="utf-8")
    with pytest.raises(UserError, match="incomplete"):
        hub.export_model_folder("IEMOCAP", save_dir, tmp_path / "out")
    audio.unlink()
    with pytest.raises(UserError, match="audio.json not found"):
        hub.export_model_folder("IEMOCAP", save_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_seeds_summary_of_another_run_is_left_out_and_a_model_folder_is_replaced_whole(exported, tmp_path):
    save_dir = tmp_path / "save"
    shutil.copytree(exported["save_dir"], save_dir)
    files = StageFiles.fusion(save_dir)
    summary = json.loads(files.seeds_summary.read_text(encoding="utf-8"))
    for row in summary["seeds"]:
        row["test_weighted_f1"] += 0.1  # not the kept checkpoint's run any more
    files.seeds_summary.write_text(json.dumps(summary), encoding="utf-8")
    out = tmp_path / "folder"
    shutil.copytree(exported["out"], out)
    (out / "stale.txt").write_text("from before", encoding="utf-8")
    (out / hub.CONFIG).write_text(json.dumps({hub.FORMAT: hub.VERSION}), encoding="utf-8")
    hub.export_model_folder("IEMOCAP", save_dir, out)
    config = json.loads((out / hub.CONFIG).read_text(encoding="utf-8"))
    assert config["seeds"] is None and config["selection"]["seeds"] == [config["selection"]["seed"]]
    assert not (out / "stale.txt").exists() and not (out / "multimodal_fusion_seeds.json").exists()
    assert "mean ± std" not in (out / hub.CARD).read_text(encoding="utf-8")
