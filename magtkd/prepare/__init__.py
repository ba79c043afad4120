"""Data preparation: raw releases -> the CSVs every stage reads (SPEC section 1)."""
