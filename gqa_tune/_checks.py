"""The value rules every public entry point shares, each with one message: ``ValueError`` naming the value.

Library code anywhere in the package may import these (they import nothing of gqa_tune's).
"""

import math
import numbers
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn


class ConfigError(ValueError):
    """Input a recipe refuses before it trains: ``problems`` lists them, each led by its key."""

    def __init__(self, problems: Union[str, Sequence[str]], what: str = "the config") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{count} with {what}; not starting:\n{lines}")


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def optional_positive_int(name: str, value: Any) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    return value


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (a truthy string or number is refused, not read as one)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_number(name: str, value: Any) -> float:
    """``value`` if it is a finite number > 0."""
    if not _real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return value


def optional_positive_number(name: str, value: Any) -> Optional[float]:
    if value is not None and (not _real(value) or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be None or a finite positive number, got {value!r}")
    return value


def probability(name: str, value: Any, *, below_one: bool = False) -> float:
    """``value`` if it is a number in ``[0, 1]`` (``[0, 1)`` with ``below_one``)."""
    if not _real(value) or not (0 <= value and (value < 1 if below_one else value <= 1)):
        raise ValueError(f"{name} must be in [0, 1{')' if below_one else ']'}, got {value!r}")
    return value


def module(name: str, value: Any, *, optional: bool = False) -> Optional[nn.Module]:
    """``value`` if it is an ``nn.Module`` (or ``None`` where ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, nn.Module):
        kind = "an nn.Module or None" if optional else "an nn.Module"
        raise ValueError(f"{name} must be {kind}, got {type(value).__name__} {value!r:.60}")
    return value


def floating_dtype(name: str, value: Any, *, allowed: Sequence[torch.dtype] = ()) -> torch.dtype:
    """``value`` if it is a floating ``torch.dtype`` (or one of ``allowed``)."""
    if not isinstance(value, torch.dtype) or not (value.is_floating_point or value in allowed):
        extra = f" or one of {', '.join(map(str, allowed))}" if allowed else ""
        raise ValueError(f"{name} must be a floating torch.dtype{extra} (e.g. torch.float32), got {value!r}")
    return value


def device(name: str, value: Any) -> torch.device:
    """``value`` as a ``torch.device`` that exists on this machine (``None``: torch's default device)."""
    if value is None:
        return torch.get_default_device()
    if not isinstance(value, (str, torch.device)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a torch.device or its name (e.g. 'cpu', 'cuda:0'), got {value!r}")
    try:
        found = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r}: CUDA is not available on this machine")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        raise ValueError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return found
