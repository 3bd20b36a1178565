"""Where each module's delta comes from, for the commands that rework adapters (resize, combine): LoRA factors
(scale * B @ A, in PEFT's orientation) or, for LoHa/LoKr, a delta formed as the merge forms it."""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.adapters.base import Adapter, TensorEdit
from lora_cli.errors import UnsupportedAdapterError


@dataclass(frozen=True)
class ModuleDelta:
    """Where a module's delta comes from: LoRA factors (scale * B @ A, in PEFT's orientation) or a formed delta."""

    module: str
    layout: str  # "linear", "embedding", "conv" or "formed"
    factors: tuple[str, str, float, int] | None = None  # (a_key, b_key, scale, rank)
    edit: TensorEdit | None = None
    shape: tuple[int, int] | None = None


def module_deltas(adapter: Adapter, edits: list[TensorEdit]) -> tuple[list[ModuleDelta], list[tuple[str, str, float]]]:
    """Every module's delta source and the LoRA biases (module, key, scale). Until each edit describes its own
    form (issue 12), this is the one place that knows the edit classes."""
    sources: list[ModuleDelta] = []
    biases: list[tuple[str, str, float]] = []
    for edit in edits:
        module = edit.target.rsplit(".", 1)[0]
        if edit.kind == "dora":
            raise UnsupportedAdapterError(
                "is a DoRA adapter: its magnitude vector rescales W + delta, so it has no delta to resize or combine",
                path=adapter.directory,
                fix="merge it (loractl merge) and extract a LoRA from the merged model with loractl extract",
            )
        if edit.kind == "lora":
            f = edit.factors  # type: ignore[attr-defined]
            sources.append(ModuleDelta(module, f.layout, (f.a_key, f.b_key, f.scaling, f.rank)))
        elif edit.kind == "lora_bias" or edit.target.endswith(".bias"):
            biases.append((module, edit.key, edit.scaling))  # type: ignore[attr-defined]
        elif edit.kind in ("loha", "lokr"):
            sources.append(ModuleDelta(module, "formed", edit=edit, shape=_linear_shape(adapter, edit)))
        else:
            raise UnsupportedAdapterError(f"holds a {edit.kind} edit on {edit.target}", path=adapter.directory)
    return sources, biases


def _linear_shape(adapter: Adapter, edit: TensorEdit) -> tuple[int, int]:
    """The (out, in) shape of a linear LoHa/LoKr delta, read from its factor shapes."""
    params: dict[str, str] = edit.params  # type: ignore[attr-defined]
    shape = adapter.weights.shape
    refuse = UnsupportedAdapterError(
        f"{edit.target} is a convolution (CP or 4-D factors): only linear LoHa/LoKr modules are taken",
        path=adapter.directory,
        fix="exclude the module or merge the adapter and use loractl extract",
    )
    if any(name in params for name in ("hada_t1", "hada_t2", "lokr_t2")):
        raise refuse
    if edit.kind == "loha":
        return shape(params["hada_w1_a"])[0], shape(params["hada_w1_b"])[1]

    def side(full: str, a: str, b: str) -> tuple[int, ...]:
        if full in params:
            return shape(params[full])
        return shape(params[a])[0], shape(params[b])[1]

    w1, w2 = side("lokr_w1", "lokr_w1_a", "lokr_w1_b"), side("lokr_w2", "lokr_w2_a", "lokr_w2_b")
    if len(w1) != 2 or len(w2) != 2:
        raise refuse
    return w1[0] * w2[0], w1[1] * w2[1]
