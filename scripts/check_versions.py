"""Run the model and TRL tests on the oldest versions pyproject allows and on the GPU machine's set.

    python scripts/check_versions.py [floors] [gpu] [--keep] [--tests tests/models tests/rl]

Each set gets a fresh virtual environment under ``/tmp/fastft-versions/NAME``: the CPU torch wheel (2.13.0: the
only torch build this machine installs without a multi-GB CUDA download; the torch floor is not checked here),
fastft itself with its dev extras, then the set's pins, then ``pytest -q`` on the given tests. Run it before each
release and whenever a floor in pyproject.toml moves: a floor that fails here must be raised, not claimed.

- ``floors``: every ``>=`` lower bound of pyproject's dependencies, pinned exactly (torch excepted);
- ``gpu``: the lent GPU machine's set (transformers 5.17, triton 3.6, accelerate 1.15; peft and trl as wheels).

Prints one line per set (passed / failed and the pytest summary; the whole output is in
``/tmp/fastft-versions/NAME.log``) and exits 1 if any set failed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TORCH_CPU = "torch==2.13.0"
# Not the GPU machine's numpy (2.4): the interpreters of triton 3.5 and 3.6, which run the kernels on this CPU, fail
# with numpy >= 2.4 (scalars held as one-element arrays). Compiled kernels on a GPU do not use the interpreter.
INTERPRETER_NUMPY = "numpy<2.4"
GPU_SET = [
    "transformers==5.17.0",
    "triton==3.6.0",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "trl==1.16.0",
    "bitsandbytes==0.50.2",
    INTERPRETER_NUMPY,
]


def floors() -> list[str]:
    """``name==version`` for every ``name>=version`` dependency of pyproject.toml, torch excepted."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for requirement in project["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", requirement)
        if match and match.group(1) != "torch":
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return [*pins, INTERPRETER_NUMPY]


def run_set(name: str, pins: list[str], tests: list[str], keep: bool) -> tuple[bool, str]:
    venv = Path("/tmp/fastft-versions") / name
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_CPU], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]", *pins], check=True)
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    log = Path("/tmp/fastft-versions") / f"{name}.log"
    log.write_text(result.stdout + result.stderr)
    lines = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not keep:
        shutil.rmtree(venv, ignore_errors=True)
    return result.returncode == 0, (lines[-1] if lines else result.stdout[-500:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="*", default=["floors", "gpu"], choices=["floors", "gpu"])
    parser.add_argument("--tests", nargs="+", default=["tests/models", "tests/rl"])
    parser.add_argument("--keep", action="store_true", help="keep the virtual environments")
    args = parser.parse_args(argv)
    sets = {"floors": floors(), "gpu": GPU_SET}
    ok_all = True
    for name in args.sets:
        ok, summary = run_set(name, sets[name], args.tests, args.keep)
        ok_all &= ok
        print(f"{name:7s} {'passed' if ok else 'FAILED'}  {' '.join(sets[name])}  ->  {summary}", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
