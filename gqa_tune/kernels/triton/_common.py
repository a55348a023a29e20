"""What the Triton kernels share: availability, block sizes, strides."""

import os
from typing import Optional, Sequence

import torch

#: Whether the kernels in this package were compiled for Triton's CPU
#: interpreter. ``TRITON_INTERPRET=1`` must be set before the kernel modules
#: are imported (Triton reads it when a kernel is defined).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def head_block(head_dim: int) -> int:
    """Padded head dimension (a power of two, at least 16 for ``tl.dot``)."""
    return max(16, next_pow2(head_dim))


def strides4(t: Optional[torch.Tensor]) -> Sequence[int]:
    """Strides of a 4-D tensor, or zeros for a missing one."""
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def runtime_problem(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` here, or ``None``."""
    if device.type == "cuda":
        return None if not INTERPRET else "TRITON_INTERPRET=1 is set, so the kernels were built for the CPU"
    if device.type == "cpu":
        if INTERPRET:
            return None
        return "Triton kernels run on CUDA; on CPU only in Triton's interpreter (TRITON_INTERPRET=1 set before import)"
    return f"Triton kernels do not run on {device.type} tensors"
