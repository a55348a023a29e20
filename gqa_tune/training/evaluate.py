"""Held-out loss and task accuracy for the synthetic tasks."""

import json
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft

from gqa_tune.data import resolve_data_file
from gqa_tune.generation import encode_prompts, generate, has_chat_template, left_padded, new_tokens, padding_id


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels for next-token prediction: position ``t`` predicts token ``t + 1``."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], CROSS_ENTROPY_IGNORE_IDX)], dim=1)


@torch.no_grad()
def heldout_loss(model, dataset, tokenizer, batch_size: int = 64, device="cpu") -> float:
    """Mean cross-entropy per supervised (answer) token over ``dataset``."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False,
        collate_fn=lambda b: padded_collate_sft(b, padding_idx=tokenizer.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX),
    )  # fmt: skip
    total, count = 0.0, 0
    for batch in loader:
        tokens, labels = batch["tokens"].to(device), shift_labels(batch["labels"].to(device))
        logits = model(tokens)
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=CROSS_ENTROPY_IGNORE_IDX, reduction="sum"
        )
        count += int((labels != CROSS_ENTROPY_IGNORE_IDX).sum())
    model.train(was_training)
    return float(total) / max(count, 1)


def task_accuracy(
    model, tokenizer, data_file: str, max_examples: Optional[int] = 200, batch_size: int = 64, kv_cache_dtype=None
) -> Dict[str, float]:
    """Exact-match accuracy of greedy answers on ``data_file`` (JSONL with prompt/answer/task); a tokenizer with
    a chat template gets each prompt as a user message through it.

    ``kv_cache_dtype``: the generation's caches quantized (``torch.int8``, ...); ``None``: the model's dtype.
    """
    rows = [json.loads(line) for line in resolve_data_file(data_file).read_text().splitlines() if line.strip()]
    rows = rows[:max_examples] if max_examples else rows
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_tokens = list(tokenizer.stop_tokens)
    correct: Dict[str, list] = {}
    chat = has_chat_template(tokenizer)  # a chat model is asked as it was tuned: through its template
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        prompts = encode_prompts(tokenizer, [r["prompt"] for r in chunk], chat)
        longest = max(len(tokenizer.encode(r["answer"], add_bos=False, add_eos=False)) for r in chunk)
        pad_id = padding_id(prompts, tokenizer)
        batch = left_padded(prompts, pad_id, device)
        tokens, _ = generate(
            model, batch, longest + 1, pad_id=pad_id, stop_tokens=stop_tokens, kv_cache_dtype=kv_cache_dtype
        )
        answers, _ = new_tokens(tokens, batch.shape[1], stop_tokens)
        for row, ids in zip(chunk, answers):
            correct.setdefault(row.get("task", "all"), []).append(tokenizer.decode(ids) == row["answer"])
    model.train(was_training)
    scores = {task: sum(v) / len(v) for task, v in correct.items()}
    scores["all"] = sum(sum(v) for v in correct.values()) / max(1, sum(len(v) for v in correct.values()))
    return scores
