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


# --------------------------------------------------------------------------- checkpoints as people save them


class Pickled(torch.nn.Module):
    """A model saved whole (torch.save(model)); unpickling it would call __setstate__."""

    unpickled = False

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def __setstate__(self, state: dict) -> None:
        Pickled.unpickled = True
        super().__setstate__(state)


def test_ddp_prefixed_and_wrapped_fusion_checkpoints_load_with_a_log_line(tmp_path, caplog):
    """DistributedDataParallel's `module.` keys, and the weights inside a training checkpoint's dict, load as
    the plain state_dict does; each unwrapping is logged (docs/METHOD.md §6, "Checkpoints")."""
    state = AnchorGatedTransformer(H, C, N_SPK, n_head=2).state_dict()
    ddp = {f"module.{k}": v for k, v in state.items()}
    torch.save(ddp, tmp_path / "ddp.bin")
    torch.save({"epoch": 7, "model_state_dict": ddp, "optimizer_state_dict": {"param_groups": []}},
               tmp_path / "wrapped.bin")
    for name in ("ddp.bin", "wrapped.bin"):
        model = AnchorGatedTransformer(H, C, N_SPK, n_head=2)
        with caplog.at_level("INFO", logger="magtkd"):
            load_fusion_checkpoint(model, tmp_path / name)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    lines = [r.getMessage() for r in caplog.records]
    assert sum("every key starts with 'module.' (saved from a DistributedDataParallel / DataParallel model); "
               "the prefix is removed" in line for line in lines) == 2
    assert any("the weights are its 'model_state_dict' entry" in line for line in lines)


@pytest.mark.parametrize("zipped", [True, False])
def test_a_whole_pickled_model_is_refused_unpickled_in_one_plain_line(tmp_path, zipped):
    path = tmp_path / "multimodal_fusion_best.bin"
    torch.save(Pickled(), path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(FusionCheckpointError) as err:
        load_fusion_checkpoint(AnchorGatedTransformer(H, C, N_SPK, n_head=2), path)
    message = str(err.value)
    assert f"{path} holds a whole pickled object of class " in message and "Pickled (saved with torch.save(model))" \
        in message and "not unpickled" in message and "torch.save(m.state_dict(), " in message
    assert not Pickled.unpickled and "truncated" not in message


def test_a_pickled_object_among_the_entries_is_named_without_terminal_codes(tmp_path):
    """torch's own refusal carries colour codes; the one line carries none."""
    path = tmp_path / "text.bin"
    torch.save({"model": torch.nn.Linear(2, 2), "weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"text.bin holds a pickled object of class "
                                              r"torch.nn.modules.linear.Linear, not only tensors") as err:
        load_checkpoint(torch.nn.Linear(2, 2), path, "IEMOCAP/text.py")
    assert not any(ord(c) < 32 for c in str(err.value))
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"it is truncated or not a checkpoint: re-run IEMOCAP/text.py"):
        load_checkpoint(torch.nn.Linear(2, 2), path, "IEMOCAP/text.py")
