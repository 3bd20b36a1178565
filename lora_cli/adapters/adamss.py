"""AdaMSS as PEFT defines it (`peft/tuners/adamss/layer.py`): the weight's output rows are clustered into subspaces,
and each subspace i gets a small update B_i @ A_i @ newB, scattered back onto its rows.

newB and the factors are saved; which rows form each subspace is not: PEFT recomputes it when loading from the base
weight (`adamss/utils.py`): a rank-r `torch.svd_lowrank` of W in fp32 under a forked RNG seeded with `random_seed`,
then scikit-learn's KMeans (init="random", n_init=1, max_iter=10, random_state=123456789) over the left singular
vectors' rows. loractl replays both (scikit-learn is the optional extra `loractl[adamss]`) and checks the clusters'
sizes against the saved B_i. delta[rows_i] = B_i @ A_i @ newB in fp32, rounded to the base dtype before it is added.
On a layer with a bias PEFT clusters [W | b] and updates the bias too: that reads two tensors at once, which
loractl refuses by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_cli.adapters.base import Adapter, AdapterKind, AdapterModule, EditContext, Shape, TensorEdit
from lora_cli.adapters.from_base import FromBaseEdit
from lora_cli.adapters.params import config_number, missing_params
from lora_cli.errors import AdapterMismatchError, InputError, UnsupportedAdapterError


def kmeans_labels(rows: torch.Tensor, clusters: int) -> torch.Tensor:
    """PEFT's `clustering_Z`."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise InputError(
            "AdaMSS adapters need scikit-learn: PEFT picks each layer's subspaces with its KMeans when loading",
            fix='pip install "loractl[adamss]"',
        ) from None
    kmeans = KMeans(n_clusters=clusters, init="random", n_init=1, max_iter=10, random_state=123456789)
    return torch.from_numpy(kmeans.fit_predict(rows.detach().cpu().numpy().astype("float32"))).long()


class AdamssEdit(FromBaseEdit):
    kind = "adamss"
    rounds_change = True

    def __init__(self, adapter: Adapter, target: str, a_keys: list[str], b_keys: list[str], new_b: str) -> None:
        self.a_keys, self.b_keys, self.new_b = a_keys, b_keys, new_b
        self.rank = adapter.weights.shape(new_b)[0]
        self.seed = int(config_number(adapter, "random_seed", 0))
        super().__init__(adapter, target, [*a_keys, *b_keys, new_b], f"{len(a_keys)} subspaces r={self.rank}")

    def check(self, shape: Shape) -> str | None:
        new_b = self.adapter.weights.shape(self.new_b)
        rows = sum(self.adapter.weights.shape(key)[0] for key in self.b_keys)
        if len(shape) != 2 or new_b[1] != shape[1] or rows > shape[0]:
            return f"{self.target}: AdaMSS newB {new_b}, {rows} rows vs base {tuple(shape)}"
        return None

    def _rows(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """Each subspace's rows, as PEFT's `slice_pca`, `clustering_Z` and `seg_locations` find them."""
        w = weight.to(torch.float32)
        rank = min(self.rank, *w.shape)
        fork = {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(self.seed)
            u, _, _ = torch.svd_lowrank(w, q=rank, niter=2, M=None)
        labels = kmeans_labels(u[:, :rank], min(len(self.a_keys), w.shape[0]))
        return [torch.where(labels == i)[0] for i in range(int(labels.max()) + 1)]

    def change(self, weight: torch.Tensor, ctx: EditContext) -> torch.Tensor:
        rows = self._rows(weight)
        sizes = [self.adapter.weights.shape(key)[0] for key in self.b_keys]
        if [len(r) for r in rows] != sizes:
            raise AdapterMismatchError(
                f"{self.target}: AdaMSS subspaces of {[len(r) for r in rows]} rows recomputed from the base, the "
                f"adapter's have {sizes}",
                path=self.adapter.weights.path,
                fix="pass the base it was trained on (a different scikit-learn may cluster differently)",
            )
        new_b = ctx.load(self.new_b)
        chunks = [ctx.load(b) @ ctx.load(a) @ new_b for a, b in zip(self.a_keys, self.b_keys, strict=True)]
        delta = torch.zeros(weight.shape[0], new_b.shape[1], device=weight.device, dtype=torch.float32)
        delta[torch.cat(rows).to(weight.device)] = torch.cat(chunks)
        return delta


class Adamss(AdapterKind):
    peft_type = "ADAMSS"
    param_roots = frozenset({"adamss_A", "adamss_B", "adamss_newB"})

    def module_edits(
        self, adapter: Adapter, module: AdapterModule, base_shape: Callable[[str], Shape | None]
    ) -> list[TensorEdit]:
        count = sum(1 for name in module.params if name.startswith("adamss_A."))
        a_keys = [module.params.get(f"adamss_A.{i}") for i in range(count)]
        b_keys = [module.params.get(f"adamss_B.{i}") for i in range(count)]
        if not count or None in a_keys or None in b_keys or not module.has("adamss_newB"):
            raise missing_params(adapter, module.path, list(module.params), "adamss_A.i, adamss_B.i and adamss_newB")
        if base_shape(f"{module.path}.bias") is not None:
            raise UnsupportedAdapterError(
                f"{module.path} has a bias: PEFT's AdaMSS clusters [W | b] and updates both, which reads two tensors "
                "at once; loractl merges one tensor at a time",
                path=adapter.weights.path,
                fix="merge this adapter with PEFT's merge_and_unload",
            )
        return [AdamssEdit(adapter, f"{module.path}.weight", a_keys, b_keys, module.params["adamss_newB"])]
