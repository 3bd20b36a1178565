"""`merge --combine METHOD`: each edited tensor gets the combination of its adapters' deltas, not their sum.

The merge's transform, swapped in for `engine.apply_edits`: every adapter's delta for this tensor (computed
unweighted: the adapters are loaded at weight 1 and the weights handed to `combine_deltas`), combined in fp32 as
mergekit defines the method, added to the base in working precision and rounded once by the engine. Only
additive edits combine: a replacement (modules_to_save, trainable tokens) or a transform (DoRA, OFT...) has no
delta to elect signs on, and is refused with its name.
"""

from __future__ import annotations

import torch

from lora_cli.adapters.base import Adapter, EditContext, Workspace
from lora_cli.combine import CombineOptions, combine_deltas
from lora_cli.engine import Transform
from lora_cli.errors import UnsupportedAdapterError
from lora_cli.plan import PlannedTensor, working_dtype


def combine_transform(adapters: list[Adapter], weights: list[float], options: CombineOptions) -> Transform:
    """The engine transform for `options` over `adapters` (loaded at weight 1) with the user's `weights`."""
    positions = {id(adapter): index for index, adapter in enumerate(adapters)}

    def transform(
        planned: PlannedTensor,
        tensor: torch.Tensor,
        device: torch.device,
        workspace: Workspace,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        work = working_dtype(planned.source)
        shape = tuple(tensor.shape)
        deltas: list[torch.Tensor] = []
        places: list[int] = []
        for edit in planned.edits:
            if not edit.form.is_additive:
                raise UnsupportedAdapterError(
                    f"changes {planned.name} by a {edit.describe()} edit ({edit.form.kind}), not by adding a delta: "
                    f"--combine {options.method} needs deltas",
                    path=edit.adapter.ref,
                    fix="merge it separately, or drop --combine",
                )
            # No workspace: each delta needs its own storage, as all of them are alive at once.
            delta = edit.delta(shape, EditContext(edit.adapter, device, work, None))
            if tuple(delta.shape) != shape:
                raise UnsupportedAdapterError(
                    f"changes the shape of {planned.name}: --combine {options.method} needs same-shape deltas",
                    path=edit.adapter.ref,
                    fix="merge it separately, or drop --combine",
                )
            deltas.append(delta)
            places.append(positions[id(edit.adapter)])
        combined = combine_deltas(
            deltas,
            [weights[p] for p in places],
            options,
            tensor=planned.name,
            positions=places,
            all_weights=weights,
        )
        return tensor.to(device=device, dtype=work) + combined  # never in place: `tensor` is the reader's buffer

    return transform
