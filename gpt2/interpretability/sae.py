"""Sparse autoencoders (SAEs) in SAELens's format, on our hook points.

An SAE directory as SAELens writes it (``SAE.save_model``, and its published SAEs): ``cfg.json``
(``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``,
``reshape_activations``, the hook's name under ``metadata.hook_name``, or at the top level as
``hook_name`` / ``hook_point`` in configs from before SAELens 6) and ``sae_weights.safetensors``
(``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec``, and per architecture
``threshold``, or ``b_gate``, ``b_mag``, ``r_mag``).

``SAE.encode`` and ``SAE.decode`` compute as SAELens's ``encode`` and ``decode`` for its
architectures ``standard`` (ReLU), ``jumprelu``, ``gated`` and ``topk``, with its activation
normalizations (``none``, ``constant_norm_rescale``, ``layer_norm``, and
``expected_average_only_in`` given its scaling factor) and its flattening of ``hook_z``'s heads. On
a model: ``spliced`` gives forward hooks that put the SAE's reconstruction in the forward pass
(``run_with_hooks``), ``splice_loss`` the loss with it, beside the clean and zero-ablated losses, and
``top_features`` a text's strongest features token by token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from gpt2.config import GPT2Config
from gpt2.interpretability.hooks import Hooks, _unknown, hook_names, run_with_cache, run_with_hooks
from gpt2.model import Transformer
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import check_field, read_json_object

CONFIG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
# The weights of each architecture besides W_enc, W_dec and b_dec, each of d_sae entries.
ARCHITECTURES = {"standard": ("b_enc",), "jumprelu": ("b_enc", "threshold"),
                 "gated": ("b_gate", "b_mag", "r_mag"), "topk": ("b_enc",)}
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
_HEADS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")  # (B, T, head, d_head)


class SAE(nn.Module):
    """A sparse autoencoder loaded from SAELens's files (``SAE.load``): ``encode`` activations at
    ``hook_name`` (..., ``d_in``) into ``d_sae`` feature activations, ``decode`` them back.

    An SAE on ``attn.hook_z`` with ``reshape_activations="hook_z"`` reads all heads at once, as SAELens
    does: ``encode`` takes (..., head, d_head) and flattens it to (..., head * d_head); ``decode``
    gives the flat form (``reconstruct`` gives the activation's own shape)."""

    def __init__(self, config: dict[str, Any], weights: dict[str, Tensor]) -> None:
        super().__init__()
        self.architecture: str = config["architecture"]
        self.d_in: int = config["d_in"]
        self.d_sae: int = config["d_sae"]
        self.hook_name: str | None = config["hook_name"]
        self.apply_b_dec_to_input: bool = config["apply_b_dec_to_input"]
        self.normalize_activations: str = config["normalize_activations"]
        self.reshape_hook_z: bool = config["reshape_activations"] == "hook_z"
        self.k: int | None = config.get("k")
        self.rescale_acts_by_decoder_norm: bool = config.get("rescale_acts_by_decoder_norm", False)
        for name, tensor in weights.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    @classmethod
    def load(cls, directory: str | Path, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", norm_scaling_factor: float | None = None) -> SAE:
        """The SAE saved in ``directory`` (``cfg.json`` + ``sae_weights.safetensors``), in ``dtype``
        (cfg.json's by default) on ``device``. ``norm_scaling_factor``: for an SAE trained with
        ``normalize_activations="expected_average_only_in"``, the factor SAELens folds into its weights
        (``norm_scaling_factor`` in SAELens's ``pretrained_saes.yaml``; 1.0 when already folded)."""
        directory = Path(directory)
        if not (directory / CONFIG).is_file():
            raise UserError(f"{directory} is not an SAE directory in SAELens's format: it has no {CONFIG}"
                            f"{'' if directory.is_dir() else ' (no such directory)'}")
        config = _config(read_json_object(directory / CONFIG), str(directory / CONFIG))
        dtype = dtype or config["dtype"]
        weights = {name: w.to(dtype) for name, w in _weights(directory / WEIGHTS, config).items()}
        if config["normalize_activations"] == "expected_average_only_in":
            _fold_scaling_factor(weights, config, norm_scaling_factor, directory)
        elif norm_scaling_factor is not None:
            raise UserError(f"norm_scaling_factor is for SAEs trained on activations scaled by a constant "
                            f"(expected_average_only_in); the one in {directory} normalizes "
                            f"{config['normalize_activations']!r}")
        return cls(config, weights).to(device)

    def __repr__(self) -> str:
        return (f"SAE({self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, hook_name={self.hook_name!r}"
                f"{f', k={self.k}' if self.k else ''})")

    def encode(self, acts: Tensor) -> Tensor:
        """Feature activations (..., d_sae) of activations (..., d_in) (or, for a ``hook_z`` SAE,
        (..., head, d_head)), as SAELens's ``encode``."""
        x = self._input(acts)
        if self.architecture == "gated":
            active = (x @ self.W_enc + self.b_gate > 0).to(x.dtype)
            return active * F.relu(x @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        hidden = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return F.relu(hidden) * (hidden > self.threshold).to(hidden.dtype)
        if self.architecture == "topk":
            if self.rescale_acts_by_decoder_norm:
                hidden = hidden * self.W_dec.norm(dim=-1)
            values, indices = torch.topk(hidden, k=self.k, dim=-1, sorted=False)
            return torch.zeros_like(hidden).scatter_(-1, indices, values.relu())
        return F.relu(hidden)

    def decode(self, features: Tensor, acts: Tensor | None = None) -> Tensor:
        """The reconstruction (..., d_in) of feature activations (..., d_sae), as SAELens's ``decode``.
        An SAE whose normalization depends on each input (``layer_norm``, ``constant_norm_rescale``)
        needs the activations ``acts`` that were encoded, to undo it."""
        if features.shape[-1] != self.d_sae:
            raise UserError(f"decode takes feature activations of width d_sae={self.d_sae}, got shape "
                            f"{tuple(features.shape)}")
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            features = features * (1 / self.W_dec.norm(dim=-1))
        out = features.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.normalize_activations == "none":
            return out
        if acts is None:
            raise UserError(f"this SAE normalizes each input ({self.normalize_activations}), so decode "
                            "needs the activations that were encoded: decode(features, acts)")
        x = self._flat(acts)
        if self.normalize_activations == "layer_norm":  # SAELens multiplies back by the std without eps
            mu = x.mean(dim=-1, keepdim=True)
            return out * (x - mu).std(dim=-1, keepdim=True) + mu
        return out / ((self.d_in**0.5) / x.norm(dim=-1, keepdim=True))

    def reconstruct(self, acts: Tensor) -> Tensor:
        """``decode(encode(acts))`` in the shape and dtype of ``acts``: what SAELens's forward gives."""
        return self.decode(self.encode(acts), acts).reshape(acts.shape).to(acts.dtype)

    def forward(self, acts: Tensor) -> Tensor:
        return self.reconstruct(acts)

    def _flat(self, acts: Tensor) -> Tensor:
        """``acts`` in the SAE's dtype and device, a ``hook_z`` SAE's heads flattened, checked for width."""
        if not isinstance(acts, Tensor) or not acts.is_floating_point() or acts.ndim == 0:
            raise UserError(f"an SAE encodes float activations (..., {self.d_in}); got "
                            f"{acts.dtype if isinstance(acts, Tensor) else type(acts).__name__}")
        x = acts.to(self.W_enc.device, self.W_enc.dtype)
        if self.reshape_hook_z and x.ndim >= 2 and x.shape[-1] != self.d_in:
            x = x.flatten(-2)
        if x.shape[-1] != self.d_in:
            heads = " (heads flattened, as for hook_z)" if self.reshape_hook_z else ""
            raise UserError(f"activations of shape {tuple(acts.shape)} have width {x.shape[-1]}{heads}, and "
                            f"this SAE reads width d_in={self.d_in} (at {self.hook_name}); is it the SAE "
                            "for this model and hook?")
        return x

    def _input(self, acts: Tensor) -> Tensor:
        """SAELens's ``process_sae_in``: normalized, less ``b_dec`` where it applies it to the input."""
        x = self._flat(acts)
        if self.normalize_activations == "layer_norm":  # centred, over the (unbiased) std + 1e-5
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        elif self.normalize_activations == "constant_norm_rescale":  # to norm sqrt(d_in)
            x = x * ((self.d_in**0.5) / x.norm(dim=-1, keepdim=True))
        return x - self.b_dec * self.apply_b_dec_to_input


# ----------------------------------------------------------------------------------------------------
# The files


def _config(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """cfg.json's fields as ``SAE`` holds them, from SAELens 6's layout or an earlier one (hook name
    and activation function at the top level), checked: one line for anything this cannot run."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    for key, kinds in (("apply_b_dec_to_input", (bool,)), ("rescale_acts_by_decoder_norm", (bool,)),
                       ("hook_name", (str, type(None))), ("hook_point", (str, type(None))),
                       ("architecture", (str,)), ("reshape_activations", (str, type(None)))):
        check_field(raw, key, kinds, where)
    check_field(meta, "hook_name", (str, type(None)), f"{where}: metadata")
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    activation = raw.get("activation_fn") or raw.get("activation_fn_str") or "relu"
    kwargs = raw.get("activation_fn_kwargs") if isinstance(raw.get("activation_fn_kwargs"), dict) else {}
    normalize = raw.get("normalize_activations")  # before SAELens 6, true or false
    config = {"architecture": raw.get("architecture") or ("topk" if activation == "topk" else "standard"),
              "hook_name": hook, "apply_b_dec_to_input": raw.get("apply_b_dec_to_input", True),
              "normalize_activations": normalize if isinstance(normalize, str) else
              "expected_average_only_in" if normalize is True else "none",
              "reshape_activations": raw.get("reshape_activations") or (
                  "hook_z" if hook is not None and hook.endswith("hook_z") else "none"),
              "k": raw.get("k", kwargs.get("k")),
              "rescale_acts_by_decoder_norm": raw.get("rescale_acts_by_decoder_norm", False),
              "hook_head_index": meta.get("hook_head_index", raw.get("hook_head_index",
                                                                     raw.get("hook_point_head_index")))}
    for key in ("d_in", "d_sae"):
        value = raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{where}: {key} must be a positive integer, found {value!r}")
        config[key] = value
    _check_config(config, str(raw.get("dtype", "float32")), activation, where)
    return config


def _check_config(config: dict[str, Any], dtype: str, activation: object, where: str) -> None:
    architecture, normalize, k = config["architecture"], config["normalize_activations"], config["k"]
    if architecture not in ARCHITECTURES:
        raise UserError(f"{where}: SAEs of architecture {architecture!r} are not supported; this reads "
                        f"{', '.join(ARCHITECTURES)}")
    if activation not in ("relu", "topk"):
        raise UserError(f"{where}: the activation function {activation!r} is not supported (relu; topk)")
    if normalize not in NORMALIZATIONS:
        raise UserError(f"{where}: normalize_activations {normalize!r} is not supported (a transform SAELens "
                        f"folds into the weights after training); this reads {', '.join(NORMALIZATIONS)}")
    if config["reshape_activations"] not in ("none", "hook_z"):
        raise UserError(f"{where}: reshape_activations {config['reshape_activations']!r} is not supported "
                        "(none; hook_z)")
    if config["reshape_activations"] == "hook_z" and not str(config["hook_name"]).endswith("_z"):
        raise UserError(f"{where}: reshape_activations is hook_z, and the SAE's hook is "
                        f"{config['hook_name']!r}; SAELens flattens heads only for hook_z")
    if config["hook_head_index"] is not None:
        raise UserError(f"{where}: an SAE of one head (hook_head_index {config['hook_head_index']!r}) is "
                        "not supported")
    if architecture == "topk" and (type(k) is not int or not 0 < k <= config["d_sae"]):
        raise UserError(f"{where}: a topk SAE needs k, an integer from 1 to d_sae={config['d_sae']}, "
                        f"found {k!r}")
    if dtype.removeprefix("torch.") not in DTYPES:
        raise UserError(f"{where}: dtype {dtype!r} is not supported ({', '.join(DTYPES)})")
    config["dtype"] = DTYPES[dtype.removeprefix("torch.")]


def _weights(path: Path, config: dict[str, Any]) -> dict[str, Tensor]:
    """The SAE's tensors from ``path``, each checked for its shape under ``config``."""
    if not path.is_file():
        raise UserError(f"{path.parent} has {CONFIG} but no {WEIGHTS}; copy the SAE's weights beside it")
    try:
        weights = load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({e}); save or download it "
                        "again") from None
    scale = weights.pop("scaling_factor", None)  # SAELens's finetuning scale, saved as ones for a time
    if scale is not None and not torch.equal(scale, torch.ones_like(scale)):
        raise UserError(f"{path}: a finetuning scaling_factor other than ones is not supported")
    d_in, d_sae = config["d_in"], config["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    shapes |= dict.fromkeys(ARCHITECTURES[config["architecture"]], (d_sae,))
    missing, extra = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or extra:
        raise UserError(f"{path}: a {config['architecture']} SAE has the tensors {', '.join(shapes)}; "
                        + "; ".join(f"{word} {', '.join(names)}" for word, names in
                                    (("missing", missing), ("unexpected", extra)) if names))
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            raise UserError(f"{path}: {name} has shape {tuple(weights[name].shape)}, and {CONFIG}'s d_in="
                            f"{d_in}, d_sae={d_sae} make it {shape}; are they the same SAE's files?")
        if not weights[name].is_floating_point():
            raise UserError(f"{path}: {name} holds {weights[name].dtype}, not floats")
    return weights


def _fold_scaling_factor(weights: dict[str, Tensor], config: dict[str, Any], factor: float | None,
                         directory: Path) -> None:
    """SAELens's ``fold_activation_norm_scaling_factor``: the factor that scaled the activations in
    training, moved into the weights, after which the SAE reads the activations as they are."""
    if factor is None:
        raise UserError(f"the SAE in {directory} was trained on activations scaled by a constant "
                        "(normalize_activations=expected_average_only_in); pass norm_scaling_factor= "
                        "(SAELens's pretrained_saes.yaml lists it; 1.0 when it is already folded in)")
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise UserError(f"norm_scaling_factor must be a positive number, got {factor!r}")
    weights["W_enc"] = weights["W_enc"] * factor
    weights["W_dec"] = weights["W_dec"] / factor
    weights["b_dec"] = weights["b_dec"] / factor
    config["normalize_activations"] = "none"


# ----------------------------------------------------------------------------------------------------
# On a model


def check_sae(model: Transformer, sae: SAE) -> str:
    """The hook point ``sae`` reads on ``model``, after checking that the model has it and that its
    activations there have the SAE's width: one line naming the difference if not."""
    name, config = sae.hook_name, model.config
    if not isinstance(name, str):
        raise UserError("this SAE's cfg.json names no hook (metadata.hook_name); set sae.hook_name to the "
                        "hook point it reads")
    layer = re.match(r"blocks\.(\d+)\.", name)
    if layer is not None and int(layer.group(1)) >= config.n_layer:
        raise UserError(f"the SAE reads {name}, in block {layer.group(1)}, and this model has "
                        f"{config.n_layer} blocks (0 to {config.n_layer - 1}); is it the SAE for this model?")
    if name not in hook_names(config.n_layer, result=True):
        raise UserError(_unknown(name, set(hook_names(config.n_layer)), "the SAE's hook_name"))
    width = activation_width(config, name, sae.reshape_hook_z)
    if width != sae.d_in:
        raise UserError(f"the SAE reads activations of width d_in={sae.d_in} at {name}, and this model's "
                        f"are {width} wide there (n_embd {config.n_embd}); the SAE is for another model")
    return name


def activation_width(config: GPT2Config, name: str, flatten_heads: bool = False) -> int:
    """The last dimension of the activation at hook point ``name`` (with ``flatten_heads``, of
    ``attn.hook_z`` with its heads flattened, as SAELens's hook_z SAEs read it); one line for the
    points no SAE reads position by position."""
    point = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    if point in ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_result"):
        shape = "(batch, pos, head, d_model)" if point.endswith("result") else "(batch, head, pos, key pos)"
        raise UserError(f"{name} has shape {shape}, not one vector per position; no SAE reads it")
    if point in _HEADS:
        if not (flatten_heads and point == "attn.hook_z"):
            raise UserError(f"{name} is (batch, pos, head, d_head); only an SAE on hook_z with "
                            "reshape_activations='hook_z' (all heads at once) reads per-head points")
        return config.n_embd
    if point.endswith("hook_scale"):
        return 1
    if point in ("mlp.hook_pre", "mlp.hook_post"):
        return 4 * config.n_embd
    return config.vocab_size if point == "unembed.hook_out" else config.n_embd


def spliced(model: Transformer, sae: SAE, *, error_term: bool = False,
            edit: Callable[[Tensor], Tensor | None] | None = None) -> Hooks:
    """Forward hooks (``run_with_hooks``' ``fwd_hooks``) that replace the activation at the SAE's hook
    by its reconstruction, as SAELens's ``HookedSAETransformer`` splices an SAE in. ``edit(features)``
    may change the feature activations first (in place, or returning new ones). With ``error_term``,
    the reconstruction's error (from the unedited features, without gradient) is added back, so the
    output is the model's own unless ``edit`` changes something, and gradients flow through the
    features."""
    name = check_sae(model, sae)

    def replace(acts: Tensor, hook: object = None) -> Tensor:
        features = sae.encode(acts)
        if edit is not None:
            edited = edit(features)
            features = features if edited is None else edited
        out = sae.decode(features, acts).reshape(acts.shape).to(acts.device, acts.dtype)
        if error_term:
            with torch.no_grad():
                error = acts - sae.reconstruct(acts).to(acts.device)
            out = out + error
        return out

    return [(name, replace)]


def _ids(model: Transformer, inputs: str | Tensor) -> Tensor:
    """Token ids of ``inputs``: a text (the model's tokenizer encodes it) or ids as they are."""
    if not isinstance(inputs, str):
        return inputs
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UserError("this model has no tokenizer to encode text; pass token ids")
    if not inputs:
        raise UserError("the text is empty; give at least one token")
    return torch.tensor([tokenizer.encode(inputs)], device=model.device)


def feature_activations(model: Transformer, sae: SAE, inputs: str | Tensor) -> Tensor:
    """The SAE's feature activations (B, T, d_sae) on a text or token ids (B, T) or (T,)."""
    name = check_sae(model, sae)
    with torch.no_grad():
        _, cache = run_with_cache(model, _ids(model, inputs), names_filter=name)
        return sae.encode(cache[name])


@dataclass
class TokenFeatures:
    """One position's strongest features: ``features`` (feature id, activation), largest first."""

    position: int
    token: int
    text: str | None  # the token as text, where the model has a tokenizer
    features: list[tuple[int, float]]


def top_features(model: Transformer, sae: SAE, inputs: str | Tensor, k: int = 5) -> list[TokenFeatures]:
    """Per token of one text (or ids (T,) or (1, T)), its ``k`` most active features (those above
    zero, so possibly fewer)."""
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise UserError(f"k must be a positive integer, got {k!r}")
    ids = _ids(model, inputs)
    if isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[0] != 1:
        raise UserError(f"top_features lists one text's tokens; got a batch of {ids.shape[0]}")
    features = feature_activations(model, sae, ids)[0]
    values, indices = torch.topk(features.float(), k=min(k, sae.d_sae), dim=-1)
    tokenizer = getattr(model, "tokenizer", None)
    rows = []
    for position, token in enumerate(ids.reshape(-1).tolist()):
        pairs = zip(indices[position].tolist(), values[position].tolist(), strict=True)
        kept = [(i, v) for i, v in pairs if v > 0]
        text = tokenizer.decode([token]) if tokenizer is not None else None
        rows.append(TokenFeatures(position, token, text, kept))
    return rows


@dataclass
class SpliceLoss:
    """The mean next-token loss of a text plain (``loss``), with the SAE spliced in (``spliced``) and
    with its hook point zeroed (``ablated``); ``recovered``: SAELens's ``ce_loss_score``, the share
    of the ablation's loss increase the SAE wins back (1: as good as the model). ``kl_spliced`` and
    ``kl_ablated``: the mean KL divergence from the model's next-token distribution; ``kl_score`` as
    SAELens's."""

    loss: float
    spliced: float
    ablated: float
    recovered: float
    kl_spliced: float
    kl_ablated: float
    kl_score: float


def splice_loss(model: Transformer, sae: SAE, inputs: str | Tensor) -> SpliceLoss:
    """The loss of a text (or token ids (B, T) or (T,)) with and without the SAE in the forward pass."""
    hooks = spliced(model, sae)
    ids = _ids(model, inputs)
    ids = ids[None] if isinstance(ids, Tensor) and ids.ndim == 1 else ids
    if isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[1] < 2:
        raise UserError("a loss needs at least two tokens (one to predict from, one to predict)")
    with torch.no_grad():
        runs = [run_with_hooks(model, ids, fwd_hooks=fwd) for fwd in
                ((), hooks, [(hooks[0][0], lambda acts, hook: torch.zeros_like(acts))])]
    logits = [run.reshape(-1, run.shape[-1]).float() for run in runs]  # every position, for the KL
    predicting = (torch.arange(ids.numel(), device=ids.device) % ids.shape[1]) < ids.shape[1] - 1
    targets = ids[:, 1:].reshape(-1)
    loss, with_sae, ablated = (F.cross_entropy(each[predicting], targets).item() for each in logits)
    reference = F.log_softmax(logits[0], dim=-1)
    kl_sae, kl_ablated = (F.kl_div(F.log_softmax(each, dim=-1), reference, log_target=True, reduction="none")
                          .sum(-1).mean().item() for each in logits[1:])
    return SpliceLoss(loss, with_sae, ablated, _share(ablated - with_sae, ablated - loss), kl_sae, kl_ablated,
                      _share(kl_ablated - kl_sae, kl_ablated))


def _share(part: float, whole: float) -> float:
    return part / whole if whole != 0 else math.nan
