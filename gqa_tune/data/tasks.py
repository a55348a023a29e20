"""Synthetic tasks that need attention, and the dataset shipped with the project.

Two tasks, mixed half and half:

- ``recall``: a list of key=value pairs, then a key; the answer is its value.
  Solving it needs attention back to the right pair (an induction-style lookup).
- ``add``: ``a+b=`` with numbers below 1000; the answer is the sum.

``python -m gqa_tune.data.tasks`` regenerates ``data/tasks/{train,val}.jsonl``
deterministically (the files are committed; nothing is downloaded).
"""

import argparse
import json
import random
import string
from pathlib import Path
from typing import Dict, List

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"
SPLITS = {"train": (20_000, 1234), "val": (500, 5678)}


def recall_example(rng: random.Random) -> Dict[str, str]:
    keys = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
    pairs = [(k, str(rng.randint(0, 99))) for k in keys]
    key, value = rng.choice(pairs)
    return {"task": "recall", "prompt": " ".join(f"{k}={v}" for k, v in pairs) + f" ?{key}=", "answer": value}


def add_example(rng: random.Random) -> Dict[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return {"task": "add", "prompt": f"{a}+{b}=", "answer": str(a + b)}


def make_examples(n: int, seed: int) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    return [(recall_example if i % 2 == 0 else add_example)(rng) for i in range(n)]


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
