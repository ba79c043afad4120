"""The first-stage feature pickles (stage 7's artifact): their layout, building, a restricted unpickler
that runs no code from a downloaded file, and validation whose errors name the file, key and dialogue
(docs/METHOD.md §4).
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import io
import pickle
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .artifacts import atomic_path, below_hint, features_record
from .spec import DatasetSpec
from .utils import FeatureFileError


FEATURE_KEYS: tuple[str, ...] = ("text", "audio", "video", "audio_kd", "video_kd")


META_KEYS: tuple[str, ...] = ("speakers", "labels", "dia2utt")


PICKLE_PROTOCOL = 4  # readable by every Python 3 the authors' tooling could have used


def assemble_features(
    dialogue_ids: Sequence[int], utterance_ids: Sequence[int], labels: Sequence[int],
    speakers: Sequence[int], vectors: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """Group per-utterance rows (CSV order) into the docs/METHOD.md §4 layout.

    ``vectors`` maps every key of :data:`FEATURE_KEYS` to an (N, D) array whose
    row i belongs to utterance i. Dialogues are listed in order of first
    appearance; within a dialogue the rows keep their order.
    """
    n = len(dialogue_ids)
    for name, seq in (("utterance_ids", utterance_ids), ("labels", labels), ("speakers", speakers)):
        if len(seq) != n:
            raise ValueError(f"assemble_features: {name} has {len(seq)} entries, dialogue_ids has {n}")
    missing = [k for k in FEATURE_KEYS if k not in vectors]
    unknown = [k for k in vectors if k not in FEATURE_KEYS]
    if missing or unknown:
        raise ValueError(
            f"assemble_features: vectors must have exactly the keys {FEATURE_KEYS}; "
            f"missing {missing}, unknown {unknown}"
        )
    matrices: dict[str, np.ndarray] = {}
    for key in FEATURE_KEYS:
        mat = np.asarray(vectors[key])
        if mat.ndim != 2 or mat.shape[0] != n:
            raise ValueError(f"assemble_features: vectors[{key!r}] has shape {mat.shape}, expected ({n}, D)")
        matrices[key] = mat.astype(np.float32, copy=False)

    vids: list[int] = []
    out: dict[str, Any] = {"vids": vids, **{k: {} for k in (*FEATURE_KEYS, *META_KEYS)}}
    for i in range(n):
        dia = int(dialogue_ids[i])
        if dia not in out["labels"]:
            vids.append(dia)
            for k in (*FEATURE_KEYS, *META_KEYS):
                out[k][dia] = []
        out["dia2utt"][dia].append(int(utterance_ids[i]))
        out["labels"][dia].append(int(labels[i]))
        out["speakers"][dia].append(int(speakers[i]))
        for key in FEATURE_KEYS:
            # A copy, so each pickled array holds only its own row.
            out[key][dia].append(np.array(matrices[key][i], dtype=np.float32))
    return out


def save_features(path: str | Path, features: Mapping[str, Any]) -> Path:
    """Validate ``features`` strictly (float32 (D,) arrays, ints) and pickle it atomically."""
    path = Path(path)
    validate_features(features, path, FEATURE_KEYS, strict=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(dict(features), fh, protocol=PICKLE_PROTOCOL)
    return path



# --------------------------------------------------------------------------- restricted loading


def _numpy_core_module(name: str) -> Any:
    """``numpy._core.<name>`` (numpy >= 2) or ``numpy.core.<name>`` (older numpy), without warnings."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: protocol-2 pickles store ``bytes`` as a latin-1 string.

    Only the latin-1 use is admitted; any other codec is refused.
    """
    if encoding.replace("_", "-").lower() not in {"latin1", "latin-1", "iso-8859-1"}:
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a feature pickle may name (module, name) -> object to use."""
    multiarray = _numpy_core_module("multiarray")
    numeric = _numpy_core_module("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Arrays written by numpy 1.x name numpy.core.*, by numpy 2.x numpy._core.*:
    # both resolve to the current numpy's functions, never to an import of the
    # named module.
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex",
                 "bool", "str", "bytes", "bytearray"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = allowed[("builtins", name)]  # Python 2 pickles
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the allow-list; any other global is refused BEFORE it is imported."""

    def __init__(self, fh: io.BufferedIOBase, path: Path) -> None:
        # latin1 lets Python 2 pickles of numpy arrays load (numpy's own advice).
        super().__init__(fh, encoding="latin1")
        self.path = path
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise FeatureFileError(
                f"refusing to load {self.path}: it references the global '{module}.{name}', which is "
                "not a numpy array/dtype/scalar or a builtin container/scalar. A first-stage feature "
                "file holds only those (docs/METHOD.md §4); this file may be malicious or not a feature file"
            ) from None


def load_features(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Load and validate a feature pickle without executing code from it.

    ``keys``: the feature keys needed (default all of :data:`FEATURE_KEYS`);
    only these are required and returned, together with ``vids`` and the
    ``speakers``/``labels``/``dia2utt`` dicts.
    """
    path = Path(path)
    wanted = tuple(FEATURE_KEYS if keys is None else keys)
    unknown = [k for k in wanted if k not in FEATURE_KEYS]
    if unknown:
        raise ValueError(f"load_features: unknown feature keys {unknown}; known: {FEATURE_KEYS}")
    if not path.is_file():
        raise FeatureFileError(
            f"feature file {path} not found: it is written by extract_first_stage_features.py "
            "(or download the authors' first-stage features into this folder)"
            + below_hint(path.parent, path.name, "--feature_dir")
        )
    try:
        with open(path, "rb") as fh:
            data = _RestrictedUnpickler(fh, path).load()
    except FeatureFileError:
        raise
    except Exception as exc:  # truncated file, not a pickle, refused codec, ...
        raise FeatureFileError(f"cannot read feature file {path}: {type(exc).__name__}: {exc}; it is written by "
                               "extract_first_stage_features.py (re-run it)") from exc
    if not isinstance(data, dict):
        raise FeatureFileError(f"{path}: expected a pickled dict (docs/METHOD.md §4), got {type(data).__name__}")
    validate_features(data, path, wanted, strict=False)
    return {k: data[k] for k in ("vids", *wanted, *META_KEYS)}



# --------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_features(
    data: Mapping[str, Any], path: str | Path, keys: Sequence[str] = FEATURE_KEYS, strict: bool = False,
) -> None:
    """Check the docs/METHOD.md §4 layout; errors name the file, the key and the dialogue.

    ``strict`` (used when writing) also demands float32 arrays and Python ints;
    otherwise any real floating array and numpy integers are accepted, as in
    pickles produced by older tools.
    """
    for key in ("vids", *keys, *META_KEYS):
        if key not in data:
            raise FeatureFileError(
                f"{path}: missing key {key!r}; a first-stage feature file has "
                f"{('vids', *FEATURE_KEYS, *META_KEYS)} (docs/METHOD.md §4)"
            )
    vids = data["vids"]
    if not isinstance(vids, (list, tuple)) or not all(_is_int(v) for v in vids):
        raise FeatureFileError(f"{path}: key 'vids' must be a list of int dialogue ids")
    if strict and not all(type(v) is int for v in vids):
        raise FeatureFileError(f"{path}: key 'vids' must hold Python ints (not numpy integers)")
    if len(set(vids)) != len(vids):
        raise FeatureFileError(f"{path}: key 'vids' lists a dialogue more than once")
    for key in (*keys, *META_KEYS):
        if not isinstance(data[key], dict):
            raise FeatureFileError(f"{path}: key {key!r} must be a dict dialogue id -> list, got {type(data[key]).__name__}")
    widths: dict[str, int] = {}
    for dia in vids:
        lengths: dict[str, int] = {}
        for key in (*keys, *META_KEYS):
            if dia not in data[key]:
                raise FeatureFileError(f"{path}: dialogue {dia} is listed in 'vids' but missing from {key!r}")
            value = data[key][dia]
            if not hasattr(value, "__len__"):
                raise FeatureFileError(f"{path}: {key!r}[{dia}] must be a list, got {type(value).__name__}")
            lengths[key] = len(value)
        if len(set(lengths.values())) != 1:
            raise FeatureFileError(
                f"{path}: dialogue {dia} has per-utterance lists of different lengths: {lengths}"
            )
        if lengths["labels"] == 0:
            raise FeatureFileError(f"{path}: dialogue {dia} has no utterances")
        for key in META_KEYS:
            if not all(_is_int(v) for v in data[key][dia]):
                raise FeatureFileError(f"{path}: {key!r}[{dia}] must hold ints")
            if strict and not all(type(v) is int for v in data[key][dia]):
                raise FeatureFileError(f"{path}: {key!r}[{dia}] must hold Python ints (not numpy integers)")
        for key in keys:
            for j, vec in enumerate(data[key][dia]):
                _check_vector(vec, path, key, dia, j, widths, strict)


def _check_vector(vec: Any, path: str | Path, key: str, dia: Any, j: int, widths: dict[str, int],
                  strict: bool) -> None:
    where = f"{path}: {key!r}[{dia}][{j}]"
    if not isinstance(vec, np.ndarray) or vec.ndim != 1:
        shape = getattr(vec, "shape", None)
        raise FeatureFileError(f"{where} must be a 1-D numpy array (D,), got {type(vec).__name__} {shape}")
    if strict and vec.dtype != np.float32:
        raise FeatureFileError(f"{where} has dtype {vec.dtype}, expected float32")
    if not np.issubdtype(vec.dtype, np.floating):
        raise FeatureFileError(f"{where} has dtype {vec.dtype}, expected a floating dtype (float32)")
    expected = widths.setdefault(key, vec.shape[0])
    if vec.shape[0] != expected:
        raise FeatureFileError(f"{where} has width {vec.shape[0]}, other {key!r} vectors have width {expected}")
    if not np.isfinite(vec).all():
        # One NaN spreads through the fusion's attention to the whole dialogue (docs/METHOD.md §6).
        raise FeatureFileError(
            f"{path}: feature {key!r} of dialogue {dia}, utterance {j} holds non-finite values "
            f"({int(np.isnan(vec).sum())} NaN, {int(np.isinf(vec).sum())} inf of {vec.shape[0]}); re-run "
            "extract_first_stage_features.py (and the first-stage model that gives NaN, if it does)")


def feature_width(features: Mapping[str, Any], key: str) -> int:
    """D of ``features[key]`` (the first utterance of the first dialogue)."""
    first = features["vids"][0]
    return int(features[key][first][0].shape[0])


def check_features_record(record: Mapping[str, Any], path: Path, reader: DatasetSpec, script: str) -> None:
    """The pickles' dataset and labels (their record) must be the reading script's; both sides named."""
    written, labels = record.get("dataset"), record.get("labels")
    if (written is not None and written != reader.name) or (labels is not None and list(labels) != list(reader.labels)):
        raise FeatureFileError(
            f"the feature pickles in {path.parent} are {written}'s ({features_record(path.parent)}: dataset "
            f"{written}, labels {labels}) but {script or reader.name} reads {reader.name}'s (labels "
            f"{list(reader.labels)}); point --feature_dir at the features {reader.name}/extract_first_stage_features.py "
            "writes")
