"""Fixtures for running recipes end to end with ``tune run``, as users do."""

import re
from pathlib import Path
from typing import List

import pytest
from helpers import REPO, TUNE, run_tune  # noqa: F401  (run_tune: imported from here by the recipe tests)

#: A few fast steps on the tiny model: overrides shared by the recipe tests.
TINY = [
    "batch_size=8",
    "max_steps_per_epoch=6",
    "epochs=1",
    "log_every_n_steps=1",
    "eval=null",
    "tokenizer.max_seq_len=48",
]


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
