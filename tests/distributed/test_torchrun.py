"""The documented launch, literally: ``torchrun --nproc_per_node 2 examples/distributed/sft.py --shard`` on CPU ranks.

``python -m torch.distributed.run`` is what the ``torchrun`` console script runs. Both ranks print one line per
step; under FSDP2 they hold the same averaged model, so their losses are the same.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.distributed.launch import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_fsdp2_example(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the example runs fastft's torch path on CPU, as a user's run would
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "examples/distributed/sft.py"), "--steps", "2", "--shard", "--output-dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = re.findall(r"step\s+(\d+)\s+loss ([\d.]+)", done.stdout)
    assert len(steps) == 4, done.stdout  # 2 steps x 2 ranks
    by_step: dict[str, set[str]] = {}
    for step, loss in steps:
        by_step.setdefault(step, set()).add(loss)
    assert sorted(by_step) == ["1", "2"] and all(len(losses) == 1 for losses in by_step.values()), steps
