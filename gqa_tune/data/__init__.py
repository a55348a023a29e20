"""Offline data: a byte-level tokenizer and the project's synthetic task dataset."""

from pathlib import Path
from typing import Optional

from torchtune.datasets import SFTDataset, instruct_dataset

from gqa_tune.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, byte_tokenizer


def task_dataset(
    tokenizer: ByteTokenizer,
    *,
    data_file: str = "data/tasks/train.jsonl",
    train_on_input: bool = False,
    max_examples: Optional[int] = None,
) -> SFTDataset:
    """The synthetic tasks (``gqa_tune/data/tasks.py``) as a torchtune instruct dataset.

    Loaded from a local JSONL file with torchtune's ``instruct_dataset``
    (``prompt`` -> user message, ``answer`` -> assistant message); the loss
    covers the answer only unless ``train_on_input``.

    Raises:
        ValueError: if ``data_file`` does not exist.
    """
    path = Path(data_file)
    if not path.is_file():
        raise ValueError(
            f"dataset file {str(path)!r} does not exist (relative paths are taken from {Path.cwd()}); "
            "regenerate it with `python -m gqa_tune.data.tasks`"
        )
    split = "train" if max_examples is None else f"train[:{int(max_examples)}]"
    return instruct_dataset(
        tokenizer,
        source="json",
        data_files=str(path),
        column_map={"input": "prompt", "output": "answer"},
        train_on_input=train_on_input,
        split=split,
    )


__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "ByteTokenizer", "byte_tokenizer", "task_dataset"]
