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
    layout: str  # "linear", "embedding" or "formed"
    factors: tuple[str, str, float, int] | None = None  # (a_key, b_key, scale, rank)
    edit: TensorEdit | None = None
    shape: tuple[int, int] | None = None


def module_deltas(adapter: Adapter, edits: list[TensorEdit]) -> tuple[list[ModuleDelta], list[tuple[str, str, float]]]:
    """Every module's delta source, asked of each edit's form, and the 1-D deltas carried by one adapter tensor
    (LoRA's `lora_B.bias`) as (module, key, scale)."""
    sources: list[ModuleDelta] = []
    biases: list[tuple[str, str, float]] = []
    for edit in edits:
        module = edit.target.rsplit(".", 1)[0]
        form = edit.form
        if not form.is_additive:
            raise UnsupportedAdapterError(
                f"changes {edit.target} by a {edit.describe()} edit ({form.kind}), not by adding a delta, so there "
                "is no delta to resize or combine",
                path=adapter.directory,
                fix="merge it (loractl merge) and extract a LoRA from the merged model with loractl extract",
            )
        low = form.low_rank
        if low is not None:
            # PEFT's orientation is B @ A whatever the layer stores (the form's `transposed` says how it lands).
            layout = "embedding" if "lora_embedding_A" in low.a_key else "linear"
            sources.append(ModuleDelta(module, layout, (low.a_key, low.b_key, float(low.scale), low.rank)))
        elif edit.target.endswith(".bias") and len(edit.adapter_keys()) == 1:
            biases.append((module, edit.adapter_keys()[0], float(form.scale if form.scale is not None else 1.0)))
        elif form.shape is not None and len(form.shape) != 2:
            raise UnsupportedAdapterError(
                f"{edit.target} is a convolution: only linear and embedding modules are taken",
                path=adapter.directory,
                fix="merge the adapter and use loractl extract",
            )
        else:
            shape = form.shape or _linear_shape(adapter, edit)
            sources.append(ModuleDelta(module, "formed", edit=edit, shape=(int(shape[0]), int(shape[1]))))
    return sources, biases


def _linear_shape(adapter: Adapter, edit: TensorEdit) -> tuple[int, int]:
    """The (out, in) shape of a linear LoHa/LoKr delta, read from its factor shapes (their form gives only the
    element count: the same factors fit a linear layer or a flattened convolution)."""
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
