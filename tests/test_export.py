"""GGUF export: every key and tensor llama.cpp's GPT-2 loader reads, read back with llama.cpp's own
reader (``gguf.GGUFReader``); the weights (exact in f32/f16/bf16, within the format's error when
quantised); the vocabulary, GPT-2's and a trained one; and the ``gpt2 export`` command's refusals.

The expected names and shapes are written out here as llama.cpp's loader (``src/models/gpt2.cpp``)
asks for them, in GGUF's order of dimensions (the reverse of numpy's), independently of the
name table that ``gpt2.inference.export`` borrows from the ``gguf`` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BYTES, assert_one_line_error, random_model, random_words, run_cli

from gpt2 import GPT2, UserError
from gpt2.inference.export import GGUF_TYPES, write_gguf
from gpt2.tokenizer.bpe import Tokenizer, bytes_to_unicode, train_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # llama.cpp's llama_ftype
MATRIX_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def llama_cpp_tensors(n_layer: int, n_embd: int, n_vocab: int, n_ctx: int) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's GPT-2 loader creates (all required; ``output.weight`` is optional and
    falls back to ``token_embd.weight``), name -> dimensions in GGUF's order."""
    n_ff = 4 * n_embd
    names = {"token_embd.weight": (n_embd, n_vocab), "position_embd.weight": (n_embd, n_ctx),
             "output_norm.weight": (n_embd,), "output_norm.bias": (n_embd,)}
    for i in range(n_layer):
        names |= {
            f"blk.{i}.attn_norm.weight": (n_embd,), f"blk.{i}.attn_norm.bias": (n_embd,),
            f"blk.{i}.attn_qkv.weight": (n_embd, 3 * n_embd), f"blk.{i}.attn_qkv.bias": (3 * n_embd,),
            f"blk.{i}.attn_output.weight": (n_embd, n_embd), f"blk.{i}.attn_output.bias": (n_embd,),
            f"blk.{i}.ffn_norm.weight": (n_embd,), f"blk.{i}.ffn_norm.bias": (n_embd,),
            f"blk.{i}.ffn_up.weight": (n_embd, n_ff), f"blk.{i}.ffn_up.bias": (n_ff,),
            f"blk.{i}.ffn_down.weight": (n_ff, n_embd), f"blk.{i}.ffn_down.bias": (n_embd,),
        }
    return names


def our_name(gguf_name: str) -> str:
    """The key in our state dict of a llama.cpp tensor name."""
    parts = {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "attn_norm": "ln_1",
             "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
             "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
    pieces = gguf_name.split(".")
    if pieces[0] == "blk":
        return f"transformer.h.{pieces[1]}.{parts[pieces[2]]}.{pieces[3]}"
    return f"transformer.{parts[pieces[0]]}.{pieces[1]}"


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", ",", "said", "to", ";", "'tis", "a",
         "."]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A BPE vocabulary trained here (not GPT-2's): 256 bytes, merges, <|endoftext|>."""
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text(random_words(WORDS, 3000, seed=0) + "\n")
    return train_tokenizer([corpus], vocab_size=320)


def perturbed(model: GPT2) -> GPT2:
    """``model`` in eval mode, its LayerNorms and biases moved off their trivial initial values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def model(trained: Tokenizer) -> GPT2:
    """A tiny random model over the trained vocabulary."""
    return perturbed(random_model(vocab_size=trained.n_vocab, n_embd=64, n_positions=48, tokenizer=trained))


@pytest.fixture(scope="module")
def exported(model: GPT2, tmp_path_factory: pytest.TempPathFactory):
    """``exported(type)``: the model written as GGUF of that type, read back (once per type)."""
    directory, files = tmp_path_factory.mktemp("gguf"), {}

    def read(type: str) -> object:
        if type not in files:
            write_gguf(model, directory / f"{type}.gguf", type=type, name="tiny-gpt2")
            files[type] = gguf.GGUFReader(directory / f"{type}.gguf")
        return files[type]

    return read


def value(reader: object, key: str) -> object:
    return reader.fields[key].contents()


def test_every_key_llama_cpps_gpt2_loader_reads(exported, model: GPT2) -> None:
    reader, c = exported("f32"), model.config
    expected = {
        "general.architecture": (V.STRING, "gpt2"),
        "general.name": (V.STRING, "tiny-gpt2"),
        "general.file_type": (V.UINT32, 0),
        "gpt2.context_length": (V.UINT32, c.n_positions),
        "gpt2.embedding_length": (V.UINT32, c.n_embd),
        "gpt2.feed_forward_length": (V.UINT32, 4 * c.n_embd),
        "gpt2.block_count": (V.UINT32, c.n_layer),
        "gpt2.attention.head_count": (V.UINT32, c.n_head),
        "gpt2.attention.layer_norm_epsilon": (V.FLOAT32, np.float32(c.layer_norm_epsilon)),
        "tokenizer.ggml.model": (V.STRING, "gpt2"),  # llama.cpp's byte-level BPE
        "tokenizer.ggml.pre": (V.STRING, "gpt-2"),  # GPT-2's pre-tokenisation regex
        "tokenizer.ggml.bos_token_id": (V.UINT32, model.tokenizer.eot_token),
        "tokenizer.ggml.eos_token_id": (V.UINT32, model.tokenizer.eot_token),
        "tokenizer.ggml.add_bos_token": (V.BOOL, False),
        "general.quantization_version": (V.UINT32, 2),
    }
    for key, (kind, want) in expected.items():
        assert reader.fields[key].types == [kind], key
        assert value(reader, key) == want, key
    for key, kind in (("tokenizer.ggml.tokens", V.STRING), ("tokenizer.ggml.merges", V.STRING),
                      ("tokenizer.ggml.token_type", V.INT32)):
        assert reader.fields[key].types == [V.ARRAY, kind], key  # the element types llama.cpp checks
    assert "tokenizer.chat_template" not in reader.fields  # a base model's tokenizer has none


@pytest.mark.parametrize("type", list(GGUF_TYPES))
def test_every_tensor_llama_cpp_needs_with_its_shape_and_type(exported, model: GPT2, type: str) -> None:
    reader, c = exported(type), model.config
    assert value(reader, "general.file_type") == FILE_TYPES[type]
    found = {t.name: t for t in reader.tensors}
    want = llama_cpp_tensors(c.n_layer, c.n_embd, c.vocab_size, c.n_positions)
    assert {name: tuple(int(d) for d in t.shape) for name, t in found.items()} == want  # tied: no output
    for name, t in found.items():
        if len(want[name]) == 1 or name == "position_embd.weight":  # as llama.cpp's converter keeps them
            assert t.tensor_type == Q.F32, name
        elif type == "q4_0" and name == "token_embd.weight":  # also the output layer: kept at 8 bits
            assert t.tensor_type == Q.Q8_0
        else:
            assert t.tensor_type == MATRIX_TYPES[type], name


@pytest.mark.parametrize("type", ["f32", "f16", "bf16"])
def test_float_weights_are_ours_exactly(exported, model: GPT2, type: str) -> None:
    state = model.state_dict()
    for t in exported(type).tensors:
        ours = state[our_name(t.name)]
        if t.tensor_type == Q.F32:
            assert np.array_equal(np.asarray(t.data), ours.numpy()), t.name
        elif t.tensor_type == Q.F16:
            assert np.array_equal(np.asarray(t.data), ours.half().numpy()), t.name
        else:  # bf16, as raw 16-bit words: torch's rounding (to nearest even) is ggml's
            words = np.asarray(t.data).view(np.uint16).reshape(ours.shape)
            assert np.array_equal(words, ours.bfloat16().view(torch.int16).numpy().view(np.uint16)), t.name


@pytest.mark.parametrize("type, levels, off", [("q8_0", 127, 0.5), ("q4_0", 8, 1.0)])
def test_quantised_weights_are_within_the_formats_error(
    exported, model: GPT2, type: str, levels: int, off: float
) -> None:
    """Each block of 32 weights is stored as integers times one fp16 scale, a step of 1/levels of the
    block's largest magnitude: q8_0 is at most half a step off, q4_0 a step (where its range of -8..7
    clips), plus what rounding the scale to fp16 (2^-11 relative) moves the largest integer."""
    state = model.state_dict()
    for t in exported(type).tensors:
        ours = state[our_name(t.name)].numpy()
        if t.tensor_type == Q.F32:
            assert np.array_equal(np.asarray(t.data), ours), t.name
            continue
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert back.shape == ours.shape, t.name
        blocks, back_blocks = ours.reshape(-1, 32), back.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / levels
        bound = step * (off + levels * 2**-11) + 1e-8
        assert (np.abs(blocks - back_blocks) <= bound).all(), t.name
        assert not np.array_equal(back, ours), t.name  # it really is quantised


def token_bytes(token: str) -> bytes:
    """A token of the file as bytes: GPT-2's byte -> character table undone."""
    return bytes(UNICODE_TO_BYTE[c] for c in token)


def test_tokens_and_merges_are_gpt2s(gpt2_tokenizer: Tokenizer, reference_encoding, tmp_path: Path) -> None:
    """GPT-2's vocabulary: every id's token gives back tiktoken's bytes for it, <|endoftext|> is a
    control token, and the merges, in rank order, make the multi-byte tokens in id order."""
    write_gguf(random_model(vocab_size=50257, tokenizer=gpt2_tokenizer), tmp_path / "gpt2.gguf")
    reader = gguf.GGUFReader(tmp_path / "gpt2.gguf")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert value(reader, key) == 50256
    tokens, types = value(reader, "tokenizer.ggml.tokens"), value(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 50257
    for i, token in enumerate(tokens[:50256]):
        assert token_bytes(token) == reference_encoding.decode_single_token_bytes(i), i
    assert tokens[50256] == "<|endoftext|>"
    assert types == [gguf.TokenType.NORMAL] * 50256 + [gguf.TokenType.CONTROL]
    merges = value(reader, "tokenizer.ggml.merges")
    assert len(merges) == 50000
    assert tokens[256:258] == ["Ġt", "Ġa"] and merges[:2] == ["Ġ t", "Ġ a"]  # GPT-2's first merges
    for rank, merge in enumerate(merges):
        a, b = merge.split(" ")
        assert token_bytes(a) + token_bytes(b) == reference_encoding.decode_single_token_bytes(256 + rank)


def test_a_trained_vocabulary_exports_padded_to_the_models_size(trained: Tokenizer, tmp_path: Path) -> None:
    """Our own BPE (not GPT-2's): its tokens and merges, and [PADn] (unused) for the ids the model
    has beyond the tokenizer's, as llama.cpp's converter fills them."""
    model = random_model(vocab_size=trained.n_vocab + 4, tokenizer=trained)
    write_gguf(model, tmp_path / "trained.gguf", type="q8_0")
    reader = gguf.GGUFReader(tmp_path / "trained.gguf")
    tokens, types = value(reader, "tokenizer.ggml.tokens"), value(reader, "tokenizer.ggml.token_type")
    eot = trained.eot_token
    assert len(tokens) == model.config.vocab_size and eot == trained.n_vocab - 1
    assert [token_bytes(t) for t in tokens[:eot]] == [trained.decode_bytes([i]) for i in range(eot)]
    assert tokens[eot:] == ["<|endoftext|>", *(f"[PAD{i}]" for i in range(eot + 1, eot + 5))]
    assert types == [gguf.TokenType.NORMAL] * eot + [gguf.TokenType.CONTROL] + [gguf.TokenType.UNUSED] * 4
    pairs = [tuple(map(token_bytes, m.split(" "))) for m in value(reader, "tokenizer.ggml.merges")]
    assert pairs == trained.merges() and len(pairs) == eot - 256
    assert value(reader, "tokenizer.ggml.eos_token_id") == eot
    assert {t.name for t in reader.tensors} == set(llama_cpp_tensors(2, 32, eot + 5, 64))


def test_a_vocabulary_without_merges_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no merges") as e:
        write_gguf(random_model(tokenizer=BYTES), tmp_path / "bytes.gguf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bytes.gguf").exists()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    model: GPT2, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpt2.inference import export

    out = tmp_path / "model.gguf"
    out.write_bytes(b"the old file")

    def half_written(writer: object, path: Path) -> None:
        path.write_bytes(b"GGUF half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_write", half_written)
    with pytest.raises(UserError, match="No space left on device"):
        write_gguf(model, out, overwrite=True)
    assert out.read_bytes() == b"the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


# ----------------------------------------------------------------------------------------------------
# gpt2 export


@pytest.fixture(scope="module")
def model_dir(model: GPT2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saved") / "tiny-gpt2"
    model.save_pretrained(directory)
    return directory


def test_export_command_writes_a_gguf_file(model: GPT2, model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "tiny.gguf"
    code, stdout, err = run_cli(capsys, "export", "--format", "gguf", "--model", model_dir, "--out", out,
                                "--type", "q8_0")
    assert code == 0, err
    assert stdout.startswith(f"wrote {out}: ") and "q8_0" in stdout
    reader = gguf.GGUFReader(out)
    assert value(reader, "general.name") == "tiny-gpt2" and value(reader, "general.file_type") == 7
    assert len(value(reader, "tokenizer.ggml.tokens")) == model.config.vocab_size


def test_export_refuses_to_replace_a_file_without_overwrite(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"mine")
    code, _, err = run_cli(capsys, "export", "--format", "gguf", "--model", model_dir, "--out", out)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert out.read_bytes() == b"mine"
    code, _, err = run_cli(capsys, "export", "--format", "gguf", "--model", model_dir, "--out", out,
                           "--overwrite")
    assert code == 0, err
    assert value(gguf.GGUFReader(out), "general.architecture") == "gpt2"


@pytest.mark.parametrize("options, words", [
    ({"--type": "q3_k"}, ["'q3_k'", "f32, f16, bf16, q8_0, q4_0"]),
    ({"--format": "onnx"}, ["'onnx'", "gguf"]),
    ({"--out": "{tmp}"}, ["is a directory"]),
])
def test_export_bad_options_are_one_line(model_dir: Path, tmp_path: Path, capsys, options, words) -> None:
    args = {"--format": "gguf", "--model": str(model_dir), "--out": str(tmp_path / "x.gguf")}
    args |= {flag: text.format(tmp=tmp_path) for flag, text in options.items()}
    code, _, err = run_cli(capsys, "export", *[item for pair in args.items() for item in pair])
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "x.gguf").exists()


def test_export_of_a_missing_model_is_one_line(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "export", "--format", "gguf", "--model", tmp_path / "nothing",
                           "--out", tmp_path / "x.gguf")
    assert_one_line_error(code, err, "nothing")
    assert not (tmp_path / "x.gguf").exists()


def test_export_of_a_model_without_tokenizer(trained: Tokenizer, tmp_path: Path, capsys) -> None:
    """Refused in one line; with --tokenizer, its vocabulary goes in the file."""
    random_model(vocab_size=trained.n_vocab).save_pretrained(tmp_path / "bare")
    trained.save_pretrained(tmp_path / "tokenizer")
    argv = ["export", "--format", "gguf", "--model", tmp_path / "bare", "--out", tmp_path / "x.gguf"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "tokenizer", "--tokenizer")
    assert not (tmp_path / "x.gguf").exists()
    code, _, err = run_cli(capsys, *argv, "--tokenizer", tmp_path / "tokenizer")
    assert code == 0, err
    tokens = value(gguf.GGUFReader(tmp_path / "x.gguf"), "tokenizer.ggml.tokens")
    assert tokens[trained.eot_token] == "<|endoftext|>" and len(tokens) == trained.n_vocab


def test_export_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "export", "--help")
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--format FORMAT", "--model M", "--tokenizer PATH", "--out FILE", "--type TYPE",
                   "--overwrite", "gguf:", *(f"{t}:" for t in GGUF_TYPES), "(default f32)"):
        assert option in text, option
