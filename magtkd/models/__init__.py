"""Model definitions: first-stage encoders and the anchor gated fusion transformer."""
