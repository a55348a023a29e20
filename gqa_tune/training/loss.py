"""The training loss of the fine-tuning loop: the config's ``loss:`` component, or the default.

``loss: null`` (or no ``loss`` key) is the default: cross-entropy in float32 over the flattened logits,
summed over the supervised tokens. A component is built with ``torchtune.config.instantiate`` and
called ``loss_fn(logits, labels)``, as torchtune's recipes call it:

- ``torch.nn.CrossEntropyLoss`` (``reduction`` ``mean`` or ``sum``; ``label_smoothing`` ...), on
  logits ``[b * s, v]`` and labels ``[b * s]``; ``reduction: sum`` computes exactly the default.
- ``torchtune.modules.loss.CEWithChunkedOutputLoss(num_output_chunks)``: the model returns its
  logits as ``num_output_chunks`` chunks along the sequence (``model.set_num_output_chunks``), each
  upcast to float32 inside the loss, one at a time (less memory with bf16 and a large vocabulary);
  it takes the list of ``[b, s / n, v]`` chunks and labels ``[b, s]``.

(torchtune 0.6.1 has no ``LinearCrossEntropyLoss``: that arrived after its last release.)

A loss without ``reduction`` (torchtune's) or with ``reduction: mean`` returns the mean over the
micro-batch's supervised tokens; the loop multiplies it by their count, so that, as with the default,
an optimizer step averages over the supervised tokens of all its micro-batches and processes. Labels
mark unsupervised positions with torchtune's ``CROSS_ENTROPY_IGNORE_IDX``, so a loss's
``ignore_index`` must be that.

Notation: ``b`` batch, ``s`` sequence length, ``v`` vocabulary size.
"""

import contextlib
from typing import Iterator, List, Optional, Union

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

Logits = Union[torch.Tensor, List[torch.Tensor]]


def build_loss(loss_cfg: Optional[DictConfig], model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The config's ``loss`` component (``None`` for the default), with ``model`` set up for it.

    A loss with ``num_output_chunks`` (``CEWithChunkedOutputLoss``) makes ``model`` return chunked
    logits: ``model.set_num_output_chunks(loss.num_output_chunks)``.

    Raises:
        ValueError: naming ``loss.<attribute>`` and its value: an ``ignore_index`` other than
            ``CROSS_ENTROPY_IGNORE_IDX``, a ``reduction`` other than ``mean`` / ``sum``, class ``weight`` with
            ``reduction: mean``, or chunked logits for a model without ``set_num_output_chunks``.
    """
    if loss_cfg is None:
        return None
    loss_fn = config.instantiate(loss_cfg)
    name = type(loss_fn).__name__
    ignore_index = getattr(loss_fn, "ignore_index", CROSS_ENTROPY_IGNORE_IDX)
    if ignore_index != CROSS_ENTROPY_IGNORE_IDX:
        raise ValueError(
            f"loss.ignore_index: {name} ignores {ignore_index!r}, but the labels mark unsupervised tokens with "
            f"torchtune's CROSS_ENTROPY_IGNORE_IDX ({CROSS_ENTROPY_IGNORE_IDX}): leave ignore_index unset"
        )
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss.reduction: expected 'mean' or 'sum' (one number per micro-batch), got {reduction!r}")
    if reduction == "mean" and getattr(loss_fn, "weight", None) is not None:
        raise ValueError(
            "loss.weight: a class-weighted mean is not a mean over tokens, so the loop cannot sum it over "
            "micro-batches; use reduction: sum with class weights"
        )
    chunks = getattr(loss_fn, "num_output_chunks", None)
    if chunks is not None:
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"loss.num_output_chunks: expected an int >= 1, got {chunks!r}")
        if not callable(getattr(model, "set_num_output_chunks", None)):
            raise ValueError(
                f"loss: {name} needs chunked logits, but the model ({type(model).__name__}) has no "
                "set_num_output_chunks (a torchtune TransformerDecoder has)"
            )
        model.set_num_output_chunks(chunks)
    return loss_fn


def summed_loss(
    loss_fn: Optional[torch.nn.Module], logits: Logits, labels: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """The loss of one micro-batch, summed over its ``count`` supervised tokens.

    Args:
        loss_fn: from :func:`build_loss`; ``None``: the default (float32 cross-entropy, summed).
        logits: ``[b, s, v]``, or the model's chunks ``[b, s / n, v]`` when ``loss_fn`` takes chunks.
        labels: ``[b, s]``, already shifted (position ``t`` holds token ``t + 1``).
        count: the number of ``labels`` that are not ``CROSS_ENTROPY_IGNORE_IDX`` (a 0-dim tensor).

    Returns:
        A 0-dim tensor to call ``backward`` on.
    """
    if loss_fn is None:
        return F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=CROSS_ENTROPY_IGNORE_IDX, reduction="sum"
        )
    if isinstance(logits, torch.Tensor):
        value = loss_fn(logits.flatten(0, 1).float(), labels.flatten())  # [b * s, v], [b * s]
    else:
        value = loss_fn(logits, labels)
    if getattr(loss_fn, "reduction", "mean") == "sum":
        return value
    if int(count) == 0:
        # A mean over no token is 0 / 0. Keep the graph (under FSDP every process must run the backward)
        # with zero gradients.
        chunks = [logits] if isinstance(logits, torch.Tensor) else logits
        return sum(chunk.sum() for chunk in chunks) * 0.0
    return value * count


@contextlib.contextmanager
def whole_logits(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model`` returns whole logits ``[b, s, v]`` (evaluation and generation need them),
    even when the training loss has it return chunks; the chunking is restored afterwards."""
    chunks = getattr(model, "num_output_chunks", 0)
    if not chunks:
        yield model
        return
    model.set_num_output_chunks(0)
    try:
        yield model
    finally:
        model.set_num_output_chunks(chunks)
