"""The `loractl` command line: thin Typer commands over the library."""
