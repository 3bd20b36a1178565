"""The `loractl` command line: thin Typer commands over the library."""

import os

# torch's OpenMP workers spin while they wait for work; beside the merge's reader and writer threads they take
# the cores those need (a 1.1B merge on 2 cores: 21 s spinning, 9 s passive). Read when torch loads, so set here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
