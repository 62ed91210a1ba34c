"""CTranslate2 runs our checkpoints: a directory written by ``save_pretrained`` goes through its own
converter (``ct2-transformers-converter``, run unchanged as a subprocess), and CTranslate2's greedy
decoding gives exactly our greedy tokens (``gpt2.generation.sampling.generate`` at temperature 0)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_model

from gpt2 import GPT2, Tokenizer
from gpt2.generation.sampling import GenerationConfig, generate

ctranslate2 = pytest.importorskip("ctranslate2")
PROMPTS = ["Hello, world! This is", "ROMEO.\nBut soft, what light", "The capital of France"]
NEW_TOKENS = 16


def converter() -> str:
    """The ``ct2-transformers-converter`` of this environment."""
    beside = Path(sys.executable).parent / "ct2-transformers-converter"
    found = str(beside) if beside.is_file() else shutil.which("ct2-transformers-converter")
    if found is None:
        pytest.skip("ct2-transformers-converter is not installed (pip install ctranslate2)")
    return found


@pytest.fixture(scope="module")
def model(gpt2_tokenizer: Tokenizer) -> GPT2:
    """A small random model over GPT-2's vocabulary whose greedy continuations are not one token over
    and over: its matrices are scaled up five times from the usual N(0, 0.02)."""
    model = random_model(vocab_size=50257, n_layer=2, n_head=2, n_embd=64, n_positions=64, seed=3,
                         tokenizer=gpt2_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def converted(model: GPT2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model saved with save_pretrained, then converted by CTranslate2's converter as it is."""
    saved, out = tmp_path_factory.mktemp("saved"), tmp_path_factory.mktemp("ct2") / "model"
    model.save_pretrained(saved)
    run = subprocess.run([converter(), "--model", str(saved), "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def ours_greedy(model: GPT2, ids: list[int]) -> list[int]:
    """Our greedy continuation of ``ids``: NEW_TOKENS tokens, or those before <|endoftext|>."""
    eot = model.tokenizer.eot_token
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=(eot,))
    new = generate(model, torch.tensor([ids]), config, pad_token_id=eot)[0, len(ids):].tolist()
    return new[: new.index(eot)] if eot in new else new


def test_the_converted_vocabulary_is_ours(converted: Path, model: GPT2) -> None:
    vocabulary = json.loads((converted / "vocabulary.json").read_text(encoding="utf-8"))
    spelled, _ = model.tokenizer.spelled_vocab()
    assert vocabulary == sorted(spelled, key=spelled.__getitem__)
    config = json.loads((converted / "config.json").read_text())
    assert config["bos_token"] == config["eos_token"] == "<|endoftext|>"


def test_ctranslate2_greedy_tokens_equal_ours(converted: Path, model: GPT2) -> None:
    generator = ctranslate2.Generator(str(converted), device="cpu", compute_type="float32", intra_threads=2)
    vocabulary = json.loads((converted / "vocabulary.json").read_text(encoding="utf-8"))
    prompts = [model.tokenizer.encode(text) for text in PROMPTS]
    results = generator.generate_batch([[vocabulary[i] for i in ids] for ids in prompts],
                                       max_length=NEW_TOKENS, sampling_topk=1, include_prompt_in_result=False)
    theirs = [r.sequences_ids[0] for r in results]
    ours = [ours_greedy(model, ids) for ids in prompts]
    assert theirs == ours
    assert all(len(set(tokens)) > 3 for tokens in ours)  # not one token repeated: a real comparison
    streamed = [step.token_id for step in generator.generate_tokens(
        [vocabulary[i] for i in prompts[0]], max_length=NEW_TOKENS, sampling_topk=1)]
    assert streamed == ours[0]
