"""Run a function on N CPU ranks (gloo process group) and collect what each rank returns.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` fresh processes (``torch.multiprocessing`` with the
spawn start method, so nothing of the test process leaks in), initialises ``torch.distributed`` with the gloo
backend on a free localhost port, calls ``fn(rank, world_size, *args)`` on every rank, and returns the list of the
ranks' return values (picklable; tensors are moved to CPU). A rank that raises makes ``run_ranks`` raise with that
rank's traceback. ``fn`` must be importable by name (a module-level function), as spawn requires.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))  # fmt: skip
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # reported to the parent with the traceback, then re-raised
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each on its own gloo rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
                                     join=False, start_method="spawn")  # fmt: skip
        try:
            while not context.join(timeout=TIMEOUT_S):
                pass
        except mp.ProcessRaisedException as err:
            errors = [torch.load(p, weights_only=False) for p in sorted(Path(out_dir).glob("rank*.pt"))]
            details = "\n".join(e["error"] for e in errors if not e["ok"])
            raise AssertionError(f"a rank failed:\n{details or err}") from None
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)["result"] for r in range(world_size)]
