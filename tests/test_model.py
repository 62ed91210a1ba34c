"""The network: sizes, tying, initialisation, KV cache, padding, dropout and the context limit."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_model

from gpt2 import GPT2, PRESETS, GPT2Config, UserError
from gpt2.kv_cache import KVCache

PUBLISHED_PARAMETERS = {  # the released checkpoints, tied embedding counted once
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


def expected_parameters(c: GPT2Config) -> int:
    """GPT-2's parameter count by hand: embeddings, then per block two LayerNorms (2 * 2d),
    attention (3d^2 + 3d and d^2 + d) and MLP (4d^2 + 4d and 4d^2 + d), then the final LayerNorm."""
    d = c.n_embd
    return c.vocab_size * d + c.n_positions * d + c.n_layer * (12 * d * d + 13 * d) + 2 * d


SMALL_VOCAB = 1000  # the behaviour tests do not need GPT-2's 50,257 embeddings


@pytest.fixture
def tiny() -> GPT2:
    """A random model of the tiny preset's shape, in eval mode."""
    return random_model(SMALL_VOCAB, n_layer=4, n_head=4, n_embd=256, n_positions=256).eval()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_count_of_every_preset(preset: str) -> None:
    config = GPT2Config.from_preset(preset)
    with torch.device("meta"):
        model = GPT2(config)
    assert model.num_parameters() == expected_parameters(config)
    if preset in PUBLISHED_PARAMETERS:
        assert model.num_parameters() == PUBLISHED_PARAMETERS[preset]
    embeddings = (config.vocab_size + config.n_positions) * config.n_embd
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - embeddings


def test_lm_head_is_tied_to_the_token_embedding(tiny: GPT2) -> None:
    assert tiny.lm_head.weight is tiny.transformer.wte.weight
    tiny.train()
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1)
    tiny(torch.randint(0, 100, (2, 8))).sum().backward()
    optimizer.step()  # one update moves both, as they are one tensor
    assert tiny.lm_head.weight is tiny.transformer.wte.weight
    assert sum(p is tiny.transformer.wte.weight for p in tiny.parameters()) == 1


def test_initialisation_statistics() -> None:
    torch.manual_seed(0)
    config = GPT2Config.from_preset("tiny")
    model = GPT2(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    normal = []
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.all(p == 1), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
        else:  # N(0, 0.02), the two projections into the residual stream scaled by 1/sqrt(2 n_layer)
            std = residual_std if name.endswith("c_proj.weight") else 0.02
            assert p.std().item() == pytest.approx(std, rel=0.03), name
            assert abs(p.mean().item()) < 0.03 * std, name  # >= 65,536 samples: 8 standard errors
            normal.append(name)
    assert len(normal) == 2 + 4 * config.n_layer  # wte, wpe and four projections per block


def test_kv_cache_incremental_decoding_equals_full_forward(tiny: GPT2) -> None:
    idx = torch.randint(0, tiny.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = tiny(idx)
        cache = KVCache(tiny.config, batch_size=2, max_len=32)
        steps = [tiny(idx[:, :10], cache=cache)]  # prompt
        steps.append(tiny(idx[:, 10:14], cache=cache))  # a chunk after cached positions
        steps += [tiny(idx[:, t : t + 1], cache=cache) for t in range(14, 24)]  # one token at a time
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        last = tiny(idx, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_rows_equal_the_unpadded_rows(tiny: GPT2) -> None:
    pad = 0
    rows = [torch.randint(1, 1000, (n,)) for n in (9, 5, 7)]
    width = max(len(r) for r in rows)
    idx = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.arange(width) >= width - len(r) for r in rows]).long()
    more = torch.randint(1, 1000, (3, 4))  # then decode 4 tokens per row with the cache
    with torch.no_grad():
        batched = tiny(idx, attention_mask=mask)
        cache = KVCache(tiny.config, batch_size=3, max_len=width + 4)
        tiny(idx, attention_mask=mask, cache=cache)
        decoded = torch.cat([tiny(more[:, t : t + 1], cache=cache) for t in range(4)], dim=1)
        for i, r in enumerate(rows):
            alone = tiny(torch.cat([r, more[i]])[None])
            torch.testing.assert_close(batched[i, width - len(r) :], alone[0, : len(r)], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(decoded[i], alone[0, len(r) :], atol=1e-5, rtol=1e-5)


def test_dropout_rate_is_honoured() -> None:
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("tiny", vocab_size=SMALL_VOCAB, dropout=0.3))
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.3 for p in dropouts)
    assert all(block.attn.dropout == 0.3 for block in model.transformer.h)  # attention weights
    plain = GPT2(GPT2Config.from_preset("tiny", vocab_size=SMALL_VOCAB, dropout=0.0))
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 1000, (2, 16))
    model.train()
    plain.train()
    with torch.no_grad():
        assert not torch.allclose(model(idx), model(idx))  # a fresh mask each call
        torch.testing.assert_close(plain(idx), plain(idx))  # dropout 0: training is deterministic
        block = model.transformer.h[0]
        x = torch.randn(2, 16, model.config.n_embd)
        assert not torch.allclose(block.attn(x, None, None, 0), block.attn(x, None, None, 0))
        model.eval()
        torch.testing.assert_close(model(idx), plain.eval()(idx))  # eval: no dropout at all


def test_sequence_longer_than_the_context_is_a_user_error(tiny: GPT2) -> None:
    n = tiny.config.n_positions
    with pytest.raises(UserError, match="exceeds the context window"):
        tiny(torch.zeros(1, n + 1, dtype=torch.long))
    cache = KVCache(tiny.config, batch_size=1)
    with torch.no_grad():
        tiny(torch.zeros(1, n, dtype=torch.long), cache=cache)
        with pytest.raises(UserError, match="exceeds the context window"):
            tiny(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(UserError, match="exceeds the context window"):
        KVCache(tiny.config, batch_size=1, max_len=n + 1)
