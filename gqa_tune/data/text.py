"""Real English that ships with Python: the language reference's topics (``pydoc_data.topics``, about 465k
characters over 79 topics), as a text-completion dataset for training or for held-out perplexity.

Every machine with Python has it, so a real model can be measured on real text offline. Topics, not
characters, are split: every ``1 / val_fraction``-th topic in sorted order is held out, so no held-out
passage was seen in training.
"""

from typing import Any, Dict, List, Optional

from torch.utils.data import Dataset

from gqa_tune import _checks as checks

SPLITS = ("train", "val")


def pydoc_topics(split: str = "train", val_fraction: float = 0.125) -> Dict[str, str]:
    """``{topic: text}`` of one split of the language reference's topics."""
    import pydoc_data.topics

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    every = max(2, round(1 / val_fraction))
    names = sorted(pydoc_data.topics.topics)
    held_out = {name for i, name in enumerate(names) if i % every == every - 1}
    return {n: pydoc_data.topics.topics[n] for n in names if (n in held_out) == (split == "val")}


class TextChunks(Dataset):
    """Token chunks of at most ``max_seq_len`` tokens (each topic encoded with EOS, then cut), for
    next-token prediction on every token (``tokens``, ``labels``)."""

    def __init__(self, tokenizer: Any, texts: List[str], max_seq_len: int, max_chunks: Optional[int] = None) -> None:
        self.chunks: List[List[int]] = []
        for text in texts:
            ids = tokenizer.encode(text, add_bos=False, add_eos=True)
            self.chunks += [ids[i : i + max_seq_len] for i in range(0, len(ids), max_seq_len) if len(ids) - i > 1]
        if max_chunks is not None:
            self.chunks = self.chunks[:max_chunks]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> Dict[str, List[int]]:
        tokens = self.chunks[index]
        return {"tokens": list(tokens), "labels": list(tokens)}


def pydoc_text_dataset(
    tokenizer: Any,
    *,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    max_chunks: Optional[int] = None,
    val_fraction: float = 0.125,
) -> TextChunks:
    """The language reference's topics (``split`` ``train`` or ``val``) in chunks of ``max_seq_len`` tokens
    (default: the tokenizer's ``max_seq_len``, else 512); ``max_chunks``: the first ones only."""
    length = max_seq_len if max_seq_len is not None else (getattr(tokenizer, "max_seq_len", None) or 512)
    checks.positive_int("max_seq_len", length)
    checks.optional_positive_int("max_chunks", max_chunks)
    return TextChunks(tokenizer, list(pydoc_topics(split, val_fraction).values()), length, max_chunks)


__all__ = ["TextChunks", "pydoc_text_dataset", "pydoc_topics"]
