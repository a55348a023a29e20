"""``gqa_tune.data.pydoc_text_dataset``: the language reference shipped with Python, split by topic."""

import pytest

from gqa_tune.data import ByteTokenizer, pydoc_text_dataset
from gqa_tune.data.text import pydoc_topics


def test_topics_split_disjoint_and_whole():
    train, val = pydoc_topics("train"), pydoc_topics("val")
    assert not set(train) & set(val) and len(val) == 9 and len(train) + len(val) == 79
    assert sum(map(len, val.values())) > 20_000  # real English: tens of thousands of characters held out


def test_chunks_predict_every_token():
    data = pydoc_text_dataset(ByteTokenizer(), split="val", max_seq_len=128, max_chunks=5)
    assert len(data) == 5
    sample = data[0]
    assert sample["tokens"] == sample["labels"] and 1 < len(sample["tokens"]) <= 128
    assert ByteTokenizer().decode(sample["tokens"]).strip()


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(split="test"), "split must be one of train, val"), (dict(max_seq_len=0), "max_seq_len must be a positive"),
     (dict(val_fraction=1.5), r"val_fraction must lie in \(0, 1\)")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pydoc_text_dataset(ByteTokenizer(), **kwargs)
