"""The tokenizer: parity with tiktoken and transformers, every file format, training, the CLI, bad input.

The references are built independently of gpt2.tokenizer.bpe: a tiktoken.Encoding over the ranks file
with GPT-2's regex (``reference_encoding``, in conftest.py, beside ``gpt2_tokenizer``, ours), and here
OpenAI's encoder.json + vocab.bpe derived from the ranks by plain BPE, and transformers' GPT2Tokenizer
over those files.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken

from gpt2.cli import main
from gpt2.tokenizer.bpe import Tokenizer, train_tokenizer
from gpt2.util.errors import UserError

EOT = "<|endoftext|>"

ADVERSARIAL = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing  ",
    "it's I'll we've they're I'm he'd don't 'S 'LL it’s",
    "a  b   c    d\t\te\n\nf\r\n\r\ng \n \n",
    "\t\t\t x",
    "\n" * 7,
    " " * 17 + "y",
    "1234567890 3.14159 -42 1,000,000 ١٢٣ ½ ² 0x7fff",
    "naïve café déjà vu Æsir straße ﬁ",
    "e\u0301 a\u0300\u0316 Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334",
    "日本語のテキストと中文文本 한국어 텍스트",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "control \x00\x01\x07\x1b[31m\x7f\x1c\x1d\x1e\x1f\x85 \u00a0\u2028\u2029\u200b\ufeff",
    EOT,
    f"before{EOT}after {EOT} <|endo",
    "Ω≈ç√∫˜µ≤≥÷ ÅÍÎÏ˝ÓÔ\uf8ffÒÚÆ☃",
    "العربية עברית हिन्दी",
    "\U0001d54b\U0001d559\U0001d556 \U0010ffff",
    "x" * 1000,
    "ab" * 500 + " " + "😀" * 100,
    "def f(x):\n    return x ** 2  # comment\n",
]
LONE_SURROGATES = ["\ud800", "a\udfffb", "smile \ud83d!"]


# -- references built here, independently of gpt2.tokenizer.bpe -----------------------------------------


@functools.cache
def openai_bytes_to_unicode() -> dict[int, str]:
    """As in OpenAI's gpt-2 encoder.py."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def spell(token: bytes) -> str:
    table = openai_bytes_to_unicode()
    return "".join(table[b] for b in token)


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """For each token in rank order, plain BPE on its bytes with the lower ranks; two parts remain."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while True:
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if ranks.get(parts[i] + parts[i + 1], rank) < rank]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2, token
        merges.append((parts[0], parts[1]))
    return merges


def write_vocab_and_merges(directory: Path, vocab: dict[str, int], merges: list[tuple[str, str]],
                           names: tuple[str, str] = ("encoder.json", "vocab.bpe")) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / names[0]).write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges), ""]
    (directory / names[1]).write_text("\n".join(lines), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def ranks(gpt2_ranks_file: Path) -> dict[bytes, int]:
    lines = gpt2_ranks_file.read_text().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


@pytest.fixture(scope="module")
def shakespeare(shakespeare_files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8") for f in shakespeare_files]


@pytest.fixture(scope="module")
def openai_dir(ranks: dict[bytes, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2's encoder.json + vocab.bpe, as OpenAI published them, derived from the ranks."""
    vocab = {spell(token): rank for token, rank in ranks.items()} | {EOT: len(ranks)}
    merges = [(spell(a), spell(b)) for a, b in derive_merges(ranks)]
    return write_vocab_and_merges(tmp_path_factory.mktemp("openai"), vocab, merges)


@pytest.fixture(scope="module")
def saved_dir(gpt2_tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("saved")
    gpt2_tokenizer.save_pretrained(directory)
    return directory


# -- parity with tiktoken ----------------------------------------------------------------------------------


def test_shakespeare_parity_with_tiktoken(gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding,
                                          shakespeare: list[str]):
    expected = [reference_encoding.encode_ordinary(text) for text in shakespeare]
    ours = [gpt2_tokenizer.encode(text) for text in shakespeare]
    mismatching_ids = sum(sum(a != b for a, b in zip(x, y, strict=False)) + abs(len(x) - len(y))
                          for x, y in zip(ours, expected, strict=True))
    assert mismatching_ids == 0
    assert [gpt2_tokenizer.decode(ids) for ids in ours] == shakespeare
    assert gpt2_tokenizer.encode_batch(shakespeare, num_threads=2) == expected


def test_batch_encoding_cuts_long_texts_without_changing_ids(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding, shakespeare: list[str]
):
    from gpt2.tokenizer.bpe import _split_at_lines

    texts = [*shakespeare[:2], "\n".join(ADVERSARIAL) * 3]
    for text in texts:
        pieces = _split_at_lines(text, 200)
        assert len(pieces) > 3 and "".join(pieces) == text
        apart = [i for piece in pieces for i in reference_encoding.encode_ordinary(piece)]
        assert apart == reference_encoding.encode_ordinary(text)
    one_long_text = "".join(shakespeare[:8])  # long enough to be cut into pieces for the threads
    assert gpt2_tokenizer.encode_batch([one_long_text], num_threads=2) == [
        reference_encoding.encode_ordinary(one_long_text)
    ]


def test_adversarial_parity_with_tiktoken(gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding):
    for text in ADVERSARIAL:
        ids = gpt2_tokenizer.encode(text)
        assert ids == reference_encoding.encode_ordinary(text), text
        assert gpt2_tokenizer.decode(ids) == text
    assert gpt2_tokenizer.encode_batch(ADVERSARIAL, num_threads=2) == (
        reference_encoding.encode_ordinary_batch(ADVERSARIAL)
    )


def test_lone_surrogates_are_replaced_like_tiktoken(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
):
    # A lone surrogate cannot be UTF-8 encoded; tiktoken replaces it with U+FFFD, and so do we,
    # so the round trip gives U+FFFD where the surrogate was.
    for text in LONE_SURROGATES:
        ids = gpt2_tokenizer.encode(text)
        assert ids == reference_encoding.encode_ordinary(text)
        replaced = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        assert ids == gpt2_tokenizer.encode(replaced)
        assert gpt2_tokenizer.decode(ids) == replaced


def test_special_tokens_are_text_unless_allowed(
    gpt2_tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
):
    text = f"a{EOT}b"
    assert gpt2_tokenizer.eot_token == 50256 and gpt2_tokenizer.n_vocab == 50257
    assert gpt2_tokenizer.encode(text) == reference_encoding.encode_ordinary(text)
    assert 50256 not in gpt2_tokenizer.encode(text)
    assert gpt2_tokenizer.encode(text, allowed_special="all") == reference_encoding.encode(
        text, allowed_special="all"
    )
    assert gpt2_tokenizer.encode(text, allowed_special={EOT}) == [
        *gpt2_tokenizer.encode("a"), 50256, *gpt2_tokenizer.encode("b")
    ]
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode(text, allowed_special="all")) == text
    with pytest.raises(UserError, match=re.escape("<|startoftext|>")):
        gpt2_tokenizer.encode(text, allowed_special={"<|startoftext|>"})


def test_decode(gpt2_tokenizer: Tokenizer):
    char = "\U0001d54b"  # four bytes of UTF-8, more than one token
    ids = gpt2_tokenizer.encode(char)
    assert len(ids) > 1 and gpt2_tokenizer.decode_bytes(ids) == char.encode()
    assert gpt2_tokenizer.decode(ids[:1]) == "\ufffd"  # a cut-off character
    for bad in (50257, -1, 2**70):
        with pytest.raises(UserError, match=f"token id {bad} is not in"):
            gpt2_tokenizer.decode([15496, bad])
    assert "n_vocab=50257" in repr(gpt2_tokenizer)


# -- file formats ------------------------------------------------------------------------------------------


def test_same_ids_from_every_format(gpt2_ranks_file: Path, openai_dir: Path,
                                    reference_encoding: tiktoken.Encoding, shakespeare: list[str],
                                    tmp_path: Path):
    from transformers import GPT2Tokenizer

    hf_dir = tmp_path / "hf-slow"
    hf_dir.mkdir()
    shutil.copy(openai_dir / "encoder.json", hf_dir / "vocab.json")
    shutil.copy(openai_dir / "vocab.bpe", hf_dir / "merges.txt")
    hf = GPT2Tokenizer.from_pretrained(hf_dir)
    hf.save_pretrained(tmp_path / "hf-written")
    fast_dir = tmp_path / "hf-fast"
    fast_dir.mkdir()
    shutil.copy(tmp_path / "hf-written" / "tokenizer.json", fast_dir)
    string_merges_dir = tmp_path / "hf-fast-string-merges"  # the older layout, as on the hub's gpt2
    string_merges_dir.mkdir()
    data = json.loads((fast_dir / "tokenizer.json").read_text())
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (string_merges_dir / "tokenizer.json").write_text(json.dumps(data))
    tiktoken_dir = tmp_path / "tiktoken"
    tiktoken_dir.mkdir()
    shutil.copy(gpt2_ranks_file, tiktoken_dir)

    texts = [t for t in ADVERSARIAL if EOT not in t] + [shakespeare[0][:100_000]]
    for text in texts:  # the test's own files are GPT-2's: transformers agrees with tiktoken on them
        assert hf.encode(text) == reference_encoding.encode_ordinary(text), text
    for directory in (openai_dir, hf_dir, fast_dir, string_merges_dir, tiktoken_dir):
        tokenizer = Tokenizer.from_pretrained(directory)
        assert (tokenizer.n_vocab, tokenizer.eot_token) == (50257, 50256)
        for text in [*texts, *ADVERSARIAL]:
            expected = reference_encoding.encode(text, allowed_special="all")
            assert tokenizer.encode(text, allowed_special="all") == expected


def test_save_pretrained_loads_in_transformers(gpt2_tokenizer: Tokenizer, saved_dir: Path, openai_dir: Path,
                                               reference_encoding: tiktoken.Encoding):
    from transformers import AutoTokenizer, GPT2Tokenizer

    # The merges derived by save_pretrained are OpenAI's (derived independently above).
    assert (saved_dir / "merges.txt").read_text() == (openai_dir / "vocab.bpe").read_text()
    vocab = json.loads((saved_dir / "vocab.json").read_text())
    assert vocab == json.loads((openai_dir / "encoder.json").read_text())
    auto = AutoTokenizer.from_pretrained(saved_dir)
    slow_files = GPT2Tokenizer(vocab=str(saved_dir / "vocab.json"), merges=str(saved_dir / "merges.txt"))
    for text in ADVERSARIAL:
        ids = gpt2_tokenizer.encode(text, allowed_special="all")  # transformers always matches special tokens
        assert auto.encode(text) == ids, text
        assert slow_files.encode(text) == ids, text
    assert auto.eos_token_id == gpt2_tokenizer.eot_token
    loaded = Tokenizer.from_pretrained(saved_dir)
    assert [loaded.encode(t) for t in ADVERSARIAL] == [
        reference_encoding.encode_ordinary(t) for t in ADVERSARIAL
    ]


def test_save_pretrained_overwrites_cleanly(gpt2_tokenizer: Tokenizer, saved_dir: Path, tmp_path: Path):
    shutil.copytree(saved_dir, tmp_path / "again")
    (tmp_path / "again" / "vocab.json").write_text("{}")
    gpt2_tokenizer.save_pretrained(tmp_path / "again")
    names = {p.name for p in (tmp_path / "again").iterdir()}
    assert names == {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"}  # no temporary files left behind
    assert Tokenizer.from_pretrained(tmp_path / "again").encode("Hello") == gpt2_tokenizer.encode("Hello")


# -- training ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(shakespeare_files: list[Path]) -> list[Path]:
    return shakespeare_files[:3]


@pytest.fixture(scope="module")
def trained(small_corpus: list[Path]) -> Tokenizer:
    return train_tokenizer(small_corpus, 1000)


def test_train_tokenizer(trained: Tokenizer, small_corpus: list[Path], tmp_path: Path):
    from transformers import AutoTokenizer

    assert (trained.n_vocab, trained.eot_token) == (1000, 999)
    text = "".join(f.read_text(encoding="utf-8") for f in small_corpus)
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert max(ids) < 999
    assert len(ids) < 0.5 * len(text.encode())
    trained.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(text) == ids
    for sample in [*ADVERSARIAL, text[:20_000]]:
        assert loaded.encode(sample) == trained.encode(sample)
        assert hf.encode(sample) == trained.encode(sample, allowed_special="all"), sample
        assert trained.decode(trained.encode(sample)) == sample


def test_train_refuses_bad_input(small_corpus: list[Path], tmp_path: Path):
    with pytest.raises(UserError, match="at least 257"):
        train_tokenizer(small_corpus, 256)
    empty, binary, latin1 = tmp_path / "empty.txt", tmp_path / "data.bin", tmp_path / "latin1.txt"
    empty.write_bytes(b"")
    binary.write_bytes(b"text\n\x00\x01\x02\x03")
    latin1.write_bytes("café\n".encode("latin-1"))
    for path in (tmp_path / "missing.txt", empty, binary, latin1, tmp_path):
        with pytest.raises(UserError, match=str(path)):
            train_tokenizer([small_corpus[0], path], 300)


def test_cli_train_encode_decode(small_corpus: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "tok"
    files = [str(f) for f in small_corpus]
    assert main(["tokenizer", "train", *files, "--vocab-size", "600", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "600 tokens" in printed and str(out) in printed and " s" in printed
    tokenizer = Tokenizer.from_pretrained(out)
    assert tokenizer.n_vocab == 600
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "To be, or not to be"]) == 0
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert ids == tokenizer.encode("To be, or not to be")
    assert main(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "To be, or not to be\n"
    assert main(["tokenizer", "decode", "--tokenizer", str(out), "600"]) == 2
    assert "600" in capsys.readouterr().err


def test_cli_error_is_one_line(tmp_path: Path):
    missing = tmp_path / "missing.txt"
    result = subprocess.run(
        [sys.executable, "-m", "gpt2", "tokenizer", "train", str(missing), "--vocab-size", "300",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(missing) in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# -- bad vocabulary files ----------------------------------------------------------------------------------


def tiny_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = {c: i for i, c in enumerate(openai_bytes_to_unicode().values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab | {EOT: len(vocab)}


TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
HF_NAMES = ("vocab.json", "merges.txt")


def test_tiny_vocabulary_loads(tmp_path: Path):
    directory = write_vocab_and_merges(tmp_path, tiny_vocab(TINY_MERGES), TINY_MERGES, HF_NAMES)
    tokenizer = Tokenizer.from_pretrained(directory)
    assert tokenizer.encode(" the") == [258]
    assert tokenizer.n_vocab == 260


def bad_ranks_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.tiktoken"
    path.write_text("IQ== 0\nIg== 1\nthis is not base64 2\n")
    return path


def few_ranks_file(tmp_path: Path) -> Path:
    path = tmp_path / "few.tiktoken"
    path.write_text("IQ== 0\nIg== 1\n")
    return path


def json_list_vocab(tmp_path: Path) -> Path:
    write_vocab_and_merges(tmp_path, {}, [], HF_NAMES)
    (tmp_path / "vocab.json").write_text("[1, 2, 3]")
    return tmp_path / "vocab.json"


def not_json_vocab(tmp_path: Path) -> Path:
    write_vocab_and_merges(tmp_path, {}, [], HF_NAMES)
    (tmp_path / "vocab.json").write_text("{'a': 1")
    return tmp_path / "vocab.json"


def unknown_merge_token(tmp_path: Path) -> Path:
    merges = [*TINY_MERGES, ("Ġthe", "zzz")]
    write_vocab_and_merges(tmp_path, tiny_vocab(TINY_MERGES), merges, HF_NAMES)
    return tmp_path / "vocab.json"


def merges_out_of_order(tmp_path: Path) -> Path:
    swapped = [TINY_MERGES[1], TINY_MERGES[0], TINY_MERGES[2]]
    write_vocab_and_merges(tmp_path, tiny_vocab(TINY_MERGES), swapped, ("encoder.json", "vocab.bpe"))
    return tmp_path / "encoder.json"


def sentencepiece_style_merges(tmp_path: Path) -> Path:
    vocab = tiny_vocab(TINY_MERGES) | {"▁": 300, "▁t": 301}
    write_vocab_and_merges(tmp_path, vocab, [*TINY_MERGES, ("▁", "t")], HF_NAMES)
    return tmp_path / "vocab.json"


def merges_cut_short(tmp_path: Path) -> Path:
    write_vocab_and_merges(tmp_path, tiny_vocab(TINY_MERGES), TINY_MERGES[:2], HF_NAMES)
    return tmp_path / "vocab.json"


def malformed_merges_line(tmp_path: Path) -> Path:
    write_vocab_and_merges(tmp_path, tiny_vocab(TINY_MERGES), TINY_MERGES, HF_NAMES)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nh e x\n")
    return tmp_path / "merges.txt"


def wordpiece_tokenizer_json(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    return path


def tokenizer_json_without_model(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"version": "1.0"}))
    return path


def empty_directory(tmp_path: Path) -> Path:
    (tmp_path / "README.md").write_text("no tokenizer here")
    return tmp_path


@pytest.mark.parametrize("make", [
    bad_ranks_file, few_ranks_file, json_list_vocab, not_json_vocab, unknown_merge_token, merges_out_of_order,
    sentencepiece_style_merges, merges_cut_short, malformed_merges_line, wordpiece_tokenizer_json,
    tokenizer_json_without_model, empty_directory,
])
def test_bad_vocabulary_files(make, tmp_path: Path):
    path = make(tmp_path)
    with pytest.raises(UserError) as error:
        if path.suffix == ".tiktoken":
            Tokenizer.from_file(path)
        else:
            Tokenizer.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message


def test_load_dispatches_and_refuses_missing_paths(gpt2_ranks_file: Path, saved_dir: Path, tmp_path: Path,
                                                   reference_encoding: tiktoken.Encoding):
    from_file, from_directory = Tokenizer.load(gpt2_ranks_file), Tokenizer.load(saved_dir)
    expected = reference_encoding.encode_ordinary("Hello there")
    assert from_file.encode("Hello there") == from_directory.encode("Hello there") == expected
    with pytest.raises(UserError, match="no such file"):
        Tokenizer.from_file(tmp_path / "gpt2.tiktoken")
    with pytest.raises(UserError, match="no such tokenizer file or directory"):
        Tokenizer.load(tmp_path / "missing")


RSS_OF_LOADING = """
import re, sys
import tiktoken, tokenizers, torch  # their code, loaded before the count starts (as where models load)
from gpt2.tokenizer.bpe import Tokenizer

def rss() -> int:
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

before = rss()
tokenizer = Tokenizer.from_pretrained(sys.argv[1])
print(rss() - before)
"""


def test_loading_gpt2s_tokenizer_json_holds_little_beyond_its_ranks(saved_dir: Path) -> None:
    """The ranks are made again once the parsed tokenizer.json is freed: made among the parser's
    objects, the half-empty pages left between them kept 27-28 MiB with the process; now 17-19."""
    done = subprocess.run([sys.executable, "-c", RSS_OF_LOADING, str(saved_dir)], capture_output=True,
                          text=True, check=True)
    held = int(done.stdout.split()[-1])
    assert held < 23 * 2**20, f"loading GPT-2's tokenizer.json left {held / 2**20:.1f} MiB more resident"
