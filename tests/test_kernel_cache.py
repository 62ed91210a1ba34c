"""The kernels' cache and compiler cannot break loading (``gpt2.inference.kernels``): a truncated or
hollow cached library, a compiler that fails or never answers, a variant the CPU cannot run (forced,
on a CPU whose flags are faked), each leaves a model that loads and generates on PyTorch's products,
with the reason printed once, in one line, and shown by ``gpt2 info``; a failed build is remembered.
The variant is the best the CPU runs, VNNI where it has it. Each test runs fresh processes on a cache
of its own, seeded with this machine's library (copied, not rebuilt) where it needs one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from gpt2.inference import kernels

NOTICE = "gpt2: the hand-written CPU kernels are off"

LOAD = """
import sys, time
import torch
from gpt2 import GPT2, GPT2Config
from gpt2.inference import kernels
from gpt2.inference.load import load_for_inference
if {cpu!r}:
    kernels._cpu_flags = lambda: {cpu!r}
start = time.perf_counter()
for _ in range({models}):
    config = GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=1, n_head=1)
    model = load_for_inference(GPT2(config), device="cpu")
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, temperature=0)
print(kernels.library() is not None, round(time.perf_counter() - start, 1))
"""


def _load(cache: Path, models: int = 1, cpu: str = "", **env: str) -> tuple[bool, float, list[str]]:
    """Load ``models`` small models for the CPU in a fresh process on ``cache`` (on a CPU of these
    /proc/cpuinfo lines, where ``cpu`` gives them): whether the kernels ran, the seconds the loads took,
    and the process's notices of kernels off."""
    code = LOAD.format(models=models, cpu=cpu)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "GPT2_CACHE": str(cache), **env}, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"  # -7 would be SIGBUS
    assert "Traceback" not in done.stderr, done.stderr
    used, seconds = done.stdout.split()
    return used == "True", float(seconds), [line for line in done.stderr.splitlines() if NOTICE in line]


@pytest.fixture(scope="module")
def built() -> Path:
    """This machine's library (built once into its own cache when it is not there yet)."""
    lib = kernels.library()
    if lib is None:
        pytest.skip("the kernels cannot be built here")
    return Path(lib._name)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty kernel cache for the test and the processes it starts; the library this process
    loaded before is forgotten for the test, and found again after it."""
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "cache"))
    kernels.library.cache_clear()
    yield tmp_path / "cache"
    monkeypatch.undo()
    kernels.library.cache_clear()


def _seed(built: Path, cache: Path, copy: Path | None = None) -> Path:
    """``built`` copied into ``cache`` (as ``copy``; by default under its own name), with its record."""
    copy = copy or cache / "kernels" / built.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, copy)
    copy.with_name(copy.name + ".sha256").write_text(kernels._fingerprint(copy))
    return copy


def _fake_compiler(directory: Path, build: str, version: str = "echo fake-c++ 1.0") -> Path:
    """An executable ``c++`` that runs ``version`` for ``--version`` and ``build`` for anything else,
    each call written to ``calls`` beside it first."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "c++"
    script.write_text(f'#!/bin/sh\necho "$1" >> {directory / "calls"}\n'
                      f'if [ "$1" = --version ]; then {version}; else {build}; fi\n')
    script.chmod(0o755)
    return script


@pytest.mark.slow  # a real rebuild
def test_a_truncated_cached_library_is_rebuilt_not_loaded(built: Path, cache: Path) -> None:
    library = _seed(built, cache)
    os.truncate(library, library.stat().st_size // 2)
    used, _, notices = _load(cache)
    assert used and notices == []
    assert library.stat().st_size == built.stat().st_size and kernels._sound(library)


def _path(compiler: str, build: kernels._Build, cpu: str) -> Path:
    """Where ``kernels.library()`` keeps the library of ``build`` by ``compiler`` for ``cpu``."""
    keyed = [*kernels._FLAGS, *build.flags, cpu]
    return kernels._library_path(compiler, f"kernels-{build.name}", kernels.SOURCE, keyed, 5)


def test_a_truncated_library_whose_rebuild_fails_is_skipped_and_remembered(built: Path, cache: Path,
                                                                           tmp_path: Path) -> None:
    compiler = _fake_compiler(tmp_path / "bin", build="echo 'kernels.cpp:1:1: error: no luck' >&2; exit 1")
    cpu = kernels._cpu_flags()
    library = _seed(built, cache, _path(str(compiler), kernels._choose(cpu), cpu))
    os.truncate(library, 4096)
    used, _, notices = _load(cache, CXX=str(compiler))
    assert not used and len(notices) == 1
    assert "unsound" in notices[0] and "error: no luck" in notices[0]
    assert library.with_name(library.name + ".failed").is_file()


def test_a_library_missing_a_kernel_is_skipped_with_the_reason(built: Path, cache: Path) -> None:
    library = _seed(built, cache)
    source = cache / "hollow.cpp"
    source.write_text('extern "C" int matvec_abilities() { return 31; }\n')
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    library.with_name(library.name + ".sha256").write_text(kernels._fingerprint(library))
    used, _, notices = _load(cache)
    assert not used and len(notices) == 1
    assert "lacks matvec_f32, matvec_bf16, matvec_i8, matvec_i4, matvec_attend" in notices[0]


def test_a_compiler_that_never_answers_is_given_up_on_within_the_bound(cache: Path, tmp_path: Path) -> None:
    compiler = _fake_compiler(tmp_path / "bin", build="sleep 600", version="sleep 600")
    start = time.monotonic()
    used, seconds, notices = _load(cache, CXX=str(compiler), GPT2_KERNELS_TIMEOUT="2")
    assert not used and seconds < 60, f"loading took {seconds} s (whole process: {time.monotonic() - start})"
    assert len(notices) == 1 and "c++ --version did not answer within 2 s" in notices[0]


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaps counts as ended)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_build_that_never_ends_is_given_up_on_and_remembered(cache: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    compiler = _fake_compiler(bin_dir, build=f"sleep 600 & echo $! > {bin_dir / 'pid'}; wait")
    env = {"CXX": str(compiler), "GPT2_KERNELS_TIMEOUT": "2"}
    used, seconds, notices = _load(cache, **env)
    assert not used and seconds < 60 and len(notices) == 1
    assert "c++ did not answer within 2 s" in notices[0] and "remembered" not in notices[0]
    assert [p.suffix for p in (cache / "kernels").iterdir()] == [".failed"]  # no half-written library
    assert _gone(int((bin_dir / "pid").read_text())), "the compiler's own children are killed too"
    assert (bin_dir / "calls").read_text().split() == ["--version", "-O3"]
    used, _, notices = _load(cache, **env)  # later processes do not try again ...
    assert not used and len(notices) == 1 and (bin_dir / "calls").read_text().split()[2:] == ["--version"]
    assert "c++ did not answer within 2 s" in notices[0] and "remembered in" in notices[0]
    with pytest.MonkeyPatch.context() as m:  # ... unless asked to
        m.setenv("GPT2_KERNELS_RETRY", "1")
        for name, value in env.items():
            m.setenv(name, value)
        assert kernels.summary() == "off: c++ did not answer within 2 s (GPT2_KERNELS_TIMEOUT)"
    assert (bin_dir / "calls").read_text().split()[-1] == "-O3"


def test_a_failed_build_is_told_by_its_first_error_line(cache: Path, tmp_path: Path) -> None:
    compiler = _fake_compiler(tmp_path / "bin", build="echo 'In file included from x.h:1,' >&2; "
                              "echo 'kernels.cpp:3:9: error: immintrin.h: No such file' >&2; exit 1")
    used, _, notices = _load(cache, CXX=str(compiler))
    assert not used and len(notices) == 1
    assert notices[0].endswith("c++ failed: kernels.cpp:3:9: error: immintrin.h: No such file")


def test_the_notice_is_printed_once_per_process_and_not_for_GPT2_MATVEC_0(cache: Path) -> None:
    used, _, notices = _load(cache, models=2, CXX="no-such-compiler")
    assert not used and len(notices) == 1 and "no-such-compiler is not on PATH" in notices[0]
    assert _load(cache, models=2, GPT2_MATVEC="0")[::2] == (False, [])


def _info(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """The kernels row of ``gpt2 info --preset tiny`` under ``env``, the kernels looked for afresh."""
    kernels.library.cache_clear()
    with monkeypatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        code, out, err = run_cli(capsys, "info", "--preset", "tiny")
    assert code == 0 and NOTICE not in err, err  # the row says it: no notice besides
    return next(line for line in out.splitlines() if line.startswith("kernels")).split(None, 1)[1]


def test_gpt2_info_shows_whether_the_kernels_are_in_use_and_why_not(
        built: Path, cache: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _info(capsys, monkeypatch, GPT2_MATVEC="0") == "off: GPT2_MATVEC=0"
    assert _info(capsys, monkeypatch, CXX="no-such-compiler") == \
        "off: no C++ compiler: no-such-compiler is not on PATH (install g++, or name one in CXX)"
    assert not (cache / "kernels").exists()
    _seed(built, cache)
    best = kernels._choose(kernels._cpu_flags()).name
    assert _info(capsys, monkeypatch) == f"on: {best} (fp32, bf16, int8, int4, attention)"
    variants = "avx512bf16, avx512, avx512+vnni, avx2, avx2+vnni"
    assert _info(capsys, monkeypatch, GPT2_KERNELS_ISA="sse4") == \
        f"off: GPT2_KERNELS_ISA=sse4 is not a variant of the kernels: {variants}"


# /proc/cpuinfo's lines of CPUs of each level (their flags cut to the ones that matter here)
BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx"
SKYLAKE_CLIENT = f"model name\t: Skylake\nflags\t\t: {BASE} avx2 fma f16c bmi1 bmi2"
ALDER_LAKE = f"model name\t: Alder Lake\nflags\t\t: {BASE} avx2 fma f16c avx_vnni"
SKYLAKE_SP = f"model name\t: Skylake-SP\nflags\t\t: {BASE} avx2 fma f16c avx512f avx512dq avx512bw avx512vl"
CASCADE_LAKE = SKYLAKE_SP.replace("Skylake-SP", "Cascade Lake") + " avx512_vnni"
SAPPHIRE_RAPIDS = CASCADE_LAKE.replace("Cascade Lake", "Sapphire Rapids") + " avx512_bf16 avx_vnni"
SANDY_BRIDGE = f"model name\t: Sandy Bridge\nflags\t\t: {BASE}"


@pytest.mark.parametrize(("cpu", "chosen"), [(SKYLAKE_CLIENT, "avx2"), (ALDER_LAKE, "avx2+vnni"),
                                             (SKYLAKE_SP, "avx512"), (CASCADE_LAKE, "avx512+vnni"),
                                             (SAPPHIRE_RAPIDS, "avx512bf16")])
def test_the_best_variant_the_cpu_runs_is_built_with_vnni_where_it_has_it(cpu: str, chosen: str) -> None:
    build = kernels._choose(cpu)
    assert build.name == chosen
    assert not any(flag.startswith("-march") for flag in build.flags), "a variant needs just what is checked"
    assert ("-mavx512f" in build.flags) == chosen.startswith("avx512")
    assert ("-mavx512bf16" in build.flags) == (chosen == "avx512bf16")
    assert bool({"-mavx512vnni", "-mavxvnni"} & set(build.flags)) == (chosen not in ("avx2", "avx512"))


def test_each_variant_and_cpu_has_a_library_of_its_own(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The key of a build covers the variant's flags and the CPU, besides the source and compiler."""
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path))
    compiler = str(_fake_compiler(tmp_path / "bin", build="exit 1"))
    builds = [kernels._choose(cpu) for cpu in (SKYLAKE_CLIENT, ALDER_LAKE, SAPPHIRE_RAPIDS)]
    paths = {_path(compiler, build, SAPPHIRE_RAPIDS) for build in builds}
    assert len(paths) == 3 and {p.name.split("-")[1] for p in paths} == {"avx2", "avx2+vnni", "avx512bf16"}
    assert _path(compiler, builds[0], SKYLAKE_CLIENT) not in paths
    assert _path(compiler, builds[0], SAPPHIRE_RAPIDS) in paths


def test_GPT2_KERNELS_ISA_forces_a_variant_the_cpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    for forced, chosen in [("avx2", "avx2"), ("avx512", "avx512+vnni"), ("avx2+vnni", "avx2+vnni"),
                           ("avx512bf16", "avx512bf16")]:
        monkeypatch.setenv("GPT2_KERNELS_ISA", forced)
        assert kernels._choose(SAPPHIRE_RAPIDS if forced != "avx2" else SKYLAKE_CLIENT).name == chosen


@pytest.mark.parametrize(("cpu", "forced", "why"), [
    (SKYLAKE_CLIENT, "avx512",
     "GPT2_KERNELS_ISA=avx512 needs avx512f, avx512bw, avx512dq, avx512vl, which this CPU lacks"),
    (CASCADE_LAKE, "avx512bf16", "GPT2_KERNELS_ISA=avx512bf16 needs avx512_bf16, which this CPU lacks"),
    (SKYLAKE_CLIENT, "avx2+vnni", "GPT2_KERNELS_ISA=avx2+vnni needs avx_vnni, which this CPU lacks"),
    (SAPPHIRE_RAPIDS, "avx512bf16+vnni", "GPT2_KERNELS_ISA=avx512bf16+vnni is not a variant of the kernels: "
                                         "avx512bf16, avx512, avx512+vnni, avx2, avx2+vnni"),
    (SANDY_BRIDGE, "", "this CPU has no AVX2 with FMA and F16C, the least the kernels need"),
])
def test_a_variant_the_cpu_cannot_run_is_refused_with_the_reason(cpu: str, forced: str, why: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT2_KERNELS_ISA", forced)
    with pytest.raises(kernels.Unavailable) as refused:
        kernels._choose(cpu)
    assert str(refused.value) == why


def test_a_cpu_that_is_not_x86_keeps_pytorchs_products(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    assert kernels.summary() == \
        "off: this CPU (aarch64) is not x86-64: the kernels are written for AVX2 and AVX-512"
    assert kernels.variant() is None and not kernels.kernel("fp32", 64)


def test_a_forced_variant_the_cpu_lacks_leaves_pytorchs_products_with_one_line(cache: Path) -> None:
    """Forced where the CPU lacks its instructions (an AVX2 CPU's flags, faked in the process): nothing is
    built, the model loads and generates on PyTorch's products, and the reason is printed once."""
    used, _, notices = _load(cache, models=2, cpu=SKYLAKE_CLIENT, GPT2_KERNELS_ISA="avx512bf16")
    assert not used and len(notices) == 1
    assert notices[0].endswith("GPT2_KERNELS_ISA=avx512bf16 needs avx512f, avx512bw, avx512dq, avx512vl, "
                               "avx512_vnni, avx512_bf16, which this CPU lacks")
    assert not (cache / "kernels").exists()
