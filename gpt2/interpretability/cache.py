"""The activations of one run by hook-point name (``ActivationCache``), and TransformerLens's shorthand
for those names (``act_name``: ``("resid_pre", 3)`` for ``blocks.3.hook_resid_pre``)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

from torch import Tensor

# TransformerLens's shorthand (``transformer_lens.utils.get_act_name``): other words for a point, the
# points that live in a block's attention or MLP, and short words for the part of a block.
_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
            "mlp_pre": "pre", "mlp_post": "post"}
_IN_ATTENTION = {"q", "k", "v", "z", "result", "pattern", "attn_scores"}
_IN_MLP = {"pre", "post"}
_PARTS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


def act_name(name: str, layer: int | None = None, part: str | None = None) -> str:
    """The full hook-point name that TransformerLens's shorthand stands for: ``act_name("resid_pre", 3)``
    is ``blocks.3.hook_resid_pre``, ``act_name("pattern", 0)`` ``blocks.0.attn.hook_pattern``,
    ``act_name("scale", 2, "ln1")`` ``blocks.2.ln1.hook_scale``, ``act_name("normalized")``
    ``ln_final.hook_normalized``, ``act_name("k6")`` ``blocks.6.attn.hook_k``; a full name is itself."""
    if ("." in name or name.startswith("hook_")) and layer is None and part is None:
        return name
    packed = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)  # "k6", "scale4ln1"
    if packed is not None:
        name, layer, part = packed.group(1), int(packed.group(2)), packed.group(3)
    name = _ALIASES.get(name, name)
    if name in _IN_ATTENTION:
        part = "attn"
    elif name in _IN_MLP:
        part = "mlp"
    else:
        part = _PARTS.get(part, part) if part is not None else None
    full = (f"blocks.{layer}." if layer is not None else "") + (f"{part}." if part else "") + f"hook_{name}"
    return f"ln_final.{full}" if name in ("scale", "normalized") and layer is None else full


class ActivationCache(Mapping[str, Tensor]):
    """The activations of one run (``GPT2.run_with_cache``): hook-point name -> tensor in
    TransformerLens's shape for that name, in the order the forward pass reaches them, detached from
    the graph.

    As TransformerLens's ``ActivationCache``, it is also indexed by shorthand (``act_name``):
    ``cache["resid_pre", 0]``, ``cache["pattern", -1]`` (a negative layer counts from the last),
    ``cache["scale", 2, "ln1"]``, ``cache["normalized"]`` (the final LayerNorm's), ``cache["q5"]``.
    """

    def __init__(self, activations: dict[str, Tensor], n_layer: int) -> None:
        self._activations = activations
        self.n_layer = n_layer

    def __getitem__(self, key: str | tuple) -> Tensor:
        if isinstance(key, str) and key in self._activations:
            return self._activations[key]
        if isinstance(key, tuple):
            name, layer, *part = key
            if layer is not None and layer < 0:
                layer += self.n_layer
            return self._activations[act_name(name, layer, *part)]
        return self._activations[act_name(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._activations)

    def __len__(self) -> int:
        return len(self._activations)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(self._activations)})"
