"""The reduced precisions against fp32 on a trained tiny model (random weights would hide what
rounding does to a model that predicts something): the held-out loss each precision gives, the
logits, and greedy tokens; int8 and int4 hold their weights in 8 and 4 bits, the tied embedding
once, and load the same from a checkpoint as from a model in memory; bf16's blocked weights give the
plain ones' values."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BYTES, random_model, random_words
from torch import nn

from gpt2 import GPT2, UserError
from gpt2.inference import kernels, ops
from gpt2.inference.cpu_layers import BlockedHead, HandLinear
from gpt2.inference.load import load_for_inference
from gpt2.inference.quantization import Int4Linear, Int8Embedding, Int8Linear
from gpt2.kv_cache import KVCache

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "her", "dog", "ran"]

# Held-out loss (nats per token) may rise by at most this share over fp32's; the logits may move by
# at most this share of their spread.
LOSS_TOLERANCE = {"bf16": 0.01, "int8": 0.01, "int4": 0.05}
LOGIT_TOLERANCE = {"bf16": 0.03, "int8": 0.05, "int4": 0.15}


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor(BYTES.encode(text))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-128 model trained for 300 steps on text of 10 words: it learns to spell them."""
    model = random_model(n_layer=2, n_head=4, n_embd=128, n_positions=64, seed=0, tokenizer=BYTES)
    data = ids_of(random_words(WORDS, 20000, seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = torch.randint(0, len(data) - 65, (16,), generator=generator)
        batch = torch.stack([data[s : s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    directory = tmp_path_factory.mktemp("trained")
    model.save_pretrained(directory)
    return directory


def held_out_loss(model: GPT2, text: torch.Tensor) -> float:
    windows = text[: len(text) // 64 * 64].view(-1, 64)
    with torch.inference_mode():
        logits = model(windows[:, :-1]).float()
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_each_precision_stays_close_to_fp32_on_a_trained_model(trained: Path, precision: str) -> None:
    fp32 = load_for_inference(trained, device="cpu")
    reduced = load_for_inference(trained, precision=precision, device="cpu")
    text = ids_of(random_words(WORDS, 1500, seed=1))
    base = held_out_loss(fp32, text)
    assert base < 1.5  # it did learn: the bytes of 10 words, far below their letters' entropy (2.7)
    assert held_out_loss(reduced, text) <= base * (1 + LOSS_TOLERANCE[precision])
    prompt = text[:40][None]
    with torch.inference_mode():
        expected, got = fp32(prompt).float(), reduced(prompt).float()
    spread = expected.amax() - expected.amin()
    assert (got - expected).abs().max() <= LOGIT_TOLERANCE[precision] * spread
    same = fp32.generate(prompt, max_new_tokens=24, temperature=0) == reduced.generate(
        prompt, max_new_tokens=24, temperature=0)
    assert same.float().mean() >= 0.9


@pytest.fixture
def pytorch_kernels(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Layers made while ``gpt2.inference.kernels``' kernels are off (``GPT2_MATVEC=0``, as on a CPU they
    cannot run on): fbgemm's and tinygemm's products."""
    monkeypatch.setenv("GPT2_MATVEC", "0")
    kernels.library.cache_clear()
    yield
    monkeypatch.undo()
    kernels.library.cache_clear()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_without_the_hand_kernels_the_quantised_layers_run_on_pytorchs_as_close_to_fp32(
        trained: Path, precision: str, pytorch_kernels: None) -> None:
    model = load_for_inference(trained, precision=precision, device="cpu")
    assert model.lm_head.packed is not None  # fbgemm's packed weight, not the hand kernel's layout
    assert all(not m.hand for m in model.modules() if isinstance(m, Int4Linear))
    fp32 = load_for_inference(trained, device="cpu")
    text = ids_of(random_words(WORDS, 1500, seed=1))
    assert held_out_loss(model, text) <= held_out_loss(fp32, text) * (1 + LOSS_TOLERANCE[precision])


@pytest.mark.parametrize(("precision", "layer"), [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantised_models_hold_low_bit_weights_and_the_embedding_once(
    trained: Path, precision: str, layer: type
) -> None:
    model = load_for_inference(trained, precision=precision, device="cpu")
    assert not any(type(m) is nn.Linear for m in model.modules())
    blocks = [m for m in model.transformer.h.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert len(blocks) == 4 * model.config.n_layer and all(type(m) is layer for m in blocks)
    assert isinstance(model.transformer.wte, Int8Embedding) and model.transformer.wte.head[0] is model.lm_head
    assert model.lm_head.weight.dtype == torch.int8 and model.dtype == torch.float32
    assert model.cache_dtype == torch.bfloat16  # a 16-bit KV cache, as llama.cpp's
    fp32_bytes = 4 * GPT2.from_pretrained(trained).num_parameters()
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert held < fp32_bytes * (0.3 if precision == "int8" else 0.25)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantising_a_loaded_model_equals_quantising_while_loading(trained: Path, precision: str) -> None:
    in_memory = load_for_inference(GPT2.from_pretrained(trained), precision=precision, device="cpu")
    streamed = load_for_inference(trained, precision=precision, device="cpu")
    ids = ids_of("the cat sat on a mat")[None]
    with torch.inference_mode():
        assert torch.equal(in_memory(ids), streamed(ids))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_compiled_quantized_model_generates_the_eager_ones_tokens_in_one_graph(
        trained: Path, precision: str, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    # another model of the same shape, compiled after it in the same process, keeps its own weights
    other = random_model(n_layer=2, n_head=4, n_embd=128, n_positions=64, seed=1, tokenizer=BYTES)
    other.save_pretrained(tmp_path)
    prompts = torch.stack([ids_of("the cat sat"), ids_of("her dog ran")])
    for directory in (trained, tmp_path):
        eager = load_for_inference(directory, precision=precision, device="cpu")
        compiled = load_for_inference(directory, precision=precision, device="cpu", compile=True)
        counters.clear()
        for rows in (prompts, prompts[1:]):  # a batch, then one sequence
            assert torch.equal(compiled.generate(rows, max_new_tokens=16, temperature=0),
                               eager.generate(rows, max_new_tokens=16, temperature=0))
        # fbgemm's int8 products (every layer of int8, int4's LM head) do not split the compiled step
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


@pytest.mark.skipif(not ops.available("bf16", 64), reason="the hand-written kernels do not run here")
def test_bf16_on_the_cpu_multiplies_blocked_weights_with_the_plain_weights_values(trained: Path) -> None:
    model = load_for_inference(trained, precision="bf16", device="cpu")
    plain = GPT2.from_pretrained(trained, dtype=torch.bfloat16).eval()
    layers = [name for name, m in plain.named_modules() if type(m) is nn.Linear]
    assert len(layers) == 4 * model.config.n_layer + 1  # the blocks' and the LM head
    x = torch.randn(3, 5, 4 * model.config.n_embd).bfloat16()
    with torch.inference_mode():
        for name in layers:
            blocked, linear = model.get_submodule(name), plain.get_submodule(name)
            assert type(blocked) is (BlockedHead if name == "lm_head" else HandLinear)
            rows = x[..., : linear.in_features]
            expected = linear(rows)  # the same sums, rounded to bfloat16 from another order at most
            if name.endswith("mlp.c_fc"):  # which computes the MLP's GELU too
                expected = F.gelu(linear(rows).float(), approximate="tanh").bfloat16()
            spread = float(expected.abs().max())
            torch.testing.assert_close(blocked(rows), expected, atol=0.01 * spread, rtol=0.01)
        ids = ids_of("the cat sat on a mat")[None]
        logits, expected = model(ids), plain(ids)
        torch.testing.assert_close(logits, expected, atol=0.02 * float(expected.abs().max()), rtol=0.02)
        # the embedding reads the head's rows: the same bfloat16 values
        assert torch.equal(model.transformer.wte(ids), plain.transformer.wte(ids))
    assert model.cache_dtype == torch.bfloat16 and model.attention_dtype == torch.float32


def test_the_cache_estimate_counts_the_float32_room_of_a_bfloat16_cache() -> None:
    config = random_model(n_layer=4, n_head=2, n_embd=64).config

    def estimate(**attention: torch.dtype) -> float:
        with pytest.raises(UserError, match="needs about") as refused:
            KVCache.check_fits(config, 10**9, 64, torch.bfloat16, **attention)
        return float(str(refused.value).split("needs about ")[1].split(" GiB")[0].replace(",", ""))

    # one layer of float32 keys and values is two layers of bfloat16 ones: 4 layers read as 6
    assert estimate(attention_dtype=torch.float32) / estimate() == pytest.approx(6 / 4, rel=1e-3)
    assert estimate(attention_dtype=torch.bfloat16) == estimate()


def test_int4_prompts_multiply_the_unpacked_weight_with_tinygemms_values(pytorch_kernels: None) -> None:
    torch.manual_seed(0)
    layer = Int4Linear(torch.randn(192, 96) * 0.02, torch.randn(192) * 0.01)  # 192: three blocks of 64
    few, many = torch.randn(1, 8, 96), torch.randn(1, 256, 96)  # tinygemm's rows, and a prompt's
    with torch.inference_mode():
        x = few[0].bfloat16()
        tinygemm = torch._weight_int4pack_mm_for_cpu(x, layer.weight, 32, layer.scales_and_zeros)
        torch.testing.assert_close(F.linear(x, layer.unpacked()), tinygemm, atol=1e-2, rtol=1e-2)
        prompt = layer(many)
        by_rows = torch.cat([layer(many[:, i : i + 8]) for i in range(0, 256, 8)], dim=1)
    assert prompt.dtype == torch.float32 and prompt.shape == (1, 256, 192)
    torch.testing.assert_close(prompt, by_rows, atol=1e-2, rtol=1e-2)


def test_int4_needs_a_width_in_groups_of_32(tmp_path: Path) -> None:
    random_model(n_embd=48, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"int4 needs .* a multiple of 32, not 48"):
        load_for_inference(tmp_path, precision="int4", device="cpu")
    with pytest.raises(UserError, match="int8 runs on the CPU only"):
        load_for_inference(tmp_path, precision="int8", device="meta")


PEAK_OF_LOADING = """
import re, sys
from gpt2.inference.load import load_for_inference
from gpt2.util.memory import release_freed_memory

def status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

model = load_for_inference(sys.argv[1], precision="int8", device="cpu")  # the kernels' code, loaded once
del model
release_freed_memory()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the high-water mark starts again from here
before = status("VmRSS")
model = load_for_inference(sys.argv[1], precision="int8", device="cpu")
print(status("VmHWM") - before)
"""


def test_int8_loading_lets_the_float_embedding_go_before_packing_its_int8_copy(tmp_path: Path) -> None:
    """The float32 embedding (the largest tensor by far here) is never held beside fbgemm's packed
    copy: loading peaks at the float embedding and its int8 values (with a little room), not the float
    one and three int8 ones."""
    random_model(50257, n_layer=1, n_head=8, n_embd=512).save_pretrained(tmp_path)
    float_bytes, int8_bytes = 50257 * 512 * 4, 50257 * 512
    done = subprocess.run([sys.executable, "-c", PEAK_OF_LOADING, str(tmp_path)], capture_output=True,
                          text=True, check=True)
    peak = int(done.stdout.split()[-1])
    assert peak < float_bytes + 2 * int8_bytes, f"loading peaked {peak / 2**20:.0f} MiB above its start"


@pytest.mark.slow
def test_every_model_compiled_in_a_process_gets_compiled_steps() -> None:
    """torch.compile keeps at most ``recompile_limit`` graphs per code object (8; 2 here, so that two
    models show it), and a model's step makes two (one row, several): had the models shared one code
    object, the fifth model of a process (here the second) would silently run eager."""
    from torch._dynamo.utils import counters

    prompts = torch.stack([ids_of("the cat"), ids_of("her dog")])
    with torch._dynamo.config.patch(recompile_limit=2):
        for seed in range(2):
            eager = load_for_inference(random_model(n_layer=1, n_head=2, n_embd=64, seed=seed),
                                       precision="int8", device="cpu")
            compiled = load_for_inference(random_model(n_layer=1, n_head=2, n_embd=64, seed=seed),
                                          precision="int8", device="cpu", compile=True)
            counters.clear()
            for rows in (prompts, prompts[1:]):
                assert torch.equal(compiled.generate(rows, max_new_tokens=4, temperature=0),
                                   eager.generate(rows, max_new_tokens=4, temperature=0))
            assert counters["stats"]["unique_graphs"] == 2, f"model {seed + 1} ran eager"
