"""Loading for inference: the precision, device and compile choice are made once, at load time, and
generating never changes the model it is given; the KV cache's operations; the command line's shared
model options and its start-up without torch."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_model
from torch import nn

from gpt2 import GPT2, GPT2Config, UserError
from gpt2.cli import VERBS, build_parser
from gpt2.inference.cpu_layers import weight_memory
from gpt2.inference.load import load_for_inference
from gpt2.kv_cache import KVCache


def wide_model(training: bool) -> GPT2:
    """Layers wide enough (>= 2**18 weights) for the oneDNN products, with dropout."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=300, n_positions=64, n_embd=512, n_layer=1, n_head=8, dropout=0.1))
    return model.train(training)


def snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], bool, dict[str, torch.Tensor]]:
    return ([(name, type(m)) for name, m in model.named_modules()], model.training,
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("training", [True, False], ids=["training-mode", "eval-mode"])
def test_generating_leaves_the_model_as_it_was(training: bool) -> None:
    model = wide_model(training)
    before = snapshot(model)
    ids = torch.tensor([[1, 2, 3]])
    model.generate(ids, max_new_tokens=5, temperature=0)
    list(model.stream(ids, max_new_tokens=3, seed=0))
    layers, mode, weights = snapshot(model)
    assert layers == before[0]  # no layer swapped for a faster kind
    assert mode == before[1]
    assert weights.keys() == before[2].keys()
    assert all(torch.equal(weights[k], before[2][k]) for k in weights)


def test_fp32_loading_for_inference_gives_the_same_logits_and_tokens(tmp_path) -> None:
    plain = wide_model(False)
    plain.save_pretrained(tmp_path)
    model = load_for_inference(tmp_path, precision="fp32", device="cpu")
    assert not model.training
    ids = torch.randint(0, 300, (2, 20))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), plain(ids), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0),
                       plain.generate(ids, max_new_tokens=8, temperature=0))


def test_bad_precision_and_device_are_one_line_errors() -> None:
    with pytest.raises(UserError, match=r"unknown precision .fp8.; choose one of: fp32, bf16, int8, int4"):
        load_for_inference(wide_model(False), precision="fp8")
    with pytest.raises(UserError, match="unknown device 'bogus'"):
        load_for_inference(wide_model(False), device="bogus")


def test_both_forward_paths_advance_the_cache_the_same_way() -> None:
    model = wide_model(False)
    ids = torch.randint(0, 300, (2, 6))
    cache = KVCache(model.config, batch_size=2, max_len=10)
    with torch.inference_mode():
        model(ids, cache=cache)
        assert (cache.length, int(cache.slot)) == (6, 6)
        stepped = model.decode_step(ids[:, :1], cache)
        assert (cache.length, int(cache.slot)) == (7, 7)
        assert cache.next_position.tolist() == [7, 7]
        # the same token through the plain forward path gives the same logits and the same cache state
        again = KVCache(model.config, batch_size=2, max_len=10)
        model(ids, cache=again)
        forward = model(ids[:, :1], cache=again)[:, -1]
    torch.testing.assert_close(stepped, forward, atol=1e-5, rtol=1e-5)
    assert (again.length, int(again.slot)) == (7, 7) and torch.equal(again.next_position, cache.next_position)


def test_a_batch_uses_the_cache_s_first_rows() -> None:
    model = wide_model(False)
    ids = torch.randint(0, 300, (2, 5))
    big, small = (
        KVCache(model.config, batch_size=4, max_len=8),
        KVCache(model.config, batch_size=2, max_len=8),
    )
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, cache=big), model(ids, cache=small))
    assert torch.equal(big.keys[0][:2, :, :5], small.keys[0][:, :, :5])
    assert not big.keys[0][2:].any()


INFERENCE_VERBS = [
    ["generate"],
    ["chat"],
    ["task", "summarize"],
    ["serve"],
    ["eval", "perplexity"],
    ["detect"],
]


@pytest.mark.parametrize("verb", INFERENCE_VERBS, ids=" ".join)
def test_every_inference_verb_spells_the_model_options_the_same_way(verb: list[str]) -> None:
    parser = build_parser(verb[0])
    options = {}
    for action in _subparser(parser, verb)._actions:
        for flag in action.option_strings:
            options[flag] = action
    assert options["--precision"].choices == ["fp32", "bf16", "int8", "int4"]
    assert options["--precision"].default == "fp32"
    assert {"--model", "--tokenizer", "--device"} <= options.keys()
    assert not {"--bf16", "--int8", "--dtype"} & options.keys()


def _subparser(parser, names: list[str]):
    for name in names:
        (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        parser = action.choices[name]
    return parser


def _help(*verb: str) -> tuple[str, str]:
    """``gpt2 [VERB] --help`` in a fresh interpreter: whether it imported torch ("True"/"False"), and
    what it printed."""
    code = (
        "import sys, contextlib, io\nfrom gpt2.cli import main\nout = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        f"    main([*{list(verb)!r}, '--help'])\n"
        "print('torch' in sys.modules)\nprint(out.getvalue())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, _, text = result.stdout.partition("\n")
    return loaded, text


def test_gpt2_help_lists_every_verb_without_importing_torch() -> None:
    loaded, text = _help()
    assert loaded == "False"
    assert all(verb in text for verb in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_every_verbs_help_returns_without_importing_torch(verb: str) -> None:
    loaded, text = _help(verb)
    assert text.startswith(f"usage: gpt2 {verb}")
    assert loaded == "False", f"gpt2 {verb} --help imports torch"


def _huge_pages_here() -> bool:
    """Whether this Linux offers 2 MB pages to a program that asks (transparent huge pages not off)."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _huge_pages_here(), reason="needs Linux's transparent huge pages")
def test_a_model_loaded_for_the_cpu_holds_its_large_weights_on_2_mb_pages() -> None:
    """Decoding streams every weight once a token, faster from 2 MB pages: loading moves the weights
    there (the embedding/LM head here, 10 MB)."""
    model = load_for_inference(random_model(vocab_size=5000, n_embd=512, n_head=8), device="cpu")
    memory = max(weight_memory(model).items(), key=lambda item: item[1])
    assert memory[1] >= 5000 * 512 * 4
    huge = 0
    for mapping in Path("/proc/self/smaps").read_text().split("\n")[:-1]:
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", mapping):
            start, end = (int(a, 16) for a in mapping.split()[0].split("-"))
            inside = start <= memory[0] < end
        elif inside and mapping.startswith("AnonHugePages:"):
            huge += int(mapping.split()[1]) * 1024
    assert huge >= 4 * 2**20
