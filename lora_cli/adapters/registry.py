"""Importing this module registers every adapter type loractl merges."""

from lora_cli.adapters import lora  # noqa: F401
