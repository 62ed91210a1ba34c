"""The hand-written kernels as PyTorch operators (``gpt2.inference.ops``): a call with a wrong dtype,
shape, contiguity or size is one clear ``ValueError`` naming the operator and the argument (never a
crash or a read of memory a tensor does not hold), and compiled decoding calls the same operators as
eager decoding, with the same tokens, at every precision."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from conftest import random_model
from torch import Tensor

from gpt2 import GPT2
from gpt2.inference import ops
from gpt2.inference.load import load_for_inference
from gpt2.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not ops.available("fp32", 64), reason="the hand kernels do not run here")


def _refused(call: Callable[[], Tensor], op: str, *words: str) -> None:
    """``call()`` raises one line: ``torch.ops.gpt2.<op>: ...``, naming each of ``words``."""
    with pytest.raises(ValueError) as raised:
        call()
    message = str(raised.value).splitlines()[0]
    assert message.startswith(f"torch.ops.gpt2.{op}: "), message
    assert all(word in message for word in words), message


def test_the_float_product_refuses_wrong_arguments_in_one_line() -> None:
    torch.manual_seed(0)
    weight = ops.blocked(torch.randn(100, 64))
    x, bias = torch.randn(3, 64), torch.randn(100)
    run = torch.ops.gpt2.blocked_linear
    assert run(x, [weight], bias, 100, False).shape == (3, 100)
    _refused(lambda: run(x.int(), [weight], bias, 100, False), "blocked_linear", "x", "torch.int32")
    _refused(lambda: run(x.bfloat16(), [weight], bias, 100, False), "blocked_linear", "weight", "float32")
    _refused(lambda: run(torch.randn(64, 3).T, [weight], bias, 100, False), "blocked_linear", "contiguous")
    _refused(lambda: run(torch.randn(3, 32), [weight], bias, 100, False), "blocked_linear", "weight", "32")
    _refused(lambda: run(x, [weight], bias, 300, False), "blocked_linear", "out_features=300")
    _refused(lambda: run(x, [weight], bias, 20, False), "blocked_linear", "out_features=20")
    _refused(lambda: run(x, [weight], torch.randn(99), 100, False), "blocked_linear", "bias", "100")
    _refused(lambda: run(x, [], None, 100, False), "blocked_linear", "weight")
    _refused(lambda: run(x, [weight, weight], bias, 200, False), "blocked_linear", "bias")
    _refused(lambda: run(torch.randn(3, 63).bfloat16(), [ops.blocked(torch.randn(64, 63))], None, 64, False),
             "blocked_linear")


def test_the_quantised_products_refuse_wrong_arguments_in_one_line() -> None:
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (100, 64), dtype=torch.int8)
    weight, scales, sums = ops.int8_blocked(q), torch.rand(100), ops.row_sums(q)
    x = torch.randn(2, 64)
    run = torch.ops.gpt2.int8_linear
    assert run(x, weight, scales, sums, None, 100, False).shape == (2, 100)
    _refused(lambda: run(x.double(), weight, scales, sums, None, 100, False), "int8_linear", "x", "float64")
    _refused(lambda: run(x, weight.float(), scales, sums, None, 100, False), "int8_linear", "weight", "int8")
    _refused(lambda: run(x, weight, scales[:50], sums, None, 100, False), "int8_linear", "scales", "100")
    _refused(lambda: run(x, weight, scales, sums.long(), None, 100, False), "int8_linear", "sums", "int32")
    _refused(lambda: run(x, weight, scales, sums, None, 200, False), "int8_linear", "weight", "blocks")
    _refused(lambda: run(torch.randn(2, 40), weight, scales, sums, None, 100, False), "int8_linear", "16")
    packed = ops.int4_blocked(torch.randint(0, 16, (64, 64)), torch.rand(64, 2), torch.rand(64, 2))
    run4 = torch.ops.gpt2.int4_linear
    assert run4(x, packed, None, 64, False).shape == (2, 64)
    _refused(lambda: run4(x, packed, None, 128, False), "int4_linear", "weight", "blocks")
    _refused(lambda: run4(x, packed[:, :1].contiguous(), None, 64, False), "int4_linear", "x's inputs")
    _refused(lambda: run4(x, packed, torch.randn(64).bfloat16(), 64, False), "int4_linear", "bias")


def test_attention_over_the_cache_refuses_wrong_arguments_in_one_line() -> None:
    keys, values = torch.zeros(2, 2, 16, 64), torch.zeros(2, 2, 16, 64)
    real, length = torch.ones(2, 16, dtype=torch.bool), torch.tensor([3])
    qkv = torch.randn(2, 4, 3 * 128)
    run = torch.ops.gpt2.attend
    assert run(qkv, keys, values, real, length).shape == (2, 4, 128)
    _refused(lambda: run(qkv[:, :, :300].contiguous(), keys, values, real, length), "attend", "qkv", "384")
    _refused(lambda: run(torch.randn(3, 4, 384), keys, values, real, length), "attend", "3 rows")
    _refused(lambda: run(qkv, keys, values, real, torch.tensor([14])), "attend", "do not fit")
    _refused(lambda: run(qkv, keys, values[:, :, :8].contiguous(), real, length), "attend", "values")
    _refused(lambda: run(qkv, keys, values, real.int(), length), "attend", "real", "torch.bool")
    _refused(lambda: run(qkv.bfloat16(), keys, values, real, length), "attend", "cache")
    _refused(lambda: run(qkv, keys.transpose(2, 3), values, real, length), "attend", "keys")
    _refused(lambda: run(qkv, keys, values, real, torch.tensor(3)), "attend", "length")


def _operators_called(run: Callable[[], Tensor]) -> Counter:
    """How many times each ``gpt2::`` operator ran in ``run()`` (the profiler's record of the dispatcher)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return Counter(event.name for event in profile.events() if event.name.startswith("gpt2::"))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_compiled_decoding_calls_the_same_operators_as_eager_with_the_same_tokens(precision: str) -> None:
    """The compiled decode step (``--compile``) runs the hand kernels' operators, every product and the
    attention of every layer, in one graph, and gives eager decoding's tokens."""
    def model() -> GPT2:  # the same weights each time
        return random_model(n_layer=2, n_head=1, n_embd=64, vocab_size=300)  # heads of 64: the kernel's

    eager = load_for_inference(model(), precision=precision, device="cpu")
    compiled = load_for_inference(model(), precision=precision, device="cpu", compile=True)
    prompts = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        expected = eager.generate(prompts, max_new_tokens=8, temperature=0)
        assert torch.equal(compiled.generate(prompts, max_new_tokens=8, temperature=0), expected)
        cache = KVCache(compiled.config, 2, 16, dtype=compiled.cache_dtype,
                        attention_dtype=compiled.attention_dtype)
        compiled(prompts, cache=cache)
        compiled.decode_step(prompts[:, :1], cache)  # compiled for this cache (fp32's autotuning runs it)
        called = _operators_called(lambda: compiled.decode_step(prompts[:, :1], cache))
    assert not torch._dynamo.utils.counters["graph_break"]
    products = {"int8": "int8_linear", "int4": "int4_linear"}.get(precision, "blocked_linear")
    head = "int8_linear" if precision.startswith("int") else products  # the quantised models' head: int8
    assert called == Counter({f"gpt2::{products}": 4 * 2, "gpt2::attend": 2}) + Counter({f"gpt2::{head}": 1})
