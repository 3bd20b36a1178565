"""Adapter types: one module per PEFT type, each answering "given this base tensor, what does it become"."""
