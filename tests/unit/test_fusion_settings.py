"""The fusion's settings (`magtkd.fusion_settings`; docs/METHOD.md §5): which release's attention and padding
row a model computes, from its flags when training and from its record (or, without one, the flags) when a
trained model is evaluated."""

from __future__ import annotations

import pytest

from magtkd.fusion_settings import FusionRequest, FusionSettings
from magtkd.model import FusionVariant
from magtkd.utils import UserError

FEATURES = ("audio_kd", "video")


def trained(paper_attention: bool | None, padding_speaker: str | None) -> FusionSettings:
    """A trained model's settings as read from its checkpoint and record (None: the record does not say)."""
    return FusionSettings(hidden=16, n_classes=6, n_speaker=304, separate_text_blocks=False,
                          variant=FusionVariant(), n_head=None, paper_attention=paper_attention,
                          padding_speaker=padding_speaker)


def request(**flags) -> FusionRequest:
    return FusionRequest.from_flags(flags, FEATURES)


def test_training_takes_the_fixed_attention_and_our_padding_row_unless_asked():
    default = request().for_training(16, 6, 304, "train.pkl")
    assert (default.paper_attention, default.padding_speaker, default.padding_row) == (False, "own", 304)
    authors = request(paper_attention=True, padding_speaker="authors").for_training(16, 6, 304, "train.pkl")
    assert (authors.paper_attention, authors.padding_row) == (True, 2)
    model = authors.build(0.1)
    assert model.paper_attention and model.padding_speaker == 2
    assert authors.flags()["paper_attention"] is True and authors.flags()["padding_speaker"] == "authors"


def test_a_record_decides_and_a_contradicting_flag_names_both():
    recorded = trained(True, "authors")
    assert request().against(recorded, "checkpoint X").paper_attention is True
    with pytest.raises(UserError, match=r"--paper_attention False but checkpoint X was trained with "
                                        r"--paper_attention True"):
        request(paper_attention=False).against(recorded, "checkpoint X")
    with pytest.raises(UserError, match="--padding_speaker own but checkpoint X was trained with --padding_speaker "
                                        "authors"):
        request(padding_speaker="own").against(recorded, "checkpoint X")


def test_a_checkpoint_without_record_is_the_authors_and_the_flag_picks_the_attention():
    unknown = trained(None, None)
    default = request().against(unknown, "checkpoint X")
    assert (default.paper_attention, default.padding_speaker) == (False, "authors")
    assert request(paper_attention=True).against(unknown, "checkpoint X").paper_attention is True


def test_the_may_2025_attention_refuses_packed_batches():
    with pytest.raises(UserError, match="--packed True.*--paper_attention True"):
        request(paper_attention=True, packed=True).for_training(16, 6, 304, "train.pkl")
    with pytest.raises(UserError, match="--packed True"):
        request(packed=True).against(trained(True, "own"), "checkpoint X")
    with pytest.raises(UserError, match="speaker row 2"):
        request(padding_speaker="authors", n_speaker=1).for_training(16, 6, 1, "train.pkl")
