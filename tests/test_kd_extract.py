"""Stages 5-8 inputs (docs/METHOD.md §3, §4): distillation checkpoints and first-stage feature pickles.

The demo (``demo`` fixture) already trained every model and wrote the pickles;
these tests read its artifacts, evaluate/extract against COPIES of its
checkpoints, and train only three 1-epoch KD runs on a few rows of the generated
data (to watch what the KD stage loads, how it treats the teacher and how it
weights its loss terms).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers import copy_checkpoints, flags, script, stage_paths
from IEMOCAP.config import IEMOCAP, speaker_letter
from magtkd import checkpoints, engine, loaders, losses, pretrained
from magtkd.artifacts import SubstitutionReport, feature_path
from magtkd.dataset import build_samples, group_dialogues, load_speaker2id, load_split
from magtkd.loaders import SampleDataset
from magtkd.spec import SPLITS
from magtkd.pickles import FEATURE_KEYS, load_features
from magtkd.checkpoints import load_checkpoint
from magtkd.pretrained import load_encoder
from magtkd.synthetic.models import AV_HIDDEN, TEXT_HIDDEN
from MELD.config import MELD

DATASETS = {"IEMOCAP": IEMOCAP, "MELD": MELD}
STUDENTS = ("audio", "video")
PICKLE_KEYS = {"vids", *FEATURE_KEYS, "speakers", "labels", "dia2utt"}
CHECKPOINTS = {"text": "text.bin", "audio": "audio.bin", "video": "video.bin",
               "audio_kd": "text_KD_audio.bin", "video_kd": "text_KD_video.bin"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- KD checkpoints (docs/METHOD.md §3)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("student", STUDENTS)
def test_kd_checkpoint_and_metrics_json(demo, dataset, student):
    save_dir = stage_paths(demo["workdir"], dataset)["save_dir"]
    name = f"text_KD_{student}.bin"
    state = torch.load(save_dir / name, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())
    # A student checkpoint: the same keys and shapes as the unimodal model of its modality.
    unimodal = torch.load(save_dir / f"{student}.bin", map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in unimodal.items()}
    doc = json.loads((save_dir / f"text_KD_{student}.json").read_text(encoding="utf-8"))
    assert doc["checkpoint"] == name
    assert doc["args"]["student"] == student and doc["args"]["teacher"] == "text"
    dev = [row["dev"]["weighted_f1"] for row in doc["epochs"]]
    assert len(dev) == doc["args"]["epochs"] and doc["selected_epoch"] == 1 + dev.index(max(dev))
    for label in DATASETS[dataset].labels:
        assert {"precision", "recall", "f1-score", "support"} <= set(doc["test"]["per_class"][label])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_kd_objective_defaults_per_dataset(demo, dataset):
    expected = {"IEMOCAP": (1.0, 0.0), "MELD": (0.1, 1.0)}[dataset]  # docs/METHOD.md §3
    for student in STUDENTS:
        save_dir = stage_paths(demo["workdir"], dataset)["save_dir"]
        args = json.loads((save_dir / f"text_KD_{student}.json").read_text(encoding="utf-8"))["args"]
        assert (args["logit_weight"], args["feature_weight"]) == expected
        assert args["tau"] == 2.0


@pytest.fixture(scope="module")
def kd_evaluated(demo, tmp_path_factory):
    """kd_evaluated(dataset, student): ``KD.py --train False`` against copies of the demo's checkpoints."""
    runs: dict[tuple[str, str], dict] = {}

    def run(dataset: str, student: str) -> dict:
        if (dataset, student) not in runs:
            demo_paths = stage_paths(demo["workdir"], dataset)
            names = ["text.bin", f"text_KD_{student}.bin"] + (["audio.bin"] if student == "audio" else [])
            report = f"text_KD_{student}_substitutions.tsv"
            if (demo_paths["save_dir"] / report).is_file():
                names.append(report)
            paths = copy_checkpoints(demo_paths, tmp_path_factory.mktemp(f"kd_eval_{dataset}_{student}"), *names)
            result = script(dataset, "KD").main(flags(paths, train="False", student=student, device="cpu"))
            runs[(dataset, student)] = {"paths": paths, "demo_paths": demo_paths, "result": result}
        return runs[(dataset, student)]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("student", STUDENTS)
def test_kd_evaluation_only_reproduces_saved_test_metrics(kd_evaluated, dataset, student):
    run = kd_evaluated(dataset, student)
    doc = json.loads((run["demo_paths"]["save_dir"] / f"text_KD_{student}.json").read_text(encoding="utf-8"))
    result = run["result"]
    assert result["accuracy"] == doc["test"]["accuracy"]
    assert result["weighted_f1"] == doc["test"]["weighted_f1"]
    assert result["per_class"] == doc["test"]["per_class"]
    for name in ("text.bin", f"text_KD_{student}.bin"):  # evaluation changes no checkpoint
        assert digest(run["paths"]["save_dir"] / name) == digest(run["demo_paths"]["save_dir"] / name)
    assert not (run["paths"]["save_dir"] / f"text_KD_{student}.json").exists()


@pytest.mark.slow
def test_kd_evaluation_only_keeps_the_training_substitution_report(kd_evaluated):
    run = kd_evaluated("MELD", "audio")
    trained = SubstitutionReport.read(run["demo_paths"]["save_dir"] / "text_KD_audio_substitutions.tsv")
    assert {s.key.split("/")[0] for s in trained} == set(SPLITS)
    assert SubstitutionReport.read(run["paths"]["save_dir"] / "text_KD_audio_substitutions.tsv") == trained
    evaluated_report = SubstitutionReport.read(run["paths"]["save_dir"] / "text_KD_audio_eval_substitutions.tsv")
    assert evaluated_report == [t for t in trained if t.key.startswith("test/")]


# --------------------------------------------------------------------------- what a KD run loads


def tiny_iemocap(generated: Path, tmp: Path, rows: dict[str, int]) -> Path:
    """A data folder with the first ``rows[split]`` rows of each generated CSV (media linked, not copied)."""
    source = generated / "datasets" / "IEMOCAP"
    target = tmp / "IEMOCAP"
    target.mkdir(parents=True)
    for session in source.glob("Session*"):
        (target / session.name).symlink_to(session, target_is_directory=True)
    for split, n in rows.items():
        name = IEMOCAP.csv_names[split]
        frame = pd.read_csv(source / name, dtype=str, keep_default_na=False)
        frame.head(n).to_csv(target / name, index=False)
    return target


class Watch:
    """Records what a KD run builds, which fields its loaders get, what it loads, the teacher's state,
    and, for every training step, whether the loss is ``CE + logit_weight L_logit + feature_weight L_feat``
    of the very terms the run computed (the KD objective of docs/METHOD.md §3)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, logit_weight: float, feature_weight: float) -> None:
        self.built: list[str] = []
        self.fields: dict[str, list[str]] = {}
        self.checkpoints: list[str] = []
        self.teacher_calls: list[tuple[bool, bool, bool]] = []
        self.losses: dict[str, int] = {"logit": 0, "feature": 0}
        self.taus: set[float] = set()
        self.objectives: list[tuple[float, float, float]] = []  # (loss of the step, CE + weighted terms, CE)
        self._terms: dict[str, torch.Tensor] = {}
        build, make_loaders = pretrained.load_encoder, loaders.split_loaders
        load, fit = checkpoints.load_checkpoint, engine.fit
        logit, feature, cross_entropy = losses.logit_kd_loss, losses.feature_kd_loss, F.cross_entropy

        def watched_build(modality, pretrained_dir, num_classes, feature_dir=None, audio_cache=None, **options):
            model, field = build(modality, pretrained_dir, num_classes, feature_dir, audio_cache, **options)
            if modality == "text":  # the teacher
                model.register_forward_pre_hook(self._teacher_call)
            self.built.append(modality)
            return model, field

        def watched_loaders(samples, fields, batch_size, num_workers, seed, splits=SPLITS):
            for split in splits:
                self.fields[split] = [f.name for f in fields]
            return make_loaders(samples, fields, batch_size, num_workers, seed, splits)

        def watched_load(model, path, produced_by, dataset=None, labels=None):
            self.checkpoints.append(Path(path).name)
            return load(model, path, produced_by, dataset, labels)

        def watched_logit(s, t, tau=2.0, **kw):
            self.losses["logit"] += 1
            self.taus.add(tau)
            self._terms["logit"] = logit(s, t, tau=tau, **kw)
            return self._terms["logit"]

        def watched_feature(s, t):
            self.losses["feature"] += 1
            self._terms["feature"] = feature(s, t)
            return self._terms["feature"]

        def watched_cross_entropy(*args, **kwargs):
            self._terms["ce"] = cross_entropy(*args, **kwargs)
            return self._terms["ce"]

        def watched_fit(model, objective, *args, **kwargs):
            # The stage's own objective (KD.objective with its weights); every training step's loss is
            # compared with CE + logit_weight L_logit + feature_weight L_feat of the terms it computed.
            def checked(student, batch):
                self._terms.clear()
                loss = objective(student, batch)
                zero = torch.zeros(())
                expected = (self._terms["ce"] + logit_weight * self._terms.get("logit", zero)
                            + feature_weight * self._terms.get("feature", zero))
                self.objectives.append((loss.item(), expected.item(), self._terms["ce"].item()))
                return loss

            return fit(model, checked, *args, **kwargs)

        monkeypatch.setattr(pretrained, "load_encoder", watched_build)
        monkeypatch.setattr(loaders, "split_loaders", watched_loaders)
        monkeypatch.setattr(checkpoints, "load_checkpoint", watched_load)
        monkeypatch.setattr(engine, "fit", watched_fit)
        monkeypatch.setattr(losses, "logit_kd_loss", watched_logit)
        monkeypatch.setattr(losses, "feature_kd_loss", watched_feature)
        monkeypatch.setattr(F, "cross_entropy", watched_cross_entropy)

    def _teacher_call(self, module, _inputs) -> None:
        trainable = any(p.requires_grad for p in module.parameters())
        self.teacher_calls.append((module.training, trainable, torch.is_grad_enabled()))


def refuse(field: str):
    def load(self, sample):
        raise AssertionError(f"the KD run loaded {field} for {sample.utterance.key}")

    return load


@pytest.mark.slow
@pytest.mark.parametrize("student", STUDENTS)
def test_kd_run_loads_only_its_modalities_and_freezes_the_teacher(demo, generated, tmp_path, monkeypatch, student):
    demo_paths = stage_paths(demo["workdir"], "IEMOCAP")
    data_dir = tiny_iemocap(generated, tmp_path, {"train": 8, "dev": 4, "test": 4})
    paths = copy_checkpoints({**demo_paths, "data_dir": data_dir, "pretrained_dir": generated / "pretrained_model"},
                             tmp_path, "text.bin", "audio.bin")
    other = "video" if student == "audio" else "audio"
    monkeypatch.setattr(getattr(loaders, f"{other.capitalize()}Field"), "load", refuse(other))
    watch = Watch(monkeypatch, logit_weight=1.0, feature_weight=0.0)
    teacher_before = digest(paths["save_dir"] / "text.bin")
    audio_before = digest(paths["save_dir"] / "audio.bin")

    script("IEMOCAP", "KD").main(flags(paths, student=student, epochs=1, device="cpu"))

    assert sorted(watch.built) == sorted(["text", student])  # the other modality's model is never built
    assert watch.fields == {"train": ["text", student], "dev": [student], "test": [student]}
    # Teacher from text.bin; audio student from audio.bin, video student from the pretrained TimeSformer.
    assert watch.checkpoints == (["text.bin", "audio.bin"] if student == "audio" else ["text.bin"])
    assert watch.teacher_calls and len(watch.teacher_calls) == 2  # 8 train rows / batch 4; dev/test: student only
    assert all(call == (False, False, False) for call in watch.teacher_calls), watch.teacher_calls
    # IEMOCAP objective: CE + L_logit (tau 2); no feature loss (docs/METHOD.md §3).
    assert watch.losses == {"logit": 2, "feature": 0} and watch.taus == {2.0}
    assert len(watch.objectives) == 2  # CE + 1.0 * L_logit at every training step
    for loss, expected, _ in watch.objectives:
        assert loss == pytest.approx(expected, rel=1e-6)
    assert digest(paths["save_dir"] / "text.bin") == teacher_before
    assert digest(paths["save_dir"] / "audio.bin") == audio_before
    state = torch.load(paths["save_dir"] / f"text_KD_{student}.bin", weights_only=True)
    reference = torch.load(demo_paths["save_dir"] / f"{student}.bin", weights_only=True)
    assert set(state) == set(reference)
    args = json.loads((paths["save_dir"] / f"text_KD_{student}.json").read_text(encoding="utf-8"))["args"]
    assert args["student"] == student and args["teacher"] == "text" and args["epochs"] == 1
    assert (args["logit_weight"], args["feature_weight"], args["learning_rate"]) == (1.0, 0.0, 1e-5)


@pytest.mark.slow
def test_kd_objective_weights_its_terms(demo, generated, tmp_path, monkeypatch):
    """``--logit_weight``/``--feature_weight``/``--tau`` set the objective CE + w_l L_logit + w_f L_feat
    (MELD's weights 0.1 / 1, on a few IEMOCAP rows)."""
    demo_paths = stage_paths(demo["workdir"], "IEMOCAP")
    data_dir = tiny_iemocap(generated, tmp_path, {"train": 8, "dev": 4, "test": 4})
    paths = copy_checkpoints({**demo_paths, "data_dir": data_dir, "pretrained_dir": generated / "pretrained_model"},
                             tmp_path, "text.bin", "audio.bin")
    watch = Watch(monkeypatch, logit_weight=0.1, feature_weight=1.0)

    script("IEMOCAP", "KD").main(flags(paths, student="audio", epochs=1, device="cpu", logit_weight=0.1,
                                       feature_weight=1.0, tau=3.0))

    assert watch.losses == {"logit": 2, "feature": 2} and watch.taus == {3.0}
    assert len(watch.objectives) == 2
    for loss, expected, ce in watch.objectives:
        assert loss == pytest.approx(expected, rel=1e-6)
        assert loss != pytest.approx(ce, rel=1e-6)  # the distillation terms really contribute
    args = json.loads((paths["save_dir"] / "text_KD_audio.json").read_text(encoding="utf-8"))["args"]
    assert (args["logit_weight"], args["feature_weight"], args["tau"]) == (0.1, 1.0, 3.0)


# --------------------------------------------------------------------------- feature pickles (docs/METHOD.md §4)


def expected_speakers(spec, dialogue: list, speaker2id: dict | None) -> list[int]:
    if speaker2id is not None:
        return [speaker2id[u.speaker] for u in dialogue]
    order: dict[str, int] = {}
    return [order.setdefault(speaker_letter(u.speaker), len(order)) for u in dialogue]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("split", SPLITS)
def test_feature_pickle_layout(demo, dataset, split):
    spec, paths = DATASETS[dataset], stage_paths(demo["workdir"], dataset)
    path = feature_path(paths["feature_dir"], split)
    with open(path, "rb") as handle:  # our own file: the exact top-level keys
        assert set(pickle.load(handle)) == PICKLE_KEYS
    features = load_features(path)  # the restricted unpickler admits it
    assert set(features) == PICKLE_KEYS

    utts = load_split(spec, paths["data_dir"], split)
    dialogues = group_dialogues(utts)
    speaker2id = load_speaker2id(paths["data_dir"]) if dataset == "MELD" else None
    vids = features["vids"]
    assert vids == [dia for dia, _ in dialogues] and all(type(v) is int for v in vids)
    for key in FEATURE_KEYS + ("speakers", "labels", "dia2utt"):
        assert isinstance(features[key], dict) and list(features[key]) == vids, key
    for dia, dialogue in dialogues:
        assert features["dia2utt"][dia] == [u.utterance_id for u in dialogue]
        assert features["labels"][dia] == [u.label for u in dialogue]
        assert features["speakers"][dia] == expected_speakers(spec, dialogue, speaker2id)
        for key in ("speakers", "labels", "dia2utt"):
            assert all(type(v) is int for v in features[key][dia])
        for key in FEATURE_KEYS:
            vectors = features[key][dia]
            assert isinstance(vectors, list) and len(vectors) == len(dialogue)
            for vec in vectors:
                # D is the audio/video width (32), not the text model's (48) (docs/METHOD.md §2).
                assert isinstance(vec, np.ndarray) and vec.dtype == np.float32 and vec.shape == (AV_HIDDEN,)
                assert np.isfinite(vec).all()
    assert AV_HIDDEN != TEXT_HIDDEN
    if dataset == "IEMOCAP":
        assert {s for dia in vids for s in features["speakers"][dia]} == {0, 1}
    flat = {key: np.stack([v for dia in vids for v in features[key][dia]]) for key in FEATURE_KEYS}
    for a, b in (("audio", "audio_kd"), ("video", "video_kd"), ("text", "audio")):
        assert not np.allclose(flat[a], flat[b]), (a, b)  # each key has its own model


@pytest.mark.slow
def test_feature_vectors_come_from_their_checkpoints(demo):
    """The first batch of IEMOCAP test, run through each checkpoint, gives the pickle's vectors."""
    paths = stage_paths(demo["workdir"], "IEMOCAP")
    utts = load_split(IEMOCAP, paths["data_dir"], "test")
    features = load_features(feature_path(paths["feature_dir"], "test"))
    flat = {key: [v for dia in features["vids"] for v in features[key][dia]] for key in FEATURE_KEYS}
    order = [u for _, dialogue in group_dialogues(utts) for u in dialogue]
    assert order == utts  # CSV order is already grouped by dialogue here
    batch_rows = 16  # extract_first_stage_features.py's default --batch_size, so batches match
    samples = build_samples(utts)[:batch_rows]
    with torch.inference_mode():
        for key, checkpoint in CHECKPOINTS.items():
            modality = key.removesuffix("_kd")
            model, field = load_encoder(modality, paths["pretrained_dir"], IEMOCAP.num_classes, paths["feature_dir"])
            load_checkpoint(model, paths["save_dir"] / checkpoint, "test").eval()
            dataset = SampleDataset(samples, [field])
            batch = dataset.collate([dataset[i] for i in range(len(samples))])
            rep, _ = model.encode(batch)
            expected = np.stack(flat[key][:batch_rows])
            assert np.allclose(rep.numpy(), expected, atol=1e-5), (key, np.abs(rep.numpy() - expected).max())


def flat_by_key(features: dict, key: str) -> dict[tuple[int, int], np.ndarray]:
    """(dialogue id, utterance id) -> vector of one feature key."""
    return {(dia, utt): vec for dia in features["vids"]
            for utt, vec in zip(features["dia2utt"][dia], features[key][dia])}


@pytest.fixture(scope="module")
def extracted_twice(demo, generated, tmp_path_factory):
    """IEMOCAP features extracted with --batch_size 1 and 8 from the demo's checkpoints.

    A few rows per split keep it quick (the prefixes of the kept rows are whole);
    the demo's stored frames are copied into each feature folder.
    """
    paths = stage_paths(demo["workdir"], "IEMOCAP")
    data_dir = tiny_iemocap(generated, tmp_path_factory.mktemp("extract_data"), {"train": 12, "dev": 6, "test": 10})
    out = {}
    for batch_size in (1, 8):
        feature_dir = tmp_path_factory.mktemp(f"features_bs{batch_size}")
        shutil.copytree(paths["feature_dir"] / "video", feature_dir / "video")
        strays = [feature_dir / f".{name}.k1ll.tmp" for name in  # left by a killed run's writes
                  ("first_stage_test_features.pkl", "first_stage_features.json", "first_stage_substitutions.tsv")]
        for stray in strays:
            stray.write_bytes(b"")
        before = {name: digest(paths["save_dir"] / name) for name in CHECKPOINTS.values()}
        script("IEMOCAP", "extract_first_stage_features").main(
            flags({**paths, "data_dir": data_dir, "feature_dir": feature_dir}, batch_size=batch_size, device="cpu"))
        assert {name: digest(paths["save_dir"] / name) for name in CHECKPOINTS.values()} == before
        assert not any(stray.exists() for stray in strays)  # removed at the start
        out[batch_size] = {split: load_features(feature_path(feature_dir, split)) for split in SPLITS}
    # The demo's own extraction (--batch_size 16, all rows), for the rows kept here.
    out[16] = {split: load_features(feature_path(paths["feature_dir"], split)) for split in SPLITS}
    return out


@pytest.mark.slow
def test_extraction_metadata_does_not_depend_on_batch_size(extracted_twice):
    for split in SPLITS:
        one, eight, full = (extracted_twice[b][split] for b in (1, 8, 16))
        for key in ("vids", "speakers", "labels", "dia2utt"):
            assert one[key] == eight[key], (split, key)
        kept = flat_by_key(one, "text")
        assert kept and set(kept) <= set(flat_by_key(full, "text"))
        for dia in one["vids"]:  # the kept rows are prefixes of the demo's dialogues
            n = len(one["labels"][dia])
            assert one["labels"][dia] == full["labels"][dia][:n]
            assert one["speakers"][dia] == full["speakers"][dia][:n]


@pytest.mark.slow
@pytest.mark.parametrize("key", [
    "text", "video", "video_kd",
    "audio", "audio_kd",
])
def test_extracted_features_do_not_depend_on_batch_size(extracted_twice, key):
    for split in SPLITS:
        one, eight, full = (flat_by_key(extracted_twice[b][split], key) for b in (1, 8, 16))
        assert list(one) == list(eight)
        a, b = np.stack(list(one.values())), np.stack(list(eight.values()))
        assert np.allclose(a, b, atol=1e-5, rtol=0), (split, np.abs(a - b).max())
        c = np.stack([full[k] for k in one])
        assert np.allclose(a, c, atol=1e-5, rtol=0), (split, np.abs(a - c).max())


# --------------------------------------------------------------------------- the fusion stage reads them


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
def test_fusion_labels_follow_the_test_pickle(demo, dataset):
    paths = stage_paths(demo["workdir"], dataset)
    test = load_features(feature_path(paths["feature_dir"], "test"))
    out = json.loads((paths["save_dir"] / "multimodal_fusion_best.json").read_text(encoding="utf-8"))
    assert out["labels"] == [y for dia in test["vids"] for y in test["labels"][dia]]
    assert len(out["preds"]) == len(out["labels"])
    assert set(out["preds"]) <= set(range(DATASETS[dataset].num_classes))
