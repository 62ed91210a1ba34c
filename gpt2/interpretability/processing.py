"""TransformerLens's processed weights of a GPT-2 network (``processed``), as its ``from_pretrained``
gives them: the same function, in weights that read more simply.

- ``fold_ln``: each LayerNorm's weight and bias move into the layer that reads its output (the
  attention's query, key and value projection, the MLP's first layer, the unembedding), whose reading
  weights are then centred over the residual stream (LayerNorm's output has mean 0, so that changes
  nothing); the LayerNorms keep only centring and scaling (weight 1, bias 0).
- ``center_writing_weights``: the weights and biases that write into the residual stream (the
  embeddings, the attention's and MLP's output layers) have mean 0 over it, which the LayerNorms that
  read the stream subtract anyway.
- ``center_unembed``: the unembedding has mean 0 over the vocabulary, which moves each position's logits
  by a constant (softmax is unchanged).
- ``fold_value_biases``: the value biases move into the attention's output bias (a pattern's rows sum
  to 1, so a head's value bias always adds the same vector).

Folding and centring the unembedding unties it from the token embedding and gives it a bias, so the
processed model is one for reading: its logits, activations and generations are the network's (up to a
constant per position), and it is not saved or trained.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn

from gpt2.interpretability.hooks import check_plain_layers
from gpt2.model import Transformer

M = TypeVar("M", bound=Transformer)


def processed(model: M, empty: M, *, fold_ln: bool = True, center_writing_weights: bool = True,
              center_unembed: bool = True, fold_value_biases: bool = True) -> M:
    """``empty`` (a model of ``model``'s config built on the meta device) holding ``model``'s weights
    processed as TransformerLens's flags of the same names say (its ``from_pretrained`` defaults), in
    ``model``'s dtype and on its device; ``model`` itself is left as it is."""
    check_plain_layers(model, "processed")
    state = processed_weights(model, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                              center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    config = model.config
    empty.set_submodule("lm_head", nn.Linear(config.n_embd, config.vocab_size, device="meta"))
    dtype, device = model.dtype, model.device
    empty.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return empty.train(model.training)


def processed_weights(model: Transformer, *, fold_ln: bool, center_writing_weights: bool,
                      center_unembed: bool, fold_value_biases: bool) -> dict[str, Tensor]:
    """``model``'s state dict processed (in float32), with the unembedding's own weight and bias
    (``lm_head.weight``, ``lm_head.bias``), in TransformerLens's order of the steps."""
    with torch.no_grad():
        state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        state.setdefault("lm_head.bias", state["lm_head.weight"].new_zeros(model.config.vocab_size))
        blocks = [f"transformer.h.{i}." for i in range(model.config.n_layer)]
        if fold_ln:
            for block in blocks:
                _fold_layer_norm(state, block + "ln_1", block + "attn.c_attn")
                _fold_layer_norm(state, block + "ln_2", block + "mlp.c_fc")
            _fold_layer_norm(state, "transformer.ln_f", "lm_head")
        if center_writing_weights:
            for name in ("transformer.wte.weight", "transformer.wpe.weight"):
                state[name] -= state[name].mean(-1, keepdim=True)
            for layer in (block + part for block in blocks for part in ("attn.c_proj", "mlp.c_proj")):
                state[layer + ".weight"] -= state[layer + ".weight"].mean(0, keepdim=True)
                state[layer + ".bias"] -= state[layer + ".bias"].mean()
        if center_unembed:
            state["lm_head.weight"] -= state["lm_head.weight"].mean(0, keepdim=True)
            state["lm_head.bias"] -= state["lm_head.bias"].mean()
        if fold_value_biases:
            for block in blocks:
                _fold_value_bias(state, block, model.config.n_embd, center_writing_weights)
    return state


def _fold_layer_norm(state: dict[str, Tensor], ln: str, reader: str) -> None:
    """LayerNorm ``ln``'s weight and bias into linear layer ``reader`` (weight (out, in)), whose
    reading weights are then centred over the input; ``ln`` becomes weight 1, bias 0."""
    weight, bias = state[ln + ".weight"], state[ln + ".bias"]
    w = state[reader + ".weight"]
    state[reader + ".bias"] = state[reader + ".bias"] + w @ bias
    w = w * weight
    state[reader + ".weight"] = w - w.mean(1, keepdim=True)
    state[ln + ".weight"], state[ln + ".bias"] = torch.ones_like(weight), torch.zeros_like(bias)


def _fold_value_bias(state: dict[str, Tensor], block: str, n_embd: int, centred: bool) -> None:
    """Block ``block``'s value bias into its attention's output bias (``centred``: kept of mean 0)."""
    qkv_bias = state[block + "attn.c_attn.bias"]
    out = block + "attn.c_proj."
    state[out + "bias"] = state[out + "bias"] + state[out + "weight"] @ qkv_bias[2 * n_embd :]
    if centred:
        state[out + "bias"] -= state[out + "bias"].mean()
    qkv_bias[2 * n_embd :] = 0
