"""The pretrained stand-ins (`magtkd.synthetic.models`) and their loaders (`magtkd.pretrained`):
hub layouts, real-size architectures, and wrong or incomplete folders refused (docs/METHOD.md §6)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from magtkd import pretrained
from magtkd.pretrained import PRETRAINED
from magtkd.synthetic.models import write_models
from magtkd.synthetic.text import corpus


CORPUS = [
    "Excuse me. Do you have your forms?",
    "I'm so happy to see you again, really!",
    "Why would you do that? That's terrible.",
    "Oh my God, I can't believe it.",
    "Well, um, I guess it's fine.",
    "Now she feels angry about the car.",
]

SPEAKERS = [f"<s{k}>" for k in range(1, 10)]


@pytest.fixture(scope="module")
def pdir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "pretrained_model"
    folders = write_models(out, CORPUS, seed=0)
    assert folders == {name: out / name for name in PRETRAINED}
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_matches_hub_folders(pdir: Path) -> None:
    names = {name: set(os.listdir(pdir / name)) for name in PRETRAINED}
    assert names["roberta-large"] == {"config.json", "vocab.json", "merges.txt", "tokenizer.json", "model.safetensors"}
    for name in ("data2vec-audio-base-960h", "videomae-base", "timesformer-base-finetuned-k400"):
        assert names[name] == {"config.json", "model.safetensors", "preprocessor_config.json"}
    arch = {name: json.loads((pdir / name / "config.json").read_text())["architectures"] for name in PRETRAINED}
    assert arch == {
        "roberta-large": ["RobertaForMaskedLM"],
        "data2vec-audio-base-960h": ["Data2VecAudioForCTC"],
        "videomae-base": ["VideoMAEForPreTraining"],
        "timesformer-base-finetuned-k400": ["TimesformerForVideoClassification"],
    }
    vocab = json.loads((pdir / "roberta-large" / "vocab.json").read_text())
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert vocab["<mask>"] == len(vocab) - 1
    assert 261 <= len(vocab) <= 1000
    assert (pdir / "roberta-large" / "merges.txt").read_text().startswith("#version: 0.2\n")
    config = json.loads((pdir / "roberta-large" / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["max_position_embeddings"]) == (len(vocab), 48, 514)


def test_tokenizer_roberta_behaviour(pdir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pdir / "roberta-large")
    assert type(tok).__name__ == "RobertaTokenizer"
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_token_id == len(tok) - 1
    assert tok("</s>", add_special_tokens=False).input_ids == [tok.sep_token_id]
    assert tok("hi").input_ids[0] == tok.cls_token_id and tok("hi").input_ids[-1] == tok.sep_token_id
    # <mask> swallows the space before it, as RoBERTa's does.
    assert tok("so <mask>", add_special_tokens=False).input_ids[-1] == tok.mask_token_id
    assert tok.convert_ids_to_tokens(tok("so <mask>", add_special_tokens=False).input_ids)[-2] != "Ġ"

    # transformers 5 calls them extra_special_tokens; the v4 key still works.
    size = len(tok)
    assert tok.add_special_tokens({"additional_special_tokens": SPEAKERS}) == 9
    assert len(tok) == size + 9 and tok.extra_special_tokens == SPEAKERS
    ids = tok("<s1> Excuse me. <s2> Do you have your forms? </s> Now<s2> feels", add_special_tokens=False).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens.count("<s1>") == 1 and tokens.count("<s2>") == 2 and tokens.count("</s>") == 1
    for speaker in SPEAKERS:
        assert len(tok(speaker, add_special_tokens=False).input_ids) == 1
    assert pretrained.load_tokenizer(pdir).model_max_length == 512


def test_text_backbone_forward(pdir: Path) -> None:
    from transformers import RobertaModel

    tok = pretrained.load_tokenizer(pdir)
    batch = tok(["Excuse me.", "Oh my God, I can't believe it. </s> Now feels"], add_special_tokens=False,
                padding=True, return_tensors="pt")
    model = RobertaModel.from_pretrained(pdir / "roberta-large").eval()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (2, batch.input_ids.shape[1], 48)

    backbone = pretrained.load_text_backbone(pdir).eval()
    assert type(backbone).__name__ == "RobertaModel" and backbone.pooler is None
    assert backbone.config.hidden_size == 48
    tok.add_special_tokens({"additional_special_tokens": SPEAKERS})
    backbone.resize_token_embeddings(len(tok), mean_resizing=False)
    ids = tok("<s9> hi </s> Now<s9> feels", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert backbone(**ids).last_hidden_state.shape == (1, ids.input_ids.shape[1], 48)


def test_audio_extractor_and_backbone(pdir: Path) -> None:
    from transformers import AutoFeatureExtractor, Data2VecAudioModel

    extractor = AutoFeatureExtractor.from_pretrained(pdir / "data2vec-audio-base-960h")
    assert type(extractor).__name__ == "Wav2Vec2FeatureExtractor"
    assert (extractor.sampling_rate, extractor.do_normalize, extractor.return_attention_mask,
            extractor.padding_value, extractor.feature_size) == (16000, True, True, 0.0, 1)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(16000).astype(np.float32), rng.standard_normal(8000).astype(np.float32)]
    inputs = extractor(clips, sampling_rate=16000, padding=True, return_tensors="pt")
    assert inputs.input_values.shape == (2, 16000) and inputs.attention_mask[1, 8000:].sum() == 0

    model = Data2VecAudioModel.from_pretrained(pdir / "data2vec-audio-base-960h").eval()
    with torch.no_grad():
        hidden = model(inputs.input_values[:1]).last_hidden_state
    assert hidden.shape[0] == 1 and 20 <= hidden.shape[1] <= 100 and hidden.shape[2] == 32

    backbone = pretrained.load_audio_backbone(pdir)
    assert backbone.config.mask_time_length == 3 and backbone.config.hidden_size == 32
    assert pretrained.load_audio_backbone(pdir, mask_time_length=5).config.mask_time_length == 5
    backbone.train()  # time masking is active in training mode
    out = backbone(**inputs).last_hidden_state
    assert out.shape == (2, hidden.shape[1], 32)
    assert type(pretrained.load_audio_feature_extractor(pdir)).__name__ == "Wav2Vec2FeatureExtractor"


def test_video_processor_and_backbone(pdir: Path, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, TimesformerModel, VideoMAEForPreTraining

    processor = AutoImageProcessor.from_pretrained(pdir / "videomae-base")
    assert type(processor).__name__ == "VideoMAEImageProcessor"
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(8)]
    pixels = processor(frames, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 8, 3, 32, 32)

    pretraining, info = VideoMAEForPreTraining.from_pretrained(pdir / "videomae-base", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert pretraining.config.hidden_size == 32 and pretraining.config.num_frames == 8

    model = TimesformerModel.from_pretrained(pdir / "timesformer-base-finetuned-k400").eval()
    with torch.no_grad():
        hidden = model(pixels).last_hidden_state
    assert hidden.shape == (1, 1 + 8 * (32 // 8) ** 2, 32)
    backbone = pretrained.load_video_backbone(pdir).eval()
    with torch.no_grad():
        assert torch.equal(backbone(pixels).last_hidden_state, hidden)

    # The older preprocessor format some hub folders use ("size": 224 ints,
    # VideoMAEFeatureExtractor) must give the same pixels through load_image_processor.
    legacy = tmp_path / "videomae-base"
    legacy.mkdir()
    shutil.copy(pdir / "videomae-base" / "config.json", legacy)
    (legacy / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "VideoMAEFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 32,
    }))
    legacy_pixels = pretrained.load_image_processor(tmp_path)(frames, return_tensors="pt").pixel_values
    assert torch.equal(legacy_pixels, pixels)


def test_write_models_deterministic(pdir: Path, tmp_path: Path) -> None:
    again = write_models(tmp_path / "same", CORPUS, seed=0)
    other = write_models(tmp_path / "other", CORPUS, seed=1)
    for name in PRETRAINED:
        assert _files(again[name]) == _files(pdir / name), name
        assert (other[name] / "config.json").read_bytes() == (pdir / name / "config.json").read_bytes()
        assert (other[name] / "model.safetensors").read_bytes() != (pdir / name / "model.safetensors").read_bytes()
    assert (other["roberta-large"] / "merges.txt").read_bytes() == (pdir / "roberta-large" / "merges.txt").read_bytes()
    assert not list(tmp_path.rglob(".*")), "staging or temporary files left behind"
    with pytest.raises(ValueError, match="corpus is empty"):
        write_models(tmp_path / "empty", [], seed=0)


def test_missing_folder_and_files(pdir: Path, tmp_path: Path) -> None:
    folder = (tmp_path / "roberta-large").resolve()
    with pytest.raises(pretrained.PretrainedMissingError) as err:
        pretrained.load_tokenizer(tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    assert str(folder) in str(err.value)
    assert f"hf download FacebookAI/roberta-large --local-dir {folder}" in str(err.value)

    for name in ("data2vec-audio-base-960h", "timesformer-base-finetuned-k400", "videomae-base"):
        shutil.copytree(pdir / name, tmp_path / name)
    (tmp_path / "data2vec-audio-base-960h" / "preprocessor_config.json").unlink()
    with pytest.raises(pretrained.PretrainedMissingError, match="has no preprocessor_config.json") as err:
        pretrained.load_audio_feature_extractor(tmp_path)
    assert "hf download facebook/data2vec-audio-base-960h --local-dir" in str(err.value)
    (tmp_path / "timesformer-base-finetuned-k400" / "config.json").unlink()
    with pytest.raises(pretrained.PretrainedMissingError, match=r"timesformer-base-finetuned-k400 has no config\.json"):
        pretrained.load_video_backbone(tmp_path)
    (tmp_path / "videomae-base" / "preprocessor_config.json").unlink()
    with pytest.raises(pretrained.PretrainedMissingError, match="hf download MCG-NJU/videomae-base"):
        pretrained.load_image_processor(tmp_path)
    (tmp_path / "data2vec-audio-base-960h" / "model.safetensors").unlink()
    with pytest.raises(pretrained.PretrainedMissingError, match="has none of model.safetensors, pytorch_model.bin"):
        pretrained.load_audio_backbone(tmp_path)
    with pytest.raises(KeyError, match="unknown pretrained model 'bert'"):
        pretrained.pretrained_folder(tmp_path, "bert")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_missing_backbone_weights_are_an_error_not_random_weights(pdir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    records = _Records()
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addHandler(records)
    try:
        pretrained.load_video_backbone(pdir)
        assert not records.messages  # the dropped classifier head is expected
    finally:
        hf_logger.removeHandler(records)
    folder = tmp_path / "timesformer-base-finetuned-k400"
    shutil.copytree(pdir / "timesformer-base-finetuned-k400", folder)
    state = load_file(folder / "model.safetensors")
    dropped = next(k for k in state if k.endswith("layernorm.weight"))
    del state[dropped]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pretrained.PretrainedMissingError, match=r"backbone weights are missing.*incomplete.*hf download"):
        pretrained.load_video_backbone(tmp_path)


def test_videomae_folder_where_timesformer_belongs_is_the_wrong_model(generated, tmp_path):
    shutil.copytree(generated / "pretrained_model" / "videomae-base", tmp_path / "timesformer-base-finetuned-k400")
    with pytest.raises(pretrained.PretrainedMismatchError,
                       match=r"holds another model \(model_type 'videomae'.*needs model_type 'timesformer'.*wrong "
                             r"model, not an incomplete download.*hf download facebook/timesformer"):
        pretrained.load_video_backbone(tmp_path)


@pytest.mark.parametrize("name, loader", [("roberta-large", pretrained.load_tokenizer),
                                          ("data2vec-audio-base-960h", pretrained.load_audio_backbone),
                                          ("videomae-base", pretrained.load_image_processor)])
def test_a_config_of_another_model_type_is_refused(generated, tmp_path, name, loader):
    folder = tmp_path / name
    shutil.copytree(generated / "pretrained_model" / name, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(pretrained.PretrainedMismatchError, match=rf"{name} needs model_type"):
        loader(tmp_path)


def test_missing_backbone_weights_are_an_incomplete_download(generated, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "timesformer-base-finetuned-k400"
    shutil.copytree(generated / "pretrained_model" / folder.name, folder)
    state = load_file(folder / "model.safetensors")
    dropped = next(k for k in state if k.endswith("layernorm.weight"))
    del state[dropped]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(pretrained.PretrainedMissingError,
                       match=r"1 backbone weights are missing .*layernorm.weight.*incomplete or corrupt.*hf download"):
        pretrained.load_video_backbone(tmp_path)


def test_real_size_standins_have_the_real_architectures(tmp_path: Path) -> None:
    """``--size real`` configs, tokenizer and processors (weights skipped: RoBERTa-large alone is 1.4 GB)."""
    from transformers import AutoConfig, AutoModel

    write_models(tmp_path, corpus(), seed=0, size="real", weights=False)
    assert not list(tmp_path.rglob("*.safetensors"))

    tok = pretrained.load_tokenizer(tmp_path)
    assert (len(tok), tok.mask_token_id, tok.model_max_length) == (50265, 50264, 512)
    ids = tok("Now <mask>").input_ids
    assert ids[0] == 0 and ids[-2:] == [50264, 2]
    assert max(ids[:-2]) < 5000  # the placeholder entries filling the vocabulary are never produced

    text = AutoConfig.from_pretrained(tmp_path / "roberta-large")
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size,
            text.vocab_size, text.max_position_embeddings) == (24, 1024, 16, 4096, 50265, 514)
    audio = AutoConfig.from_pretrained(tmp_path / "data2vec-audio-base-960h")
    assert (audio.num_hidden_layers, audio.hidden_size, len(audio.conv_dim)) == (12, 768, 7)
    video = AutoConfig.from_pretrained(tmp_path / "timesformer-base-finetuned-k400")
    assert (video.image_size, video.num_frames, video.num_hidden_layers, video.hidden_size,
            video.num_labels) == (224, 8, 12, 768, 400)
    assert pretrained.representation_width(tmp_path) == 768

    with torch.device("meta"):  # parameter counts without allocating them
        counts = {name: sum(p.numel() for p in AutoModel.from_config(AutoConfig.from_pretrained(
            tmp_path / name)).parameters()) for name in ("roberta-large", "data2vec-audio-base-960h",
                                                         "timesformer-base-finetuned-k400")}
    assert 354e6 < counts["roberta-large"] < 357e6
    assert 90e6 < counts["data2vec-audio-base-960h"] < 96e6
    assert 118e6 < counts["timesformer-base-finetuned-k400"] < 124e6

    processor = pretrained.load_image_processor(tmp_path)
    assert (processor.crop_size["height"], processor.size["shortest_edge"]) == (224, 224)
    assert pretrained.load_audio_feature_extractor(tmp_path).sampling_rate == 16000
    with pytest.raises(ValueError, match="expected one of tiny, real"):
        write_models(tmp_path / "x", corpus(), size="huge")
