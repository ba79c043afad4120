"""MELD stage scripts; ``config.py`` holds everything specific to this dataset."""
