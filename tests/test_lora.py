"""LoRA adapters (gpt2.adapters.lora): peft's own library loads ours and we load peft's, with the same logits;
`gpt2 merge` folds an adapter in; `gpt2 train --lora-rank` trains the adapter alone, its checkpoints
run with --adapter and resume exactly; and the inputs a user can get wrong are one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import BYTES, assert_one_line_error, random_model, random_words, run_cli, saved_model_dir
from safetensors.torch import load_file, save_file

from gpt2 import GPT2, UserError
from gpt2.adapters.lora import LoRAConfig, add_lora, load_adapter, lora_layers, save_adapter
from gpt2.inference.load import load_for_inference
from gpt2.training.config import load_config
from gpt2.training.metrics import read_metrics
from gpt2.training.trainer import finish, fit, init_distributed, setup

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


ALL = ("c_attn", "c_proj", "c_fc")
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]
TRAIN = ["--seq-len", "32", "--micro-batch", "4", "--eval-tokens", "256", "--sample-tokens", "0",
         "--log-interval", "0", "--warmup-steps", "2", "--lr", "1e-2", "--keep-checkpoints", "0"]
IDS = torch.randint(0, BYTES.n_vocab, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, width-32 model over bytes, saved with its tokenizer."""
    return saved_model_dir(random_model(tokenizer=BYTES), tmp_path_factory)


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter of rank 4 on every projection of ``base``, saved by us, with random (non-zero) B."""
    config = LoRAConfig(4, 16, targets=ALL, base_model=str(base))
    model = with_random_adapter(GPT2.from_pretrained(base), config)
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def data(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of random words in the base's byte tokenizer."""
    from gpt2.cli import main

    root = tmp_path_factory.mktemp("lora-data")
    (root / "words.txt").write_text(random_words(WORDS, 6_000, seed=0), encoding="utf-8")
    assert main(["prepare", str(root / "words.txt"), "--tokenizer", str(base), "--out", str(root / "data"),
                 "--val-fraction", "0.1"]) == 0
    return root / "data"


def with_random_adapter(model: GPT2, config: LoRAConfig, seed: int = 1) -> GPT2:
    """``model`` with a new adapter, the same for the same ``seed``."""
    torch.manual_seed(seed)
    add_lora(model, config)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)  # B = 0 would leave the model as it was
    return model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    out = model.eval()(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_peft_loads_our_adapter_on_transformers_gpt2_with_our_logits(base: Path, adapter: Path) -> None:
    ours = with_random_adapter(GPT2.from_pretrained(base), LoRAConfig(4, 16, targets=ALL))
    hf = transformers.GPT2LMHeadModel.from_pretrained(base)
    theirs = peft.PeftModel.from_pretrained(hf, adapter)
    assert theirs.peft_config["default"].r == 4 and theirs.peft_config["default"].lora_alpha == 16
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-4)
    assert not torch.allclose(logits(ours), logits(GPT2.from_pretrained(base)), atol=1e-2)  # it matters
    # adapter_config.json names the base: peft finds and loads it by itself.
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
    torch.testing.assert_close(logits(auto), logits(ours), rtol=0, atol=1e-4)


def test_an_adapter_written_by_peft_loads_into_our_model(base: Path, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=list(ALL), fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(base), config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs)
    ours = GPT2.from_pretrained(base)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-4)
    # Merged at load time, with the base that peft named in adapter_config.json.
    torch.testing.assert_close(logits(load_for_inference(None, adapter=tmp_path / "peft", device="cpu")),
                               expected, rtol=0, atol=1e-4)
    # Keys without peft's "base_model.model." prefix (and with its adapter name) load the same.
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    shutil.copytree(tmp_path / "peft", tmp_path / "bare")
    bare = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
            for k, v in tensors.items()}
    save_file(bare, tmp_path / "bare" / "adapter_model.safetensors")
    ours = GPT2.from_pretrained(base)
    load_adapter(ours, tmp_path / "bare")
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-4)


def test_gpt2_merge_writes_a_plain_model_equal_to_base_plus_adapter(
    base: Path, adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    unmerged = GPT2.from_pretrained(base)
    load_adapter(unmerged, adapter)
    code, out, err = run_cli(capsys, "merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    assert str(tmp_path / "merged") in out
    merged = GPT2.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(unmerged), rtol=0, atol=1e-5)
    assert merged.state_dict().keys() == GPT2.from_pretrained(base).state_dict().keys()  # no LoRA left
    assert merged.tokenizer is not None and merged.tokenizer.n_vocab == BYTES.n_vocab
    # transformers reads it as an ordinary GPT-2.
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(hf), logits(unmerged), rtol=0, atol=1e-4)
    # Generating with --adapter runs the same model as the merged one.
    greedy = ["--prompt", "the cat", "--max-new-tokens", 12, "--temperature", 0, "--device", "cpu"]
    texts = [run_cli(capsys, "generate", *model, *greedy)[1]
             for model in (["--adapter", adapter], ["--model", base, "--adapter", adapter],
                           ["--model", tmp_path / "merged"])]
    assert texts[0] == texts[1] == texts[2] and texts[0].strip()


def lora_run(data: Path, base: Path, out: Path, *extra: object) -> list[object]:
    return ["train", "--init-from", base, "--data", data, "--out", out, "--lora-rank", 4,
            "--lora-targets", "c_attn,c_fc", *TRAIN, *extra]


def test_lora_training_trains_the_adapter_alone_and_its_checkpoints_run(
    base: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    cfg = load_config(init_from=str(base), data=str(data), out=str(run), lora_rank=4,
                      lora_targets="c_attn,c_fc", seq_len=32, micro_batch=4, eval_tokens=256,
                      sample_tokens=0, log_interval=0, warmup_steps=2, lr=1e-2, max_steps=6,
                      checkpoint_interval=3, device="cpu")
    state = setup(cfg, init_distributed("cpu"))
    original = GPT2.from_pretrained(base).state_dict()
    fit(state)
    finish(state)
    capsys.readouterr()
    # The base is frozen and untouched; only the adapters moved, and only they have optimiser state.
    trained = state.model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in original.items())
    lora_names = {n for n, _ in state.model.named_parameters() if ".lora_" in n}
    assert len(lora_names) == 2 * 2 * 2  # A and B on c_attn and c_fc of 2 layers
    assert {n for n, p in state.model.named_parameters() if p.requires_grad} == lora_names
    assert all(trained[n].any() for n in lora_names if "lora_B" in n)  # B started at zero
    saved = torch.load(run / "step_000006" / "trainer_state.pt", weights_only=True)
    assert set(saved["optimizer"]["state"]) == lora_names
    # The checkpoint is the adapter in peft's files (naming the base), the tokenizer and the state.
    files = {p.name for p in (run / "step_000006").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt", "tokenizer.json"} <= files
    assert "model.safetensors" not in files and "config.json" not in files
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(run / "step_000006")
    torch.testing.assert_close(logits(theirs), logits(state.model), rtol=0, atol=1e-4)
    # It runs with --adapter (base from adapter_config.json) or as --model (a LoRA run), the same text,
    # which is not the base's.
    greedy = ["--prompt", "the cat", "--max-new-tokens", 12, "--temperature", 0, "--device", "cpu"]
    outputs = [run_cli(capsys, "generate", *model, *greedy)
               for model in (["--adapter", run / "step_000006"], ["--model", run], ["--adapter", run],
                             ["--model", base])]
    assert all(code == 0 for code, _, _ in outputs), outputs
    assert outputs[0][1] == outputs[1][1] == outputs[2][1] != outputs[3][1]


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / (run / "latest").read_text().strip() / "adapter_model.safetensors")


def test_a_lora_run_resumed_halfway_repeats_the_run_exactly(
    base: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, stopped = tmp_path / "run", tmp_path / "stopped"
    code, out, err = run_cli(capsys, *lora_run(data, base, run, "--max-steps", 8, "--checkpoint-interval", 4,
                                               "--lora-dropout", 0.1, "--eval-interval", 4))
    assert code == 0, err
    assert "parameters (a LoRA adapter of rank 4 on c_attn, c_fc; the base is frozen)" in out
    shutil.copytree(run, stopped)  # as if stopped after its step-4 checkpoint
    shutil.rmtree(stopped / "step_000008")
    (stopped / "latest").write_text("step_000004\n")
    code, out, err = run_cli(capsys, "train", "--out", stopped, "--resume")
    assert code == 0, err
    assert "resuming at step 4" in out
    expected, resumed = adapter_tensors(run), adapter_tensors(stopped)
    assert expected.keys() == resumed.keys() and len(expected) == 8
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    losses = [[r.get("loss", r.get("val_loss")) for r in read_metrics(r)] for r in (run, stopped)]
    assert losses[0] == losses[1]


def test_bad_lora_inputs_are_one_line_errors(
    base: Path, adapter: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    out = tmp_path / "run"

    def train(*flags: object) -> tuple[int, str, str]:
        return run_cli(capsys, "train", "--init-from", base, "--data", data, "--out", out, *TRAIN,
                       "--max-steps", 2, *flags)

    for flags, words in [
        (["--lora-rank", 0], ["lora_rank", "positive"]),
        (["--lora-rank", 33], ["LoRA rank 33", "width (32)"]),
        (["--lora-rank", 4, "--lora-targets", "c_attn,q_proj"], ["'q_proj'", "c_attn, c_proj, c_fc"]),
        (["--lora-rank", 4, "--lora-dropout", 1], ["lora_dropout"]),
        (["--lora-rank", 4, "--lora-alpha", 0], ["lora_alpha"]),
        (["--lora-alpha", 16], ["lora_alpha", "--lora-rank"]),
    ]:
        assert_one_line_error(*train(*flags)[::2], *words)
        assert not out.exists()
    code, _, err = run_cli(capsys, "train", "--preset", "nano", "--data", data, "--out", out, *TRAIN,
                           "--max-steps", 2, "--lora-rank", 4)
    assert_one_line_error(code, err, "--init-from")
    # An adapter made for another base: its shape and the base it names, in one line.
    other = saved_model_dir(random_model(n_embd=64, n_layer=3, tokenizer=BYTES), tmp_path_factory)
    code, _, err = run_cli(capsys, "generate", "--model", other, "--adapter", adapter, "--device", "cpu")
    assert_one_line_error(code, err, "another shape", "width 32 with 2 layers", "width 64 with 3 layers",
                          str(base))
    # Neither a model nor an adapter; a directory that holds no adapter; a corrupt one.
    code, _, err = run_cli(capsys, "generate", "--prompt", "x")
    assert_one_line_error(code, err, "give --model")
    code, _, err = run_cli(capsys, "generate", "--adapter", tmp_path, "--device", "cpu")
    assert_one_line_error(code, err, "holds no LoRA adapter", "adapter_config.json")
    shutil.copytree(adapter, tmp_path / "corrupt")
    (tmp_path / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    code, _, err = run_cli(capsys, "generate", "--adapter", tmp_path / "corrupt", "--device", "cpu")
    assert_one_line_error(code, err, "adapter_model.safetensors", "corrupt")
    # merge refuses to replace what is there without --overwrite (and a non-model even with it).
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for extra, word in (([], "--overwrite"), (["--overwrite"], "holds no model")):
        code, _, err = run_cli(capsys, "merge", "--adapter", adapter, "--out", tmp_path / "taken", *extra)
        assert_one_line_error(code, err, word)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    # A LoRA checkpoint is not a whole model: from_pretrained says what to do instead.
    with pytest.raises(UserError, match="LoRA adapter, not a whole model"):
        GPT2.from_pretrained(adapter)
