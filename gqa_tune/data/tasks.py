"""Synthetic tasks that need attention, and the dataset shipped with the project.

Two tasks, mixed half and half:

- ``copy``: a random word of 4 to 8 letters, then ``>``; the answer is the word again.
  Each answer letter needs attention back to its position in the prompt.
- ``add``: ``a+b=`` with numbers below 100; the answer is the sum (digit
  alignment and carries, again read back through attention).

``python -m gqa_tune.data.tasks`` regenerates ``{train,val}.jsonl`` deterministically into
``data/tasks/`` in the working directory (or ``--out``), where the configs' ``data/tasks/...`` paths
find them before the copies shipped in the package (``gqa_tune/data/synthetic/``). Nothing is downloaded.
"""

import argparse
import json
import random
import string
from pathlib import Path
from typing import Dict, List

DATA_DIR = Path("data") / "tasks"  # relative: in the working directory
SPLITS = {"train": (20_000, 1234), "val": (500, 5678)}


def copy_example(rng: random.Random) -> Dict[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
    return {"task": "copy", "prompt": f"{word}>", "answer": word}


def add_example(rng: random.Random) -> Dict[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"task": "add", "prompt": f"{a}+{b}=", "answer": str(a + b)}


def make_examples(n: int, seed: int) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    return [(copy_example if i % 2 == 0 else add_example)(rng) for i in range(n)]


def write_splits(out_dir: Path = DATA_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (n, seed) in SPLITS.items():
        path = out_dir / f"{split}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for example in make_examples(n, seed):
                f.write(json.dumps(example) + "\n")
        print(f"wrote {n} examples to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Regenerate the synthetic task data.")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    write_splits(parser.parse_args().out)
