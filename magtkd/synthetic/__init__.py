"""Generators of tiny datasets in the real release formats and of tiny model stand-ins."""
