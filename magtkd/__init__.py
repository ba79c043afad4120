"""MAGTKD: Multi-modal Anchor Gated Transformer with Knowledge Distillation for ERC.

Shared library behind the per-dataset stage scripts in ``IEMOCAP/`` and ``MELD/``.
Dataset specifics live in ``IEMOCAP/config.py`` and ``MELD/config.py``; everything
here is shared: ``model``, ``dataset``, ``utils``, ``media`` (+ ``pipeline``, ``demo``, ``synthetic``).
"""

__version__ = "0.1.0"
