"""The text prompt (docs/METHOD.md §2, Text) with a tiny byte-level BPE tokenizer trained here, and
its ablation variants (`magtkd.prompt`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer

from magtkd import spec
from magtkd.prompt import add_speaker_tokens, build_prompt, encode_prompt, left_pad, SPEAKER_TOKENS
from magtkd.spec import PROMPTS


CORPUS = ["Excuse me. Do you have your forms? Now feels. Yeah. Let me see them. Is there a problem?"] * 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A RoBERTa-style tokenizer folder (vocab.json, merges.txt, config.json) loaded by AutoTokenizer."""
    folder = tmp_path_factory.mktemp("roberta-tiny")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def prepared(tokenizer):
    base = len(tokenizer)
    return tokenizer, base, add_speaker_tokens(tokenizer)


TEXTS = ["Excuse me.", "Do you have your forms?", "Yeah.", "Who are you?"]

SPEAKERS = [0, 1, 0, 2]


def test_prompt_every_prefix() -> None:
    expected = [
        "<s1> Excuse me. </s> Now<s1> feels",
        "<s1> Excuse me. <s2> Do you have your forms? </s> Now<s2> feels",
        "<s1> Excuse me. <s2> Do you have your forms? <s1> Yeah. </s> Now<s1> feels",
        "<s1> Excuse me. <s2> Do you have your forms? <s1> Yeah. <s3> Who are you? </s> Now<s3> feels",
    ]
    assert [build_prompt(TEXTS[: t + 1], SPEAKERS[: t + 1]) for t in range(4)] == expected


def test_prompt_errors() -> None:
    with pytest.raises(ValueError, match="speaker number 9 has no token"):
        build_prompt(["a"] * 10, list(range(10)))
    with pytest.raises(ValueError, match="2 texts but 1 speakers"):
        build_prompt(["a", "b"], [0])
    with pytest.raises(ValueError, match="empty"):
        build_prompt([], [])
    assert build_prompt(["a"] * 9, list(range(9))).endswith("<s9> a </s> Now<s9> feels")


def test_speaker_tokens_are_single_ids(prepared) -> None:
    tok, base, size = prepared
    assert size == len(tok) == base + len(SPEAKER_TOKENS)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in SPEAKER_TOKENS]
    assert all(len(i) == 1 for i in ids)
    assert sorted(i[0] for i in ids) == list(range(size - 9, size))
    assert add_speaker_tokens(tok) == size  # adding again changes nothing


def test_encode_prompt(prepared) -> None:
    tok, _, _ = prepared
    prompt = build_prompt(TEXTS[:2], SPEAKERS[:2])
    ids = encode_prompt(tok, prompt)
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<s1>"  # no begin-of-sequence token added
    assert pieces[-1] == "<mask>" and ids[-1] == tok.mask_token_id
    assert ids.count(tok.sep_token_id) == 1 and pieces.count("<s2>") == 2  # literal </s> -> separator id
    last_speaker = len(pieces) - 1 - pieces[::-1].index("<s2>")
    assert tok.decode(ids[last_speaker + 1:-1]) == " feels"
    assert tok.decode(ids[:-1]) == prompt


def test_truncation_keeps_the_last_ids(prepared) -> None:
    tok, _, _ = prepared
    prompt = build_prompt(["Yeah."] * 400, [0, 1] * 200)
    full = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(full) > 1000
    ids = encode_prompt(tok, prompt)
    assert len(ids) == 512 and ids[:-1] == full[-511:] and ids[-1] == tok.mask_token_id
    assert encode_prompt(tok, prompt, max_tokens=8) == full[-7:] + [tok.mask_token_id]


def test_encode_needs_speaker_tokens(tmp_path: Path) -> None:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=280, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    plain = AutoTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="call add_speaker_tokens"):
        encode_prompt(plain, "<s1> hi </s> Now<s1> feels")


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=1)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8], [1, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    with pytest.raises(ValueError, match="empty batch"):
        left_pad([], 1)


def test_prompt_variants():
    texts, speakers = ("hi there", "oh no", "fine"), (0, 1, 0)
    assert build_prompt(texts, speakers) == "<s1> hi there <s2> oh no <s1> fine </s> Now<s1> feels"
    assert build_prompt(texts, speakers, "no_template") == "<s1> hi there <s2> oh no <s1> fine"
    assert build_prompt(texts, speakers, "no_speakers") == "hi there oh no fine </s> Now feels"
    assert build_prompt(texts, speakers, "no_context") == "<s1> fine </s> Now<s1> feels"
    assert PROMPTS == spec.PROMPTS
