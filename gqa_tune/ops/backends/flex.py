"""The ``"flex"`` backend: compiled ``flex_attention`` with ``enable_gqa=True``.

``flex_attention`` is compiled the first time it is used (never at import). Dynamo allows only
``recompile_limit`` (8) graphs per code object and then runs the function eagerly, which for flex is
an unfused kernel that materializes every score. So each *structure* of call gets a compiled copy of
its own, with its own code object and so its own budget: the dtype, the head dims, whether K/V are
grouped, the mask and score functions, whether log-sum-exp is returned, and which of the sizes are 1
(dynamo specializes sizes 0 and 1). Within one structure the sizes (batch, heads, lengths) are
dynamic: a decode loop whose key length grows every step, or a process that meets many shapes,
compiles once or twice per structure and never falls back to eager flex.

Causal masks become cached ``BlockMask``s; a dense bool mask becomes a ``BlockMask`` whose ``mask_mod``
reads it, and an additive float mask a ``score_mod`` that adds it. Limits, all reported by
:func:`flex_limits`: no dropout, no attention weights, and on CPU no backward and no float64 (torch's
CPU flex kernel has neither).
"""

import functools
import types
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def _flex_call(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse):
    return flex_attention(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse
    )


#: Compiled copies of :func:`_flex_call`, by call structure and ``dynamic`` setting.
_COMPILED: Dict[tuple, Callable] = {}


def _compiled(key: tuple, dynamic: Optional[bool]) -> Callable:
    """The compiled flex for calls of structure ``key``: a copy of :func:`_flex_call` with a code object of its
    own, because dynamo counts recompiles per code object."""
    entry = (key, dynamic)
    if entry not in _COMPILED:
        name = f"_flex_call_{len(_COMPILED)}"
        code = _flex_call.__code__.replace(co_name=name, co_qualname=name)
        fresh = types.FunctionType(code, _flex_call.__globals__, name)
        _COMPILED[entry] = torch.compile(fresh, dynamic=dynamic)
    return _COMPILED[entry]


def _compiled_flex(key: tuple) -> Callable:
    return _compiled(key, None)  # automatic dynamic shapes: static first, dynamic after a size changes


def _static_flex(key: tuple) -> Callable:
    return _compiled(key, False)


def _structure(q, k, v, score_mod, block_mask, return_lse) -> tuple:
    """What a compiled flex specializes on, besides the sizes (see the module docstring)."""
    functions = tuple(getattr(f, "__code__", f) for f in (score_mod, getattr(block_mask, "mask_mod", None)))
    ones = tuple(size == 1 for size in (*q.shape[:3], k.shape[1], k.shape[2]))
    mask_ones = None if block_mask is None else tuple(size == 1 for size in block_mask.shape[:2])
    return (q.device.type, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] != k.shape[1], return_lse, functions,
            ones, mask_ones)  # fmt: skip


def _inductor_failed(err: Exception) -> bool:
    return type(err).__module__.startswith(("torch._inductor", "torch._dynamo")) and "Inductor" in repr(err)


def _run_flex(q, k, v, *, score_mod, block_mask, scale, return_lse):
    """Compiled flex; where inductor fails to build the dynamic-shape kernel for a call (torch's CPU flex
    template emits C++ that does not compile for some size-1 shapes), the same call compiled for its static
    shapes, with a warning, rather than an error no user input caused."""
    key = _structure(q, k, v, score_mod, block_mask, return_lse)
    args = (q, k, v, score_mod, block_mask, scale, q.shape[1] != k.shape[1], return_lse)
    try:
        return _compiled_flex(key)(*args)
    except Exception as err:  # only inductor's own build failures are retried
        if not _inductor_failed(err):
            raise
        warnings.warn(f"flex_attention's dynamic-shape kernel failed to build ({type(err).__name__}); "
                      "compiling this call for its static shapes", stacklevel=3)  # fmt: skip
        return _static_flex(key)(*args)


def _top_left_causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=32)
def _causal_block_mask(s_q: int, s_kv: int, device: str) -> BlockMask:
    return create_block_mask(_top_left_causal_mod, None, None, s_q, s_kv, device=device)


def _from_dense(
    mask: torch.Tensor, b: int, n_h: int, s_q: int, s_kv: int
) -> Tuple[Optional[BlockMask], Optional[Callable]]:
    """``(block_mask, score_mod)`` for a 4-D dense mask (bool: which keys; float: added to the scores).

    The functions read the mask expanded to ``[b, n_h, s_q, s_kv]`` (a view), so they capture one tensor
    and no Python number a compiled flex would specialize on.
    """
    full = mask.expand(b, n_h, s_q, s_kv)
    if mask.dtype == torch.bool:

        def mask_mod(b, h, q_idx, kv_idx):
            return full[b, h, q_idx, kv_idx]

        batch = b if mask.shape[0] > 1 else None
        heads = n_h if mask.shape[1] > 1 else None
        return create_block_mask(mask_mod, batch, heads, s_q, s_kv, device=str(mask.device)), None

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + full[b, h, q_idx, kv_idx]

    return None, score_mod


def _with_softcap(score_mod: Optional[Callable], softcap: float, device: torch.device) -> Callable:
    # A captured tensor, not a Python float: compiled flex turns a float into a graph input that it cannot lower.
    cap = torch.tensor(softcap, dtype=torch.float32, device=device)

    def capped(score, b, h, q_idx, kv_idx):
        score = cap * torch.tanh(score / cap)
        return score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)

    return capped


#: Head dims torch's compiled CPU flex_attention miscomputes (torch 2.13, dynamic and static shapes alike): with
#: 8 or 16 (one vector of floats) and a key length of 8 mod 16, some rows come out wrong or NaN (NATTEN
#: likewise refuses compiled CPU flex below 32). Zero-padding the head to 32 gives the exact answer: the zeros
#: add nothing to ``q . k`` and their output columns are dropped. ``tests/ops/test_flex_compile.py`` checks it.
_CPU_BAD_HEAD_DIMS, _CPU_PADDED_HEAD_DIM = (8, 16), 32


def _padded_heads(q, k, v):
    """``q``, ``k``, ``v`` with a head dim in :data:`_CPU_BAD_HEAD_DIMS` zero-padded to :data:`_CPU_PADDED_HEAD_DIM`."""
    if q.shape[-1] in _CPU_BAD_HEAD_DIMS:
        pad = (0, _CPU_PADDED_HEAD_DIM - q.shape[-1])
        q, k = torch.nn.functional.pad(q, pad), torch.nn.functional.pad(k, pad)
    if v.shape[-1] in _CPU_BAD_HEAD_DIMS:
        v = torch.nn.functional.pad(v, (0, _CPU_PADDED_HEAD_DIM - v.shape[-1]))
    return q, k, v


@torch.compiler.disable(recursive=False)
def flex_backend(q, k, v, *, mask, scale, is_causal, dropout_p, softcap=None, sinks=None):
    b, n_h, s_q, s_kv = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    block_mask, score_mod = mask, None
    if isinstance(mask, torch.Tensor):
        block_mask, score_mod = _from_dense(mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)), b, n_h, s_q, s_kv)
    if is_causal:
        block_mask = _causal_block_mask(s_q, s_kv, str(q.device))
    if softcap is not None:
        score_mod = _with_softcap(score_mod, softcap, q.device)  # on the scaled scores, before the mask
    value_dim = v.shape[-1]
    if q.device.type == "cpu":
        q, k, v = _padded_heads(q, k, v)
    result = _run_flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_lse=sinks is not None)
    out, lse = result if sinks is not None else (result, None)
    out = out[..., :value_dim]  # [b, n_h, s_q, h_dv]
    if sinks is not None:
        # softmax over the keys and a zero-valued sink = (softmax over the keys) * Z / (Z + e^sink).
        # lse [b, n_h, s_q], natural log; -inf for a row that sees no key
        keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
        out = out * keep.unsqueeze(-1).to(out.dtype)
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        # A row whose float mask is -inf everywhere: flex gives NaN, the rule is 0.
        dead = torch.isneginf(mask).all(-1, keepdim=True)
        out = torch.where(dead, 0.0, out)
    return out


def flex_limits(call) -> "str | None":
    """Why ``"flex"`` cannot serve ``call``, or ``None``."""
    if call.need_weights:
        return "it cannot return attention weights (use backend='math')"
    if call.dropout_p > 0.0:
        return f"it has no dropout (dropout_p={call.dropout_p})"
    if call.device.type == "cpu":
        if call.needs_grad:
            return "torch's flex_attention has no backward on CPU"
        if call.dtype == torch.float64:
            return "torch's CPU flex_attention does not support float64"
        if call.sinks:
            return "torch's compiled CPU flex_attention cannot return the log-sum-exp that sinks need"
    return None
