"""Checkpoints: parity with transformers in both directions, the published layout, and bad inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpt2 import GPT2, GPT2Config, Tokenizer, UserError
from gpt2 import checkpoints as ckpt
from gpt2.cli import main
from gpt2.tokenizer.bpe import train_tokenizer

TOLERANCE = 1e-4  # max |logit difference| in fp32


def hf_model(preset: str) -> transformers.GPT2LMHeadModel:
    """A randomly initialised transformers GPT-2 of the preset's shape, in eval mode."""
    c = GPT2Config.from_preset(preset)
    hc = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(hc).eval()


def perturb(model: torch.nn.Module) -> None:
    """Noise on every parameter, so biases and LayerNorms are not at their trivial init values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def max_logit_diff(
    ours: GPT2, theirs: transformers.GPT2LMHeadModel, batch: int = 2, length: int = 32
) -> float:
    """max |logit difference| on random token ids."""
    torch.manual_seed(1)
    idx = torch.randint(0, ours.config.vocab_size, (batch, length))
    with torch.no_grad():
        return (ours(idx) - theirs(idx).logits).abs().max().item()


def assert_tied(model: GPT2) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(p.is_meta for p in model.parameters())


def load_transformers_quietly(directory: Path, capfd: pytest.CaptureFixture) -> transformers.GPT2LMHeadModel:
    """transformers' own loader, asserting that it reports no missing, unexpected or mismatched key."""
    capfd.readouterr()
    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    assert "[transformers]" not in capfd.readouterr().err  # no warning of any kind
    return theirs.eval()


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.GPT2LMHeadModel]:
    """A perturbed random transformers GPT-2 of the tiny shape, saved by transformers."""
    theirs = hf_model("tiny")
    perturb(theirs)
    directory = tmp_path_factory.mktemp("hf-tiny")
    theirs.save_pretrained(directory)
    return directory, theirs


# --- Parity with transformers ---------------------------------------------------------------------


def test_transformers_checkpoint_loads_with_the_same_logits(tiny_hf_dir) -> None:
    directory, theirs = tiny_hf_dir
    ours = GPT2.from_pretrained(directory)
    assert_tied(ours)
    assert not ours.training and ours.tokenizer is None
    assert ours.config == GPT2Config.from_preset("tiny", dropout=0.1)  # transformers' default pdrop
    assert max_logit_diff(ours, theirs) < TOLERANCE


def test_our_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path: Path, capfd) -> None:
    torch.manual_seed(0)
    ours = GPT2(GPT2Config.from_preset("tiny", dropout=0.2)).eval()
    perturb(ours)
    ours.save_pretrained(tmp_path)
    theirs = load_transformers_quietly(tmp_path, capfd)
    assert theirs.config.resid_pdrop == theirs.config.attn_pdrop == theirs.config.embd_pdrop == 0.2
    assert max_logit_diff(ours, theirs) < TOLERANCE
    again = GPT2.from_pretrained(tmp_path)  # and back: the same weights, bit for bit
    assert again.config == ours.config
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_full_124m_shape_both_directions(tmp_path: Path, capfd) -> None:
    """Ours (random) -> our files -> transformers, then that transformers model -> its own files ->
    ours: one random initialisation of 124M parameters serves both directions."""
    torch.manual_seed(0)
    ours = GPT2(GPT2Config.from_preset("gpt2")).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = load_transformers_quietly(tmp_path / "ours", capfd)
    assert max_logit_diff(ours, theirs, batch=1, length=16) < TOLERANCE
    del ours
    theirs.save_pretrained(tmp_path / "theirs")
    ours = GPT2.from_pretrained(tmp_path / "theirs")
    assert ours.num_parameters() == 124_439_808
    assert max_logit_diff(ours, theirs, batch=1, length=16) < TOLERANCE


def published_layout(theirs: transformers.GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """The tensors as in the original `gpt2` hub files: no `transformer.` prefix, causal-mask buffers."""
    n = theirs.config.n_positions
    state = {k.removeprefix("transformer."): v.clone() for k, v in theirs.state_dict().items()}
    del state["lm_head.weight"]
    for i in range(theirs.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_published_layout_and_formats(tiny_hf_dir, tmp_path: Path, fmt: str) -> None:
    source, theirs = tiny_hf_dir
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    state = published_layout(theirs)
    if fmt == "safetensors":
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":  # with the tied lm_head.weight, as old transformers versions saved it
        torch.save({**state, "lm_head.weight": state["wte.weight"].clone()}, tmp_path / "pytorch_model.bin")
    else:
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[::2],
                  "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: state[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours = GPT2.from_pretrained(tmp_path)
    assert_tied(ours)
    assert max_logit_diff(ours, theirs) < TOLERANCE


def test_dtype_is_kept_or_converted(tiny_hf_dir, tmp_path: Path) -> None:
    directory, _ = tiny_hf_dir
    half = GPT2.from_pretrained(directory, dtype=torch.bfloat16)
    assert_tied(half)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    half.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    again = GPT2.from_pretrained(tmp_path)  # the checkpoint's dtype by default
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert torch.equal(again.transformer.h[0].attn.c_attn.weight, half.transformer.h[0].attn.c_attn.weight)


def test_run_directory_follows_latest(tiny_hf_dir, tmp_path: Path) -> None:
    directory, theirs = tiny_hf_dir
    ours = GPT2.from_pretrained(directory)
    ours.save_pretrained(tmp_path / "step-00100")
    (tmp_path / "latest").write_text("step-00100\n")
    assert max_logit_diff(GPT2.from_pretrained(tmp_path), theirs) < TOLERANCE
    (tmp_path / "latest").write_text("step-00200\n")
    with pytest.raises(UserError, match=r"latest names .*step-00200, which holds no config.json"):
        GPT2.from_pretrained(tmp_path)


def test_hub_names_go_through_huggingface_hub(tiny_hf_dir, tmp_path: Path, monkeypatch) -> None:
    """Offline, with a local hub cache holding one snapshot: a hub name loads from it, also where a
    local directory of that name holds no model; an unknown name is a one-line error."""
    directory, theirs = tiny_hf_dir
    cache, work = tmp_path / "cache", tmp_path / "work"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    revision = "0" * 40
    repo = cache / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snapshot / f).write_bytes((directory / f).read_bytes())
    (work / "someone" / "tiny-gpt2").mkdir(parents=True)  # like ./gpt2, the package, in the repo root
    (work / "empty").mkdir()
    monkeypatch.chdir(work)
    assert max_logit_diff(GPT2.from_pretrained("someone/tiny-gpt2"), theirs) < TOLERANCE
    message = load_error("someone/no-such-model")
    assert message.startswith("someone/no-such-model does not exist, and the Hugging Face hub could not")
    message = load_error("empty")
    assert message.startswith("empty holds no config.json") and "the Hugging Face hub could not" in message


def test_loading_a_local_model_leaves_the_hub_client_unimported(tiny_hf_dir) -> None:
    """huggingface_hub and its HTTP stack (12 MB resident) are imported only to download a model."""
    directory, _ = tiny_hf_dir
    code = ("import sys; from gpt2 import GPT2; GPT2.from_pretrained(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith(('huggingface_hub', 'httpx'))))")
    done = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_tokenizer_travels_with_the_checkpoint(tmp_path: Path, gpt2_ranks_file: Path, capfd) -> None:
    tokenizer = Tokenizer.from_file(gpt2_ranks_file)
    ours = GPT2(GPT2Config.from_preset("tiny"), tokenizer=tokenizer)
    ours.save_pretrained(tmp_path)
    loaded = GPT2.from_pretrained(tmp_path)
    text = "Hello world! It's 2024 <|endoftext|> naïve café 🤗 日本語\n\n\tdone"
    assert loaded.tokenizer is not None and loaded.tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded.tokenizer.eot_token == 50256
    load_transformers_quietly(tmp_path, capfd)  # the tokenizer files do not disturb transformers


def test_custom_vocabulary_checkpoint(tmp_path: Path, capfd) -> None:
    """A model over a trained vocabulary: its <|endoftext|> id, not GPT-2's, is bos/eos in config.json."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    tokenizer = train_tokenizer([corpus], vocab_size=300)
    ours = GPT2(GPT2Config.from_preset("tiny", vocab_size=tokenizer.n_vocab), tokenizer=tokenizer).eval()
    ours.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tokenizer.eot_token < tokenizer.n_vocab
    assert GPT2.from_pretrained(tmp_path / "model").tokenizer.encode("the fox") == tokenizer.encode("the fox")
    theirs = load_transformers_quietly(tmp_path / "model", capfd)
    assert max_logit_diff(ours, theirs) < TOLERANCE
    ours.tokenizer = None  # without its tokenizer, no id can be claimed for <|endoftext|>
    ours.save_pretrained(tmp_path / "bare")
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    assert config["eos_token_id"] is None and GPT2.from_pretrained(tmp_path / "bare").tokenizer is None
    load_transformers_quietly(tmp_path / "bare", capfd)


# --- Saving ---------------------------------------------------------------------------------------


def test_saved_files_are_in_the_published_layout(tmp_path: Path) -> None:
    config = GPT2Config.from_preset("tiny")
    ours = GPT2(config)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors and all(k.startswith("transformer.") for k in tensors)
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (config.n_embd, 4 * config.n_embd)  # Conv1D
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gpt2" and saved["architectures"] == ["GPT2LMHeadModel"]
    assert saved["n_ctx"] == saved["n_positions"] == config.n_positions
    assert saved["tie_word_embeddings"] is True and saved["eos_token_id"] == 50256


def test_a_failed_save_leaves_the_old_checkpoint_intact(tiny_hf_dir, tmp_path: Path, monkeypatch) -> None:
    directory, theirs = tiny_hf_dir
    GPT2.from_pretrained(directory).save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):  # the disk fills up half-way through
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="No space"):
        GPT2(GPT2Config.from_preset("tiny")).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    assert max_logit_diff(GPT2.from_pretrained(tmp_path), theirs) < TOLERANCE


# --- Bad inputs: one line naming the file and the problem -----------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A tiny checkpoint of ours with a small vocabulary, for breaking."""
    GPT2(GPT2Config.from_preset("tiny", vocab_size=1000)).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def load_error(path: Path | str) -> str:
    with pytest.raises(UserError) as e:
        GPT2.from_pretrained(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_directory_without_config(saved: Path) -> None:
    (saved / "config.json").unlink()
    message = load_error(saved)
    assert message.startswith(f"{saved} holds no config.json")


def test_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert str(missing) in load_error(missing) and "does not exist" in load_error(missing)


def test_a_file_instead_of_a_directory(saved: Path) -> None:
    assert "is a file" in load_error(saved / "model.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.999, 10 / 1e9])
def test_truncated_safetensors(saved: Path, keep: float) -> None:
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    message = load_error(saved)
    assert str(weights) in message and "corrupt or truncated" in message


class Payload:
    """An object that a pickle could use to run code."""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a zip file at all", "bin: not a plain state dict of tensors (Unsupported operand"),
        ("truncated", "pytorch_model.bin: corrupt or truncated PyTorch file"),
        ({"wte.weight": torch.zeros(2), "x": Payload()}, "bin: not a plain state dict of tensors"),
        ([torch.zeros(2)], "pytorch_model.bin: expected a dict of tensors"),
    ],
)
def test_bad_pytorch_bin(saved: Path, content: object, expected: str) -> None:
    (saved / "model.safetensors").unlink()
    path = saved / "pytorch_model.bin"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save({"wte.weight": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        torch.save(content, path)
    assert expected in load_error(saved)


def test_no_weights(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    assert "has no weights" in load_error(saved)


def test_config_that_does_not_match_the_weights(saved: Path) -> None:
    edit_config(saved, n_embd=128, n_head=4)
    message = load_error(saved)
    pattern = r"model\.safetensors: tensor transformer\.\S+ has shape \(.+\) but .*config\.json implies"
    assert re.search(pattern, message)
    edit_config(saved, n_embd=256, n_layer=3)
    assert "unexpected tensor 'transformer.h.3." in load_error(saved)


def test_config_with_a_vocabulary_size_that_does_not_match(saved: Path) -> None:
    edit_config(saved, vocab_size=1200)
    message = load_error(saved)
    assert "transformer.wte.weight has shape (1000, 256)" in message and "implies (1200, 256)" in message


def test_conv1d_shapes_are_reported_in_the_checkpoint_layout(saved: Path) -> None:
    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    tensors["transformer.h.1.mlp.c_fc.weight"] = tensors["transformer.h.1.mlp.c_fc.weight"].t().contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    assert "transformer.h.1.mlp.c_fc.weight has shape (1024, 256) but" in load_error(saved)
    assert "implies (256, 1024)" in load_error(saved)


def test_missing_tensors(saved: Path) -> None:
    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    del tensors["transformer.ln_f.bias"], tensors["transformer.h.2.ln_1.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    message = load_error(saved)
    assert "lacks transformer.h.2.ln_1.weight, transformer.ln_f.bias" in message


def test_untied_lm_head_is_refused(saved: Path) -> None:
    weights = saved / "model.safetensors"
    tensors = load_file(weights)
    tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])
    save_file(tensors, weights, metadata={"format": "pt"})
    assert "lm_head.weight differs from the token embedding" in load_error(saved)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=True is not supported"),
        ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
        ({"n_inner": 512}, "n_inner=512 is not supported"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
        ({"n_head": 3}, "n_embd (256) must be divisible by n_head (3)"),
        ({"n_layer": "4"}, "n_layer must be an integer, found '4'"),
    ],
)
def test_config_options_we_do_not_implement(saved: Path, change: dict, expected: str) -> None:
    edit_config(saved, **change)
    message = load_error(saved)
    assert message.startswith(str(saved / "config.json")) and expected in message


def test_config_that_is_not_json(saved: Path) -> None:
    (saved / "config.json").write_text("{n_layer: 4")
    assert "config.json is not valid JSON" in load_error(saved)


def test_cli_prints_one_error_line_without_traceback(saved: Path, capsys) -> None:
    (saved / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    assert main(["info", str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
