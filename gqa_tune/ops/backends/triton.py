"""The ``"triton"`` backend: gqa_tune's flash attention kernels with grouped K/V.

Serves: no mask, ``is_causal`` (torch's top-left alignment), bool masks;
fp16/bf16/fp32; forward and backward. Declines (``"auto"`` then moves on):
additive float masks, ``BlockMask``, dropout, attention weights, and
devices where the kernels cannot run (CPU needs ``TRITON_INTERPRET=1`` set
before gqa_tune's kernels are first imported). Triton is imported on first use.
"""

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _kernels():
    from gqa_tune.kernels.triton import ops

    return ops


_TRITON_INSTALLED: Optional[bool] = None


def triton_available() -> bool:
    """Whether Triton is installed (looked up once: this sits on the decode path)."""
    global _TRITON_INSTALLED
    if _TRITON_INSTALLED is None:
        _TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
    return _TRITON_INSTALLED


_RECORD = Path(__file__).resolve().parents[2] / "kernels" / "triton" / "validated.json"


@functools.cache
def _validated_architectures() -> Dict[str, Any]:
    try:
        return json.loads(_RECORD.read_text()).get("architectures", {})
    except (OSError, ValueError):
        return {}


def auto_validated(device: torch.device) -> bool:
    """Whether ``"auto"`` may pick the Triton kernels on ``device``: only where the committed record
    (``gqa_tune/kernels/triton/validated.json``) says, for this GPU architecture, that the correctness
    suite passed and the kernels were faster than SDPA's best backend. CPU (the interpreter): never."""
    if device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    entry = _validated_architectures().get(f"sm_{major}{minor}", {})
    return bool(entry.get("correct")) and bool(entry.get("faster_than_sdpa"))


def device_problem(device: torch.device) -> Optional[str]:
    """Why the kernels cannot run on ``device`` in this process, or ``None``."""
    if not triton_available():
        return "triton is not installed (pip install 'gqa_tune[triton]')"
    from gqa_tune.kernels.triton._common import runtime_problem

    return runtime_problem(device)


def kernel_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why the kernels cannot take tensors of this device, dtype and head_dim, or ``None``."""
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is above {MAX_HEAD_DIM}"
    if dtype not in _SUPPORTED_DTYPES:
        return f"it supports float16, bfloat16 and float32, not {dtype}"
    return device_problem(device)


def triton_backend(
    q, k, v, *, mask, scale, is_causal, dropout_p, softcap=None, sinks=None, causal_offset=0, window=None,
    seqlens=None, max_seqlen=None, kv_scales=None,
):  # fmt: skip
    """Flash attention, or with ``seqlens`` (a KV cache's per-row filled lengths) the split-K decode kernel.

    With ``kv_scales`` (decode only) K/V are int8 with per-position scales ``[b, n_kv, s_kv]``, which the
    decode kernel applies to the tiles it loads.

    ``scale`` comes resolved from the dispatcher and ``mask`` 4-D. Query ``i`` sits at key position
    ``i + causal_offset``, or with ``seqlens`` at the end of its row's keys (``seqlens[b] - s_q + i``); the
    window is ``|query position - key position| < window``; ``softcap`` caps the scaled scores; ``sinks``
    ``[n_h]`` join each softmax with a zero value.
    """
    features = dict(window=int(window or 0), softcap=float(softcap or 0.0), sinks=sinks)
    if seqlens is not None:
        mask3 = None
        if mask is not None:  # [b, s_q, max_len], padded with False to the buffer
            mask3 = F.pad(mask[:, 0], (0, k.shape[2] - mask.shape[-1]), value=False)
            mask3 = mask3.expand(q.shape[0], q.shape[2], -1)
        bound = -1 if max_seqlen is None else int(max_seqlen)
        if kv_scales is not None:
            features.update(k_scale=kv_scales[0], v_scale=kv_scales[1])
        return _kernels().flash_decode(
            q, k, v, seqlens.to(torch.int32), mask3, float(scale), is_causal, bound, **features
        )
    out, _ = _kernels().flash_attn(q, k, v, mask, float(scale), is_causal, int(causal_offset), **features)
    return out


def triton_limits(call) -> Optional[str]:
    """Why ``"triton"`` cannot serve ``call``, or ``None``."""
    if call.need_weights:
        return "it cannot return attention weights (use backend='math')"
    if call.dropout_p > 0.0:
        return f"it has no dropout (dropout_p={call.dropout_p})"
    if call.value_head_dim is not None:
        return f"value head_dim {call.value_head_dim} differs from the query/key head_dim {call.head_dim}"
    if call.mask_kind not in ("none", "bool"):
        return f"it takes no mask, is_causal or a bool mask, not a {call.mask_kind} mask"
    if call.decode and call.needs_grad:
        return "its split-K decode kernel has no backward"
    if call.decode and call.per_head_mask:
        return "its split-K decode kernel takes a mask without a head dim"
    return kernel_problem(call.device, call.dtype, call.head_dim)
