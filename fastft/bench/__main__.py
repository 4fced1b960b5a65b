"""``python -m fastft.bench [options]`` runs ``fastft bench``; ``python -m fastft.bench gpu [options]`` the one-shot
GPU suite (:mod:`fastft.bench.gpu`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``): a leading ``gpu`` goes to the GPU suite, the rest to
    :func:`fastft.bench.cli.main`. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gpu"]:
        from fastft.bench import gpu  # imported only when asked: it pulls in the kernel benchmarks

        return gpu.main(argv[1:])
    from fastft.bench import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
