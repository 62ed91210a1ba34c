"""Our models in other engines' formats: GGUF, the file llama.cpp runs (and the engines built on it).

The file holds what llama.cpp's own ``convert_hf_to_gguf.py`` writes for a Hugging Face GPT-2
(architecture ``gpt2``): the hyper-parameters under ``gpt2.*``, the tensors under llama.cpp's names
(``token_embd``, ``blk.N.attn_qkv``...), and the byte-level BPE vocabulary as ``tokenizer.ggml.*``:
every token spelled as in Hugging Face's vocab.json (``bytes_to_unicode``) and the merges in rank
order, with the ``gpt-2`` pre-tokenizer. Our ``nn.Linear`` weights are (out, in), the layout the
converter reaches by transposing the published Conv1D weights, so they are written as they are
(GGUF lists a tensor's dimensions in the reverse of numpy's order: ``attn_qkv`` is {n_embd, 3 n_embd}).
The output layer is tied to ``token_embd``, which llama.cpp reuses when ``output.weight`` is absent.

Which tensors are quantised follows the converter: LayerNorms, biases and the position embedding stay
f32; a matrix whose rows do not split into the format's blocks falls back to f16, as there.
``gguf`` (llama.cpp's Python writer) is imported only when a file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from gpt2.util.atomic import write_atomic
from gpt2.util.errors import UserError

if TYPE_CHECKING:
    from types import ModuleType

    import numpy as np

    from gpt2.model import Transformer
    from gpt2.tokenizer.bpe import Tokenizer


class GGUFType(NamedTuple):
    """One ``--type``: its ``gguf.LlamaFileType`` (``general.file_type``), the
    ``gguf.GGMLQuantizationType`` of its weight matrices, and what it means."""

    file_type: str
    weights: str
    description: str


FORMATS = {"gguf": "GGUF, llama.cpp's file (llama.cpp, llama-cpp-python, ollama, LM Studio run it)"}
GGUF_TYPES = {
    "f32": GGUFType("ALL_F32", "F32", "32-bit floats, the weights exactly"),
    "f16": GGUFType("MOSTLY_F16", "F16", "16-bit floats, half the size"),
    "bf16": GGUFType("MOSTLY_BF16", "BF16", "bfloat16, half the size with float32's range"),
    "q8_0": GGUFType("MOSTLY_Q8_0", "Q8_0", "8-bit integers in blocks of 32 with one scale each, 27% "
                     "of the size, outputs very close to f32's"),
    "q4_0": GGUFType("MOSTLY_Q4_0", "Q4_0", "4-bit integers in blocks of 32, 14% of the size, outputs "
                     "differ; the token embedding, which is also the output layer, stays q8_0 (llama.cpp's "
                     "quantizer keeps that tensor at higher precision too)"),
}
ARCHITECTURE = "gpt2"
TOKENIZER_MODEL = "gpt2"  # llama.cpp's byte-level BPE
TOKENIZER_PRE = "gpt-2"  # GPT-2's pre-tokenisation regex, which trained vocabularies here use too
LM_HEAD = "lm_head.weight"


def check_output(path: str | Path, *, overwrite: bool) -> Path:
    """``path`` as a file to write: refused when it is a directory, or exists and ``overwrite`` is
    not set."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give the file to write, such as {path}/model.gguf")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another --out or add --overwrite")
    return path


def check_type(type: str) -> GGUFType:
    """The ``GGUF_TYPES`` entry named ``type``."""
    if type not in GGUF_TYPES:
        raise UserError(f"unknown --type {type!r}; choose one of: {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[type]


def write_gguf(
    model: Transformer,
    path: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    type: str = "f32",
    name: str = "gpt2",
    overwrite: bool = False,
) -> None:
    """Write ``model`` with ``tokenizer`` (default: the model's own) as the GGUF file ``path``, its
    weights stored as ``type`` (a key of ``GGUF_TYPES``), atomically; ``name`` is ``general.name``."""
    kind = check_type(type)
    path = check_output(path, overwrite=overwrite)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UserError("the model has no tokenizer, and a GGUF file holds the vocabulary; give one with "
                        "--tokenizer PATH")
    gguf = import_gguf()
    writer = gguf.GGUFWriter(None, ARCHITECTURE)
    file_type = getattr(gguf.LlamaFileType, kind.file_type)
    _add_hyperparameters(gguf, writer, model, name, file_type)
    _add_vocabulary(gguf, writer, tokenizer, model.config.vocab_size)
    _add_tensors(gguf, writer, model, getattr(gguf.GGMLQuantizationType, kind.weights))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: _write(writer, tmp))
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); free space there or choose another "
                        "--out") from None


def import_gguf() -> ModuleType:
    """The ``gguf`` package, llama.cpp's writer, or a one-line error naming it."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise UserError("writing GGUF needs the gguf package (llama.cpp's Python writer): pip install gguf"
                        ) from None
    return gguf


def _add_hyperparameters(
    gguf: ModuleType, writer: Any, model: Transformer, name: str, file_type: int
) -> None:
    """``general.*`` and ``gpt2.*``: what llama.cpp's GPT-2 loader reads, as the converter writes it."""
    config = model.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocabulary(gguf: ModuleType, writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """``tokenizer.ggml.*``: the tokens of every id the model has, their types, the merges, and
    ``<|endoftext|>`` as both BOS and EOS (no BOS is added to prompts, as GPT-2 adds none)."""
    tokens, types, merges = gguf_vocabulary(gguf, tokenizer, vocab_size)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_token)
    writer.add_eos_token_id(tokenizer.eot_token)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def gguf_vocabulary(
    gguf: ModuleType, tokenizer: Tokenizer, vocab_size: int
) -> tuple[list[str], list[int], list[str]]:
    """The token of each of the model's ``vocab_size`` ids (Hugging Face's spelling; ``[PADn]`` for an
    id the tokenizer lacks, as the converter writes them), each token's ``gguf.TokenType`` (special
    tokens are CONTROL), and the merges as ``"A B"`` in rank order."""
    if tokenizer.n_vocab > vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.n_vocab} ids ({tokenizer.source}) but the model only "
                        f"{vocab_size}; give the tokenizer the model was trained with")
    spelled, merges = tokenizer.spelled_vocab()
    specials = set(tokenizer.special_tokens.values())
    if len(spelled) != 256 + len(merges) + len(specials):
        raise UserError(f"{tokenizer.source}: a special token is spelled like an ordinary token, which "
                        "a GGUF vocabulary cannot tell apart")
    if not merges:
        raise UserError(f"{tokenizer.source} has no merges (every token is one byte or special), and "
                        "llama.cpp's BPE tokenizer needs them; export a model with a BPE vocabulary")
    text_of = {i: text for text, i in spelled.items()}
    types = gguf.TokenType
    tokens, kinds = [], []
    for i in range(vocab_size):
        text = text_of.get(i)
        tokens.append(f"[PAD{i}]" if text is None else text)
        kinds.append(types.UNUSED if text is None else types.CONTROL if i in specials else types.NORMAL)
    if len(set(tokens)) != len(tokens):
        raise UserError(f"{tokenizer.source} has a token spelled like the padding tokens [PADn]; a GGUF "
                        "vocabulary needs every token unique")
    return tokens, [int(k) for k in kinds], [f"{a} {b}" for a, b in merges]


def _add_tensors(gguf: ModuleType, writer: Any, model: Transformer, weights: Any) -> None:
    """Every tensor of ``model`` under llama.cpp's name, stored as ``tensor_type`` says; the LM head
    only when it is not tied to the token embedding."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    tied = model.lm_head.weight is model.transformer.wte.weight or bool(
        model.lm_head.weight.equal(model.transformer.wte.weight))
    for key, tensor in model.state_dict().items():
        if key == LM_HEAD and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{key} has no name in llama.cpp's GPT-2")
        array = tensor.detach().float().cpu().numpy()
        data, qtype = quantize(gguf, array, tensor_type(gguf, name, array, weights))
        writer.add_tensor(name, data, raw_dtype=qtype)


def tensor_type(gguf: ModuleType, name: str, array: np.ndarray, weights: Any) -> Any:
    """The ``gguf.GGMLQuantizationType`` that tensor ``name`` is stored in when the weight matrices
    are ``weights``: f32 for vectors, norms, biases and the position embedding (as the converter
    keeps them), q8_0 for the token embedding (also the output layer) of a q4_0 file."""
    q = gguf.GGMLQuantizationType
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return q.F32
    if name.startswith("position_embd."):
        return q.F32
    if weights == q.Q4_0 and name.startswith("token_embd."):
        return q.Q8_0
    return weights


def quantize(gguf: ModuleType, array: np.ndarray, qtype: Any) -> tuple[np.ndarray, Any]:
    """``array`` in ``qtype`` and that type; f16 where its rows do not split into ``qtype``'s blocks."""
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.quants.QuantError:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def _write(writer: Any, path: Path) -> None:
    """Write the file that ``writer`` holds to ``path``."""
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
