"""Dataset recipes: one module per dataset holds all of its specifics."""

from .base import PRETRAINED, SPLITS, DatasetSpec, FusionDefaults
from .iemocap import IEMOCAP
from .meld import MELD

RECIPES = {"IEMOCAP": IEMOCAP, "MELD": MELD}

__all__ = ["PRETRAINED", "SPLITS", "DatasetSpec", "FusionDefaults", "IEMOCAP", "MELD", "RECIPES"]
