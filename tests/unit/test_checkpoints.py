"""Loading checkpoints (`magtkd.checkpoints`): the reference's fusion checkpoints, wrong shapes and
keys named, and first-stage checkpoints laid out as the authors' code writes them (docs/METHOD.md §5, §7)."""

from __future__ import annotations

import pytest
import torch

from helpers import C, H, N_SPK, authors_layout, reference_state
from IEMOCAP.config import IEMOCAP
from magtkd import pretrained
from magtkd.checkpoints import (CheckpointError, FusionCheckpointError, load_checkpoint, load_fusion_checkpoint,
                                settings_from_checkpoint)
from magtkd.model import AnchorGatedTransformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost (conftest.py)


def test_reference_checkpoint_loads(tmp_path, caplog):
    state = reference_state()
    path = tmp_path / "multimodal_fusion_best.bin"
    torch.save(state, path)
    settings = settings_from_checkpoint(state)
    assert (settings.n_speaker, settings.hidden, settings.n_classes, settings.separate_text_blocks) == \
        (N_SPK, H, C, False)
    model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
    with caplog.at_level("INFO", logger="magtkd"):
        load_fusion_checkpoint(model, path)
    dropped = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(dropped) == 1 and "a_t" in dropped[0] and "fc" in dropped[0]
    own = model.state_dict()
    assert set(own) == {k for k in state if not k.startswith(("fc.", "a_t.", "v_t.", "a_t_gate.", "v_t_gate."))}
    for key, value in own.items():
        assert torch.equal(value, state[key]), key
    # With separate text blocks the reference's a_t / v_t entries are loaded, only fc is dropped.
    separate = AnchorGatedTransformer(H, C, N_SPK, n_head=2, separate_text_blocks=True)
    load_fusion_checkpoint(separate, path)
    assert torch.equal(separate.state_dict()["a_t_gate.fc.weight"], state["a_t_gate.fc.weight"])


def test_wrong_shape_and_missing_keys_are_named(tmp_path):
    state = reference_state()
    state["w_a.weight"] = torch.zeros(C + 1, H)
    del state["v_v_gate.fc.bias"]
    path = tmp_path / "ref.bin"
    torch.save(state, path)
    with pytest.raises(FusionCheckpointError) as err:
        load_fusion_checkpoint(AnchorGatedTransformer(H, C, N_SPK, n_head=2), path)
    message = str(err.value)
    assert str(path) in message
    assert "w_a.weight: file (8, 8) vs model (7, 8)" in message
    assert "missing keys: v_v_gate.fc.bias" in message
    with pytest.raises(FusionCheckpointError, match=r"unexpected keys: a_t\..*--separate_text_blocks"):
        # Our own separate-block checkpoint into a sharing model: nothing is silently dropped.
        torch.save(AnchorGatedTransformer(H, C, N_SPK, n_head=2, separate_text_blocks=True).state_dict(), path)
        load_fusion_checkpoint(AnchorGatedTransformer(H, C, N_SPK, n_head=2), path)


def test_authors_text_checkpoint_maps_by_shape_and_names_what_does_not_fit(generated, tmp_path, caplog):
    encoder, _ = pretrained.load_encoder("text", generated / "pretrained_model", IEMOCAP.num_classes)
    ours = {k: v.clone() for k, v in encoder.state_dict().items()}
    hidden = encoder.backbone.config.hidden_size
    # Whichever of the two Linears is called W (classifier or projection), shapes decide.
    for classifier, projection in (("W", "fc"), ("classifier_head", "W")):
        torch.nn.init.zeros_(encoder.classifier.weight)
        path = tmp_path / f"{classifier}.bin"
        torch.save(authors_layout(ours, "text", hidden, classifier, projection), path)
        caplog.set_level("INFO", logger="magtkd")
        load_checkpoint(encoder, path, "the authors' text stage")
        assert all(torch.equal(encoder.state_dict()[k], ours[k]) for k in ours)
        assert "laid out as the authors' code writes it" in caplog.text and "text_model.pooler" in caplog.text

    state = authors_layout(ours, "text", hidden)
    state["unknown_head.weight"] = torch.zeros(3, 3)
    del state["text_model.encoder.layer.0.attention.self.query.weight"]
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(encoder, tmp_path / "bad.bin", "the authors' text stage")
    message = str(err.value)
    assert "bad.bin" in message and "unknown_head.weight" in message
    assert "missing keys: backbone.encoder.layer.0.attention.self.query.weight" in message


def test_a_checkpoint_stored_as_safetensors_is_read_where_its_bin_is_absent(tmp_path):
    """A model folder (magtkd.hub, docs/METHOD.md §9) keeps the save folder's names with .safetensors: the readers
    find it under the .bin name; a .bin beside it wins."""
    from safetensors.torch import save_file

    from magtkd.checkpoints import checkpoint_file, read_state_dict

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.float16)}
    save_file(state, str(tmp_path / "text.safetensors"))
    assert checkpoint_file(tmp_path / "text.bin") == tmp_path / "text.safetensors"
    read = read_state_dict(tmp_path / "text.bin", "IEMOCAP/text.py")
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    torch.save({"w": torch.ones(1)}, tmp_path / "text.bin")
    assert checkpoint_file(tmp_path / "text.bin") == tmp_path / "text.bin"
    with pytest.raises(CheckpointError, match="audio.bin not found: it is written by IEMOCAP/audio.py"):
        read_state_dict(tmp_path / "audio.bin", "IEMOCAP/audio.py")
