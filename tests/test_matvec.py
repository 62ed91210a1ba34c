"""The hand-written decoding products (``gpt2.inference.kernels``): on oneDNN's blocked weights they give
oneDNN's products for every number of rows they take, in every variant of the kernels this CPU runs
(the ``variant`` fixture), the blocked layers of a loaded model use them, the library is built once per
machine into the cache and shares PyTorch's OpenMP threads, and ``GPT2_MATVEC=0`` leaves oneDNN's
products."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model
from torch import Tensor, nn

from gpt2.inference import kernels, ops
from gpt2.inference.cpu_layers import (
    BlockedEmbedding,
    BlockedHead,
    BlockedLinear,
    HandAttention,
    HandLinear,
    intel_cpu,
)
from gpt2.inference.load import load_for_inference
from gpt2.kv_cache import KVCache


def _runnable() -> list[str]:
    """The variants of the kernels this CPU runs, by ``kernels.variant()``'s names: each level it has,
    with and without the VNNI the level takes where it has that too."""
    has = kernels.cpu_has(kernels._cpu_flags())
    return [name for level, v in kernels.VARIANTS.items() if set(v.needs) <= has
            for name in ([f"{level}+vnni"] if v.vnni and v.vnni[0] in has else []) + [level]]


RUNNABLE = _runnable()
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN's bfloat16 product (the reference) "
    "needs AVX-512"))]
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="the kernels need AVX2 or AVX-512")


@pytest.fixture(params=RUNNABLE)
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each variant of the kernels this CPU runs in turn, forced (``GPT2_KERNELS_ISA``; for a level
    without its VNNI, that VNNI hidden from the CPU's flags), built once per machine into the cache and
    loaded in place of the best one for the test, the operators (``torch.ops.gpt2``) bound to it."""
    name = request.param
    level = kernels.VARIANTS[name.removesuffix("+vnni")]
    monkeypatch.setenv("GPT2_KERNELS_ISA", name)
    if level.vnni and not name.endswith("+vnni"):
        cpu = kernels._cpu_flags()
        monkeypatch.setattr(kernels, "_cpu_flags", lambda: re.sub(rf"\s{level.vnni[0]}\b", "", cpu))
    kernels.library.cache_clear()
    assert kernels.variant() == name and ops.operators()
    yield name
    monkeypatch.undo()
    kernels.library.cache_clear()
    ops.operators()


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    """The kernels split their rows between PyTorch's threads: two here (conftest sets one), so every
    split is checked against the plain product."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _layer(out_features: int, in_features: int, dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(out_features + in_features)
    return nn.Linear(in_features, out_features).to(dtype).requires_grad_(False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(100, 64), (130, 192), (768, 96)])  # rows of the last block: 36, 2, 0
def test_the_hand_product_equals_onednns_on_the_same_blocked_layout(dtype: torch.dtype, shape: tuple,
                                                               variant: str) -> None:
    linear = _layer(*shape, dtype)
    blocked = torch.ops.mkldnn._reorder_linear_weight(linear.weight, None)
    ours = [ops.blocked(linear.weight)]  # oneDNN's layout, laid out by us in a plain tensor
    for rows in range(1, 10):
        x = torch.randn(rows, shape[1]).to(dtype)
        for bias in (None, linear.bias):
            expected = torch.ops.mkldnn._linear_pointwise(x, blocked, bias, "none", [], "")
            got = torch.ops.gpt2.blocked_linear(x, ours, bias, shape[0], False)
            assert got.dtype == dtype and got.shape == (rows, shape[0])
            # float32: the same sums in another order; bfloat16: rounded once, at most one step apart
            tolerance = 1e-4 if dtype == torch.float32 else 2 ** -7
            torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
        gelu = F.gelu(expected.float(), approximate="tanh")  # the MLP's input layer: GELU as it writes
        torch.testing.assert_close(torch.ops.gpt2.blocked_linear(x, ours, bias, shape[0], True).float(), gelu,
                                   rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_hand_layer_gives_the_plain_layers_outputs_at_every_batch_with_and_without_gelu(
        dtype: torch.dtype, variant: str) -> None:
    """Through the operator ``torch.ops.gpt2.blocked_linear``: a decoding step's rows, more than 8 (a
    prompt's), and a weight whose last block is part padding; its state dict holds the plain weight."""
    for gelu in (False, True):
        linear = _layer(200, 128, dtype)
        layer = HandLinear(linear, gelu=gelu)
        for shape in [(1, 1, 128), (8, 1, 128), (9, 1, 128), (2, 5, 128), (3, 70, 128)]:
            x = torch.randn(shape).to(dtype)
            expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
            expected = F.gelu(expected, approximate="tanh") if gelu else expected
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(layer(x).float(), expected, rtol=tolerance, atol=tolerance)
        assert torch.equal(layer.state_dict()["weight"], linear.weight)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=DTYPES[1].marks)])
def test_a_model_loaded_for_the_cpu_multiplies_with_the_hand_kernels(precision: str) -> None:
    model = load_for_inference(random_model(n_embd=64, vocab_size=5000), precision=precision, device="cpu")
    if precision == "bf16" or not intel_cpu():  # fp32 on Intel: MKL's products on the plain weights
        assert [type(m) for m in model.modules() if isinstance(m, (nn.Linear, HandLinear, BlockedLinear))] \
            == [HandLinear] * 4 * model.config.n_layer
        assert type(model.lm_head) is BlockedHead  # the tied LM head and embedding: blocked in place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [5000, 4992])  # a last block of 8 rows; whole blocks only
def test_the_blocked_head_gives_the_plain_weights_logits_and_rows_from_the_embeddings_own_memory(
        dtype: torch.dtype, vocab: int, variant: str) -> None:
    """The tied LM head reordered in place: its products (1, 8 and 37 rows) equal the plain weight's,
    the embedding looks up the same rows, the state dict holds the plain weight, and the blocks live in
    the memory the plain weight had (no second copy)."""
    torch.manual_seed(0)
    plain = torch.randn(vocab, 96).to(dtype)
    weight = plain.clone()
    memory = weight.untyped_storage().data_ptr()
    head = BlockedHead(weight)
    assert head.blocks.untyped_storage().data_ptr() == memory
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in [1, 8, 37]:
        x = torch.randn(rows, 96).to(dtype)
        expected = x.float() @ plain.float().T
        torch.testing.assert_close(head(x).float(), expected, rtol=tolerance,
                                   atol=tolerance * expected.abs().max().item())
    idx = torch.tensor([[0, 63, 64, vocab - 9], [vocab - 8, vocab - 1, 4991, 17]])
    assert torch.equal(BlockedEmbedding(head)(idx), plain[idx])
    assert torch.equal(head.state_dict()["weight"], plain)


def _in_a_fresh_process(code: str, cache: Path, **env: str) -> str:
    environment = {**os.environ, "GPT2_CACHE": str(cache), **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


LOAD = """
import re, torch
from gpt2.inference import kernels
lib = kernels.library()
maps = open("/proc/self/maps").read()
print(lib._name if lib else None, len(set(re.findall(r"\\S*libgomp\\S*", maps))))
"""


def test_the_library_is_built_once_into_the_cache_and_runs_on_pytorchs_openmp_threads(tmp_path) -> None:
    first = _in_a_fresh_process(LOAD, tmp_path).split()
    library = Path(first[0])
    assert library.parent == tmp_path / "kernels" and library.is_file()
    assert first[1] == "1", "one OpenMP runtime in the process: PyTorch's, whose threads run the kernels"
    built = library.stat().st_mtime_ns
    assert _in_a_fresh_process(LOAD, tmp_path).split()[0] == str(library)
    record = library.with_name(library.name + ".sha256")  # its size and SHA-256, checked before loading
    assert library.stat().st_mtime_ns == built and sorted(library.parent.iterdir()) == [library, record]


def test_GPT2_MATVEC_0_leaves_onednns_products(tmp_path) -> None:
    code = LOAD + """
from gpt2.inference import ops
print(ops.available("fp32", 64))
"""
    assert _in_a_fresh_process(code, tmp_path, GPT2_MATVEC="0").split()[::2] == ["None", "False"]
    assert not (tmp_path / "kernels").exists()


# the last: more inputs than a chunk of the block (the kernels read 16 KB of it at a time), and a part
@pytest.mark.parametrize("shape", [(100, 64), (130, 192), (768, 96), (70, 528)])
def test_the_int8_product_is_the_8_bit_rows_times_the_int8_weight(shape: tuple, variant: str) -> None:
    """Each row of x is quantised to 8 bits (x / (max |x| / 127), rounded half to even) and multiplied
    by the int8 weight exactly; only the float32 scaling rounds."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, shape, dtype=torch.int8)
    scales, bias = torch.rand(shape[0]) / 100, torch.randn(shape[0])
    assert kernels.kernel("int8", shape[1])
    blocked, sums = ops.int8_blocked(q), ops.row_sums(q)
    assert torch.equal(sums, q.long().sum(dim=1).int())
    idx = torch.tensor([[0, shape[0] - 1], [shape[0] // 2, 63]])
    assert torch.equal(ops.int8_blocked_rows(blocked, idx), q[idx])
    for rows in [*range(1, 10), 37]:
        x = torch.randn(rows, shape[1])
        xs = x.abs().amax(dim=1, keepdim=True) / 127
        dots = torch.round(x / xs).double() @ q.double().T
        expected = dots * xs.double() * scales.double() + bias.double()
        got = torch.ops.gpt2.int8_linear(x, blocked, scales, sums, bias, shape[0], False)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        no_bias = torch.ops.gpt2.int8_linear(x, blocked, scales, sums, None, shape[0], False)
        torch.testing.assert_close(no_bias.double(), expected - bias.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(128, 64), (192, 96), (64, 768), (128, 416)])
def test_the_int4_product_is_the_8_bit_rows_times_each_groups_values_scale_and_low(shape: tuple,
                                                                                   variant: str) -> None:
    """Per group of 32 inputs: scale * (8-bit x . 4-bit q) * x's scale + low * the group's sum of x; the
    scales and lows in bfloat16."""
    torch.manual_seed(0)
    (out, width), groups = shape, shape[1] // 32
    q = torch.randint(0, 16, shape)
    scales, lows = (torch.rand(out, groups) / 10).bfloat16(), (torch.randn(out, groups) / 5).bfloat16()
    assert kernels.kernel("int4", width)
    blocked, bias = ops.int4_blocked(q, scales, lows), torch.randn(out)
    for rows in [1, 2, 3, 8, 33]:
        x = torch.randn(rows, width)
        xs = x.abs().amax(dim=1, keepdim=True) / 127
        dots = torch.einsum("mgk,ngk->mng", torch.round(x / xs).double().view(rows, groups, 32),
                            q.double().view(out, groups, 32))
        sums = x.double().view(rows, groups, 32).sum(dim=2)
        expected = (dots * xs.double()[:, :, None] * scales.double()).sum(dim=2) + sums @ lows.double().T
        got = torch.ops.gpt2.int4_linear(x, blocked, bias, out, False)
        torch.testing.assert_close(got.double(), expected + bias.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=DTYPES[1].marks), "int8"])
def test_a_padded_batch_decoded_by_the_hand_attention_gives_each_sequences_own_logits(precision: str) -> None:
    """Heads of 64 (what the kernel takes): prompts of different lengths, left-padded in one cache and
    decoded a token at a time, give the logits each sequence gets alone through the full forward pass
    (PyTorch's attention, no cache)."""
    model = load_for_inference(random_model(n_embd=128, n_head=2, seed=3), precision=precision, device="cpu")
    torch.manual_seed(0)
    lengths, steps = (5, 9), 6
    rows = [torch.randint(0, 257, (n + steps,)) for n in lengths]
    ids = torch.zeros(2, max(lengths), dtype=torch.long)
    padding = torch.zeros(2, max(lengths), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, -n:], padding[row, -n:] = rows[row][:n], 1
    cache = KVCache(model.config, 2, max(lengths) + steps, dtype=model.cache_dtype,
                    attention_dtype=model.attention_dtype)
    assert all(isinstance(block.attn, HandAttention) for block in model.transformer.h)  # the kernel takes it
    tolerance = 1e-4 if precision == "fp32" else 3e-2  # bf16 and int8: a bfloat16 cache, rounded
    with torch.inference_mode():
        model(ids, attention_mask=padding, cache=cache)
        for step in range(steps):
            tokens = torch.stack([r[n + step] for r, n in zip(rows, lengths, strict=True)])[:, None]
            stepped = model.decode_step(tokens, cache).float()
            for row, n in enumerate(lengths):
                alone = model(rows[row][None, : n + step + 1])[0, -1].float()
                spread = alone.amax() - alone.amin()
                assert (stepped[row] - alone).abs().max() <= tolerance * spread


def _attention_by_definition(q: Tensor, keys: Tensor, values: Tensor, real: Tensor, length: int) -> Tensor:
    """Softmax attention, in float64, of queries q (B, T, H, 64) at positions length.. over the keys and
    values (B, H, L, 64) up to each query's own position that ``real`` (B, L) marks, and itself."""
    B, T = q.shape[:2]
    positions = torch.arange(length, length + T)
    seen = torch.arange(keys.shape[2])[None, :] <= positions[:, None]
    seen = (seen[None] & real[:, None, : keys.shape[2]]) | (torch.arange(keys.shape[2]) == positions[:, None])
    scores = torch.einsum("bthd,bhld->bhtl", q.double(), keys.double()) / 8
    p = scores.masked_fill(~seen[:, None], -torch.inf).softmax(dim=-1)
    return torch.einsum("bhtl,bhld->bthd", p, values.double()).reshape(B, T, -1)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize(("length", "T"),
                         [(0, 1), (0, 3), (0, 4), (0, 70), (7, 1), (7, 5), (7, 6), (64, 17), (61, 67)])
def test_the_hand_attention_of_a_chunk_is_softmax_attention_over_the_real_keys_up_to_each_query(
        dtypes: tuple, length: int, T: int, variant: str) -> None:
    """Queries of a decoding step (T = 1) or of a chunk, after ``length`` cached positions, some of them
    padding: the kernel writes the chunk's keys and values into the cache and gives each query the
    softmax attention over the real keys up to its own position (and itself)."""
    activations, cache = dtypes
    B, H, max_len = 2, 3, 140
    generator = torch.Generator().manual_seed(length * 1000 + T)
    qkv = torch.randn(B, T, 3 * H * 64, generator=generator).to(activations)
    keys = torch.randn(B, H, max_len, 64, generator=generator).to(cache)
    values = torch.randn(B, H, max_len, 64, generator=generator).to(cache)
    real = torch.rand(B, max_len, generator=generator) < 0.7
    got = torch.ops.gpt2.attend(qkv, keys, values, real, torch.tensor([length]))
    q, k, v = qkv.view(B, T, 3, H, 64).unbind(2)
    written = slice(length, length + T)
    assert torch.equal(keys[:, :, written], k.transpose(1, 2).to(cache))
    assert torch.equal(values[:, :, written], v.transpose(1, 2).to(cache))
    expected = _attention_by_definition(q, keys[:, :, : length + T], values[:, :, : length + T], real, length)
    tolerance = 1e-5 if dtypes == (torch.float32, torch.float32) else 2e-2
    assert got.dtype == activations
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_quantised_products_with_gelu_give_the_tanh_gelu_of_the_product(bits: int, variant: str) -> None:
    """An MLP's input layer computes GELU on its output as it writes it: the same as torch's tanh-GELU of
    the plain product, for 1 row (decoding) and many (a prompt), over the GELU's whole range."""
    out, width = 192, 96
    generator = torch.Generator().manual_seed(bits)
    q = torch.randint(-127 if bits == 8 else 0, 128 if bits == 8 else 16, (out, width), generator=generator)
    scales, bias = torch.rand(out, generator=generator) / 50, torch.randn(out, generator=generator)
    if bits == 8:
        q = q.to(torch.int8)
        weight = (ops.int8_blocked(q), scales, ops.row_sums(q))
        def product(x: Tensor, gelu: bool) -> Tensor:
            return torch.ops.gpt2.int8_linear(x, *weight, bias, out, gelu)
    else:
        group_scales = scales[:, None].expand(out, width // 32)
        blocked = ops.int4_blocked(q, group_scales.contiguous(), -8 * group_scales)
        def product(x: Tensor, gelu: bool) -> Tensor:
            return torch.ops.gpt2.int4_linear(x, blocked, bias, out, gelu)
    for rows in [1, 300]:
        x = 10 * torch.randn(rows, width, generator=generator)
        plain = product(x, False)
        assert plain.abs().max() > 8  # both tails of the GELU are exercised
        torch.testing.assert_close(product(x, True), F.gelu(plain, approximate="tanh"), rtol=1e-5, atol=1e-5)
