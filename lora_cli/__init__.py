"""loractl: merge, unmerge, diff and inspect PEFT adapters by streaming safetensors checkpoints."""

__version__ = "0.1.0"
