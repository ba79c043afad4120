"""Random-weight stand-ins for the four pretrained folders (docs/METHOD.md §0): tiny, or real-size.

Each folder has the layout ``hf download <hub id> --local-dir pretrained_model/<name>``
produces for the real model (config.json, weights saved from the same head class,
tokenizer / preprocessor files), so every stage loads them through exactly the
``from_pretrained`` calls it uses for the real checkpoints (magtkd.model).
Only the sizes are tiny, so the whole pipeline runs on a CPU in seconds.

The text width (48) deliberately differs from the audio/video width (32): the
text head must follow the audio/video width instead of hard-coding it
(docs/METHOD.md §2, "Text").

``size="real"`` writes the real architectures instead (random weights, same
files): RoBERTa-large (24 layers, 1024 hidden, 16 heads, FFN 4096, 514
positions, vocabulary 50265), data2vec-audio-base-960h (its config defaults:
7 conv layers, 12 layers of 768), TimeSformer-base (224 px, 8 frames, 12 layers
of 768, 400 Kinetics classes) and videomae-base (224 px, 16 frames, 12 layers of
768, decoder 4 x 384), with the 16 kHz feature extractor and the image
processors at 224 px. The real BPE merges cannot be had offline, so the
tokenizer is trained on the corpus like the tiny one, and its vocabulary is
filled up with placeholder entries (never produced by the merges) to the real
50265 ids, ``<mask>`` last at 50264: the embedding matrix, and everything that
sizes itself from ``len(tokenizer)``, is real-size. The weights take about
2.6 GB (RoBERTa-large alone 1.4 GB).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch

from ..artifacts import atomic_path, write_json, write_text

log = logging.getLogger(__name__)

# Sizes of the stand-ins (the brief for this module fixes them).
TEXT_HIDDEN = 48
AV_HIDDEN = 32
TOKENIZER_VOCAB = 800  # BPE target; a small corpus may stop earlier (>= 256 bytes + 5 specials)
FRAME_SIZE = 32
NUM_FRAMES = 8
SIZES = ("tiny", "real")

# The real models' sizes (their hub config.json files).
REAL_TEXT_VOCAB = 50265  # roberta-large, <mask> = 50264
REAL_FRAME_SIZE = 224

# RoBERTa's special tokens in its id order; <mask> is appended last, as in the
# real vocab (where it is id 50264).
_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_ROBERTA_MASK = "<mask>"

# ImageNet mean/std as in MCG-NJU/videomae-base's preprocessor_config.json, and
# the Kinetics mean/std of facebook/timesformer-base-finetuned-k400's.
_VIDEOMAE_MEAN, _VIDEOMAE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
_TIMESFORMER_MEAN, _TIMESFORMER_STD = [0.45, 0.45, 0.45], [0.225, 0.225, 0.225]
_K400_LABELS = ("abseiling", "air drumming", "answering questions", "applauding")


def write_models(out_dir: Path, corpus: Iterable[str], seed: int = 0, size: str = "tiny",
                 weights: bool = True) -> dict[str, Path]:
    """Write the four stand-in folders into ``out_dir``; return ``{name: folder}``.

    ``corpus`` is the text the byte-level BPE tokenizer is trained on. The same
    corpus and seed give byte-identical files. ``size`` is ``tiny`` or ``real``
    (the real architectures); ``weights=False`` writes everything but the weight
    files (configs, tokenizer, processors), e.g. to inspect the real sizes cheaply.
    """
    if size not in SIZES:
        raise ValueError(f"size={size!r}; expected one of {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    texts = [str(t) for t in corpus]
    if not texts:
        raise ValueError("write_models: the tokenizer corpus is empty; pass at least one sentence")
    real = size == "real"
    writers = {
        "roberta-large": lambda d: _write_roberta(d, texts, seed, real, weights),
        "data2vec-audio-base-960h": lambda d: _write_data2vec_audio(d, seed, real, weights),
        "videomae-base": lambda d: _write_videomae(d, seed, real, weights),
        "timesformer-base-finetuned-k400": lambda d: _write_timesformer(d, seed, real, weights),
    }
    folders: dict[str, Path] = {}
    for name, writer in writers.items():
        start = time.perf_counter()
        folder = out_dir / name
        writer(folder)
        folders[name] = folder
        log.info("wrote %s %s (%.1f s)", size, folder, time.perf_counter() - start)
    return folders


# --- text -----------------------------------------------------------------


def _train_bpe(texts: list[str]):
    """A RoBERTa-style byte-level BPE tokenizer trained on ``texts``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(_ROBERTA_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # RoBERTa's <mask> swallows the space before it (lstrip), so "a <mask>" predicts " word".
    tok.add_special_tokens([AddedToken(_ROBERTA_MASK, lstrip=True, normalized=False, special=True)])
    vocab = tok.get_vocab(with_added_tokens=True)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=False
    )
    return tok


def _fill_vocab(tokenizer_json: dict, size: int) -> None:
    """Grow the BPE vocabulary to ``size`` ids with placeholder entries before ``<mask>`` (kept last).

    The placeholders are never produced (no merge builds them); they only give the
    vocabulary, and so the embedding matrix, the real model's size.
    """
    vocab = tokenizer_json["model"]["vocab"]
    mask = tokenizer_json["added_tokens"][-1]
    if mask["content"] != _ROBERTA_MASK or len(vocab) + 1 > size:
        raise RuntimeError(f"cannot fill the vocabulary ({len(vocab)} entries + <mask>) up to {size}")
    for i in range(len(vocab), size - 1):
        vocab[f"<unused{i}>"] = i
    mask["id"] = size - 1


def _write_roberta(folder: Path, texts: list[str], seed: int, real: bool = False, weights: bool = True) -> None:
    from tokenizers import Tokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM

    tok = _train_bpe(texts)
    if real:
        tokenizer_json = json.loads(tok.to_str())
        _fill_vocab(tokenizer_json, REAL_TEXT_VOCAB)
        tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = [vocab[t] for t in _ROBERTA_SPECIALS]
    if ids != [0, 1, 2, 3] or vocab[_ROBERTA_MASK] != len(vocab) - 1:
        raise RuntimeError(f"tokenizer special ids came out as {ids}, <mask>={vocab[_ROBERTA_MASK]}")
    tokenizer_json = json.loads(tok.to_str())
    merges = tokenizer_json["model"]["merges"]
    merges_lines = [" ".join(m) if isinstance(m, list) else m for m in merges]

    # The hub repo ships vocab.json (with <mask>), merges.txt and tokenizer.json;
    # no tokenizer_config.json, so AutoTokenizer resolves the class from config.json.
    write_text(folder / "vocab.json", json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(line + "\n" for line in merges_lines))
    write_text(folder / "tokenizer.json", json.dumps(tokenizer_json, ensure_ascii=False, indent=2))

    sizes = (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096) if real
             else dict(hidden_size=TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=TEXT_HIDDEN * 2))
    config = RobertaConfig(
        vocab_size=len(vocab), **sizes, max_position_embeddings=514, type_vocab_size=1,
        layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1, eos_token_id=2,
    )
    _save_model(RobertaForMaskedLM, config, folder, seed, weights)


# --- audio ----------------------------------------------------------------


def _write_data2vec_audio(folder: Path, seed: int, real: bool = False, weights: bool = True) -> None:
    from transformers import Data2VecAudioConfig, Data2VecAudioForCTC, Wav2Vec2FeatureExtractor

    # The real folder's config is the library defaults with the 32-letter CTC vocabulary.
    # Tiny: four conv layers with total stride 5*4*4*4 = 320 (as the real 7-layer
    # encoder): 1 s at 16 kHz gives 49 frames, enough for mask_time_length 3.
    config = Data2VecAudioConfig(vocab_size=32) if real else Data2VecAudioConfig(
        vocab_size=32, hidden_size=AV_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=AV_HIDDEN * 2, conv_dim=(16, 16, 16, 16), conv_stride=(5, 4, 4, 4),
        conv_kernel=(10, 4, 4, 4), num_conv_pos_embeddings=2, conv_pos_kernel_size=5,
        num_conv_pos_embedding_groups=4, classifier_proj_size=16, tdnn_dim=(16, 16, 16, 16, 32),
        xvector_output_dim=16,
    )
    _save_model(Data2VecAudioForCTC, config, folder, seed, weights)
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True,
    )
    write_text(folder / "preprocessor_config.json", extractor.to_json_string())


# --- video ----------------------------------------------------------------


def _image_processor_json(mean: list[float], std: list[float], pixels: int = FRAME_SIZE) -> dict:
    """The VideoMAEImageProcessor settings of the real folders, at ``pixels`` pixels."""
    return {
        "crop_size": {"height": pixels, "width": pixels},
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": mean,
        "image_processor_type": "VideoMAEImageProcessor",
        "image_std": std,
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": pixels},
    }


def _write_videomae(folder: Path, seed: int, real: bool = False, weights: bool = True) -> None:
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    # Real: the library defaults are videomae-base's (224 px, 16 frames, 12 x 768, decoder 4 x 384).
    config = VideoMAEConfig(norm_pix_loss=True, use_mean_pooling=False) if real else VideoMAEConfig(
        image_size=FRAME_SIZE, patch_size=8, num_frames=NUM_FRAMES, tubelet_size=2, hidden_size=AV_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=AV_HIDDEN * 2,
        decoder_hidden_size=AV_HIDDEN, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=AV_HIDDEN * 2, norm_pix_loss=True, use_mean_pooling=False,
    )
    _save_model(VideoMAEForPreTraining, config, folder, seed, weights)
    write_json(folder / "preprocessor_config.json",
               _image_processor_json(_VIDEOMAE_MEAN, _VIDEOMAE_STD, REAL_FRAME_SIZE if real else FRAME_SIZE))


def _write_timesformer(folder: Path, seed: int, real: bool = False, weights: bool = True) -> None:
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    if real:  # the library defaults are TimeSformer-base's (224 px, patch 16, 8 frames, 12 x 768)
        labels = [f"kinetics_class_{i}" for i in range(400)]  # the real head has 400 Kinetics classes
        config = TimesformerConfig(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    else:
        config = TimesformerConfig(
            image_size=FRAME_SIZE, patch_size=8, num_frames=NUM_FRAMES, hidden_size=AV_HIDDEN, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=AV_HIDDEN * 2,
            id2label=dict(enumerate(_K400_LABELS)), label2id={label: i for i, label in enumerate(_K400_LABELS)},
        )
    _save_model(TimesformerForVideoClassification, config, folder, seed, weights)
    write_json(folder / "preprocessor_config.json",
               _image_processor_json(_TIMESFORMER_MEAN, _TIMESFORMER_STD, REAL_FRAME_SIZE if real else FRAME_SIZE))


# --- shared ---------------------------------------------------------------


def _save_model(model_cls, config, folder: Path, seed: int, weights: bool = True) -> None:
    """Build ``model_cls(config)`` from ``seed`` and move its save_pretrained files in atomically
    (``weights=False``: only config.json)."""
    from transformers.utils import logging as hf_logging

    if not weights:
        config.architectures = [model_cls.__name__]
        write_text(folder / "config.json", config.to_json_string())
        return
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    # save_pretrained writes in place; stage it in a scratch folder next to the
    # target and rename each file in through magtkd.utils, so a killed run never
    # leaves a half-written weights file.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny file is noise
    try:
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=folder) as staging:
            model.save_pretrained(staging)
            for src in sorted(Path(staging).iterdir()):
                with atomic_path(folder / src.name) as tmp:
                    shutil.move(src, tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
