"""Sparse autoencoders in SAELens's format (issue 35): SAEs made and saved by the real ``sae-lens``
package load into ``gpt2.interpretability.sae``, encode and decode our cached activations as SAELens
does, splice into the forward pass, and list a text's top features; bad inputs are one line each."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BYTES, random_model
from safetensors.torch import save_file
from test_interpretability import one_line_error  # a UserError of one line, holding each word

from gpt2 import GPT2
from gpt2.interpretability.sae import SAE, check_sae, splice_loss, spliced, top_features

sae_lens = pytest.importorskip("sae_lens")

TOLERANCE = 1e-5  # absolute: feature activations and reconstructions of order 1
TEXT = "the cat sat on the mat. the dog sat on the log."
N_EMBD = 32

# (architecture, hook point, SAELens config fields): every architecture, normalization and hook_z.
CASES = {
    "standard": ("standard", "blocks.0.hook_resid_pre", {}),
    "jumprelu": ("jumprelu", "blocks.1.hook_resid_post", {"apply_b_dec_to_input": False}),
    "gated": ("gated", "blocks.0.mlp.hook_post", {"normalize_activations": "constant_norm_rescale"}),
    "topk": ("topk", "blocks.1.hook_mlp_out", {"k": 6, "rescale_acts_by_decoder_norm": True,
                                               "normalize_activations": "layer_norm"}),
    "hook_z": ("standard", "blocks.1.attn.hook_z", {"reshape_activations": "hook_z"}),
}


@pytest.fixture(scope="module")
def model() -> GPT2:
    return random_model(n_layer=2, n_head=2, n_embd=N_EMBD, seed=0, tokenizer=BYTES).eval()


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([BYTES.encode(text)])


def their_sae(architecture: str, hook: str, d_in: int, d_sae: int = 64, seed: int = 0,
              **fields: object) -> object:
    """SAELens's own SAE of ``architecture`` for ``hook``, its weights random (biases and thresholds
    too, so that every term counts and about half the features fire)."""
    configs = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
               "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig)}
    cls, config = configs[architecture]
    metadata = sae_lens.saes.sae.SAEMetadata(hook_name=hook, model_name="tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = cls(config(d_in=d_in, d_sae=d_sae, metadata=metadata, **fields))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            scale = 0.3 if name in ("W_enc", "W_dec", "r_mag") else 0.1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        if architecture == "jumprelu":
            sae.threshold.abs_()
    return sae.eval()


def saved(sae: object, directory: Path) -> Path:
    sae.save_model(directory)
    return directory


def activations(model: GPT2, hook: str, text: str = TEXT) -> torch.Tensor:
    _, cache = model.run_with_cache(ids_of(text), names_filter=hook)
    return cache[hook]


def width(model: GPT2, hook: str) -> int:
    acts = activations(model, hook, "ab")
    return acts.shape[-2] * acts.shape[-1] if hook.endswith("hook_z") else acts.shape[-1]


# ----------------------------------------------------------------------------------------------------
# Against SAELens


@pytest.mark.parametrize("case", CASES)
def test_encode_and_decode_equal_sae_lens(model: GPT2, case: str, tmp_path: Path) -> None:
    architecture, hook, fields = CASES[case]
    theirs = their_sae(architecture, hook, width(model, hook), **fields)
    ours = SAE.load(saved(theirs, tmp_path))
    assert (ours.architecture, ours.hook_name, ours.d_sae) == (architecture, hook, 64)
    acts = activations(model, hook)
    with torch.no_grad():
        their_features = theirs.encode(acts)
        their_out = theirs.decode(their_features)  # after its encode: SAELens's normalization is stateful
    features = ours.encode(acts)
    assert features.shape == their_features.shape == (1, acts.shape[1], 64)
    assert 0 < (features > 0).float().mean() < 1  # some features fire, not all
    reconstruction = ours.reconstruct(acts)
    assert reconstruction.shape == acts.shape == their_out.shape
    encode_diff = (features - their_features).abs().max().item()
    decode_diff = (ours.decode(features, acts) - their_out.reshape(*acts.shape[:2], -1)).abs().max().item()
    print(f"{case}: encode {encode_diff:.1e}, decode {decode_diff:.1e}")
    assert encode_diff < TOLERANCE and decode_diff < TOLERANCE
    assert (reconstruction - their_out).abs().max() < TOLERANCE
    # SAELens's own loader reads the same files to the same SAE.
    loaded = type(theirs).load_from_disk(tmp_path)
    assert torch.equal(loaded.encode(acts), their_features)


@pytest.mark.parametrize("case", ["standard", "hook_z", "topk"])
def test_the_splice_equals_sae_lens_forward_in_the_loop(model: GPT2, case: str, tmp_path: Path) -> None:
    architecture, hook, fields = CASES[case]
    theirs = their_sae(architecture, hook, width(model, hook), **fields)
    ours = SAE.load(saved(theirs, tmp_path))
    ids = ids_of(TEXT)
    with torch.no_grad():
        logits = model.run_with_hooks(ids, fwd_hooks=spliced(model, ours))
        their_logits = model.run_with_hooks(ids, fwd_hooks=[(hook, lambda acts, hook: theirs(acts))])
        plain = model(ids)
        kept = model.run_with_hooks(ids, fwd_hooks=spliced(model, ours, error_term=True))
    diff = (logits - their_logits).abs().max().item()
    print(f"{case}: spliced logits differ from SAELens's in the loop by {diff:.1e}")
    assert diff < TOLERANCE and (logits - plain).abs().max() > 1e-3  # the SAE is in the loop
    assert (kept - plain).abs().max() < TOLERANCE  # the error term restores the model's own output

    def ablate(features: torch.Tensor) -> None:  # an edit in place: feature 3 off
        features[..., 3] = 0

    def their_ablated(acts: torch.Tensor, hook: object) -> torch.Tensor:
        features = theirs.encode(acts)
        features[..., 3] = 0
        return theirs.decode(features)

    with torch.no_grad():
        edited = model.run_with_hooks(ids, fwd_hooks=spliced(model, ours, edit=ablate))
        their_edited = model.run_with_hooks(ids, fwd_hooks=[(hook, their_ablated)])
    assert (edited - their_edited).abs().max() < TOLERANCE


def test_the_splice_loss_and_top_features(model: GPT2, tmp_path: Path) -> None:
    architecture, hook, fields = CASES["jumprelu"]
    theirs = their_sae(architecture, hook, N_EMBD, **fields)
    ours = SAE.load(saved(theirs, tmp_path))
    ids = ids_of(TEXT)
    with torch.no_grad():
        runs = [model(ids), model.run_with_hooks(ids, fwd_hooks=[(hook, lambda acts, hook: theirs(acts))]),
                model.run_with_hooks(ids, fwd_hooks=[(hook, lambda acts, hook: acts * 0)])]
    losses = [F.cross_entropy(run[0, :-1], ids[0, 1:]).item() for run in runs]
    reference = F.softmax(runs[0][0], -1)
    kls = [F.kl_div(F.log_softmax(run[0], -1), reference, reduction="none").sum(-1).mean().item()
           for run in runs[1:]]
    result = splice_loss(model, ours, TEXT)
    assert result.loss == pytest.approx(losses[0], abs=1e-5)
    assert result.spliced == pytest.approx(losses[1], abs=1e-5)
    assert result.ablated == pytest.approx(losses[2], abs=1e-5)
    assert result.recovered == pytest.approx((losses[2] - losses[1]) / (losses[2] - losses[0]), abs=1e-4)
    assert (result.kl_spliced, result.kl_ablated) == pytest.approx(kls, abs=1e-5)
    # The top features of each token are SAELens's encode's largest, those above zero.
    rows = top_features(model, ours, TEXT, k=4)
    with torch.no_grad():
        values, indices = torch.topk(theirs.encode(activations(model, hook)), k=4, dim=-1)
    assert [row.text for row in rows] == list(TEXT) and [row.token for row in rows] == BYTES.encode(TEXT)
    for row in rows:
        pairs = zip(indices[0, row.position].tolist(), values[0, row.position].tolist(), strict=True)
        expected = [(i, v) for i, v in pairs if v > 0]
        assert [i for i, _ in row.features] == [i for i, _ in expected]
        assert [v for _, v in row.features] == pytest.approx([v for _, v in expected], abs=TOLERANCE)
    assert any(row.features for row in rows)


def test_sae_lens_5_configs_and_a_norm_scaling_factor_load(model: GPT2, tmp_path: Path) -> None:
    """A cfg.json of SAELens before 6 (hook_point, activation_fn_str and its k at the top level, the
    published GPT-2 SAEs' layout) and expected_average_only_in with its folded scaling factor."""
    hook = "blocks.0.hook_resid_post"
    theirs = their_sae("topk", hook, N_EMBD, k=5, seed=1)
    weights = {name: p.detach().clone() for name, p in theirs.state_dict().items()}
    save_file(weights, tmp_path / "sae_weights.safetensors")
    old = {"d_in": N_EMBD, "d_sae": 64, "dtype": "torch.float32", "hook_point": hook, "hook_point_layer": 0,
           "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
           "apply_b_dec_to_input": True, "normalize_activations": False, "sae_lens_version": "3.21.0",
           "model_name": "tiny", "context_size": 64}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    ours, acts = SAE.load(tmp_path), activations(model, hook)
    assert (ours.architecture, ours.k, ours.hook_name) == ("topk", 5, hook)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = sae_lens.SAE.load_from_disk(tmp_path)
        assert (ours.encode(acts) - loaded.encode(acts)).abs().max() < TOLERANCE
        (tmp_path / "cfg.json").write_text(json.dumps(old | {"normalize_activations": True}))
        scaled = SAE.load(tmp_path, norm_scaling_factor=2.5)
        theirs.fold_activation_norm_scaling_factor(2.5)
        assert (scaled.encode(acts) - theirs.encode(acts)).abs().max() < TOLERANCE
        assert (scaled.reconstruct(acts) - theirs(acts)).abs().max() < TOLERANCE


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one clear line each


def test_mismatches_and_bad_files_are_one_clear_line(model: GPT2, tmp_path: Path) -> None:
    def sae_for(hook: str, d_in: int, name: str, **fields: object) -> SAE:
        return SAE.load(saved(their_sae("standard", hook, d_in, **fields), tmp_path / name))

    wide = sae_for("blocks.0.hook_resid_pre", 48, "wide")  # an SAE for another width
    one_line_error(lambda: spliced(model, wide), "d_in=48", "32 wide", "another model")
    one_line_error(lambda: top_features(model, wide, TEXT), "d_in=48")
    one_line_error(lambda: wide.encode(activations(model, "blocks.0.hook_resid_pre")), "width 32", "d_in=48")
    deep = sae_for("blocks.7.hook_resid_pre", N_EMBD, "deep")  # a layer beyond the model's depth
    one_line_error(lambda: splice_loss(model, deep, TEXT), "blocks.7.hook_resid_pre", "2 blocks (0 to 1)")
    typo = sae_for("blocks.0.hook_resid_prre", N_EMBD, "typo")  # a hook the model does not have
    one_line_error(lambda: spliced(model, typo), "hook_resid_prre", "nearest", "blocks.0.hook_resid_pre")
    one_line_error(lambda: check_sae(model, sae_for("blocks.0.attn.hook_pattern", 8, "pattern")),
                   "hook_pattern", "no SAE reads it")
    one_line_error(lambda: check_sae(model, sae_for("blocks.0.attn.hook_q", N_EMBD, "q")), "hook_q",
                   "per-head")
    one_line_error(lambda: SAE.load(tmp_path / "nothing"), "no cfg.json")
    one_line_error(lambda: SAE.load(tmp_path / "wide", norm_scaling_factor=2.0), "norm_scaling_factor",
                   "'none'")
    directory = saved(their_sae("standard", "blocks.0.hook_resid_pre", N_EMBD), tmp_path / "files")
    config = json.loads((directory / "cfg.json").read_text())
    for changed, words in [({"architecture": "matching_pursuit"}, ("'matching_pursuit'", "jumprelu")),
                           ({"d_in": 40}, ("W_enc", "(32, 64)", "(40, 64)")),
                           ({"normalize_activations": "covariance_whitening"}, ("covariance_whitening",)),
                           ({"normalize_activations": "expected_average_only_in"}, ("norm_scaling_factor=",)),
                           ({"architecture": "jumprelu"}, ("missing threshold",)),
                           ({"d_sae": "64"}, ("d_sae", "positive integer"))]:
        (directory / "cfg.json").write_text(json.dumps(config | changed))
        one_line_error(lambda: SAE.load(directory), *words)
    (directory / "cfg.json").write_text(json.dumps(config))
    (directory / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    one_line_error(lambda: SAE.load(directory), "corrupt or truncated")
    (directory / "sae_weights.safetensors").unlink()
    one_line_error(lambda: SAE.load(directory), "no sae_weights.safetensors")
