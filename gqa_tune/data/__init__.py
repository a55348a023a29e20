"""Offline data: a byte-level tokenizer and the project's synthetic task dataset."""

from pathlib import Path
from typing import Optional, Union

from torchtune.datasets import PackedDataset, SFTDataset, instruct_dataset

from gqa_tune import _checks as checks
from gqa_tune.data.hf_tokenizer import HFTokenizer, hf_tokenizer
from gqa_tune.data.text import pydoc_text_dataset
from gqa_tune.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer, byte_tokenizer

#: The task data shipped inside the package (``train.jsonl``, ``val.jsonl``), so that a non-editable
#: install finds it from any working directory.
PACKAGED_TASKS = Path(__file__).resolve().with_name("synthetic")
#: How configs name the task files: relative to the working directory, falling back to the packaged copy.
TASKS_PREFIX = "data/tasks/"


def resolve_data_file(data_file: str) -> Path:
    """``data_file`` when it exists (relative paths from the working directory); else, for a name under
    ``data/tasks/`` (what the configs say), the copy shipped in the package; else ``data_file`` as given.

    So ``python -m gqa_tune.data.tasks``, which writes ``data/tasks/`` in the working directory, overrides the
    packaged files, and the configs work from any directory with a non-editable install.
    """
    path = Path(data_file).expanduser()
    name = path.as_posix().removeprefix("./")
    if not path.exists() and not path.is_absolute() and name.startswith(TASKS_PREFIX):
        packaged = PACKAGED_TASKS / name[len(TASKS_PREFIX) :]
        if packaged.is_file():
            return packaged
    return path


def task_dataset(
    tokenizer: ByteTokenizer,
    *,
    data_file: str = "data/tasks/train.jsonl",
    train_on_input: bool = False,
    max_examples: Optional[int] = None,
    packed: bool = False,
) -> Union[SFTDataset, PackedDataset]:
    """The synthetic tasks (``gqa_tune/data/tasks.py``) as a torchtune instruct dataset.

    Loaded from a local JSONL file with torchtune's ``instruct_dataset``
    (``prompt`` -> user message, ``answer`` -> assistant message); the loss
    covers the answer only unless ``train_on_input``. ``packed``: examples are packed into rows of the
    tokenizer's ``max_seq_len`` tokens (torchtune's ``PackedDataset``; the recipes then attend block-causally
    within each example, with positions restarting: :mod:`gqa_tune.data.packing`).

    Raises:
        ValueError: if ``data_file`` does not exist, or ``packed`` without a tokenizer ``max_seq_len``.
    """
    path = resolve_data_file(data_file)
    if not path.is_file():
        raise ValueError(
            f"dataset file {str(data_file)!r} does not exist (relative paths are taken from {Path.cwd()}); "
            "`python -m gqa_tune.data.tasks` writes the task files to data/tasks/ there"
        )
    checks.flag("packed", packed)
    if packed and getattr(tokenizer, "max_seq_len", None) is None:
        raise ValueError("packed=True needs the tokenizer's max_seq_len (the length of a packed row): set it")
    split = "train" if max_examples is None else f"train[:{int(max_examples)}]"
    return instruct_dataset(
        tokenizer,
        source="json",
        data_files=str(path),
        column_map={"input": "prompt", "output": "answer"},
        train_on_input=train_on_input,
        split=split,
        packed=packed,
    )


__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "ByteTokenizer", "HFTokenizer", "byte_tokenizer", "hf_tokenizer",
    "pydoc_text_dataset", "task_dataset",
]  # fmt: skip
