"""Checkpoints in Hugging Face's format: config.json + model.safetensors (+ tokenizer files).

Reading accepts the layout of the published GPT-2 checkpoints (keys with or without the
``transformer.`` prefix, Conv1D weights stored as (in, out), attention-mask buffers) as well as what
``transformers`` writes today (safetensors, sharded or not, or ``pytorch_model.bin``). Writing
produces a directory that ``transformers.GPT2LMHeadModel.from_pretrained`` loads without warnings.
Every file is written atomically, so a crash never leaves a half-written checkpoint behind.

Read top to bottom: loading (``load_model``; ``resolve``, which finds the directory a name means;
``read_config`` and the tensor readers), then saving (``save_model``, ``hf_config``). A training
run directory (see gpt2.training.trainer) holds several checkpoints and a ``latest`` file naming the newest
complete one: ``LATEST``, ``latest_checkpoint`` and ``write_latest`` are that file's one definition,
read here by ``resolve`` and by the trainer's ``--resume``, written by the trainer.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from gpt2.config import GPT2Config
from gpt2.model import Transformer
from gpt2.tokenizer.bpe import Tokenizer, find_tokenizer_files
from gpt2.util.atomic import write_atomic
from gpt2.util.errors import UserError
from gpt2.util.jsonfile import check_field, parse_json, read_json_object
from gpt2.util.memory import release_freed_memory

M = TypeVar("M", bound=Transformer)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # in order of preference
HUB_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.bpe", "*.tiktoken"]
HUB_FALLBACK_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # hub repos without safetensors

# Hugging Face's GPT-2 stores these projections with its Conv1D, whose weight is (in, out): the
# transpose of nn.Linear's (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers of old checkpoints, recomputed by every implementation.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
WTE = "transformer.wte.weight"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

# Keys of Hugging Face's GPT2Config whose other values change the network in ways this package does not
# implement, with the one value we accept (their defaults).
FIXED_OPTIONS = {
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "scale_attn_weights": True,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation
HF_DROPOUT = 0.1  # Hugging Face's default for the three *_pdrop keys
LATEST = "latest"  # in a training run directory: names its newest complete checkpoint
# A LoRA run's checkpoint holds an adapter instead (gpt2.adapters.lora).
ADAPTER_CONFIG = "adapter_config.json"
# What writing a checkpoint raises when the disk is full or failing: torch.save reports it as a
# RuntimeError, safetensors as its own error.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def write_failure(error: BaseException) -> str:
    """Why one of ``WRITE_ERRORS`` happened, in a few words: the OS's reason, else its first line."""
    return getattr(error, "strerror", None) or str(error).strip().splitlines()[0]


# --- Loading -------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | Path,
    model_class: type[M],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    **build: Any,
) -> M:
    """``model_class(config, **build)`` with the weights of a checkpoint, in eval mode.

    ``name_or_path``: a Hugging Face-format directory, a training run directory (its ``latest`` file
    names the checkpoint to load), or a hub name such as ``gpt2``. ``dtype``: convert the weights to
    it; by default they keep the checkpoint's dtype.
    """
    directory = resolve(name_or_path)
    model = empty_model(directory, model_class, **build)
    state = dict(read_weights(directory, model, torch.device(device), dtype))
    target = dtype or state[WTE].dtype
    state = {k: v.to(target) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)  # keys were checked by read_weights
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied parameter
    return model.eval()


def empty_model(directory: Path, model_class: type[M], **build: Any) -> M:
    """``model_class(config, **build)`` of ``directory``'s config, without weights (on the meta device:
    no memory)."""
    config = read_config(directory / CONFIG)
    with torch.device("meta"):
        return model_class(config, **build)


def read_tokenizer(directory: Path) -> Tokenizer | None:
    """The tokenizer saved in checkpoint ``directory`` (None when it has no tokenizer files)."""
    return Tokenizer.from_pretrained(directory) if find_tokenizer_files(directory) else None


def resolve(name_or_path: str | Path) -> Path:
    """The checkpoint directory that ``name_or_path`` names: itself, the checkpoint a run directory's
    ``latest`` file points to, or a hub model downloaded into the local cache.

    A local directory without config.json whose name could be a hub model's (``gpt2`` run from this
    repository's root, where the package directory has that name) is looked up on the hub.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raise UserError(f"{path} is a file; give the directory that holds it and {CONFIG}")
    if (path / CONFIG).is_file():
        return path
    if find_adapter(path) is not None:
        raise UserError(f"{path} holds a LoRA adapter, not a whole model; load it on its base with --adapter "
                        "(gpt2.inference.load.load_for_inference(adapter=...)), or merge them with "
                        "`gpt2 merge`")
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    return _download(str(name_or_path), local=path.is_dir())


def find_adapter(path: str | Path) -> Path | None:
    """The LoRA adapter directory that ``path`` names: itself, or the checkpoint that a LoRA run's
    ``latest`` file names; None when it names something else (a model, a hub name)."""
    path = Path(path).expanduser()
    if not path.is_dir() or (path / CONFIG).is_file():
        return None
    if (path / ADAPTER_CONFIG).is_file():
        return path
    latest = latest_checkpoint(path)
    return latest if latest is not None and not (latest / CONFIG).is_file() else None


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint directory that run directory ``run``'s ``latest`` file names (None when it has
    no such file); a name of a directory without config.json (or, for a LoRA run, adapter_config.json)
    is an error."""
    latest = run / LATEST
    if not latest.is_file():
        return None
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{latest}: cannot read it ({e}); fix or delete {latest}") from None
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UserError(f"{latest} must name a checkpoint directory of {run}, found {name!r}; "
                        f"fix or delete {latest}")
    target = run / name
    if not (target / CONFIG).is_file() and not (target / ADAPTER_CONFIG).is_file():
        raise UserError(f"{latest} names {target}, which holds no {CONFIG}; fix or delete {latest}")
    return target


def write_latest(run: Path, name: str) -> None:
    """Make ``run``'s ``latest`` file name checkpoint directory ``run / name``, atomically: a reader
    sees the previous name or the new one, never a mix."""
    write_atomic(run / LATEST, lambda path: path.write_text(name + "\n"))


def _download(name: str, *, local: bool) -> Path:
    """The local snapshot of hub model ``name``: config, safetensors weights and tokenizer files
    (``pytorch_model.bin`` only for repositories without safetensors). ``local``: a directory of that
    name exists here (but holds no model), which the error messages mention. (huggingface_hub is
    imported here only: with its HTTP stack it would add memory and start-up time to every process that
    loads a model.)"""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    if local:
        here = f"{name} holds no {CONFIG} (it is not a model directory nor a training run)"
    else:
        here = f"{name} does not exist"
    try:
        path = Path(snapshot_download(name, allow_patterns=HUB_FILES))
        if not any((path / f).is_file() for f in WEIGHT_FILES):
            path = Path(snapshot_download(name, allow_patterns=HUB_FALLBACK_FILES))
    except HFValidationError:
        raise UserError(f"{here}, and it is not a valid hub model name either") from None
    except OSError as e:  # no network, no such repository, gated repository...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{here}, and the Hugging Face hub could not provide a model of that name ({reason}); "
            "check the path, the model name or the network"
        ) from None
    if not (path / CONFIG).is_file():
        raise UserError(f"hub model {name} has no {CONFIG}; it is not a Hugging Face-format model")
    return path


def read_config(path: Path) -> GPT2Config:
    """Our ``GPT2Config`` from a Hugging Face GPT-2 config.json; options we do not implement are
    refused rather than silently ignored."""
    hf = read_json_object(path)
    _refuse_unsupported(path, hf)
    _check_sizes(path, hf)
    try:
        return GPT2Config(
            vocab_size=hf.get("vocab_size", 50257),
            n_positions=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_embd=hf.get("n_embd", 768),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            dropout=hf.get("resid_pdrop", HF_DROPOUT),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
    except (UserError, TypeError) as e:
        raise UserError(f"{path}: {e}") from None


def _refuse_unsupported(path: Path, hf: dict) -> None:
    """Refuse a model type, or options changing the network, that this package does not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type is {hf['model_type']!r}; only 'gpt2' models can be loaded")
    for key, supported in FIXED_OPTIONS.items():
        if hf.get(key, supported) != supported:
            raise UserError(f"{path}: {key}={hf[key]!r} is not supported (only {supported})")
    if hf.get("activation_function", ACTIVATIONS[0]) not in ACTIVATIONS:
        raise UserError(
            f"{path}: activation_function {hf['activation_function']!r} is not supported "
            f"(only {' or '.join(ACTIVATIONS)}, GELU's tanh approximation)"
        )


def _check_sizes(path: Path, hf: dict) -> None:
    """The sizes are integers, the epsilon and dropout numbers, and the MLP is 4 times as wide as the
    model (``n_inner``)."""
    for key in ("vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head"):
        check_field(hf, key, (int,), str(path))
    for key in ("layer_norm_epsilon", "resid_pdrop"):
        check_field(hf, key, (int, float), str(path))
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{path}: n_inner={hf['n_inner']} is not supported (only 4 * n_embd = {4 * n_embd})")


def read_weights(
    directory: Path, model: Transformer, device: torch.device, dtype: torch.dtype | None
) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's tensors one at a time, under our names and in our layout, each checked
    against the shape that ``model`` (built from the config) expects and converted to ``dtype`` as it
    is read; so loading holds no tensor beyond the model's own but the one being converted. The LM
    head is the token embedding (a separate one, in old checkpoints, is checked to equal it)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != LM_HEAD}
    seen: set[str] = set()
    files = _checkpoint_files(directory)
    headers = {f: _safetensors_header(f) for f in files if f.suffix == ".safetensors"}
    separate_head = len(headers) < len(files) or any(LM_HEAD in header for header, _ in headers.values())
    tied: dict[str, tuple[Path, Tensor]] = {}  # until both are seen: the LM head and the embedding
    for file, key, shape, load in (entry for f in files for entry in _file_tensors(f, headers.get(f))):
        if key.endswith(IGNORED_SUFFIXES):
            continue
        name = key if key.startswith(PREFIX) or key == LM_HEAD else PREFIX + key
        conv1d = name.endswith(CONV1D_WEIGHTS)
        want = expected.get(WTE if name == LM_HEAD else name)
        if want is None:
            raise UserError(f"{file}: unexpected tensor {key!r}; this is not a GPT-2 language model")
        if (shape[::-1] if conv1d else shape) != want:
            raise UserError(
                f"{file}: tensor {key} has shape {shape} but {directory / CONFIG} implies "
                f"{want[::-1] if conv1d else want}; the config does not match the weights"
            )
        tensor = load(dtype, conv1d).to(device)
        if name in (LM_HEAD, WTE) and separate_head:
            tied[name] = file, tensor
            _check_tied(tied)
        if name != LM_HEAD:
            seen.add(name)
            handed, tensor = [tensor], None
            yield name, handed.pop()  # the consumer's alone: it may free it before the next is read
        del tensor
        release_freed_memory()
    missing = [k for k in expected if k not in seen]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"{directory}: the checkpoint lacks {shown}; its weights are incomplete")


def _check_tied(tied: dict[str, tuple[Path, Tensor]]) -> None:
    """Once both the LM head and the embedding were read: refuse them unless equal, and let both go."""
    if len(tied) < 2:
        return
    (file, head), (_, embedding) = tied.pop(LM_HEAD), tied.pop(WTE)
    if not torch.equal(head, embedding.to(head.dtype)):
        raise UserError(f"{file}: {LM_HEAD} differs from the token embedding; "
                        "only GPT-2 with tied input and output embeddings is supported")


# A weight file's tensor is (file, key, shape, load): ``load(dtype, transpose)`` reads it, converted to
# ``dtype`` (None: as stored) and transposed (a 2-D tensor) when asked.
Loader = Callable[[torch.dtype | None, bool], Tensor]
_CHUNK_BYTES = 1 << 20  # converting or transposing a tensor as it is read: so many bytes at a time


def _checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint: one, or the shards its index names."""
    found = [directory / f for f in WEIGHT_FILES if (directory / f).is_file()]
    if not found:
        raise UserError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    weights = found[0]
    if not weights.name.endswith(".index.json"):
        return [weights]
    index = read_json_object(weights)
    try:
        names = [Path(f) for f in dict.fromkeys(index["weight_map"].values())]
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{weights}: not a valid shard index ({e!r})") from None
    for name in names:  # an index is data: it must not make us read files elsewhere
        if name.is_absolute() or ".." in name.parts:
            raise UserError(f"{weights} names {name}, outside {directory}; a shard index names "
                            "files of its own directory only")
    return [directory / name for name in names]


def _file_tensors(
    file: Path, safetensors: tuple[dict[str, dict], int] | None
) -> Iterator[tuple[Path, str, tuple[int, ...], Loader]]:
    """(file, key, shape, load) for every tensor of one weight file; ``safetensors``: its header and
    data start (``_safetensors_header``), None for a file of ``torch.save``."""
    if safetensors is None:
        for key, tensor in read_state_dict(file).items():
            yield file, key, tuple(tensor.shape), lambda dtype, transpose, t=tensor: (
                (t.t() if transpose else t).to(dtype or t.dtype).contiguous())
        return
    header, data_start = safetensors
    # The largest first (the embedding): converting it while the least memory is held lowers the peak.
    by_size = sorted(header.items(), key=lambda item: -math.prod(item[1]["shape"]))
    with open(file, "rb") as f:
        for key, entry in by_size:
            yield file, key, tuple(entry["shape"]), (
                lambda dtype, transpose, e=entry: _read_tensor(f, data_start, e, file, dtype, transpose))


def _safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (dtype, shape, data_offsets) and where their data starts,
    after safetensors checked the file. We read the tensors ourselves, into memory of their own:
    safetensors' are views of the file mapped into memory, a mapping that (with every page read)
    lives as long as any of them, on top of each tensor that loading converts."""
    try:
        with safe_open(file, framework="pt"):
            pass
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = parse_json(f.read(size), str(file))
    except (SafetensorError, OSError) as e:
        message = f"{file}: corrupt or truncated safetensors file ({e}); save or download it again"
        raise UserError(message) from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_tensor(
    f: BinaryIO, data_start: int, entry: dict, file: Path, dtype: torch.dtype | None, transpose: bool
) -> Tensor:
    """One tensor of a safetensors file (``entry`` of its header), converted and transposed through a
    small buffer, so that no full copy in the stored dtype or layout is ever made."""
    stored = SAFETENSORS_DTYPES.get(entry["dtype"])
    if stored is None:
        raise UserError(f"{file}: tensors of type {entry['dtype']} are not supported; save the model in "
                        "float32, float16 or bfloat16")
    shape = entry["shape"]
    f.seek(data_start + entry["data_offsets"][0])
    if len(shape) == 0 or (not transpose and dtype in (None, stored)):
        return _read_into(f, torch.empty(shape, dtype=stored), file).to(dtype or stored)
    out = torch.empty(shape[::-1] if transpose else shape, dtype=dtype or stored)
    per_chunk = max(1, _CHUNK_BYTES // max(1, math.prod(shape[1:]) * stored.itemsize))
    chunk = torch.empty((min(per_chunk, shape[0]), *shape[1:]), dtype=stored)
    for first in range(0, shape[0], per_chunk):
        part = _read_into(f, chunk[: min(per_chunk, shape[0] - first)], file)
        if transpose:
            out[:, first : first + len(part)] = part.t()
        else:
            out[first : first + len(part)] = part
    return out


def _read_into(f: BinaryIO, tensor: Tensor, file: Path) -> Tensor:
    """Fill the contiguous ``tensor`` with the file's next bytes."""
    size = tensor.numel() * tensor.element_size()
    if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != size:
        raise UserError(f"{file}: truncated safetensors file; save or download it again")
    return tensor


def read_state_dict(file: Path, fix: str = "convert it to safetensors") -> dict[str, Tensor]:
    """A state dict saved with ``torch.save`` (pytorch_model.bin, peft's adapter_model.bin), unpickled
    with ``weights_only=True`` so that it cannot run code; a bad file is one line ending in ``fix``."""
    state = torch_load(file, "a plain state dict of tensors", fix)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{file}: expected a dict of tensors (a state dict)")
    return state


def torch_load(file: Path, what: str, fix: str, *, mmap: bool = True) -> object:
    """``torch.load(file)`` with ``weights_only=True``, so that it cannot run code; a file that is not
    ``what`` (garbage, truncated, or holding objects unsafe to unpickle) is a one-line error ending
    in ``fix``. ``mmap``: map the tensors from the file rather than read them (they then keep its
    disk space allocated while they live, even once it is deleted)."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # pre-2020 format
    except pickle.UnpicklingError as e:  # garbage, or objects that weights_only=True will not build
        detail = str(e).partition("WeightsUnpickler error:")[2].strip().split(". ")[0].splitlines()
        raise UserError(
            f"{file}: not {what} ({detail[0] if detail else 'unpickling failed'}); "
            f"it is corrupt or holds objects that are unsafe to unpickle: {fix}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file}: corrupt or truncated PyTorch file ({reason}); {fix}") from None


# --- Saving --------------------------------------------------------------------------------------


def save_model(model: Transformer, directory: str | Path, *, tokenizer: Tokenizer | None = None) -> None:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face GPT-2 checkpoint in ``directory``:
    model.safetensors in the published layout, then config.json, each file atomically."""
    if getattr(model.lm_head, "bias", None) is not None:
        raise UserError("this model's unembedding has weights and a bias of its own (a processed model, "
                        "GPT2.processed), which a GPT-2 checkpoint cannot hold; save the model it was "
                        "processed from")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == LM_HEAD:  # tied to wte: transformers re-ties it on load
            continue
        tensor = tensor.detach().to("cpu")
        tensors[name] = tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor.contiguous()
    write_atomic(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = hf_config(model.config, dtype=model.transformer.wte.weight.dtype, tokenizer=tokenizer)
    write_atomic(directory / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def hf_config(config: GPT2Config, *, dtype: torch.dtype, tokenizer: Tokenizer | None) -> dict[str, object]:
    """config.json for ``transformers.GPT2LMHeadModel``, with our single dropout rate as all three."""
    eot = tokenizer.eot_token if tokenizer is not None else 50256
    eot_id = eot if eot < config.vocab_size else None  # a custom vocabulary saved without its tokenizer
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        **FIXED_OPTIONS,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": dtype_name,  # transformers 5
        "torch_dtype": dtype_name,  # transformers 4
    }
