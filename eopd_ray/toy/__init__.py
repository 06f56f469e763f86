"""Tiny models and (later) the synthetic task behind the embedded default; no hub needed."""
