"""The `loractl` command line: thin Typer commands over the library."""

from lora_cli import early_reads

# The CLI's first act, before any command (and through it torch) is imported: a cold local BASE starts streaming
# into the page cache. Here rather than in the library package, so that importing the library reads nothing.
early_reads.start()
