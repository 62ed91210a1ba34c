"""Interpretability (issue 35): TransformerLens's hook points on our network (``run_with_cache``,
``run_with_hooks``, backward hooks) and its processed weights (``GPT2.processed``), held to the real
``transformer-lens`` loading our saved checkpoints through its own GPT-2 conversion, offline."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import BYTES, saved_model_dir, trained_model

from gpt2 import GPT2, GPT2Config, UserError
from gpt2.interpretability.hooks import hook_names

TOLERANCE = 1e-4  # relative to the largest magnitude of TransformerLens's tensor
FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")  # processing
TEXT = "the cat sat on the mat. the dog sat on the log. "


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([BYTES.encode(text)])


# Padding-free prompts of different lengths (run one at a time), and a batch of two of one length.
PROMPTS = [ids_of("the cat"), ids_of("the dog sat on"), ids_of("a mat. the log sat on the cat"),
           torch.cat([ids_of("the mat."), ids_of("dog sat ")])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer model of width 128 (4 heads) trained for 30 steps on repeated text (batches of eight
    windows, in order), saved."""
    return saved_model_dir(trained_model(TEXT, steps=30, lr=3e-3, n_embd=128), tmp_path_factory)


@pytest.fixture(scope="module")
def ours(trained: Path) -> GPT2:
    return GPT2.from_pretrained(trained)


def lens(directory: Path, **processing: bool) -> object:
    """TransformerLens's ``HookedTransformer`` of the checkpoint in ``directory``: transformers reads the
    weights, TransformerLens converts them (its own GPT-2 conversion, ``from_pretrained`` with
    ``hf_model`` and ``tokenizer``) and processes them as ``processing`` says (none by default). Offline:
    its look-up of the hub's "gpt2" config, the one thing it would fetch, is answered with the
    checkpoint's own config (the shape)."""
    pytest.importorskip("transformer_lens")
    import huggingface_hub.constants
    import transformers
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    hf = transformers.GPT2LMHeadModel.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    flags = dict.fromkeys(FLAGS, False)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(loading, "AutoConfig", SimpleNamespace(from_pretrained=lambda name, **_: hf.config))
        model = HookedTransformer.from_pretrained("gpt2", hf_model=hf, tokenizer=tokenizer, device="cpu",
                                                  **(flags | processing))
    return model.eval()


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| over TransformerLens's largest magnitude, over the finite entries; the -inf
    entries (the attention scores of future keys) must be the same."""
    ours, theirs = ours.detach().float(), theirs.detach().float()
    assert ours.shape == theirs.shape
    finite = theirs.isfinite()
    assert torch.equal(finite, ours.isfinite()) and torch.equal(ours[~finite], theirs[~finite])
    return ((ours - theirs)[finite].abs().max() / theirs[finite].abs().max().clamp(min=1e-30)).item()


def assert_same_run(ours: GPT2, theirs: object, ids: torch.Tensor) -> float:
    """Our logits and cache equal TransformerLens's for ``ids``, name for name (the same names, in the
    same order); returns the largest relative difference."""
    logits, cache = ours.run_with_cache(ids)
    their_logits, their_cache = theirs.run_with_cache(ids)
    assert list(cache) == list(their_cache.keys())
    worst = {name: relative_difference(cache[name], their_cache[name]) for name in cache}
    worst["logits"] = relative_difference(logits, their_logits)
    name = max(worst, key=worst.get)
    assert worst[name] < TOLERANCE, f"{name}: {worst[name]:.2e}"
    print(f"{len(worst)} tensors of shape {tuple(ids.shape)}: largest relative difference {worst[name]:.1e} "
          f"({name})")
    return worst[name]


# ----------------------------------------------------------------------------------------------------
# Against TransformerLens


def test_every_activation_equals_transformer_lens_on_a_trained_model(ours: GPT2, trained: Path) -> None:
    theirs = lens(trained)
    for ids in PROMPTS:
        assert_same_run(ours, theirs, ids)
    logits, _ = ours.run_with_cache(PROMPTS[1])
    assert relative_difference(logits, ours(PROMPTS[1])) < TOLERANCE  # the network's own forward pass


@pytest.mark.parametrize("only", [None, *FLAGS])  # None: all four, TransformerLens's from_pretrained defaults
def test_the_processed_model_equals_transformer_lens_processed(ours: GPT2, trained: Path, only: str) -> None:
    alone = {name: only in (None, name) for name in FLAGS}
    theirs, processed = lens(trained, **alone), ours.processed(**alone)
    for ids in PROMPTS:
        assert_same_run(processed, theirs, ids)
    weights = theirs.state_dict()
    for mine, name in [(processed.lm_head.weight.T, "unembed.W_U"), (processed.lm_head.bias, "unembed.b_U"),
                       (processed.transformer.wte.weight, "embed.W_E"), (processed.transformer.wpe.weight,
                       "pos_embed.W_pos"), (processed.transformer.h[1].attn.c_proj.bias, "blocks.1.attn.b_O"),
                       (processed.transformer.h[0].mlp.c_fc.weight.T, "blocks.0.mlp.W_in")]:
        assert relative_difference(mine, weights[name]) < TOLERANCE, name
    # The logits are the network's up to a constant per position (center_unembed), exactly so without it.
    shift = ours(PROMPTS[2]) - processed(PROMPTS[2])
    if alone["center_unembed"]:
        shift = shift - shift.mean(-1, keepdim=True)
    assert shift.abs().max() < 1e-4 * ours(PROMPTS[2]).abs().max()
    assert processed.lm_head.weight is not ours.lm_head.weight and ours.lm_head.bias is None  # ours untouched


@pytest.mark.slow
def test_the_124m_shape_equals_transformer_lens(tmp_path: Path) -> None:
    """GPT2Config's defaults (124M) with random weights, plain and processed."""
    torch.manual_seed(0)
    GPT2(GPT2Config(), tokenizer=BYTES).save_pretrained(tmp_path)
    model = GPT2.from_pretrained(tmp_path)
    assert model.num_parameters() == 124_439_808
    theirs = lens(tmp_path)
    prompts = [torch.randint(0, 50257, (1, 7)), torch.randint(0, 50257, (2, 12))]
    for ids in prompts:
        assert_same_run(model, theirs, ids)
    theirs.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    processed = model.processed()
    for ids in prompts:
        assert_same_run(processed, theirs, ids)


def test_patching_hooks_change_the_output_as_in_transformer_lens(ours: GPT2, trained: Path) -> None:
    theirs = lens(trained)
    clean, corrupt = ids_of("the cat sat on"), ids_of("the dog sat on")
    _, clean_cache = ours.run_with_cache(clean, names_filter="blocks.1.hook_resid_pre")

    def patch_resid(resid: torch.Tensor, hook: object) -> torch.Tensor:  # activation patching, position 4
        patched = resid.clone()
        patched[:, 4] = clean_cache[hook.name][:, 4]
        return patched

    def ablate_head(z: torch.Tensor, hook: object) -> None:  # in place, returning nothing
        z[:, :, 2] = 0.0

    def flatten_pattern(pattern: torch.Tensor, hook: object) -> torch.Tensor:
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    def halve(post: torch.Tensor, hook: object) -> torch.Tensor:
        return post / 2

    hooks = [[("blocks.1.hook_resid_pre", patch_resid)], [("blocks.0.attn.hook_z", ablate_head)],
             [("blocks.1.attn.hook_pattern", flatten_pattern), ("blocks.0.mlp.hook_post", halve)],
             [(lambda name: name.endswith("hook_v"), lambda v, hook: v.flip(1))]]
    plain = ours(corrupt)
    for fwd_hooks in hooks:
        logits = ours.run_with_hooks(corrupt, fwd_hooks=fwd_hooks)
        assert relative_difference(logits, theirs.run_with_hooks(corrupt, fwd_hooks=fwd_hooks)) < TOLERANCE
        assert (logits - plain).abs().max() > 1e-3  # the hook changed the output
    # Caching after a patch records the patched activations downstream, as TransformerLens's does.
    _, cache = ours.run_with_cache(corrupt, fwd_hooks=hooks[0])
    with theirs.hooks(fwd_hooks=hooks[0]):
        _, their_cache = theirs.run_with_cache(corrupt)
    assert relative_difference(cache["resid_post", 1], their_cache["resid_post", 1]) < TOLERANCE
    assert torch.equal(cache["resid_pre", 1][:, 4], clean_cache["resid_pre", 1][:, 4])


def test_backward_hooks_give_transformer_lens_gradients(ours: GPT2, trained: Path) -> None:
    theirs = lens(trained)
    ids = ids_of("the cat sat on the mat")
    names = ["hook_embed", "blocks.0.hook_resid_mid", "blocks.0.attn.hook_v", "blocks.1.attn.hook_pattern",
             "blocks.1.mlp.hook_pre", "ln_final.hook_scale"]

    def gradients(run: object, names: list[str]) -> dict[str, torch.Tensor]:
        """The gradients of the loss that ``run(bwd_hooks)`` differentiates, as the hooks see them."""
        grads = {}

        def keep(grad: torch.Tensor, hook: object) -> None:
            grads[hook.name] = grad.detach().clone()

        run([(name, keep) for name in names])
        return grads

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[0, :-1], ids[0, 1:])

    def their_run(bwd: list) -> None:
        with theirs.hooks(bwd_hooks=bwd):
            loss(theirs(ids)).backward()

    mine = gradients(lambda bwd: loss(ours.run_with_hooks(ids, bwd_hooks=bwd)).backward(), names)
    theirs_grads = gradients(their_run, names)
    assert set(mine) == set(names)
    for name in names:
        assert relative_difference(mine[name], theirs_grads[name]) < TOLERANCE, name
    # A frozen model still gives the gradient with respect to the hooked activation.
    frozen = GPT2.from_pretrained(trained).requires_grad_(False)
    frozen_grads = gradients(lambda bwd: loss(frozen.run_with_hooks(ids, bwd_hooks=bwd)).backward(),
                             ["hook_embed"])
    assert relative_difference(frozen_grads["hook_embed"], mine["hook_embed"]) < TOLERANCE


def test_the_optional_per_head_result_equals_transformer_lens(ours: GPT2, trained: Path) -> None:
    theirs = lens(trained)
    theirs.set_use_attn_result(True)
    names = ["blocks.0.attn.hook_result", "blocks.1.attn.hook_result", "blocks.1.hook_attn_out"]
    logits, cache = ours.run_with_cache(PROMPTS[2], names_filter=names)
    their_logits, their_cache = theirs.run_with_cache(PROMPTS[2], names_filter=names)
    assert list(cache) == names and cache[names[0]].shape == (1, PROMPTS[2].shape[1], 4, 128)
    for name in names:
        assert relative_difference(cache[name], their_cache[name]) < TOLERANCE
    assert relative_difference(logits, their_logits) < TOLERANCE


# ----------------------------------------------------------------------------------------------------
# The cache and the names


def test_the_cache_takes_transformer_lens_shorthand_and_filters(ours: GPT2) -> None:
    _, cache = ours.run_with_cache(PROMPTS[3])
    assert list(cache) == hook_names(2) and len(cache) == 2 + 2 * 17 + 4
    assert cache["resid_pre", 0] is cache["blocks.0.hook_resid_pre"]
    assert cache["pattern", -1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["scale", 1, "ln2"] is cache["blocks.1.ln2.hook_scale"]
    assert cache["normalized"] is cache["ln_final.hook_normalized"]
    assert cache["q1"] is cache["blocks.1.attn.hook_q"] and cache["embed"] is cache["hook_embed"]
    assert cache["z", 0].shape == (2, 8, 4, 32) and cache["attn_scores", 1].shape == (2, 4, 8, 8)
    assert not any(t.requires_grad for t in cache.values())
    _, some = ours.run_with_cache(PROMPTS[0], names_filter=lambda name: name.endswith("hook_pattern"))
    assert list(some) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    _, one = ours.run_with_cache(PROMPTS[0][0], names_filter="hook_pos_embed")  # (T,) is one row
    assert list(one) == ["hook_pos_embed"] and one["hook_pos_embed"].shape == (1, 7, 128)


def test_a_caching_run_hands_back_its_freed_scratch_once_before_the_logits(
        ours: GPT2, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2.interpretability import hooks

    events: list[str] = []
    monkeypatch.setattr(hooks, "release_freed_memory", lambda: events.append("trim"))
    unembed = [("unembed.hook_in", lambda x, hook: events.append("unembed"))]
    ours.run_with_cache(PROMPTS[0], fwd_hooks=unembed)
    assert events == ["trim", "unembed"]
    events.clear()
    ours.run_with_cache(PROMPTS[0], names_filter=[], fwd_hooks=unembed)  # nothing held: nothing to trim
    ours.run_with_hooks(PROMPTS[0], fwd_hooks=unembed)
    assert events == ["unembed", "unembed"]


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one clear line each


def one_line_error(call: object, *words: str) -> None:
    with pytest.raises(UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_bad_hooks_and_inputs_are_one_clear_line(ours: GPT2) -> None:
    ids = PROMPTS[1]
    one_line_error(lambda: ours.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_patern", print)]),
                   "hook_patern", "nearest", "blocks.0.attn.hook_pattern")
    one_line_error(lambda: ours.run_with_cache(ids, names_filter=["blocks.7.hook_resid_pre"]),
                   "blocks.7.hook_resid_pre", "nearest")
    one_line_error(lambda: ours.run_with_hooks(ids, fwd_hooks=[("resid_pre", print)]),
                   "'resid_pre'", "blocks.0.hook_resid_pre")
    one_line_error(lambda: ours.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern",
                                                                lambda p, hook: p[:, 0])]),
                   "blocks.0.attn.hook_pattern", "(1, 14, 14)", "(1, 4, 14, 14)")
    one_line_error(lambda: ours.run_with_hooks(ids, fwd_hooks=[("hook_embed", lambda e, hook: 0)]),
                   "type int", "(1, 14, 128)")
    one_line_error(lambda: ours.run_with_hooks(ids, fwd_hooks=["hook_embed"]), "pairs (name, fn)")
    with torch.no_grad():
        one_line_error(lambda: ours.run_with_hooks(ids, bwd_hooks=[("hook_embed", print)]), "torch.no_grad")
    one_line_error(lambda: ours.run_with_cache(torch.tensor([[3, 300]])), "300", "vocabulary of 257")
    one_line_error(lambda: ours.run_with_cache(torch.zeros(1, 65, dtype=torch.long)), "65", "context window")
    one_line_error(lambda: ours.run_with_cache(torch.rand(1, 4)), "token ids", "float")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_models_are_refused(trained: Path, precision: str) -> None:
    from gpt2.inference.load import load_for_inference

    model = load_for_inference(trained, precision=precision, device="cpu")
    for call in (lambda: model.run_with_cache(PROMPTS[0]), lambda: model.run_with_hooks(PROMPTS[0]),
                 lambda: model.processed()):
        one_line_error(call, "not available", "GPT2.from_pretrained")


def test_a_processed_model_is_not_saved(ours: GPT2, tmp_path: Path) -> None:
    one_line_error(lambda: ours.processed().save_pretrained(tmp_path), "processed", "save the model")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# Hooks cost nothing where none is asked for


def test_generating_never_imports_the_interpretability_package(trained: Path) -> None:
    """The inference model has no hook (no module of the package, no torch hook on any module), and
    loading it and generating from it never import gpt2.interpretability: the decode path is the
    network's own."""
    script = f"""
import sys
from gpt2.generation.config import GenerationConfig
from gpt2.generation.sampling import generate_text
from gpt2.inference.load import load_for_inference
model = load_for_inference({str(trained)!r}, device="cpu")
generate_text(model, model.tokenizer, "the cat", GenerationConfig(max_new_tokens=8, seed=0))
hooks = [h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks) if h]
print(hooks, sorted(name for name in sys.modules if name.startswith("gpt2.interpretability")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[] []", done.stdout
