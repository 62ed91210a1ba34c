"""``POST /inspect``: a look inside the model at one prompt, the playground's inside view, computed by
the functions ``gpt2 inspect`` prints (``gpt2.interpretability.analysis`` and ``.sae``): the logit
lens (each layer's likeliest next token and its probability at every position), one layer's
attention patterns, and, with an SAE (``gpt2 serve --sae DIR``), each token's most active features.

The hook points read the network's own float layers. The engine's model is built for inference, and
on the CPU its layers hold the weights in other layouts (oneDNN's blocked one, which the hand kernels
read): the first inspection builds a plain model from the engine's weights (``plain_model``), sharing
those its layers hold as they are (every one on a GPU, the fp32 ones on an Intel CPU) and copying the
others back to the plain layout (on other CPUs, the model's size again), and keeps it for the next
ones. A quantised model (int8, int4) holds no float weights: each inspection is a 501 naming why, and
the playground shows its inside view disabled.

Inspections never go through the engine's batches: each runs in a worker thread, one at a time (the
others wait on the event loop, holding no thread), on a prompt of at most ``MAX_TOKENS`` tokens (or
the server's prompt limit), which bounds the CPU time and memory it takes from the sequences being
generated beside it: three hooked forward passes, and the logit lens's (layers + 1) x tokens x vocab
log-probabilities.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from gpt2.api import GPT2
from gpt2.serving.errors import APIError
from gpt2.serving.protocol import InspectRequest
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from gpt2.interpretability.sae import SAE
    from gpt2.serving.service import Service

MAX_TOKENS = 128  # the longest prompt inspected (the logit lens holds (layers + 1) x tokens x vocab floats)


class Inspector:
    """Answers /inspect for ``service``'s model (``inspect``, in a worker thread, under ``lock``), with
    ``sae``'s features where one is given (checked against the model: one line if it does not fit)."""

    def __init__(self, service: Service, sae: SAE | None = None) -> None:
        self.service, self.sae = service, sae
        self.model, self.tokenizer = service.engine.model, service.tokenizer
        self.max_tokens = min(MAX_TOKENS, service.max_prompt)
        self.unavailable = _quantised(self.model)  # why this model cannot be inspected, or None
        self.lock = asyncio.Lock()  # one inspection at a time
        self._plain: GPT2 | None = None
        if sae is not None:
            from gpt2.interpretability.sae import check_sae

            if self.unavailable is not None:
                raise UserError(f"--sae reads the model's activations, and {self.unavailable}")
            check_sae(self.model, sae)

    def page_config(self) -> str:
        """What the playground needs to know, as JSON safe inside its <script> element."""
        config = self.model.config
        settings = {"available": self.unavailable is None, "why": self.unavailable,
                    "layers": config.n_layer, "heads": config.n_head, "max_tokens": self.max_tokens,
                    "sae": None if self.sae is None else self.sae.hook_name}
        return json.dumps(settings).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

    def inspect(self, body: InspectRequest) -> dict[str, Any]:
        """The inspection ``body`` asks for: its prompt's tokens, the logit lens, the attention patterns
        of its layer (its head, or all), the SAE's top features per token (None without an SAE)."""
        from gpt2.interpretability.analysis import attention_patterns, check_head, check_layer, logit_lens

        self.service.check_model(body)
        if self.unavailable is not None:
            raise APIError(501, f"/inspect is not available on this server: {self.unavailable}",
                           type="server_error", code="inspection_unavailable")
        layer = _checked(check_layer, self.model, body.layer, "layer")
        heads = (list(range(self.model.config.n_head)) if body.head is None
                 else [_checked(check_head, self.model, body.head, "head")])
        ids = self.encoded(body.prompt)
        model = self.plain()
        idx = torch.tensor(ids, device=model.device)
        lens = logit_lens(model, idx)  # (n_layer + 1, T, vocab) log-probabilities
        top = lens.argmax(-1)
        probs = lens.gather(-1, top[..., None])[..., 0].exp()
        patterns = attention_patterns(model, idx, layer)[heads]
        last = model.config.n_layer - 1
        rows = [*(f"blocks.{i}.hook_resid_pre" for i in range(last + 1)), f"blocks.{last}.hook_resid_post"]
        return {
            "object": "inspection", "model": self.service.model_name,
            "tokens": ids, "token_strs": [self.text(t) for t in ids],
            "logit_lens": {"rows": rows, "tokens": top.tolist(),
                           "token_strs": [[self.text(t) for t in row] for row in top.tolist()],
                           "probs": probs.tolist()},
            "attention": {"layer": layer, "heads": heads, "patterns": patterns.tolist()},
            "sae": None if self.sae is None else self.features(model, idx, body.top_features),
        }

    def features(self, model: GPT2, idx: torch.Tensor, k: int) -> dict[str, Any]:
        """The SAE's ``k`` most active features (above zero) at each position of ``idx``."""
        from gpt2.interpretability.sae import top_features

        sae = self.sae
        rows = top_features(model, sae, idx, k)
        return {"hook_name": sae.hook_name, "d_sae": sae.d_sae,
                "features": [[{"id": i, "activation": a} for i, a in row.features] for row in rows]}

    def encoded(self, prompt: str) -> list[int]:
        """The prompt's ids (as /v1/completions encodes it), once known to be 1 to ``max_tokens``."""
        from gpt2.generation.sampling import encode_prompt

        limit = self.max_tokens
        if not prompt:
            raise APIError(400, "prompt: the prompt is empty; give at least one token to look inside",
                           param="prompt", code="invalid_value")
        if len(prompt) > limit * self.service.longest_token:  # too long, whatever its tokens
            raise _too_long(f"{len(prompt)} characters long", limit)
        ids = encode_prompt(self.tokenizer, prompt)
        if len(ids) > limit:
            raise _too_long(f"{len(ids)} tokens long", limit)
        return ids

    def plain(self) -> GPT2:
        """The model as plain float layers (built at the first inspection, then kept); a 501 where it
        cannot be."""
        if self._plain is None:
            try:
                self._plain = plain_model(self.model, self.tokenizer)
            except UserError as e:
                self.unavailable = str(e)
                raise APIError(501, f"/inspect is not available on this server: {e}", type="server_error",
                               code="inspection_unavailable") from None
        return self._plain

    def text(self, token: int) -> str:
        """A token's text (U+FFFD for the bytes of a cut character; ids past the tokenizer's: <id>)."""
        return self.tokenizer.decode([token]) if 0 <= token < self.tokenizer.n_vocab else f"<{token}>"


def plain_model(model: GPT2, tokenizer: Any) -> GPT2:
    """``model`` as the network's own float layers, which the hook points read: ``model`` itself where
    its layers are those, else a ``GPT2`` made from its state dict, in which a layer built for inference
    holds its plain weight (the same tensor where it keeps one, a copy where it reordered it); tied as
    GPT-2 is. One line for a model whose weights are not all there as floats (quantised ones)."""
    from gpt2.interpretability.hooks import check_plain_layers

    try:
        check_plain_layers(model, "inspect")
        return model
    except UserError:
        pass
    with torch.device("meta"):
        plain = GPT2(model.config, tokenizer=tokenizer)
    state = model.state_dict()
    expected = {name: tensor.shape for name, tensor in plain.state_dict().items()}
    if {name: tensor.shape for name, tensor in state.items()} != expected \
            or not all(tensor.is_floating_point() for tensor in state.values()):
        raise UserError("the model's layers do not hold its weights as floats (it is quantised), so it has "
                        "no activations of the network's own weights; serve it at fp32 or bf16")
    plain.load_state_dict(state, assign=True)
    plain.lm_head.weight = plain.transformer.wte.weight  # tied (assign=True set each its own tensor)
    return plain.eval()


def _quantised(model: GPT2) -> str | None:
    """Why ``model`` has no activations to inspect (its layers are quantised), or None."""
    from gpt2.inference.quantization import Int4Linear, Int8Linear

    for module in model.modules():
        for kind, name in ((Int8Linear, "int8"), (Int4Linear, "int4")):
            if isinstance(module, kind):
                return (f"the model is quantised to {name}, whose layers hold no float weights and so give "
                        "no activations of the network's own; serve it at fp32 or bf16 to inspect it")
    return None


def _too_long(length: str, limit: int) -> APIError:
    return APIError(400, f"the prompt is {length}, over this server's limit of {limit} tokens for /inspect; "
                    "shorten it", param="prompt", code="context_length_exceeded")


def _checked(check: Callable[[GPT2, int], int], model: GPT2, value: int, param: str) -> int:
    """``check(model, value)``, its one line a 400 naming ``param``."""
    try:
        return check(model, value)
    except UserError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None
