"""The ``fastft`` console script: ``fastft bench [...]`` (and ``fastft bench gpu [...]``), ``fastft plan [...]``,
``fastft coverage [...]``, ``fastft --version``."""

from __future__ import annotations

import argparse
import sys

import fastft

COMMANDS = {
    "bench": "compare fastft with transformers + PEFT on a LoRA training run (fastft bench --help)",
    "plan": "memory per GPU of a fine-tuning run, with and without fastft, sharded or not (fastft plan --help)",
    "coverage": "every causal LM type of the installed transformers, patched and compared (fastft coverage --help)",
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``fastft`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from fastft.bench.__main__ import main as bench

        return bench(argv[1:])
    if argv[:1] == ["plan"]:
        from fastft.distributed.planner import main as plan

        return plan(argv[1:], prog="fastft plan")
    if argv[:1] == ["coverage"]:
        from fastft.models.coverage import main as coverage

        return coverage(argv[1:], prog="fastft coverage")
    parser = argparse.ArgumentParser(
        prog="fastft",
        description="fastft command line. Commands: " + "; ".join(f"{name}: {text}" for name, text in COMMANDS.items()),
    )
    parser.add_argument("command", choices=list(COMMANDS), help="the command to run")
    parser.add_argument("--version", action="version", version=f"fastft {fastft.__version__}")
    parser.parse_args(argv)  # only reached without a known command: prints the usage error (or --version)
    return 2


if __name__ == "__main__":
    sys.exit(main())
