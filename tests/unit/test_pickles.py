"""First-stage feature pickles (`magtkd.pickles`; docs/METHOD.md §4): layout, restricted loading,
validation errors."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from magtkd.artifacts import feature_path
from magtkd.pickles import assemble_features, FEATURE_KEYS, load_features, save_features
from magtkd.utils import FeatureFileError


def _create_file(path: str) -> None:
    """What a malicious pickle would run on load; the tests check it never does."""
    Path(path).write_text("pwned")


class Malicious:
    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (_create_file, (self.target,))


def _rows():
    """Three dialogues (ids 7, 3, 9; dialogue 3 interleaved) of width-4 features, CSV order."""
    dialogue_ids = [7, 7, 3, 7, 3, 9]
    utterance_ids = [0, 1, 0, 2, 1, 0]
    labels = [1, 0, 5, 2, 2, 4]
    speakers = [0, 1, 0, 0, 1, 0]
    vectors = {k: np.arange(24, dtype=np.float64).reshape(6, 4) + 100 * i for i, k in enumerate(FEATURE_KEYS)}
    return dialogue_ids, utterance_ids, labels, speakers, vectors


def _reference_dict(width: int = 4) -> dict:
    """A plain dict in the authors' layout, with numpy ints as some ids (as pandas would produce)."""
    rng = np.random.default_rng(0)
    vids = [np.int64(0), np.int64(1)]
    lengths = {0: 3, 1: 2}
    out = {"vids": vids}
    for key in FEATURE_KEYS:
        out[key] = {v: [rng.normal(size=width).astype(np.float32) for _ in range(lengths[int(v)])] for v in vids}
    out["speakers"] = {v: [0, 1, 0][: lengths[int(v)]] for v in vids}
    out["labels"] = {v: [np.int64(x) for x in [3, 1, 0][: lengths[int(v)]]] for v in vids}
    out["dia2utt"] = {v: list(range(lengths[int(v)])) for v in vids}
    return out


def test_feature_path():
    assert feature_path("/x/feature", "dev") == Path("/x/feature/first_stage_dev_features.pkl")


def test_assemble_save_load_round_trip(tmp_path):
    features = assemble_features(*_rows())
    assert features["vids"] == [7, 3, 9]  # order of first appearance
    assert features["dia2utt"] == {7: [0, 1, 2], 3: [0, 1], 9: [0]}
    assert features["labels"] == {7: [1, 0, 2], 3: [5, 2], 9: [4]}
    assert features["speakers"] == {7: [0, 1, 0], 3: [0, 1], 9: [0]}
    path = save_features(tmp_path / "first_stage_train_features.pkl", features)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    with open(path, "rb") as fh:  # a plain pickled dict, exactly the docs/METHOD.md §4 layout
        raw = pickle.load(fh)
    assert type(raw) is dict and set(raw) == {"vids", *FEATURE_KEYS, "speakers", "labels", "dia2utt"}

    loaded = load_features(path)
    assert set(loaded) == set(raw) and loaded["vids"] == [7, 3, 9]
    for i, key in enumerate(FEATURE_KEYS):
        for dia in loaded["vids"]:
            assert isinstance(loaded[key][dia], list)
            for vec in loaded[key][dia]:
                assert type(vec) is np.ndarray and vec.dtype == np.float32 and vec.shape == (4,)
        # Utterance 2 of dialogue 7 is CSV row 3.
        np.testing.assert_array_equal(loaded[key][7][2], np.arange(12, 16) + 100 * i)
        np.testing.assert_array_equal(loaded[key][3][1], np.arange(16, 20) + 100 * i)
    for key in ("speakers", "labels", "dia2utt"):
        assert all(type(x) is int for dia in loaded["vids"] for x in loaded[key][dia])


def test_load_subset_of_keys(tmp_path):
    features = assemble_features(*_rows())
    del features["video"]  # a file without raw video still serves a run that does not need it
    path = tmp_path / "f.pkl"
    with open(path, "wb") as fh:
        pickle.dump(features, fh)
    loaded = load_features(path, keys=("text", "audio_kd", "video_kd"))
    assert set(loaded) == {"vids", "text", "audio_kd", "video_kd", "speakers", "labels", "dia2utt"}
    with pytest.raises(FeatureFileError, match=r"f\.pkl: missing key 'video'"):
        load_features(path)


def test_assemble_rejects_wrong_keys_and_shapes():
    d, u, y, s, v = _rows()
    with pytest.raises(ValueError, match="missing \\['video_kd'\\]"):
        assemble_features(d, u, y, s, {k: a for k, a in v.items() if k != "video_kd"})
    v["audio"] = v["audio"][:5]
    with pytest.raises(ValueError, match=r"vectors\['audio'\] has shape \(5, 4\)"):
        assemble_features(d, u, y, s, v)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    target = tmp_path / "created_by_pickle.txt"
    path = tmp_path / "first_stage_test_features.pkl"
    data = _reference_dict()
    data["labels"] = Malicious(target)
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(FeatureFileError) as err:
        load_features(path)
    message = str(err.value)
    assert str(path) in message and "_create_file" in message and "refusing" in message
    assert not target.exists()


def test_builtin_functions_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (eval, ("1 + 1",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"vids": Evil()}, protocol=2))
    with pytest.raises(FeatureFileError, match=r"evil\.pkl.*'(__builtin__|builtins)\.eval'"):
        load_features(path)


def test_missing_key_names_file_and_key(tmp_path):
    data = _reference_dict()
    del data["dia2utt"]
    path = tmp_path / "first_stage_dev_features.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FeatureFileError, match=r"first_stage_dev_features\.pkl: missing key 'dia2utt'"):
        load_features(path)


def test_mismatched_lengths_name_the_dialogue(tmp_path):
    data = _reference_dict()
    data["audio_kd"][np.int64(1)].append(np.zeros(4, dtype=np.float32))
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FeatureFileError, match=r"bad\.pkl: dialogue 1 has per-utterance lists of different lengths.*'audio_kd': 3"):
        load_features(path)


def test_dialogue_missing_from_a_dict_is_named(tmp_path):
    data = _reference_dict()
    del data["speakers"][np.int64(0)]
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FeatureFileError, match=r"bad\.pkl: dialogue 0 is listed in 'vids' but missing from 'speakers'"):
        load_features(path)


def test_wrong_width_and_non_array_are_named(tmp_path):
    data = _reference_dict()
    data["text"][np.int64(1)][0] = np.zeros(5, dtype=np.float32)
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FeatureFileError, match=r"'text'\[1\]\[0\] has width 5"):
        load_features(path)
    data = _reference_dict()
    data["video"][np.int64(0)][1] = [0.0, 1.0, 2.0, 3.0]
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(FeatureFileError, match=r"'video'\[0\]\[1\] must be a 1-D numpy array"):
        load_features(path)


def test_save_is_strict_about_float32_and_ints(tmp_path):
    data = assemble_features(*_rows())
    data["text"][3][0] = data["text"][3][0].astype(np.float64)
    with pytest.raises(FeatureFileError, match=r"'text'\[3\]\[0\] has dtype float64, expected float32"):
        save_features(tmp_path / "x.pkl", data)
    data = assemble_features(*_rows())
    data["labels"][9] = [np.int64(4)]
    with pytest.raises(FeatureFileError, match=r"'labels'\[9\] must hold Python ints"):
        save_features(tmp_path / "x.pkl", data)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reference_format_pickle_loads(tmp_path, protocol):
    data = _reference_dict()
    path = tmp_path / "first_stage_train_features.pkl"
    with open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=protocol)
    loaded = load_features(path)
    assert [int(v) for v in loaded["vids"]] == [0, 1]
    np.testing.assert_array_equal(loaded["text"][1][1], data["text"][np.int64(1)][1])
    assert loaded["audio"][0][0].dtype == np.float32


def test_pickle_from_older_numpy_loads_without_importing_numpy_core(tmp_path):
    """numpy 1.x names ``numpy.core.multiarray``; those names must resolve without a deprecated import."""
    blob = pickle.dumps(_reference_dict(), protocol=2)
    old = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in old and b"numpy._core" not in old
    path = tmp_path / "old.pkl"
    path.write_bytes(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # importing numpy.core on numpy 2 warns
        loaded = load_features(path)
    np.testing.assert_array_equal(loaded["video_kd"][0][2], _reference_dict()["video_kd"][np.int64(0)][2])


def test_not_a_pickle_and_missing_file(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(FeatureFileError, match=r"cannot read feature file .*junk\.pkl"):
        load_features(path)
    with pytest.raises(FeatureFileError, match=r"nothere\.pkl not found"):
        load_features(tmp_path / "nothere.pkl")
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(FeatureFileError, match="expected a pickled dict"):
        load_features(path)
