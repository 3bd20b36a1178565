"""PEFT adapter types loractl refuses by name, with the reason `merge` gives (README lists them too)."""

_PROMPT = "it learns virtual tokens or key/value prefixes fed to the model at run time; there is no weight to merge"
_ROUTED = "it mixes adapters per input at run time; PEFT has no static merge for it either"

REFUSED: dict[str, str] = {
    "PROMPT_TUNING": _PROMPT,
    "MULTITASK_PROMPT_TUNING": _PROMPT,
    "P_TUNING": _PROMPT,
    "PREFIX_TUNING": _PROMPT,
    "ADAPTION_PROMPT": _PROMPT,
    "CPT": _PROMPT,
    "CARTRIDGE": _PROMPT,
    "POLY": _ROUTED,
    "XLORA": _ROUTED,
    "LILY": "PEFT cannot merge it either (its merge raises NotImplementedError)",
    "SHADOW": "PEFT cannot merge it either: its adaptation depends on the input",
}
