"""Stage entry points; the per-dataset scripts in IEMOCAP/ and MELD/ call these."""
