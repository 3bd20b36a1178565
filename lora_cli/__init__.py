"""loractl: merge, unmerge, diff and inspect PEFT adapters by streaming safetensors checkpoints."""

import os

# torch's OpenMP workers spin while they wait for work; beside the merge's reader and writer threads they take
# the cores those need (a 1.1B merge on 2 cores: 21 s spinning, 9 s passive). Read when torch loads, so set here,
# where the library (and the CLI) is imported before torch; a caller's own setting is kept.
OMP_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ  # the PEFT reference run drops it again
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The CLI's first act, before torch is imported: a cold base checkpoint starts streaming into the page cache.
from lora_cli import early_reads  # noqa: E402  (after the environment is set; imports nothing heavy)

early_reads.start()

__version__ = "0.1.0"
