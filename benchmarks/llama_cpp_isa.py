"""llama.cpp built for one x86 instruction-set level, to race our kernels forced to the same level
(``GPT2_KERNELS_ISA``) in ``benchmarks/generate.py --isa LEVEL --llama-dir DIR``.

Builds llama-cpp-python (0.3.36 by default) from its sdist into a directory of its own per level
(``pip install --no-deps --no-cache-dir --target DIR SDIST`` with ``CMAKE_ARGS`` for the level) and
then checks the build: llama.cpp's own ``llama_print_system_info()`` must list exactly the level's
instruction sets (imported from DIR in a fresh process, which must load DIR's libraries), and the
machine code of every library must hold none of the sets the level leaves out (``objdump -d``:
no EVEX-encoded instruction, i.e. no AVX-512 at all, for ``avx2``; no AVX512-BF16, VBMI, AVX-VNNI
or AMX instruction for ``avx512``; no VBMI, AVX-VNNI or AMX for ``avx512bf16``). What was built,
the options, the build time and the checks go to DIR/BUILD.json.

The levels (ours: ``gpt2.inference.kernels``' variants):

- ``avx512bf16``: AVX-512 F/CD/BW/DQ/VL + VNNI + BF16 (today's kernels on this machine);
- ``avx512``: AVX-512 F/CD/BW/DQ/VL + VNNI, no BF16;
- ``avx2``: AVX2 + FMA + F16C + AVX-VNNI, no AVX-512 at all.

Every level also has SSE4.2, AVX, AVX2, FMA, F16C and BMI2, and none has AVX512-VBMI or AMX;
``GGML_NATIVE``, ``GGML_BACKEND_DL`` and ``GGML_CPU_ALL_VARIANTS`` are off (one CPU backend,
built for the level, linked in), the multimodal library is not built (``LLAVA_BUILD=OFF``); the
rest is llama.cpp's defaults (OpenMP, llamafile's sgemm, Q4_0 repacking).

    nice -n 19 python benchmarks/llama_cpp_isa.py avx2 [avx512 avx512bf16] [--out /work/llama-isa]
        [--sdist llama_cpp_python-0.3.36.tar.gz] [--jobs 2] [--force] [--verify-only]

Each level goes to OUT/LEVEL (default OUT: ``../llama-isa`` beside the checkout; its build log to
OUT/LEVEL.log); without ``--sdist`` the sdist is fetched with ``pip download --no-binary :all:
--no-deps``. A build takes about ten minutes or more on 2 cores; OUT/LEVEL.lock keeps a second build
of the level out while one runs. Run it with the Python that runs ``generate.py``: the check imports
llama_cpp, which needs numpy, diskcache, jinja2 and typing-extensions (not installed: ``--no-deps``).
Standard library only (and ``objdump``, a C/C++ compiler, CMake and pip with access to PyPI for the
build backend).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.3.36"
# llama.cpp's x86 features as llama_print_system_info() names them (SSE3 and SSSE3 are always there).
FEATURES = ["AVX", "AVX_VNNI", "AVX2", "F16C", "FMA", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI",
            "AVX512_BF16", "AMX_INT8"]
BASE = {"GGML_SSE42": True, "GGML_AVX": True, "GGML_AVX2": True, "GGML_FMA": True, "GGML_F16C": True,
        "GGML_BMI2": True, "GGML_AVX_VNNI": False, "GGML_AVX512": False, "GGML_AVX512_VBMI": False,
        "GGML_AVX512_VNNI": False, "GGML_AVX512_BF16": False, "GGML_AMX_TILE": False,
        "GGML_AMX_INT8": False, "GGML_AMX_BF16": False}
COMMON = {"GGML_NATIVE": False, "GGML_BACKEND_DL": False, "GGML_CPU_ALL_VARIANTS": False,
          "LLAVA_BUILD": False}
LEVELS: dict[str, dict[str, bool]] = {
    "avx512bf16": {**BASE, "GGML_AVX512": True, "GGML_AVX512_VNNI": True, "GGML_AVX512_BF16": True},
    "avx512": {**BASE, "GGML_AVX512": True, "GGML_AVX512_VNNI": True},
    "avx2": {**BASE, "GGML_AVX_VNNI": True},
}
# Instructions a level must not hold, as regular expressions over objdump's lines (bytes and text).
EVEX = r"^\s*[0-9a-f]+:\t(?:(?:26|2e|36|3e|64|65|67) )*62 "  # 0x62 opens EVEX in 64-bit mode
BF16 = r"\t(?:vcvtne2ps2bf16|vcvtneps2bf16|vdpbf16ps)\b"
VBMI = r"\t(?:vpermb|vpermi2b|vpermt2b|vpmultishiftqb)\b"
AVX_VNNI = r"\t\{vex\} vpdp(?:bu|ws)sds?\b"  # objdump marks the VEX forms of vpdpbusd & co
AMX = (r"\t(?:tileloadd|tileloaddt1|tilestored|tdpb[su][su]d|tdpbf16ps|ldtilecfg|sttilecfg|tilezero"
       r"|tilerelease)\b")
EXCLUDED: dict[str, dict[str, str]] = {
    "avx512bf16": {"AVX512-VBMI": VBMI, "AVX-VNNI": AVX_VNNI, "AMX": AMX},
    "avx512": {"AVX512-BF16": BF16, "AVX512-VBMI": VBMI, "AVX-VNNI": AVX_VNNI, "AMX": AMX},
    "avx2": {"AVX-512 (EVEX)": EVEX, "AMX": AMX},
}
# Instructions a level must hold somewhere in libggml-cpu (the sets it is for are really used).
EXPECTED: dict[str, dict[str, str]] = {
    "avx512bf16": {"AVX-512 (EVEX)": EVEX, "AVX512-BF16": BF16},
    "avx512": {"AVX-512 (EVEX)": EVEX, "AVX512-VNNI": r"\tvpdpbusds?\b.*zmm"},
    "avx2": {"AVX-VNNI": AVX_VNNI, "FMA": r"\tvfmadd\d+ps\b.*ymm"},
}


def features(options: dict[str, bool]) -> set[str]:
    """The x86 features llama_print_system_info() lists for a build with these options."""
    named = {"AVX": "GGML_AVX", "AVX_VNNI": "GGML_AVX_VNNI", "AVX2": "GGML_AVX2", "F16C": "GGML_F16C",
             "FMA": "GGML_FMA", "BMI2": "GGML_BMI2", "AVX512": "GGML_AVX512",
             "AVX512_VBMI": "GGML_AVX512_VBMI", "AVX512_VNNI": "GGML_AVX512_VNNI",
             "AVX512_BF16": "GGML_AVX512_BF16"}
    found = {name for name, option in named.items() if options[option]}
    if options["GGML_AMX_INT8"] and options["GGML_AVX512_VNNI"]:
        found.add("AMX_INT8")
    return found


def cmake_args(level: str) -> str:
    return " ".join(f"-D{k}={'ON' if v else 'OFF'}" for k, v in {**COMMON, **LEVELS[level]}.items())


def download_sdist(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "--dest", str(dest), f"llama-cpp-python=={VERSION}"], check=True)
    return next(dest.glob("llama_cpp_python-*.tar.gz"))


def build(level: str, sdist: Path, target: Path, jobs: int, log: Path) -> float:
    """pip-installs the sdist into ``target`` for ``level``; the build's seconds."""
    env = {**os.environ, "CMAKE_ARGS": cmake_args(level), "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs),
           "FORCE_CMAKE": "1"}
    env.pop("SOURCE_DATE_EPOCH", None)
    start = time.perf_counter()
    with open(log, "w") as out:
        print(f"CMAKE_ARGS={env['CMAKE_ARGS']}", file=out, flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--verbose", "--no-deps",
                               "--no-cache-dir", "--upgrade", "--target", str(target), str(sdist)],
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{level}: pip install failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
with open("/proc/self/maps") as f:
    libs = sorted({l.split()[-1] for l in f if ".so" in l and ("ggml" in l or "llama" in l)})
print(json.dumps({"module": llama_cpp.__file__, "version": llama_cpp.__version__, "info": info,
                  "libs": libs}))
"""


def probe(target: Path) -> dict:
    """llama_cpp imported from ``target`` in a fresh process: its system info and loaded libraries."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True,
                          env=env, cwd=tempfile.gettempdir())
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"importing llama_cpp from {target} with {sys.executable} failed: {last}\n"
                         "(run this script with the Python that runs generate.py: llama_cpp needs numpy, "
                         "diskcache, jinja2 and typing-extensions there)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scan(lib: Path, patterns: dict[str, str]) -> dict[str, int]:
    """How many instructions of ``lib`` match each pattern (objdump -d, whole instructions a line)."""
    text = subprocess.run(["objdump", "-d", "--insn-width=16", str(lib)], capture_output=True,
                          text=True, check=True).stdout
    return {name: len(re.findall(pattern, text, re.MULTILINE)) for name, pattern in patterns.items()}


def verify(level: str, target: Path) -> dict:
    """Checks the build in ``target``; the findings (``ok``: whether every check passed)."""
    problems: list[str] = []
    found = probe(target)
    if not found["module"].startswith(str(target.resolve())) and not found["module"].startswith(str(target)):
        problems.append(f"llama_cpp was imported from {found['module']}, not {target}")
    outside = [lib for lib in found["libs"] if not lib.startswith(str(target.resolve()))]
    if outside:
        problems.append(f"libraries loaded from outside {target}: {outside}")
    listed = {m.group(1) for m in re.finditer(r"(\w+) = 1", found["info"])} & set(FEATURES)
    want = features(LEVELS[level])
    if listed != want:
        problems.append(f"system info lists {sorted(listed)}, expected {sorted(want)}")
    libs = sorted((target / "llama_cpp" / "lib").glob("lib*.so"))
    if not any(lib.name.startswith("libggml-cpu") for lib in libs):
        problems.append(f"no libggml-cpu*.so in {target / 'llama_cpp' / 'lib'}")
    excluded = {lib.name: scan(lib, EXCLUDED[level]) for lib in libs}
    for name, counts in excluded.items():
        problems += [f"{name}: {n} {what} instructions" for what, n in counts.items() if n]
    expected = {lib.name: scan(lib, EXPECTED[level]) for lib in libs if lib.name.startswith("libggml-cpu")}
    for name, counts in expected.items():
        problems += [f"{name}: no {what} instruction" for what, n in counts.items() if not n]
    return {"ok": not problems, "problems": problems, "system_info": found["info"].strip(),
            "module": found["module"], "libs": found["libs"], "excluded_counts": excluded,
            "expected_counts": expected}


def take(lock: Path) -> bool:
    """Creates ``lock`` holding this process's id; False where a live process holds it already."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text().strip() or 0), 0)
                return False
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # its build died without removing it
                continue
            except PermissionError:
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="levels (CMAKE_ARGS):\n" + "\n".join(
                                         f"  {k}: {cmake_args(k)}" for k in LEVELS))
    parser.add_argument("levels", nargs="+", choices=list(LEVELS), metavar="LEVEL",
                        help=f"one or more of {', '.join(LEVELS)}; each is built into OUT/LEVEL")
    parser.add_argument("--out", type=Path, default=ROOT.parent / "llama-isa",
                        help="where the levels' directories go (default: %(default)s)")
    parser.add_argument("--sdist", type=Path, help="llama-cpp-python's sdist (default: pip download "
                        f"llama-cpp-python=={VERSION} --no-binary :all:)")
    parser.add_argument("--jobs", type=int, default=2, help="CMAKE_BUILD_PARALLEL_LEVEL (default 2)")
    parser.add_argument("--force", action="store_true", help="replace an earlier build of the level")
    parser.add_argument("--verify-only", action="store_true", help="check the existing builds only")
    args = parser.parse_args(argv)
    if not shutil.which("objdump"):
        parser.error("objdump (binutils) is needed to check the builds")

    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if not args.verify_only and sdist is None:
            sdist = download_sdist(Path(tmp))
        if sdist is not None and not sdist.is_file():
            parser.error(f"--sdist {sdist}: no such file")
        for level in args.levels:
            target = args.out / level
            record = target / "BUILD.json"
            if args.verify_only:
                if not (target / "llama_cpp").is_dir():
                    print(f"{level}: no build in {target}", file=sys.stderr)
                    failed += 1
                    continue
                info = json.loads(record.read_text()) if record.is_file() else {"level": level}
            else:
                lock = args.out / f"{level}.lock"
                args.out.mkdir(parents=True, exist_ok=True)
                if not take(lock):
                    parser.error(f"a build of {level} is under way ({lock}: pid {lock.read_text().strip()})")
                try:
                    if target.exists() and any(target.iterdir()):
                        if not args.force:
                            parser.error(f"{target} is not empty (an earlier build?); --force replaces it")
                        if not (record.is_file() or (target / "llama_cpp").is_dir()):
                            parser.error(f"{target} does not hold a build of this script; not removing it")
                        shutil.rmtree(target)
                    target.mkdir(parents=True, exist_ok=True)
                    log = args.out / f"{level}.log"
                    print(f"{level}: building into {target} (log: {log})\n  CMAKE_ARGS={cmake_args(level)}",
                          flush=True)
                    seconds = build(level, sdist, target, args.jobs, log)
                finally:
                    lock.unlink()
                info = {"level": level, "sdist": str(sdist), "cmake_args": cmake_args(level),
                        "jobs": args.jobs, "build_s": round(seconds, 1)}
                print(f"{level}: built in {seconds / 60:.1f} min", flush=True)
            info["verify"] = verify(level, target)
            record.write_text(json.dumps(info, indent=1) + "\n")
            check = info["verify"]
            print(f"{level}: {check['system_info']}")
            if check["ok"]:
                print(f"{level}: ok (system info as expected; no excluded instructions in "
                      f"{', '.join(check['excluded_counts'])})")
            else:
                failed += 1
                print(f"{level}: FAILED\n  " + "\n  ".join(check["problems"]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
