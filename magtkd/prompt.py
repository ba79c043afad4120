"""The text prompt: the dialogue so far with speaker tokens, ending in ``Now<sK> feels <mask>``, its
variants, and its token ids left-padded for RoBERTa (docs/METHOD.md §2, Text and Prompt variants).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .spec import PROMPTS


SPEAKER_TOKENS: tuple[str, ...] = tuple(f"<s{k}>" for k in range(1, 10))


SEPARATOR = "</s>"  # RoBERTa's separator; the tokenizer maps the literal string to its id


def speaker_token(speaker: int) -> str:
    """0-based speaker number -> ``<s{speaker+1}>``; at most 9 speakers (MELD's maximum)."""
    if not 0 <= speaker < len(SPEAKER_TOKENS):
        raise ValueError(
            f"speaker number {speaker} has no token: the prompt supports speakers "
            f"0..{len(SPEAKER_TOKENS) - 1} ({SPEAKER_TOKENS[0]}..{SPEAKER_TOKENS[-1]}) within one dialogue"
        )
    return SPEAKER_TOKENS[speaker]


def build_prompt(texts: Sequence[str], speakers: Sequence[int], variant: str = "full") -> str:
    """Prompt for the last utterance of a dialogue prefix (`encode_prompt` appends the mask token).

    ``texts``/``speakers`` are the prefix ``[u_0 .. u_t]`` with 0-based speaker
    numbers (see :class:`Sample`). ``variant`` (ablations, docs/METHOD.md §2):
    ``full`` the paper's ``<sA> u_0 ... <sK> u_t </s> Now<sK> feels``; ``no_template`` the
    context alone (the mask follows ``u_t``); ``no_speakers`` the full prompt without any
    speaker token (``u_0 ... u_t </s> Now feels``); ``no_context`` ``<sK> u_t </s> Now<sK> feels``.
    """
    if len(texts) != len(speakers):
        raise ValueError(f"{len(texts)} texts but {len(speakers)} speakers")
    if not texts:
        raise ValueError("empty dialogue prefix")
    if variant not in PROMPTS:
        raise ValueError(f"prompt variant must be one of {', '.join(PROMPTS)}, got {variant!r}")
    if variant == "no_context":
        texts, speakers = texts[-1:], speakers[-1:]
    if variant == "no_speakers":
        return f"{' '.join(texts)} {SEPARATOR} Now feels"
    context = " ".join(f"{speaker_token(s)} {text}" for text, s in zip(texts, speakers))
    if variant == "no_template":
        return context
    return f"{context} {SEPARATOR} Now{speaker_token(speakers[-1])} feels"


def add_speaker_tokens(tokenizer: Any) -> int:
    """Add ``<s1>``..``<s9>`` as extra special tokens; return the new vocabulary size.

    The model's embeddings must be resized to the returned size (the reference
    resized the model but encoded with a tokenizer lacking the tokens). Adding
    twice is harmless. transformers 5 names the key ``extra_special_tokens``;
    ``replace_extra_special_tokens=False`` keeps any the tokenizer already has.
    """
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(SPEAKER_TOKENS)}, replace_extra_special_tokens=False
    )
    _check_speaker_tokens(tokenizer)
    return len(tokenizer)


def _check_speaker_tokens(tokenizer: Any) -> None:
    """Each speaker token must be one id, or the prompt silently loses speaker identity."""
    added = tokenizer.get_added_vocab()
    missing = [token for token in SPEAKER_TOKENS if token not in added]
    if missing:
        raise ValueError(
            f"tokenizer lacks the speaker tokens {', '.join(missing)}; "
            "call add_speaker_tokens(tokenizer) first"
        )


def encode_prompt(tokenizer: Any, prompt: str, max_tokens: int = 512) -> list[int]:
    """Token ids: the prompt as is (no BOS/EOS added), its LAST ``max_tokens-1`` ids, then the mask id."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (got {max_tokens})")
    if tokenizer.mask_token_id is None:
        raise ValueError("tokenizer has no mask token")
    _check_speaker_tokens(tokenizer)
    # verbose=False: prompts longer than the model limit are expected here; we truncate below.
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids[-(max_tokens - 1):]) + [tokenizer.mask_token_id]


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Stack id lists with LEFT padding: ``(input_ids, attention_mask)``, both ``[B, max_len]`` long."""
    if not batch:
        raise ValueError("empty batch")
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[i, width - len(ids):] = 1
    return input_ids, attention_mask
