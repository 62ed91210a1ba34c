"""Generation: greedy parity with transformers, the sampling filters on known distributions, seeds,
stops, streaming and UTF-8, the context window, the text API and the speed options."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import BYTES, random_model
from torch import nn

from gpt2 import GPT2, GPT2Config, UserError
from gpt2.generation.logits import next_token
from gpt2.generation.sampling import (
    ContextWindowReached,
    GenerationConfig,
    IncrementalDecoder,
    encode_prompt,
    generate,
    generate_text,
    stream_text,
)
from gpt2.inference import ops
from gpt2.inference.cpu_layers import (
    BlockedHead,
    BlockedLinear,
    HandLinear,
    OneDNNLinear,
    intel_cpu,
    onednn_linears,
)
from gpt2.inference.load import load_for_inference
from gpt2.tokenizer.bpe import Tokenizer

transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------------
# Fixtures: a transformers GPT-2 and the same weights in ours; a tiny model over bytes


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, GPT2]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return hf, GPT2.from_pretrained(directory)


def hf_greedy(hf: object, ids: torch.Tensor, new: int, mask: torch.Tensor | None = None, **kw: object):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                           max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                           eos_token_id=None, **kw)


@pytest.fixture(scope="module")
def byte_model() -> GPT2:
    """The tiny preset's shape with a 64-token window over BYTES: every byte a token, so characters
    span tokens."""
    return random_model(n_layer=4, n_head=4, n_embd=256, n_positions=64, seed=1, tokenizer=BYTES).eval()


# ----------------------------------------------------------------------------------------------------
# Greedy decoding is transformers' greedy decoding, token for token


def test_greedy_matches_transformers_single_prompt(hf_and_ours) -> None:
    hf, ours = hf_and_ours
    ids = torch.randint(1, 512, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = hf_greedy(hf, ids, 40)
    assert torch.equal(ours.generate(ids, max_new_tokens=40, temperature=0), expected)


def test_greedy_matches_transformers_padded_batch(hf_and_ours) -> None:
    hf, ours = hf_and_ours
    lengths = [9, 4, 7, 1]
    ids = torch.randint(1, 512, (len(lengths), 9), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 9 - n :] = 1
    ids = ids * mask  # left padding with id 0
    expected = hf_greedy(hf, ids, 30, mask)
    assert torch.equal(ours.generate(ids, max_new_tokens=30, temperature=0, attention_mask=mask), expected)
    # Each row alone gives the same tokens: padding changes nothing.
    for row, n in enumerate(lengths):
        alone = ours.generate(ids[row : row + 1, 9 - n :], max_new_tokens=30, temperature=0)
        assert torch.equal(alone[0, n:], expected[row, 9:])


def test_repetition_penalty_matches_transformers(hf_and_ours) -> None:
    hf, ours = hf_and_ours
    ids = torch.randint(1, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = hf_greedy(hf, ids, 30, repetition_penalty=1.5)
    assert torch.equal(ours.generate(ids, max_new_tokens=30, temperature=0, repetition_penalty=1.5), expected)
    assert not torch.equal(expected, hf_greedy(hf, ids, 30))  # the penalty did change something


def test_frequency_presence_penalties_and_logit_bias_follow_their_definitions(byte_model: GPT2) -> None:
    # A cache-free reference: the whole text through the model every step, penalties counted by hand.
    ids, steps = [72, 105, 32, 104, 105, 32], 20
    bias = {ord("e"): 3.0, ord(" "): -2.0}
    text = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = byte_model(torch.tensor([text]))[0, -1].clone()
            for token, count in Counter(text[len(ids) :]).items():
                logits[token] -= 0.8 * count + 0.6
            for token, b in bias.items():
                logits[token] += b
            text.append(int(logits.argmax()))
    settings = dict(frequency_penalty=0.8, presence_penalty=0.6, logit_bias=bias)
    out = byte_model.generate(torch.tensor([ids]), max_new_tokens=steps, temperature=0, **settings)
    assert out[0].tolist() == text
    assert (
        out[0].tolist()
        != byte_model.generate(torch.tensor([ids]), max_new_tokens=steps, temperature=0)[0].tolist()
    )


# ----------------------------------------------------------------------------------------------------
# The filters on known distributions


def draw(probs: list[float], n: int = 40_000, **settings: object) -> torch.Tensor:
    """Frequencies of each token over ``n`` draws from ``probs`` with ``settings``."""
    logits = torch.tensor(probs).log().expand(n, -1)
    config = GenerationConfig(**settings)
    tokens = next_token(logits, config, generator=torch.Generator().manual_seed(0))
    return torch.bincount(tokens, minlength=len(probs)).float() / n


def assert_frequencies(freq: torch.Tensor, expected: list[float]) -> None:
    expected = torch.tensor(expected)
    assert torch.all(freq[expected == 0] == 0), f"drew tokens outside the allowed set: {freq}"
    # 5 standard deviations of a binomial frequency over 40,000 draws
    tolerance = 5 * (expected * (1 - expected) / 40_000).sqrt() + 1e-9
    assert torch.all((freq - expected).abs() <= tolerance), (freq, expected)


PROBS = [0.4, 0.05, 0.3, 0.15, 0.1]


def test_top_k_draws_only_the_k_likeliest_in_proportion() -> None:
    assert_frequencies(draw(PROBS, top_k=2), [0.4 / 0.7, 0, 0.3 / 0.7, 0, 0])
    assert_frequencies(draw(PROBS, top_k=1), [1, 0, 0, 0, 0])
    assert_frequencies(draw(PROBS, top_k=0), PROBS)  # 0 = off


def test_min_p_drops_tokens_below_a_share_of_the_likeliest() -> None:
    # PROBS: 0.4, 0.05, 0.3, 0.15, 0.1; min_p 0.3 keeps p >= 0.12, min_p 0.2 keeps p >= 0.08
    assert_frequencies(draw(PROBS, min_p=0.3), [0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85, 0])
    assert_frequencies(draw(PROBS, min_p=0.2), [0.4 / 0.95, 0, 0.3 / 0.95, 0.15 / 0.95, 0.1 / 0.95])
    assert_frequencies(draw(PROBS, min_p=1.0), [1, 0, 0, 0, 0])
    assert_frequencies(draw(PROBS, min_p=0.0), PROBS)
    # After the temperature: at T = 0.5 the probabilities go as p², and min_p 0.05 of 0.16 drops 0.0025.
    squared = [0.16, 0, 0.09, 0.0225, 0.01]
    assert_frequencies(draw(PROBS, min_p=0.05, temperature=0.5), [p / sum(squared) for p in squared])


def test_top_p_draws_from_the_smallest_set_reaching_p() -> None:
    assert_frequencies(draw(PROBS, top_p=0.65), [0.4 / 0.7, 0, 0.3 / 0.7, 0, 0])  # 0.4 + 0.3 >= 0.65
    assert_frequencies(draw(PROBS, top_p=0.8), [0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85, 0])
    assert_frequencies(draw(PROBS, top_p=0.1), [1, 0, 0, 0, 0])
    assert_frequencies(draw(PROBS, top_p=1.0), PROBS)


def test_temperature_reshapes_the_distribution() -> None:
    tempered = [p ** (1 / 2.0) for p in PROBS]
    assert_frequencies(draw(PROBS, temperature=2.0), [t / sum(tempered) for t in tempered])
    # top-k, then top-p, on the tempered distribution: {0, 2} of the tempered top 3
    top3 = [tempered[0], 0, tempered[2], tempered[3], 0]
    assert_frequencies(draw(PROBS, temperature=2.0, top_k=3), [t / sum(top3) for t in top3])
    assert torch.equal(draw(PROBS, n=10, temperature=0), torch.tensor([1.0, 0, 0, 0, 0]))


# ----------------------------------------------------------------------------------------------------
# Seeds, samples, stops


def test_fixed_seed_is_reproducible(byte_model: GPT2) -> None:
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    first = byte_model.generate(ids, max_new_tokens=30, seed=7)
    assert torch.equal(byte_model.generate(ids, max_new_tokens=30, seed=7), first)
    assert torch.equal(
        byte_model.generate(ids, max_new_tokens=30, generator=torch.Generator().manual_seed(7)), first
    )
    assert not torch.equal(byte_model.generate(ids, max_new_tokens=30, seed=8), first)


def test_several_samples_per_prompt(byte_model: GPT2) -> None:
    ids = torch.tensor([[72, 101, 108], [0, 111, 33]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = byte_model.generate(ids, max_new_tokens=12, seed=0, num_samples=3, attention_mask=mask)
    assert out.shape == (6, 15)
    assert torch.equal(out[:3, :3], ids[:1].expand(3, -1)) and torch.equal(out[3:, :3], ids[1:].expand(3, -1))
    assert len({tuple(row) for row in out[:3].tolist()}) == 3  # samples differ
    greedy = byte_model.generate(ids[:1], max_new_tokens=12, temperature=0, num_samples=2)
    assert torch.equal(greedy[0], greedy[1])


def test_stop_token_ends_a_row_and_pads_it(byte_model: GPT2) -> None:
    ids = torch.tensor([[72, 101, 108], [87, 111, 119]])
    free = byte_model.generate(ids, max_new_tokens=20, temperature=0)
    stop = int(free[0, 3 + 5])  # the 6th new token of row 0
    first = (free[0, 3:] == stop).nonzero()[0, 0].item()
    out = byte_model.generate(ids, max_new_tokens=20, temperature=0, stop_token_ids=[stop], pad_token_id=0)
    assert torch.equal(out[0, : 3 + first + 1], free[0, : 3 + first + 1])
    assert torch.all(out[0, 3 + first + 1 :] == 0)
    row1 = (free[1, 3:] == stop).nonzero()
    end = 3 + (int(row1[0, 0]) + 1 if len(row1) else 20)
    assert torch.equal(out[1, :end], free[1, :end])


def test_stop_strings_cut_the_text(byte_model: GPT2) -> None:
    def plain(text: str) -> bool:
        return len(text) == 2 and text.isprintable() and "\ufffd" not in text

    # The first seed whose sample has two plain characters at 10:12 to stop at.
    seed, free = next(
        (seed, text)
        for seed in range(100)
        for text in generate_text(byte_model, BYTES, "ab", GenerationConfig(max_new_tokens=40, seed=seed))
        if plain(text[10:12])
    )
    stop = free[10:12]
    cut = generate_text(
        byte_model, BYTES, "ab", GenerationConfig(max_new_tokens=40, seed=seed, stop_strings=[stop])
    )[0]
    assert cut == free[: free.index(stop)]
    pieces = stream_text(
        byte_model, BYTES, "ab", GenerationConfig(max_new_tokens=40, seed=seed, stop_strings=[stop])
    )
    streamed = "".join(pieces)
    assert streamed == cut


# ----------------------------------------------------------------------------------------------------
# Text: streaming, UTF-8, the empty prompt, batches


@pytest.mark.parametrize("seed", range(4))
def test_streaming_yields_exactly_the_text_and_never_splits_characters(byte_model: GPT2, seed: int) -> None:
    prompt = "日本語と絵文字 🎉: "
    settings = dict(max_new_tokens=34, seed=seed, temperature=1.5)
    pieces = list(stream_text(byte_model, BYTES, prompt, GenerationConfig(**settings)))
    (text,) = generate_text(byte_model, BYTES, prompt, GenerationConfig(**settings))
    assert "".join(pieces) == text
    # Byte tokens make invalid UTF-8 and incomplete characters common; a split would show as extra
    # U+FFFD in the pieces compared with decoding the whole.
    assert sum(p.count("\ufffd") for p in pieces) == text.count("\ufffd")


@pytest.mark.parametrize("text", ["你好，世界！日本語のテキスト", "emoji 🎉👍🏽👨‍👩‍👧 and 한국어", "ü é ñ ß"])
def test_incremental_decoder_keeps_characters_whole(text: str, gpt2_ranks_file: Path) -> None:
    tokenizer = Tokenizer.from_file(gpt2_ranks_file)
    ids = tokenizer.encode(text)
    assert (
        any(
            tokenizer.decode_bytes([i]).decode("utf-8", "replace") != tokenizer.decode([i])
            or "\ufffd" in tokenizer.decode([i])
            for i in ids
        )
        or text == "ü é ñ ß"
    )
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_empty_prompt_starts_from_endoftext(byte_model: GPT2) -> None:
    assert encode_prompt(BYTES, "") == [BYTES.eot_token]
    (text,) = generate_text(byte_model, BYTES, "", GenerationConfig(max_new_tokens=20, temperature=0))
    ids = generate(byte_model, torch.tensor([[BYTES.eot_token]]),
                   GenerationConfig(max_new_tokens=20, temperature=0, stop_token_ids=[BYTES.eot_token]))
    new = [t for t in ids[0, 1:].tolist() if t != BYTES.eot_token]
    assert text == BYTES.decode(new)


def test_a_batch_of_prompts_gives_each_prompt_its_own_completion(byte_model: GPT2) -> None:
    prompts = ["a", "a much longer prompt", "", "μέτριο"]
    batch = generate_text(byte_model, BYTES, prompts, GenerationConfig(max_new_tokens=15, temperature=0))
    alone = [
        generate_text(byte_model, BYTES, p, GenerationConfig(max_new_tokens=15, temperature=0))[0]
        for p in prompts
    ]
    assert batch == alone


def test_token_stream_matches_generate(byte_model: GPT2) -> None:
    ids = torch.tensor([[1, 2, 3]])
    steps = list(byte_model.stream(ids, max_new_tokens=10, seed=5))
    assert torch.equal(
        torch.stack([t for t, _ in steps], dim=1), byte_model.generate(ids, max_new_tokens=10, seed=5)[:, 3:]
    )


# ----------------------------------------------------------------------------------------------------
# The context window


def test_prompt_longer_than_the_window_needs_truncation(byte_model: GPT2) -> None:
    ids = torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="exceeds the context window"):
        byte_model.generate(ids, max_new_tokens=4, temperature=0)
    out = byte_model.generate(ids, max_new_tokens=4, temperature=0, truncate=True)
    assert torch.equal(
        out, byte_model.generate(ids[:, -60:], max_new_tokens=4, temperature=0)
    )  # keeps 64 - 4


def test_generation_stops_at_the_window_with_a_message(byte_model: GPT2) -> None:
    ids = torch.tensor([[1] * 50])
    with pytest.raises(UserError, match=r"max_new_tokens \(20\) exceeds the context window \(64\)"):
        byte_model.generate(ids, max_new_tokens=20, temperature=0)
    with pytest.warns(ContextWindowReached, match="stopped at the context window"):
        out = byte_model.generate(ids, max_new_tokens=20, temperature=0, at_window="stop")
    assert out.shape == (1, 64)
    assert torch.equal(out, byte_model.generate(ids, max_new_tokens=14, temperature=0))


def test_sliding_window_keeps_generating_from_the_last_half(byte_model: GPT2) -> None:
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = byte_model.generate(ids, max_new_tokens=100, temperature=0, at_window="slide")
    assert out.shape == (1, 110)
    assert torch.equal(out[:, :64], byte_model.generate(ids, max_new_tokens=54, temperature=0))
    # The first slide happens when 65 tokens exist: the model then sees the last 32 of them.
    with torch.no_grad():
        expected = byte_model(out[:, 65 - 32 : 65])[0, -1].argmax()
    assert out[0, 65] == expected


# ----------------------------------------------------------------------------------------------------
# Bad settings: one-line errors


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=100), "exceeds the context window"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
        (dict(frequency_penalty=2.5), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(presence_penalty=-3), r"presence_penalty must be in \[-2, 2\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(logit_bias={"a": 1.0}), "logit_bias keys must be token ids"),
        (dict(logit_bias={10**6: 1.0}), "beyond the vocabulary"),
        (dict(at_window="wrap"), "at_window must be"),
    ],
)
def test_bad_settings_are_one_line_errors(byte_model: GPT2, settings: dict, message: str) -> None:
    settings = {"max_new_tokens": 5, **settings}
    with pytest.raises(UserError, match=message) as error:
        byte_model.generate(torch.tensor([[1, 2]]), **settings)
    assert "\n" not in str(error.value)


def test_unknown_model_path_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as error:
        GPT2.from_pretrained(tmp_path / "no-such-model")
    assert "no-such-model" in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------
# Speed options


def test_default_preparation_changes_no_value_and_no_output(hf_and_ours, tmp_path: Path) -> None:
    hf, ours = hf_and_ours
    model = GPT2(ours.config)
    model.load_state_dict(ours.state_dict())
    load_for_inference(model, device="cpu")
    if isinstance(model.lm_head, BlockedHead):  # tied: the embedding reads the head's blocks
        assert model.transformer.wte.head[0] is model.lm_head
    else:
        assert model.lm_head.weight is model.transformer.wte.weight
    for (name, a), b in zip(ours.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(1, 512, (2, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.generate(ids, max_new_tokens=20, temperature=0), hf_greedy(hf, ids, 20))
    model.save_pretrained(tmp_path)  # still saves
    assert torch.equal(GPT2.from_pretrained(tmp_path).transformer.wte.weight, ours.transformer.wte.weight)


def _same_logits_and_greedy_tokens(model: GPT2, plain: GPT2) -> torch.Tensor:
    """Check ``model``'s logits and greedy tokens (of 3 and of 1 sequence) against ``plain``'s;
    returns the prompts."""
    ids = torch.randint(0, 1024, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.allclose(model(ids), plain(ids), atol=1e-5, rtol=1e-4)
        expected = ids
        for _ in range(12):  # greedy by whole forward passes
            expected = torch.cat([expected, plain(expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(model.generate(ids, max_new_tokens=12, temperature=0), expected)
    # one sequence: its products of one row run on MKL on Intel CPUs, on oneDNN elsewhere
    assert torch.equal(model.generate(ids[:1], max_new_tokens=12, temperature=0), expected[:1])
    return ids


def _wide_pair() -> tuple[GPT2, GPT2]:
    """A model wide enough (256) that every product moves to oneDNN, and its copy."""
    config = GPT2Config(vocab_size=1024, n_positions=64, n_embd=256, n_layer=2, n_head=4)
    plain = GPT2(config).eval()  # the reference: PyTorch's own products, never prepared or generated with
    model = GPT2(config)
    model.load_state_dict(plain.state_dict())
    return plain, model


def test_fp32_inference_on_the_cpu_gives_the_same_logits_tokens_and_weights(tmp_path: Path) -> None:
    plain, model = _wide_pair()
    load_for_inference(model, device="cpu")  # fp32 on the CPU: the hand kernels' or oneDNN's products
    hand = not intel_cpu() and ops.available("fp32", 256)
    blocks = OneDNNLinear if intel_cpu() else HandLinear if hand else BlockedLinear
    head = BlockedHead if hand else OneDNNLinear
    assert isinstance(model.lm_head, head) and isinstance(model.transformer.h[1].mlp.c_fc, blocks)
    ids = _same_logits_and_greedy_tokens(model, plain)
    state = model.state_dict()  # the blocked weights' plain copies, in the model's order
    assert list(state) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(state.values(), plain.state_dict().values(), strict=True))
    model.save_pretrained(tmp_path)
    assert torch.equal(GPT2.from_pretrained(tmp_path).transformer.h[0].attn.c_attn.weight,
                       plain.transformer.h[0].attn.c_attn.weight)
    other = GPT2(plain.config).eval()
    model.load_state_dict(other.state_dict())  # loading reorders the new weights
    with torch.inference_mode():
        assert torch.allclose(model(ids), other(ids), atol=1e-5, rtol=1e-4)


def test_onednn_products_give_the_same_logits_and_tokens() -> None:
    plain, model = _wide_pair()
    onednn_linears(model)  # the plain weights' products on oneDNN (fp32's LM head; Intel CPUs' layers)
    assert all(isinstance(m, OneDNNLinear) for m in (model.lm_head, model.transformer.h[1].mlp.c_proj))
    ids = _same_logits_and_greedy_tokens(model, plain)
    assert not any(isinstance(m, OneDNNLinear) for m in plain.modules())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():  # autocast still applies
        assert model(ids).dtype == torch.bfloat16
    assert isinstance(model.transformer.h[0].mlp.act, nn.Identity)  # GELU is computed in c_fc's product
    logits = model(ids)  # with gradients: PyTorch's products, and still the GELU
    assert torch.allclose(logits, plain(ids), atol=1e-5, rtol=1e-4)
    logits.logsumexp(-1).mean().backward()  # still trainable: gradients flow as before
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens() -> None:
    config = GPT2Config(vocab_size=1024, n_positions=64, n_embd=256, n_layer=2, n_head=4)
    plain = GPT2(config).eval()
    model = GPT2(config)
    model.load_state_dict(plain.state_dict())
    load_for_inference(model, device="cpu", compile=True)  # about 30 s of compilation on 2 cores
    ids = torch.randint(0, 1024, (3, 11), generator=torch.Generator().manual_seed(6))
    for rows in (ids, ids[:1]):  # a batch, and one sequence (its own graph, its products autotuned)
        assert torch.equal(
            model.generate(rows, max_new_tokens=12, temperature=0),
            plain.generate(rows, max_new_tokens=12, temperature=0),
        )


def test_bf16_weights_generate_close_to_fp32(byte_model: GPT2) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    model = GPT2(byte_model.config)
    model.load_state_dict(byte_model.state_dict())
    load_for_inference(model, precision="bf16", device="cpu")
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    with torch.no_grad():
        expected, got = byte_model(ids)[0, -1], model(ids)[0, -1].float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max() + 0.05
    out = model.generate(ids, max_new_tokens=10, temperature=0)
    assert out.shape == (1, 14) and out.dtype == torch.long


def test_generation_under_bf16_autocast_matches_bf16_logits(byte_model: GPT2) -> None:
    # The trainer prints samples from an fp32 model under bf16 autocast: the fp32 cache takes bf16 keys.
    ids = torch.tensor([[72, 101, 108, 108, 111]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = byte_model.generate(ids, max_new_tokens=8, temperature=0)
        full = byte_model(out[:, :-1])
    assert out.shape == (1, 13)
    assert torch.equal(full[0, 4:].argmax(-1), out[0, 5:])


def test_int8_quantisation_generates_close_to_fp32(byte_model: GPT2) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    model = GPT2(byte_model.config)
    model.load_state_dict(byte_model.state_dict())
    model.generate(ids, max_new_tokens=1)  # generating first leaves every layer for quantisation to take
    model = load_for_inference(model, precision="int8", device="cpu")
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        expected, got = byte_model(ids)[0, -1], model(ids)[0, -1]
    assert math.isfinite(float(got.sum()))
    assert (got - expected).abs().max() < 0.1 * expected.abs().max() + 0.1
    assert model.generate(ids, max_new_tokens=10, temperature=0).shape == (1, 14)
