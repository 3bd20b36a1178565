"""Every adapter type loractl merges, keyed by `peft_type`, and the lookup the loaders and the plan use.

A plain module that imports the types (as mergekit's `merge_methods/registry.py` does): `base.py` knows nothing of
it, so there is no import circle. Adding a type is one module and one line here.
"""

from __future__ import annotations

from lora_cli.adapters.adalora import Adalora
from lora_cli.adapters.adamss import Adamss
from lora_cli.adapters.base import Adapter, AdapterKind
from lora_cli.adapters.beft import Beft
from lora_cli.adapters.boft import Boft
from lora_cli.adapters.c3a import C3a
from lora_cli.adapters.deft import Deft
from lora_cli.adapters.delora import Delora
from lora_cli.adapters.fourierft import Fourierft
from lora_cli.adapters.frod import Frod
from lora_cli.adapters.glora import Glora
from lora_cli.adapters.gralora import Gralora
from lora_cli.adapters.hira import Hira
from lora_cli.adapters.hra import Hra
from lora_cli.adapters.ia3 import Ia3
from lora_cli.adapters.ln_tuning import LnTuning
from lora_cli.adapters.loha import Loha
from lora_cli.adapters.lokr import Lokr
from lora_cli.adapters.lora import Lora
from lora_cli.adapters.miss import Miss
from lora_cli.adapters.oft import Oft
from lora_cli.adapters.osf import Osf
from lora_cli.adapters.peanut import Peanut
from lora_cli.adapters.psoft import Psoft
from lora_cli.adapters.randlora import Randlora
from lora_cli.adapters.refused import REFUSED
from lora_cli.adapters.road import Road
from lora_cli.adapters.shira import Shira
from lora_cli.adapters.supertuning import Supertuning
from lora_cli.adapters.tinylora import Tinylora
from lora_cli.adapters.trainable_tokens import TrainableTokens
from lora_cli.adapters.unilora import Unilora
from lora_cli.adapters.vblora import Vblora
from lora_cli.adapters.vera import Pvera, Vera
from lora_cli.adapters.waveft import Waveft
from lora_cli.errors import UnsupportedAdapterError

KINDS: tuple[type[AdapterKind], ...] = (
    Lora,
    Adalora,
    Loha,
    Lokr,
    Ia3,
    Oft,
    Boft,
    Hra,
    Road,
    Miss,
    Vera,
    Pvera,
    Randlora,
    Vblora,
    Fourierft,
    C3a,
    Delora,
    Shira,
    LnTuning,
    Beft,
    Deft,
    Gralora,
    Hira,
    Osf,
    Peanut,
    Psoft,
    Supertuning,
    Tinylora,
    TrainableTokens,
    Unilora,
    Glora,
    Waveft,
    Frod,
    Adamss,
)
REGISTRY: dict[str, AdapterKind] = {kind.peft_type: kind() for kind in KINDS}


def kind_for(adapter: Adapter) -> AdapterKind:
    """The type that merges `adapter`; types loractl does not merge are refused with the reason."""
    peft_type = adapter.peft_type
    if peft_type in REGISTRY:
        return REGISTRY[peft_type]
    reason = REFUSED.get(peft_type, "loractl does not merge this adapter type")
    raise UnsupportedAdapterError(
        f"adapter type {peft_type or '(none)'} is not supported: {reason}",
        path=adapter.config_path,
        fix="see README for the supported types",
    )
