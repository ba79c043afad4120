"""Media decoding with PyAV: audio to 16 kHz mono, frames in a time window."""
