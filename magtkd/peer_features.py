"""The first-stage features in the layouts other ERC codebases read (docs/METHOD.md §9): the tuple of
per-dialogue dicts that SDT's and GraphSmile's dataset classes unpack, with the community's label order,
speaker encoding, dialogue keys and split, every label checked against the prepared CSVs' gold emotion.
``<DS>/export_features.py`` is its script.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .artifacts import atomic_path, begin_outputs, check_complete, feature_path, features_record, finish_outputs
from .cli import EXPORT_FORMATS
from .dataset import Utterance, load_split, read_csv_checked
from .pickles import PICKLE_PROTOCOL, check_features_record, feature_width, load_features
from .spec import SPLITS, CommunityConventions, DatasetSpec
from .utils import DataError, UserError

log = logging.getLogger("magtkd")

# The tuple each peer's dataset class unpacks, slot by slot in their order, as read in their dataloader.py:
# SDT (github.com/butterfliesss/SDT: IEMOCAPDataset, MELDDataset; M3Net's first file has SDT's slots minus
# roberta2-4) and GraphSmile (github.com/lijfrank-open/GraphSmile: IEMOCAPDataset_BERT, MELDDataset_BERT).
LAYOUTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("sdt", "IEMOCAP"): ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "roberta2", "roberta3", "roberta4",
                         "videoAudio", "videoVisual", "videoSentence", "trainVid", "testVid"),
    ("sdt", "MELD"): ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "roberta2", "roberta3", "roberta4",
                      "videoAudio", "videoVisual", "videoSentence", "trainVid", "testVid", "validVid"),
    ("graphsmile", "IEMOCAP"): ("videoIDs", "videoSpeakers", "videoLabels", "videoText0", "videoText1",
                                "videoText2", "videoText3", "videoAudio", "videoVisual", "videoSentence", "trainVid",
                                "testVid"),
    ("graphsmile", "MELD"): ("videoIDs", "videoSpeakers", "videoLabels", "videoSentiments", "videoText0",
                             "videoText1", "videoText2", "videoText3", "videoAudio", "videoVisual", "videoSentence",
                             "trainVid", "testVid", "validVid"),
}

PEERS = {
    ("sdt", "IEMOCAP"): "SDT, github.com/butterfliesss/SDT dataloader.py IEMOCAPDataset",
    ("sdt", "MELD"): "SDT, github.com/butterfliesss/SDT dataloader.py MELDDataset",
    ("graphsmile", "IEMOCAP"): "GraphSmile, github.com/lijfrank-open/GraphSmile dataloader.py IEMOCAPDataset_BERT",
    ("graphsmile", "MELD"): "GraphSmile, github.com/lijfrank-open/GraphSmile dataloader.py MELDDataset_BERT",
}

# Text slots: SDT's videoText + roberta2-4 and GraphSmile's videoText0-3 (its --textf_mode picks them) all hold
# MAGTKD's one text vector per utterance (the same objects: pickled once).
TEXT_SLOTS = frozenset({"videoText", "roberta2", "roberta3", "roberta4", "videoText0", "videoText1", "videoText2",
                        "videoText3"})

SPLIT_SLOTS = {"trainVid": "train_splits", "testVid": "test", "validVid": "valid_splits"}

# The peers read an IEMOCAP speaker as `[1, 0] if x == 'M' else [0, 1]`: any other letter would be 'F'.
SPEAKER_LETTERS = ("M", "F")


@dataclass(frozen=True)
class FeatureExport:
    """One export_features.py run: the layout, the output, where the features and CSVs are, which keys feed
    the audio and video slots."""

    format: str
    out: Path
    data_dir: Path
    feature_dir: Path
    audio_feature: str
    video_feature: str
    flags: Mapping[str, Any]  # the run's flags, recorded

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> "FeatureExport":
        """export_features.py's parsed flags (``vars(args)``) as a run."""
        names = [f.name for f in fields(cls) if f.name != "flags"]
        return cls(**{name: flags[name] for name in names}, flags=dict(flags))

    @property
    def record(self) -> Path:
        """``<out stem>.json`` beside the pickle: what went into which slot (also its completion record)."""
        return self.out.with_suffix(".json")


@dataclass
class PeerDialogue:
    """One dialogue as the peers see it: its key, split, and per-utterance entries in the CSV's order."""

    key: Any
    split: str
    utterance_ids: list
    speakers: list
    labels: list[int]
    sentiments: list[int]
    sentences: list[str]
    vectors: dict[str, list]  # feature key -> the pickle's float32 (D,) arrays


def export_features(spec: DatasetSpec, conventions: CommunityConventions, run: FeatureExport) -> dict[str, Any]:
    """Write ``run.out`` in ``run.format``'s layout and its record; returns the record's facts and paths."""
    if run.format not in EXPORT_FORMATS:
        raise UserError(f"--format {run.format}: expected one of {', '.join(EXPORT_FORMATS)}")
    layout = LAYOUTS[(run.format, conventions.loader)]
    script = f"{spec.name}/export_features.py"
    log.info("%s: arguments %s", script, {k: str(v) for k, v in sorted(run.flags.items())})
    if sorted(conventions.labels) != sorted(spec.labels):
        raise ValueError(f"community labels {conventions.labels} are not {spec.name}'s {spec.labels}")
    inputs = [feature_path(run.feature_dir, s) for s in SPLITS] + [features_record(run.feature_dir)]
    check_out(run.out, run.record, inputs + [Path(run.data_dir) / spec.csv_names[s] for s in SPLITS])
    keys = ("text", run.audio_feature, run.video_feature)
    features = read_features(spec, run.feature_dir, keys, script)
    dialogues = peer_dialogues(spec, conventions, run.data_dir, features, keys, "videoSentiments" in layout)
    widths = {slot: feature_width(features["train"], key) for slot, key in zip(("text", "audio", "visual"), keys)}
    facts = export_facts(spec, conventions, run, layout, dialogues, widths)
    begin_outputs(run.record, script, run.flags, **facts)
    with atomic_path(run.out) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(layout_tuple(layout, conventions, dialogues, keys), fh, protocol=PICKLE_PROTOCOL)
    finish_outputs(run.record, script, run.flags, **facts)
    log.info("%s: wrote %s (%s layout, %s) and %s", script, run.out, run.format,
             PEERS[(run.format, conventions.loader)], run.record)
    return {**facts, "paths": {"features": str(run.out), "record": str(run.record)}}


def check_out(out: Path, record: Path, inputs: Sequence[Path]) -> None:
    """``--out`` must be a file path, neither an input nor its own record."""
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; name the pickle to write, e.g. {Path(out) / 'features.pkl'}")
    if Path(out).suffix == ".json":
        raise UserError(f"--out {out}: the record beside the pickle is <name>.json; give the pickle another suffix "
                        "(e.g. .pkl)")
    for path in (out, record):
        for given in inputs:
            if Path(path).resolve() == Path(given).resolve():
                raise UserError(f"--out {out} would overwrite the input {given}; choose another --out")


def read_features(spec: DatasetSpec, feature_dir: Path, keys: Sequence[str], script: str) -> dict[str, dict]:
    """The three feature pickles (the ``keys`` streams), refused when their record says incomplete or
    another dataset (a set without a record, e.g. the authors' download, is checked against the CSVs only)."""
    record = check_complete(features_record(feature_dir), f"the feature pickles in {feature_dir}",
                            f"{spec.name}/extract_first_stage_features.py")
    if record is not None:
        check_features_record(record, feature_path(feature_dir, "train"), spec, script)
    else:
        log.info("%s has no %s: the pickles are checked against the CSVs only", feature_dir,
                 features_record(feature_dir).name)
    return {split: load_features(feature_path(feature_dir, split), keys=tuple(dict.fromkeys(keys))) for split in SPLITS}


def peer_dialogues(spec: DatasetSpec, conventions: CommunityConventions, data_dir: Path,
                   features: Mapping[str, Mapping[str, Any]], keys: Sequence[str],
                   sentiments: bool) -> list[PeerDialogue]:
    """Every dialogue of every split in the pickles' order, its utterances matched to their CSV rows; the
    pickle's label must be the row's gold emotion, and every CSV row must be in the pickle."""
    dialogues, offset = [], 0
    for split in SPLITS:
        utterances = load_split(spec, data_dir, split)
        polarity = read_sentiments(spec, conventions, data_dir, split, utterances) if sentiments else {}
        rows = {(u.dialogue_id, u.utterance_id): u for u in utterances}
        pickle_path = feature_path("", split).name
        feats, used = features[split], 0
        for dia in feats["vids"]:
            utts = []
            for utt_id, label in zip(feats["dia2utt"][dia], feats["labels"][dia]):
                row = rows.get((int(dia), int(utt_id)))
                if row is None:
                    raise DataError(f"{pickle_path}: dialogue {dia}, utterance {utt_id} is not in "
                                    f"{spec.csv_names[split]}: the pickles were extracted from other CSVs; re-run "
                                    f"{spec.name}/extract_first_stage_features.py")
                if row.label != int(label):
                    raise DataError(f"{row.source}: row {row.row}: Emotion {row.emotion} but {pickle_path} labels "
                                    f"it {spec.labels[int(label)]}: the pickles were extracted from other CSVs")
                utts.append(row)
            used += len(utts)
            dialogues.append(peer_dialogue(spec, conventions, split, offset, utts, polarity,
                                           {k: feats[k][dia] for k in keys}))
        if used != len(utterances):
            raise DataError(f"{spec.csv_names[split]} has {len(utterances)} utterances but {pickle_path} holds "
                            f"{used}: re-run {spec.name}/extract_first_stage_features.py")
        offset += 1 + max(u.dialogue_id for u in utterances)
    check_keys(dialogues)
    return dialogues


def peer_dialogue(spec: DatasetSpec, conventions: CommunityConventions, split: str, offset: int,
                  utts: Sequence[Utterance], polarity: Mapping[int, int], vectors: Mapping[str, list]) -> PeerDialogue:
    """One dialogue in the community's encoding: key, utterance ids, speakers, labels, sentiments, texts."""
    if conventions.dialogue_keys == "name":
        names = {dialogue_name(u) for u in utts}
        if len(names) != 1:
            raise DataError(f"{utts[0].source}: dialogue {utts[0].dialogue_id} holds utterances of the dialogues "
                            f"{sorted(names)} (from Speaker)")
        key, utterance_ids = names.pop(), [u.speaker for u in utts]
    else:
        key, utterance_ids = offset + utts[0].dialogue_id, [u.utterance_id for u in utts]
    return PeerDialogue(key=key, split=split, utterance_ids=utterance_ids, speakers=encode_speakers(conventions, utts),
                        labels=[conventions.labels.index(spec.labels[u.label]) for u in utts],
                        sentiments=[polarity[u.row] for u in utts] if polarity else [],
                        sentences=[u.text for u in utts], vectors=dict(vectors))


def dialogue_name(utt: Utterance) -> str:
    """IEMOCAP's dialogue name from the utterance name in ``Speaker``: ``Ses01F_impro01_F000`` -> ``Ses01F_impro01``."""
    if "_" not in utt.speaker:
        raise DataError(f"{utt.source}: row {utt.row}: Speaker {utt.speaker!r} is not an utterance name like "
                        "Ses01F_impro01_F000, which names the dialogue in the community's pickles")
    return utt.speaker.rsplit("_", 1)[0]


def encode_speakers(conventions: CommunityConventions, utts: Sequence[Utterance]) -> list:
    """The peers' speakers: IEMOCAP the letters 'M'/'F'; MELD one-hot vectors by order of appearance."""
    if conventions.speakers == "letter":
        for u in utts:
            if u.speaker_key not in SPEAKER_LETTERS:
                raise DataError(f"{u.source}: row {u.row}: speaker {u.speaker_key!r} (from {u.speaker!r}) is not M or "
                                "F; the peers read M as one speaker and anything else as the other")
        return [u.speaker_key for u in utts]
    order: dict[str, int] = {}
    encoded = []
    for u in utts:
        slot = order.setdefault(u.speaker_key, len(order))
        if slot >= conventions.speaker_slots:
            raise DataError(f"{u.source}: row {u.row}: dialogue {u.dialogue_id} has more than "
                            f"{conventions.speaker_slots} speakers, the width of the peers' one-hot speakers")
        encoded.append([int(i == slot) for i in range(conventions.speaker_slots)])
    return encoded


def read_sentiments(spec: DatasetSpec, conventions: CommunityConventions, data_dir: Path, split: str,
                    utterances: Sequence[Utterance]) -> dict[int, int]:
    """CSV row -> the community's sentiment id, from the official ``Sentiment`` column."""
    path = Path(data_dir) / spec.csv_names[split]
    frame = read_csv_checked(path, ("Sentiment",))
    out = {}
    for u, value in zip(utterances, frame["Sentiment"], strict=True):
        if value.strip().lower() not in conventions.sentiments:
            raise DataError(f"{path}: row {u.row}: Sentiment {value!r} is not one of "
                            f"{', '.join(conventions.sentiments)}")
        out[u.row] = conventions.sentiments.index(value.strip().lower())
    return out


def check_keys(dialogues: Sequence[PeerDialogue]) -> None:
    """Dialogue keys must be unique over all splits (the peers keep one dict for all)."""
    seen: dict[Any, str] = {}
    for d in dialogues:
        if d.key in seen:
            raise DataError(f"dialogue key {d.key!r} occurs twice ({seen[d.key]} and {d.split}); the community's "
                            "pickles need one key per dialogue")
        seen[d.key] = d.split


def layout_tuple(layout: Sequence[str], conventions: CommunityConventions, dialogues: Sequence[PeerDialogue],
                 keys: Sequence[str]) -> tuple:
    """The tuple in the peer's slot order: dicts dialogue key -> per-utterance lists, then the key lists."""
    text_key, audio_key, video_key = keys
    text = {d.key: d.vectors[text_key] for d in dialogues}
    per_dialogue = {
        "videoIDs": {d.key: d.utterance_ids for d in dialogues},
        "videoSpeakers": {d.key: d.speakers for d in dialogues},
        "videoLabels": {d.key: d.labels for d in dialogues},
        "videoSentiments": {d.key: d.sentiments for d in dialogues},
        "videoAudio": {d.key: d.vectors[audio_key] for d in dialogues},
        "videoVisual": {d.key: d.vectors[video_key] for d in dialogues},
        "videoSentence": {d.key: d.sentences for d in dialogues},
    }
    out = []
    for slot in layout:
        if slot in TEXT_SLOTS:
            out.append(text)
        elif slot in SPLIT_SLOTS:
            out.append([d.key for d in dialogues if d.split in split_members(conventions, slot)])
        else:
            out.append(per_dialogue[slot])
    return tuple(out)


def split_members(conventions: CommunityConventions, slot: str) -> tuple[str, ...]:
    """Our splits whose dialogues a trainVid / testVid / validVid slot lists."""
    member = SPLIT_SLOTS[slot]
    return ("test",) if member == "test" else tuple(getattr(conventions, member))


def export_facts(spec: DatasetSpec, conventions: CommunityConventions, run: FeatureExport, layout: Sequence[str],
                 dialogues: Sequence[PeerDialogue], widths: Mapping[str, int]) -> dict[str, Any]:
    """The record beside the pickle: the peer, each slot's content, the split, label and speaker encodings."""
    sources = {"videoIDs": "utterance names (Speaker)" if conventions.dialogue_keys == "name" else "Utterance_ID",
               "videoSpeakers": ("Speaker's letter, M or F" if conventions.speakers == "letter" else
                                 f"one-hot of {conventions.speaker_slots}, speakers by order of appearance"),
               "videoLabels": "Emotion as " + ", ".join(f"{k} {i}" for i, k in enumerate(conventions.labels)),
               "videoSentiments": "Sentiment as " + ", ".join(f"{k} {i}" for i, k in enumerate(conventions.sentiments)),
               "videoAudio": run.audio_feature, "videoVisual": run.video_feature, "videoSentence": "Utterance"}
    slots = {}
    for slot in layout:
        if slot in SPLIT_SLOTS:
            members = split_members(conventions, slot)
            chosen = [d for d in dialogues if d.split in members]
            slots[slot] = {"splits": list(members), "dialogues": len(chosen),
                           "utterances": sum(len(d.labels) for d in chosen)}
        else:
            slots[slot] = "text" if slot in TEXT_SLOTS else sources[slot]
    return {"dataset": spec.name, "format": run.format, "peer": PEERS[(run.format, conventions.loader)],
            "slots": slots, "labels": list(conventions.labels), "sentiments": list(conventions.sentiments) or None,
            "dialogue_keys": ("dialogue names" if conventions.dialogue_keys == "name" else
                              "Dialogue_ID plus the earlier splits' largest Dialogue_ID + 1"),
            "widths": dict(widths), "feature_dir": str(run.feature_dir)}
