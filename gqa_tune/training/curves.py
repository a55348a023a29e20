"""The training-curves picture the fine-tuning loop writes beside its logs at the end of training.

``training_curves.png``: the training loss of every optimizer step, with the held-out loss of each
evaluation marked at its step, and, when the evaluations scored task accuracy, a second panel with it.
It needs matplotlib (``pip install 'gqa_tune[plots]'``); without it the loop warns and goes on.
"""

import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

#: The file name, in the metric logger's ``log_dir`` (else ``output_dir``).
CURVES_FILE = "training_curves.png"


def curves_dir(metric_logger_cfg: Optional[Any], output_dir: Path) -> Path:
    """Where the picture goes: beside the logs (the metric logger's ``log_dir``), else ``output_dir``."""
    log_dir = metric_logger_cfg.get("log_dir") if metric_logger_cfg is not None else None
    return Path(log_dir) if log_dir else Path(output_dir)


def plot_training_curves(
    path: Path, losses: Sequence[float], evals: Sequence[Tuple[int, Dict[str, float]]] = ()
) -> Optional[Path]:
    """Write the training curves to the PNG ``path`` (replaced in one step); ``None`` without matplotlib.

    Args:
        path: the PNG to write; its directory is created.
        losses: the training loss of steps 1, 2, ... (``FinetuneRecipe.loss_history``).
        evals: ``(global step, results)`` of each evaluation, results as ``FinetuneRecipe.evaluate``
            returns them (``heldout_loss``, ``accuracy_<task>``).
    """
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switched
    except ImportError:
        warnings.warn(
            f"matplotlib is not installed, so {CURVES_FILE} is not written (pip install 'gqa_tune[plots]')",
            stacklevel=2,
        )
        return None
    accuracy_keys = sorted({key for _, results in evals for key in results if key.startswith("accuracy_")})
    figure = Figure(figsize=(11 if accuracy_keys else 6.5, 4), layout="constrained")
    axes = figure.subplots(1, 2 if accuracy_keys else 1, squeeze=False, sharex=True)[0]
    loss_axes = axes[0]
    loss_axes.plot(range(1, len(losses) + 1), losses, label="training loss", linewidth=1)
    held = [(step, results["heldout_loss"]) for step, results in evals if "heldout_loss" in results]
    if held:
        loss_axes.plot(*zip(*held), "o", label="held-out loss")
    loss_axes.set(xlabel="optimizer step", ylabel="cross-entropy per supervised token", title="loss")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if accuracy_keys:
        acc_axes = axes[1]
        for key in accuracy_keys:
            points = [(step, results[key]) for step, results in evals if key in results]
            acc_axes.plot(*zip(*points), "o-", label=key.removeprefix("accuracy_"))
        acc_axes.set(
            xlabel="optimizer step", ylabel="exact-match accuracy", title="held-out accuracy", ylim=(-0.02, 1.02)
        )
        acc_axes.grid(alpha=0.3)
        acc_axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
