"""Tied input embeddings and output heads: which tensors are tied, when a merge unties them, what the config says.

Many language models store one matrix for the input embedding and the output head (`tie_word_embeddings`). An
adapter may change the two differently; the merged model must then hold both (untied), and an unmerge that makes
them agree again may tie them back. Every rule about ties lives here: `plan.build_plan` asks `attach_heads` where a
tied head's edits go (its own tensor, or the shared one, by the tie policy), the engine asks `config_value` what
to write, `checkpoint_files.update_config` writes it with `set_tied`, and `unmerge` finds its pair with `pair_of`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from lora_cli.adapters.common import FullTensorEdit, TokenRowsEdit

if TYPE_CHECKING:
    from lora_cli.adapters.base import TensorEdit
    from lora_cli.io.checkpoint import CheckpointIndex
    from lora_cli.io.safetensors_file import TensorInfo
    from lora_cli.plan import MergePlan

# Names of input embeddings that an output head may be tied to, across common architectures.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "shared.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
KEY = "tie_word_embeddings"

# "untie": a tied head the adapters change gets its own tensor (a merge from a tied base).
# "keep": the head's edits go onto the one shared tensor (an unmerge of a checkpoint PEFT merged while tied, where
# that tensor carries every delta).
TiePolicy = Literal["untie", "keep"]


def is_tied(config: dict | None) -> bool:
    """Whether the config ties head and embedding (transformers' default is true; a VLM says so in text_config)."""
    if not config:
        return False
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get(KEY, text.get(KEY, True)))


def set_tied(config: dict, tie: bool) -> None:
    """Write the tie state into a config, where `is_tied` reads it."""
    config[KEY] = tie
    text = config.get("text_config")
    if isinstance(text, dict) and KEY in text:
        text[KEY] = tie


def is_embedding(name: str) -> bool:
    return name.endswith(EMBEDDING_SUFFIXES)


def is_head(name: str) -> bool:
    return name.endswith(HEAD_NAMES)


def embedding_of(names: list[str] | set[str] | dict[str, object]) -> str | None:
    """The input embedding among `names`, the tensor a tied head shares."""
    return next((n for n in names if is_embedding(n)), None)


def config_value(plan: MergePlan) -> bool | None:
    """What the written config's tie_word_embeddings becomes: false when heads were untied, true when re-tied."""
    return False if plan.untied else True if plan.retied else None


def pair_of(name: str, index: CheckpointIndex, found: str | None) -> TensorInfo | None:
    """The tensor of `index` that `name` corresponds to (`found`, resolved by name); a head absent from a tied
    checkpoint is its embedding."""
    if found is not None:
        return index.tensors[found]
    if is_head(name) and is_tied(index.config()):
        embedding = embedding_of(index.tensors)
        return index.tensors[embedding] if embedding else None
    return None


def ties_along(edit: TensorEdit) -> bool:
    """Edits PEFT applies to a tied embedding and head alike: token rows, and the base copy of a resized vocab."""
    return isinstance(edit, TokenRowsEdit) or (isinstance(edit, FullTensorEdit) and edit.origin == "base_layer")


def attach_heads(
    plan: MergePlan,
    by_target: dict[str, list[TensorEdit]],
    names: set[str],
    config: dict | None,
    missing: list[str],
    policy: TiePolicy,
) -> dict[str, TensorInfo]:
    """Place the edits of a head the base ties to its embedding; returns the heads that get a tensor of their own.

    "untie": the head gets its own tensor when the adapters change the head or the embedding differently. The
    unmerged model computes logits with the head's own weight (plus the head's LoRA, if any) and looks up inputs
    with the embedding's; merging into the one shared tensor, as PEFT does, would change both. So the head is
    written from the embedding's base with only the edits the two share, and the config is untied.
    "keep": the head's own edits run on the shared tensor after the embedding's, and the tie stays.
    """
    if not is_tied(config):
        return {}
    embedding = embedding_of(names)
    heads = [t for t in by_target if t not in names]
    if embedding is None:
        missing.extend(heads)
        return {}
    if policy == "keep":
        chain = by_target.setdefault(embedding, [])
        for head in heads:
            chain.extend(e for e in by_target.pop(head) if e not in chain)
        return {}
    embedding_own = [e for e in by_target.get(embedding, []) if not ties_along(e)]
    if not heads and embedding_own and not any(h in names for h in HEAD_NAMES):
        heads = [HEAD_NAMES[0]]
    extra: dict[str, TensorInfo] = {}
    for head in heads:
        shared = [e for e in by_target.get(embedding, []) if ties_along(e)]
        by_target[head] = shared + by_target.get(head, [])
        extra[head] = plan.base.tensors[embedding]
        plan.untied.append(head)
    if heads:
        plan.warnings.append(
            f"the adapter changes {embedding} or {', '.join(heads)}, which the base ties together: both are written "
            f"and {KEY} is set to false, so the merged model computes what the adapter did"
        )
    return extra
