"""MAGTKD: Multi-modal Anchor Gated Transformer with Knowledge Distillation for ERC.

Shared library behind the per-dataset stage scripts in ``IEMOCAP/`` and ``MELD/``.
Dataset specifics live in :mod:`magtkd.recipes`; everything else is shared.
"""

__version__ = "0.1.0"
