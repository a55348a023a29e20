"""Fixtures for running recipes end to end with ``tune run``, as users do."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest
from helpers import REPO

TUNE = str(Path(sys.executable).with_name("tune"))

#: A few fast steps on the tiny model: overrides shared by the recipe tests.
TINY = [
    "batch_size=8",
    "max_steps_per_epoch=6",
    "epochs=1",
    "log_every_n_steps=1",
    "eval=null",
    "tokenizer.max_seq_len=48",
]


def run_tune(
    recipe: str,
    config: str,
    overrides: List[str],
    nproc: Optional[int] = None,
    timeout: int = 300,
    check: bool = False,
):
    """``tune run [--nproc_per_node N] gqa_tune/recipes/<recipe>.py --config <config> k=v ...`` from the repo root.

    With ``check``, a failing run raises ``AssertionError`` with the end of its output.
    """
    cmd = [TUNE, "run"]
    if nproc:
        cmd += ["--nproc_per_node", str(nproc)]
    cmd += [f"gqa_tune/recipes/{recipe}.py", "--config", config, *overrides]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tune run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_logged(log_dir: Path, name: str = "loss") -> List[float]:
    """Values of metric ``name`` from torchtune DiskLogger files in ``log_dir``, in step order."""
    values = {}
    for path in sorted(Path(log_dir).glob("log_*.txt")):
        for line in path.read_text().splitlines():
            match = re.match(r"Step (\d+) \| (.*)", line)
            if not match:
                continue
            for item in match.group(2).split():
                key, _, value = item.partition(":")
                if key == name:
                    values[int(match.group(1))] = float(value)
    return [values[k] for k in sorted(values)]


@pytest.fixture
def tune():
    def run(recipe, config, overrides=(), nproc=None, check=True, timeout=300):
        return run_tune(recipe, config, list(overrides), nproc=nproc, timeout=timeout, check=check)

    return run
