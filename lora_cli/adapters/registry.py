"""Importing this module registers every adapter type loractl merges (one line per type), and names those refused."""

from lora_cli.adapters import (
    adalora,  # noqa: F401
    boft,  # noqa: F401
    c3a,  # noqa: F401
    delora,  # noqa: F401
    fourierft,  # noqa: F401
    hra,  # noqa: F401
    ia3,  # noqa: F401
    ln_tuning,  # noqa: F401
    loha,  # noqa: F401
    lokr,  # noqa: F401
    lora,  # noqa: F401
    miss,  # noqa: F401
    oft,  # noqa: F401
    randlora,  # noqa: F401
    refused,  # noqa: F401
    road,  # noqa: F401
    shira,  # noqa: F401
    vblora,  # noqa: F401
    vera,  # noqa: F401
)
