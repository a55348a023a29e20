"""The per-step losses of a short fixed tiny run, against a committed file (torchtitan's habit).

A refactor that changes no computation must reproduce ``data/expected_loss.json`` bit for bit. Float
results depend on the CPU's vector width (torch picks kernels by it), so the file records the CPU
capability it was made on: on another one, the losses must agree to 1e-6 relative instead.

Regenerate (only for a change that is meant to alter the computation, and say so in the commit)::

    python tests/recipes/test_expected_loss.py
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a script: this folder is sys.path[0]; conftest also needs tests/
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from conftest import TINY, read_logged, run_tune  # noqa: E402

EXPECTED = Path(__file__).with_name("data") / "expected_loss.json"
RECIPE, CONFIG = "full_finetune_single_device", "configs/gqa_tiny/full.yaml"
#: The fixed run: 6 optimizer steps of the tiny model from seed 0, 2 micro-batches each.
OVERRIDES = [*TINY, "gradient_accumulation_steps=2", "seed=0", "shuffle=true"]


def _losses(out: Path):
    run_tune(RECIPE, CONFIG, [*OVERRIDES, f"output_dir={out}"], check=True)
    return read_logged(out / "logs")


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def test_the_tiny_run_reproduces_the_expected_losses(tmp_path):
    expected = json.loads(EXPECTED.read_text())
    got = _losses(tmp_path / "run")
    assert len(got) == len(expected["losses"]) == 6
    if expected["cpu_capability"] == _capability():
        assert got == expected["losses"], "a refactor changed the losses: see this file's docstring"
    else:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected["losses"]), rtol=1e-6, atol=0)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        losses = _losses(Path(tmp) / "run")
    record = {
        "recipe": RECIPE,
        "config": CONFIG,
        "overrides": OVERRIDES,
        "cpu_capability": _capability(),
        "torch": torch.__version__,
        "losses": losses,
    }
    EXPECTED.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {EXPECTED}: {losses}")
