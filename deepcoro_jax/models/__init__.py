"""Flax (linen) models: one model per file, each returning ``(out, aux)``."""
