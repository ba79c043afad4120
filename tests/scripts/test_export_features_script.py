"""``<DS>/export_features.py`` (docs/METHOD.md §9): the first-stage features in the layouts SDT's and GraphSmile's
dataset classes unpack. Each file is read back with our own re-implementation of the peer's unpacking (tuple order
and types, written from their dataloader.py) and compared with the CSVs alone: every dialogue of the split present,
every label the gold emotion in the community's order, speakers and MELD sentiments as the peers read them, and
each slot holding the vectors of the feature key it should."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import dataset_spec, generated_paths, script
from magtkd.artifacts import SubstitutionReport, feature_path, features_record
from magtkd.dataset import group_dialogues, load_speaker2id, load_split
from magtkd.extract import write_feature_pickles
from magtkd.pickles import FEATURE_KEYS, load_features
from magtkd.spec import SPLITS
from magtkd.utils import DataError, FeatureFileError, UserError

WIDTH = 6
COMMUNITY = {"IEMOCAP": ["hap", "sad", "neu", "ang", "exc", "fru"],
             "MELD": ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]}
SENTIMENTS = ["neutral", "positive", "negative"]


@pytest.fixture(scope="module")
def features(generated, tmp_path_factory) -> dict:
    """Per dataset: feature pickles of the generated CSVs (random vectors, the extraction's writer and record)."""
    rng = np.random.default_rng(0)
    out = {}
    for dataset in ("IEMOCAP", "MELD"):
        spec, folder = dataset_spec(dataset), tmp_path_factory.mktemp(f"export_{dataset}")
        paths = {**generated_paths(generated, dataset, folder), "feature_dir": folder / "feature"}
        dialogues = {s: group_dialogues(load_split(spec, paths["data_dir"], s)) for s in SPLITS}
        vectors = {s: {k: rng.normal(size=(sum(len(d) for _, d in dialogues[s]), WIDTH)).astype(np.float32)
                       for k in FEATURE_KEYS} for s in SPLITS}
        speaker2id = load_speaker2id(paths["data_dir"]) if spec.global_speaker_ids else None
        write_feature_pickles(spec, dialogues, vectors, paths["feature_dir"], SubstitutionReport(), {}, speaker2id)
        out[dataset] = paths
    return out


def export(paths: dict, dataset: str, out: Path, *extra: str) -> dict:
    argv = ["--data_dir", str(paths["data_dir"]), "--feature_dir", str(paths["feature_dir"]), "--out", str(out)]
    return script(dataset, "export_features").main(argv + list(extra))


# --------------------------------------------------------------------------- the peers' unpacking, re-written


def sdt_items(path: Path, dataset: str, train: bool) -> list[tuple]:
    """SDT's IEMOCAPDataset / MELDDataset (github.com/butterfliesss/SDT, dataloader.py) as they unpack the file:
    12 slots (IEMOCAP, read with encoding latin1) or 13 (MELD, the last ignored); per dialogue of trainVid or
    testVid: FloatTensor text, visual, audio, speakers (IEMOCAP 'M' -> [1, 0], else [0, 1]; MELD the one-hot
    lists as stored), the mask, LongTensor labels, and the key."""
    with open(path, "rb") as fh:
        data = pickle.load(fh, encoding="latin1") if dataset == "IEMOCAP" else pickle.load(fh)
    assert len(data) == (12 if dataset == "IEMOCAP" else 13)
    ids, speakers, labels, text, _r2, _r3, _r4, audio, visual, sentences, train_vid, test_vid = data[:12]
    items = []
    for vid in (train_vid if train else test_vid):
        who = [[1, 0] if x == "M" else [0, 1] for x in speakers[vid]] if dataset == "IEMOCAP" else speakers[vid]
        items.append((torch.FloatTensor(np.array(text[vid])), torch.FloatTensor(np.array(visual[vid])),
                      torch.FloatTensor(np.array(audio[vid])), torch.FloatTensor(who),
                      torch.FloatTensor([1] * len(labels[vid])), torch.LongTensor(labels[vid]), vid))
    return items


def graphsmile_items(path: Path, dataset: str, train: bool) -> list[tuple]:
    """GraphSmile's IEMOCAPDataset_BERT / MELDDataset_BERT (github.com/lijfrank-open/GraphSmile, dataloader.py):
    12 slots (IEMOCAP: four text slots; sentiment derived from the labels, 1/3/5 -> 0, 2 -> 1, 0/4 -> 2) or 14
    (MELD: videoSentiments fourth, the last slot ignored); per dialogue: four text tensors, visual, audio,
    speakers (IEMOCAP from 'M'/'F'; MELD as stored), the mask, emotion and sentiment LongTensors, the key."""
    with open(path, "rb") as fh:
        data = pickle.load(fh, encoding="latin1") if dataset == "IEMOCAP" else pickle.load(fh)
    if dataset == "IEMOCAP":
        assert len(data) == 12
        ids, speakers, labels, t0, t1, t2, t3, audio, visual, sentences, train_vid, test_vid = data
        polarity = {vid: [{1: 0, 3: 0, 5: 0, 2: 1, 0: 2, 4: 2}[e] for e in labels[vid]] for vid in labels}
    else:
        assert len(data) == 14
        ids, speakers, labels, polarity, t0, t1, t2, t3, audio, visual, sentences, train_vid, test_vid, _ = data
    items = []
    for vid in (train_vid if train else test_vid):
        who = [[1, 0] if x == "M" else [0, 1] for x in speakers[vid]] if dataset == "IEMOCAP" else speakers[vid]
        items.append((*(torch.FloatTensor(np.array(t[vid])) for t in (t0, t1, t2, t3)),
                      torch.FloatTensor(np.array(visual[vid])), torch.FloatTensor(np.array(audio[vid])),
                      torch.FloatTensor(np.array(who)), torch.FloatTensor([1] * len(labels[vid])),
                      torch.LongTensor(np.array(labels[vid])), torch.LongTensor(np.array(polarity[vid])), vid))
    return items


# --------------------------------------------------------------------------- what the CSVs alone say


def expected(paths: dict, dataset: str) -> dict[str, dict]:
    """Per split: dialogue key (the community's) -> labels, sentiments, one-hot speakers, (Dialogue_ID, split)."""
    spec, out, offset = dataset_spec(dataset), {}, 0
    for split in SPLITS:
        frame = pd.read_csv(paths["data_dir"] / spec.csv_names[split], dtype=str, keep_default_na=False)
        dialogues: dict = {}
        for row in frame.to_dict("records"):
            key = row["Speaker"].rsplit("_", 1)[0] if dataset == "IEMOCAP" else offset + int(row["Dialogue_ID"])
            d = dialogues.setdefault(key, {"labels": [], "sentiments": [], "who": [], "id": int(row["Dialogue_ID"])})
            d["labels"].append(COMMUNITY[dataset].index(row["Emotion"]))
            d["sentiments"].append(SENTIMENTS.index(row["Sentiment"]) if dataset == "MELD" else None)
            d["who"].append(row["Speaker"].rsplit("_", 1)[-1][0] if dataset == "IEMOCAP" else row["Speaker"])
        out[split] = dialogues
        offset += 1 + frame["Dialogue_ID"].astype(int).max() if dataset == "MELD" else 0
    return out


def one_hot(names: list, width: int, dataset: str) -> list:
    if dataset == "IEMOCAP":
        return [[1, 0] if x == "M" else [0, 1] for x in names]
    order = list(dict.fromkeys(names))
    return [[int(i == order.index(x)) for i in range(width)] for x in names]


@pytest.mark.parametrize("dataset", ["IEMOCAP", "MELD"])
@pytest.mark.parametrize("layout", ["sdt", "graphsmile"])
def test_the_peers_unpacking_reads_every_dialogue_with_its_gold_labels(features, dataset, layout, tmp_path):
    paths, out = features[dataset], tmp_path / f"{dataset}_{layout}.pkl"
    export(paths, dataset, out, "--format", layout)
    gold = expected(paths, dataset)
    train_splits = ("train", "dev") if dataset == "IEMOCAP" else ("train",)
    pickles = {s: load_features(feature_path(paths["feature_dir"], s)) for s in SPLITS}
    audio_key, video_key = "audio_kd", "video" if dataset == "IEMOCAP" else "video_kd"  # the fusion's defaults
    for train, splits in ((True, train_splits), (False, ("test",))):
        want = {key: (split, d) for split in splits for key, d in gold[split].items()}
        items = (sdt_items if layout == "sdt" else graphsmile_items)(out, dataset, train)
        assert [item[-1] for item in items] == list(want)  # every dialogue, in the CSVs' order
        for item in items:
            split, d = want[item[-1]]
            text, visual, audio = (item[0], item[1], item[2]) if layout == "sdt" else (item[0], item[4], item[5])
            who, mask, labels = (item[3], item[4], item[5]) if layout == "sdt" else (item[6], item[7], item[8])
            assert labels.tolist() == d["labels"] and mask.tolist() == [1.0] * len(d["labels"])
            assert who.tolist() == one_hot(d["who"], 9, dataset)
            if layout == "graphsmile":
                assert all(torch.equal(item[0], t) for t in item[1:4])  # the four text slots: the text vectors
                if dataset == "MELD":
                    assert item[9].tolist() == d["sentiments"]
            source = pickles[split]
            for tensor, key in ((text, "text"), (audio, audio_key), (visual, video_key)):
                assert torch.equal(tensor, torch.from_numpy(np.stack(source[key][d["id"]]))), key


def test_the_record_says_what_went_where_and_meld_dev_is_the_last_slot(features, tmp_path):
    paths, out = features["MELD"], tmp_path / "meld.pkl"
    result = export(paths, "MELD", out, "--format", "graphsmile", "--audio_feature", "audio", "--video_feature",
                    "video")
    record = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["complete"] is True and result["paths"]["record"] == str(out.with_suffix(".json"))
    assert list(record["slots"]) == ["videoIDs", "videoSpeakers", "videoLabels", "videoSentiments", "videoText0",
                                     "videoText1", "videoText2", "videoText3", "videoAudio", "videoVisual",
                                     "videoSentence", "trainVid", "testVid", "validVid"]
    assert (record["slots"]["videoAudio"], record["slots"]["videoVisual"]) == ("audio", "video")
    assert record["labels"] == COMMUNITY["MELD"] and record["sentiments"] == SENTIMENTS
    assert record["widths"] == {"text": WIDTH, "audio": WIDTH, "visual": WIDTH}
    gold = expected(paths, "MELD")
    with open(out, "rb") as fh:
        data = pickle.load(fh)
    assert data[-1] == list(gold["dev"]) and record["slots"]["validVid"]["dialogues"] == len(gold["dev"])
    assert record["slots"]["trainVid"]["utterances"] == sum(len(d["labels"]) for d in gold["train"].values())
    dev_key = next(iter(gold["dev"]))
    pickled = load_features(feature_path(paths["feature_dir"], "dev"))
    audio = pickled["audio"][gold["dev"][dev_key]["id"]]
    assert all(np.array_equal(a, b) for a, b in zip(data[8][dev_key], audio))


def test_features_of_another_dataset_or_incomplete_are_refused(features, tmp_path):
    with pytest.raises(FeatureFileError, match="are MELD's .* reads IEMOCAP's"):
        export({**features["IEMOCAP"], "feature_dir": features["MELD"]["feature_dir"]}, "IEMOCAP",
               tmp_path / "x.pkl", "--format", "sdt")
    folder = tmp_path / "feature"
    shutil.copytree(features["IEMOCAP"]["feature_dir"], folder)
    record = features_record(folder)
    record.write_text(json.dumps({**json.loads(record.read_text(encoding="utf-8")), "complete": False}),
                      encoding="utf-8")
    with pytest.raises(UserError, match="incomplete"):
        export({**features["IEMOCAP"], "feature_dir": folder}, "IEMOCAP", tmp_path / "x.pkl", "--format", "sdt")
    assert not (tmp_path / "x.pkl").exists()


def test_a_label_that_is_not_the_csvs_gold_emotion_names_the_row(features, tmp_path):
    spec = dataset_spec("IEMOCAP")
    data_dir = tmp_path / "IEMOCAP"
    shutil.copytree(features["IEMOCAP"]["data_dir"], data_dir, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if n.startswith("Session")])
    test_csv = data_dir / spec.csv_names["test"]
    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False)
    frame.loc[2, "Emotion"] = next(label for label in spec.labels if label != frame.loc[2, "Emotion"])
    frame.to_csv(test_csv, index=False)
    with pytest.raises(DataError, match=r"IEMOCAP_test.csv: row 3: Emotion .* but first_stage_test_features.pkl"):
        export({**features["IEMOCAP"], "data_dir": data_dir}, "IEMOCAP", tmp_path / "x.pkl", "--format", "sdt")


def test_out_naming_an_input_is_refused_before_any_write(features):
    paths = features["IEMOCAP"]
    target = feature_path(paths["feature_dir"], "train")
    before = target.read_bytes()
    with pytest.raises(UserError, match="would overwrite the input"):
        export(paths, "IEMOCAP", target, "--format", "graphsmile")
    assert target.read_bytes() == before
