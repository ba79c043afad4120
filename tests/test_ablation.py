"""Ablations (issue 23): fusion variants through the script, absent modalities never read, prompt variants
and their record, the ablation tables (statistics, files, resumability) and the demo's kept-model headline."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import copy_checkpoints, dataset_spec, flags, script, stage_paths
from sklearn.metrics import f1_score

from magtkd import ablation, comparison, results, spec, utils
from magtkd.artifacts import StageFiles, feature_path
from magtkd.loaders import TextField
from magtkd.prompt import SPEAKER_TOKENS, build_prompt
from magtkd.spec import PROMPTS
from magtkd.pickles import load_features
from magtkd.pretrained import load_tokenizer, text_prompt
from magtkd.synthetic.features import write_synthetic_features

FAST = ["--epochs", "2", "--n_head", "2", "--device", "cpu", "--lr", "1e-3", "--batch_size", "2"]


@pytest.fixture(scope="module")
def pickles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("features")
    write_synthetic_features(folder, dataset_spec("IEMOCAP"), 6, 16, 0)
    return folder


def fusion(*argv: str) -> dict:
    return script("IEMOCAP", "multimodal_fusion").main(list(argv))


def test_weighted_f1_of_weights_is_sklearns_on_the_repeated_utterances():
    rng = np.random.default_rng(1)
    labels, preds = rng.integers(0, 5, 60), rng.integers(0, 6, 60)
    weights = rng.integers(0, 4, (3, 60))
    ours = comparison.weighted_f1_weighted(labels, preds, weights.astype(float), 6)
    for w, value in zip(weights, ours):
        theirs = f1_score(np.repeat(labels, w), np.repeat(preds, w), average="weighted", zero_division=0)
        assert value == pytest.approx(theirs, abs=1e-12)


def test_paired_bootstrap_identical_and_better_models():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    dialogues = np.repeat(np.arange(40), 5)
    same = comparison.paired_bootstrap(labels, dialogues, [labels], [labels], 3)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    noisy = np.where(rng.random(200) < 0.6, rng.integers(0, 3, 200), labels)
    better = comparison.paired_bootstrap(labels, dialogues, [labels], [noisy], 3)
    assert better["difference"] > 0.2 and better["p_value"] < 0.01


def test_text_only_fusion_never_reads_audio_or_video(pickles: Path, tmp_path: Path):
    save = tmp_path / "T"
    trained = fusion(*FAST, "--feature_dir", str(pickles), "--save_dir", str(save), "--modalities", "T")
    assert trained["sizes"]["variant"] == {"modalities": ["T"], "gates": True, "speaker_embedding": True,
                                           "fusion": "anchor"}
    noisy = tmp_path / "noisy"
    shutil.copytree(pickles, noisy)
    rng = np.random.default_rng(5)
    for split in ("train", "dev", "test"):
        path = feature_path(noisy, split)
        data = pickle.loads(path.read_bytes())
        for key in ("audio", "audio_kd", "video", "video_kd"):
            data[key] = {v: [rng.normal(size=x.shape).astype(np.float32) for x in rows] for v, rows in data[key].items()}
        path.write_bytes(pickle.dumps(data))
    clean = fusion("--feature_dir", str(pickles), "--save_dir", str(save), "--train", "False", "--n_head", "2")
    other = fusion("--feature_dir", str(noisy), "--save_dir", str(save), "--train", "False", "--n_head", "2")
    assert clean["preds"] == other["preds"]
    assert clean["weighted_f1"] == pytest.approx(trained["test"]["weighted_f1"])
    # ... and the absent keys are not even required
    path = feature_path(noisy, "test")
    data = pickle.loads(path.read_bytes())
    for key in ("audio", "audio_kd", "video", "video_kd"):
        del data[key]
    path.write_bytes(pickle.dumps(data))
    assert fusion("--feature_dir", str(noisy), "--save_dir", str(save), "--train", "False", "--n_head", "2",
                  "--modalities", "T")["preds"] == clean["preds"]
    with pytest.raises(utils.UserError, match=r"--modalities T A V but checkpoint .* --modalities T\b"):
        fusion("--feature_dir", str(pickles), "--save_dir", str(save), "--train", "False", "--n_head", "2",
               "--modalities", "T", "A", "V")


@pytest.mark.parametrize("extra", [["--modalities", "A", "V"], ["--gates", "False", "--speaker_embedding", "False"],
                                   ["--fusion", "concat", "--modalities", "T", "V"]])
@pytest.mark.slow
def test_variants_train_and_evaluate_from_the_checkpoint(pickles: Path, tmp_path: Path, extra: list[str]):
    trained = fusion(*FAST, *extra, "--feature_dir", str(pickles), "--save_dir", str(tmp_path))
    again = fusion("--feature_dir", str(pickles), "--save_dir", str(tmp_path), "--train", "False", "--n_head", "2")
    assert again["variant"] == trained["sizes"]["variant"]
    assert again["weighted_f1"] == pytest.approx(trained["test"]["weighted_f1"])
    doc = json.loads(StageFiles.fusion(tmp_path).metrics.read_text())
    assert doc["sizes"]["variant"] == trained["sizes"]["variant"]


def test_duplicate_modality_is_an_error(pickles: Path, tmp_path: Path):
    with pytest.raises(utils.UserError, match="listed twice"):
        fusion(*FAST, "--modalities", "T", "t", "--feature_dir", str(pickles), "--save_dir", str(tmp_path))


def test_prompt_variants():
    texts, speakers = ("hi there", "oh no", "fine"), (0, 1, 0)
    assert build_prompt(texts, speakers) == "<s1> hi there <s2> oh no <s1> fine </s> Now<s1> feels"
    assert build_prompt(texts, speakers, "no_template") == "<s1> hi there <s2> oh no <s1> fine"
    assert build_prompt(texts, speakers, "no_speakers") == "hi there oh no fine </s> Now feels"
    assert build_prompt(texts, speakers, "no_context") == "<s1> fine </s> Now<s1> feels"
    assert PROMPTS == spec.PROMPTS


@pytest.mark.slow
def test_text_prompt_no_speakers_is_recorded_and_used(generated: Path, tmp_path: Path):
    paths = stage_paths(generated, "IEMOCAP")
    paths["save_dir"] = tmp_path
    script("IEMOCAP", "text").main(flags(paths, epochs="1", prompt="no_speakers", device="cpu"))
    record = tmp_path / "text.json"
    assert json.loads(record.read_text())["args"]["prompt"] == "no_speakers"
    assert text_prompt(record, None) == "no_speakers"
    with pytest.raises(utils.UserError, match="--prompt full but the text model was trained with --prompt no_speakers"):
        text_prompt(record, "full")
    tokenizer = load_tokenizer(paths["pretrained_dir"])
    from magtkd.dataset import load_samples
    from magtkd.prompt import add_speaker_tokens

    add_speaker_tokens(tokenizer)
    speaker_ids = set(tokenizer.convert_tokens_to_ids(list(SPEAKER_TOKENS)))
    samples = load_samples(dataset_spec("IEMOCAP"), paths["data_dir"], ("test",))["test"]
    field = TextField(tokenizer, text_prompt(record, None))
    assert all(not speaker_ids & set(field.load(s)) for s in samples)
    assert any(speaker_ids & set(TextField(tokenizer).load(s)) for s in samples)
    # the extraction builds the recorded prompt: an explicit contradicting flag stops it before any work
    for name in ("audio", "video", "text_KD_audio", "text_KD_video"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
    with pytest.raises(utils.UserError, match="trained with --prompt no_speakers"):
        script("IEMOCAP", "extract_first_stage_features").main(flags(paths, prompt="full", device="cpu"))


@pytest.mark.slow
def test_modalities_table(pickles: Path, tmp_path: Path):
    argv = ["--table", "modalities", "--seeds", "1", "2", "--feature_dir", str(pickles), "--save_dir",
            str(tmp_path), *FAST]
    doc = script("IEMOCAP", "ablation").main(argv)
    folder = tmp_path / "ablation"
    assert [v["key"] for v in doc["variants"]] == ["T", "A", "V", "T+A", "T+V", "A+V", "T+A+V"]
    assert json.loads((folder / "modalities.json").read_text()) == json.loads(json.dumps(doc))
    for row in doc["variants"]:
        values = [s["test_weighted_f1"] for s in row["seeds"]]
        assert [s["seed"] for s in row["seeds"]] == [1, 2]
        assert row["test_weighted_f1_mean"] == pytest.approx(np.mean(values))
        assert row["test_weighted_f1_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["test_accuracy_mean"] == pytest.approx(np.mean([s["test_accuracy"] for s in row["seeds"]]))
        if row["key"] != "T+A+V":
            assert 0 < row["p_value"] <= 1 and row["reference"] == "T+A+V"
            full = next(r for r in doc["variants"] if r["key"] == "T+A+V")
            assert row["difference_weighted_f1"] == pytest.approx(row["test_weighted_f1_mean"]
                                                                  - full["test_weighted_f1_mean"])
        metrics = json.loads((folder / "modalities" / row["key"] / "multimodal_fusion_metrics_seed1.json").read_text())
        assert metrics["sizes"]["variant"]["modalities"] == row["key"].split("+")
    assert (folder / "modalities.png").stat().st_size > 0
    table = (folder / "modalities.md").read_text()
    assert "| T+A+V |" in table and "**" in table and " ± " in table
    # resumable: finished variants are skipped; a changed setting re-runs them
    record = folder / "modalities" / "T" / ablation.ABLATION_RECORD
    before = record.stat().st_mtime_ns
    script("IEMOCAP", "ablation").main(argv)
    assert record.stat().st_mtime_ns == before
    script("IEMOCAP", "ablation").main([*argv[:-len(FAST)], *FAST[:-2], "--batch_size", "3"])
    assert record.stat().st_mtime_ns != before


@pytest.mark.slow
def test_demo_headline_is_the_kept_model(demo: dict):
    out = json.loads((demo["workdir"] / "results.json").read_text())
    md = (demo["workdir"] / "results.md").read_text()
    for name, r in out.items():
        save = demo["workdir"] / name / "save_model"
        kept = json.loads(StageFiles.fusion(save).predictions.read_text())
        scores = results.summary(kept["labels"], kept["preds"])
        assert (r["test_accuracy"], r["test_weighted_f1"]) == (scores["accuracy"], scores["weighted_f1"])
        summary = json.loads(StageFiles.fusion(save).seeds_summary.read_text())
        assert r["kept_model"]["seed"] == summary["best_seed"]
        assert r["test_weighted_f1_mean"] == summary["mean"]["test_weighted_f1"]
        assert f"{name} seed {summary['best_seed']}: {scores['accuracy']:.4f} / {scores['weighted_f1']:.4f}" in md
    assert md.index("±") < md.index("Kept model")


@pytest.mark.slow
@pytest.mark.parametrize("table", ["components", "kd"])
def test_tables_on_the_demo(demo: dict, tmp_path: Path, table: str):
    paths = copy_checkpoints(stage_paths(demo["workdir"], "IEMOCAP"), tmp_path, *(
        f"{n}{s}" for n in ("text", "audio", "video", "text_KD_audio", "text_KD_video") for s in (".bin", ".json")))
    argv = ["--table", table, "--seeds", "1", "2", *flags(paths), "--device", "cpu"]
    if table == "components":
        argv += ["--epochs", "2", "--lr", "1e-3", "--batch_size", "2"]
    doc = script("IEMOCAP", "ablation").main(argv)
    keys = [v["key"] for v in doc["variants"]]
    assert keys == ([v.key for v in ablation.ablation_variants(table, dataset_spec("IEMOCAP"))])
    assert (tmp_path / "save_model" / "ablation" / f"{table}.md").is_file()
    if table == "kd":  # the demo trained one first-stage model per name: one row each, its recorded seed
        for row in doc["variants"]:
            assert len(row["seeds"]) == 1 and row["test_weighted_f1_std"] == 0.0
        audio_kd = next(r for r in doc["variants"] if r["key"] == "audio_kd")
        assert audio_kd["reference"] == "audio" and "p_value" in audio_kd


@pytest.mark.slow
def test_prompt_table_on_the_demo(demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two of the prompt rows end to end: the prompt goes to text.py (and its record to the extraction), never
    to the fusion; the text flags are part of a variant's setting."""
    monkeypatch.setattr(ablation, "PROMPTS", ("full", "no_speakers"))
    calls: list[tuple[str, list[str]]] = []
    real_stage = ablation.Ablation.stage
    monkeypatch.setattr(ablation.Ablation, "stage", lambda run, spec, name, argv: calls.append((name, argv))
                        or real_stage(run, spec, name, argv))
    paths = copy_checkpoints(stage_paths(demo["workdir"], "IEMOCAP"), tmp_path, *(
        f"{n}{s}" for n in ("audio", "video", "text_KD_audio", "text_KD_video") for s in (".bin", ".json")))
    argv = ["--table", "prompt", "--seeds", "1", *flags(paths), "--device", "cpu", "--text_args", "--epochs 1",
            "--epochs", "2", "--lr", "1e-3", "--batch_size", "2"]
    doc = script("IEMOCAP", "ablation").main(argv)
    assert [v["key"] for v in doc["variants"]] == ["full", "no_speakers"]
    assert [name for name, _ in calls] == ["text.py", "extract_first_stage_features.py", "multimodal_fusion.py"] * 2
    assert calls[3][1][:2] == ["--prompt", "no_speakers"]
    assert not any("--prompt" in a for name, a in calls if name != "text.py")
    folder = tmp_path / "save_model" / "ablation" / "prompt" / "no_speakers"
    assert text_prompt(folder / "save_model" / "text.json", None) == "no_speakers"
    features = load_features(feature_path(folder / "feature", "test"))
    reference = load_features(feature_path(folder.parent / "full" / "feature", "test"))
    vid = next(iter(features["text"]))
    assert not np.array_equal(features["text"][vid], reference["text"][vid])  # another text model
    assert np.array_equal(features["audio"][vid], reference["audio"][vid])  # the pipeline's audio model
    no_speakers = next(r for r in doc["variants"] if r["key"] == "no_speakers")
    assert no_speakers["reference"] == "full" and 0 < no_speakers["p_value"] <= 1
    assert no_speakers["argv"][:2] == ["--epochs", "2"]
    assert no_speakers["text_argv"] == ["--prompt", "no_speakers", "--epochs", "1"]
    assert "| prompt no_speakers | 1 |" in (tmp_path / "save_model" / "ablation" / "prompt.md").read_text()
    setting = json.loads((folder / ablation.ABLATION_RECORD).read_text())["setting"]
    assert setting["text_argv"] == ["--prompt", "no_speakers", "--epochs", "1"]  # changed: the row re-runs
    calls.clear()
    script("IEMOCAP", "ablation").main(argv)
    assert calls == []  # both rows finished with this setting
