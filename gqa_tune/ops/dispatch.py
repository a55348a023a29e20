"""The one door to attention: the backend table, the choice of ``backend="auto"``, and the lowering of a call.

=========  ===========================================================
backend    what it is
=========  ===========================================================
sdpa       ``F.scaled_dot_product_attention(..., enable_gqa=True)``
flex       compiled ``flex_attention`` (``BlockMask`` or causal)
blocks     a ``BlockMask``, or on CPU a bool mask hiding most of its
           128 x 128 tiles, over the kept tiles only, fwd + bwd; packed
           documents one by one (``AttentionSpec.document_ids``)
math       float32 reference, the only one that returns weights
triton     gqa_tune's flash attention kernels (GQA-native, fwd + bwd),
           and their split-K decode kernel for KV-cache calls
=========  ===========================================================

With ``blocks``, document-masked training on a CPU (where flex has no backward) costs what the documents
cost, not ``s_q * s_kv``.

A call is described once, as an :class:`AttentionSpec` (mask, causal alignment, a cache's filled
lengths, window, soft-cap, sinks, scale, dropout). :func:`plan_attention` alone decides which backend
serves it (each backend states its limits in its ``*_limits`` function) and lowers what that backend
does not read natively into what it does. ``"auto"`` walks :func:`auto_order` and takes the first
backend whose limits allow the call; an explicit backend that cannot serve the call raises a
``ValueError`` saying why, it never falls back silently. Prefill, training and decoding are all rows
of the same table; the functional op and the module both come through here.
"""

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch
from torch.nn.attention.flex_attention import BlockMask

from gqa_tune.ops.backends.blocks import blocks_backend, blocks_limits
from gqa_tune.ops.backends.flex import flex_backend, flex_limits
from gqa_tune.ops.backends.math import math_backend, math_weights
from gqa_tune.ops.backends.sdpa import sdpa_backend, sdpa_limits
from gqa_tune.ops.backends.triton import auto_validated, triton_backend, triton_limits
from gqa_tune.ops.kv_quant import dequantize_filled
from gqa_tune.ops.masks import MaskType, dense_mask
from gqa_tune.ops.nan_rule import hide_masked_nans


@dataclass(frozen=True)
class AttentionCall:
    """What a backend needs to know to accept or decline a call."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    mask: Optional[MaskType]
    dropout_p: float
    need_weights: bool
    needs_grad: bool
    #: V's head dim where it differs from ``head_dim`` (``None``: the same).
    value_head_dim: Optional[int] = None
    #: Nothing to attend or nothing to compute (``b``, ``n_h`` or ``s_q`` is 0, or ``s_kv`` is 0).
    empty: bool = False
    #: Logit soft-cap (``None``: none).
    softcap: Optional[float] = None
    #: Whether per-head attention sinks join the softmax.
    sinks: bool = False
    #: A KV-cache call whose filled lengths go to the backend (its decode row, for backends that have one).
    decode: bool = False
    #: Whether the mask differs between heads.
    per_head_mask: bool = False
    #: The storage dtype of quantized K/V (``int8``, ``float8_e4m3fn``), read with the spec's ``kv_scales``.
    kv_dtype: Optional[torch.dtype] = None
    #: ``(s_q, s_kv)`` as the backend will see them (``None``: not given).
    lengths: Optional[Tuple[int, int]] = None

    @property
    def mask_kind(self) -> str:
        if self.mask is None:
            return "none"
        if isinstance(self.mask, BlockMask):
            return "block"
        return "bool" if self.mask.dtype == torch.bool else "float"


@dataclass(frozen=True)
class Backend:
    """A row of the backend table: the function, its limits, and what it reads natively.

    What a backend does not read natively, :func:`plan_attention` lowers into what it does: a causal
    offset or a causal mask beside a dense mask into one dense mask, a cache's filled lengths into a
    slice of the buffers and a mask, a window into a banded mask.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    limits: Callable[[AttentionCall], Optional[str]]
    #: Whether its kernel returns 0 for a query row holding a NaN (the NaN rule then puts the NaN back).
    zeroes_nan_query_rows: bool = False
    #: Takes ``causal_offset`` (queries at key positions ``i + offset``) and ``is_causal`` beside a mask.
    offsets: bool = False
    #: Takes a cache's ``seqlens`` / ``max_seqlen`` (its decode row).
    cache_lengths: bool = False
    #: Takes ``window`` (a sliding window, bounding the blocks it reads).
    windows: bool = False
    #: The quantized K/V dtypes its decode row reads natively, with their ``kv_scales``. Anything else
    #: quantized is dequantized when the call runs: the filled prefix only.
    quantized_kv: Tuple[torch.dtype, ...] = ()
    #: The same call returning ``(out, weights)`` (``need_weights``); ``None``: it cannot return weights.
    weights_fn: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = None
    #: Takes ``document_ids`` (packed documents, attended one by one).
    documents: bool = False


def _no_limits(call: AttentionCall) -> Optional[str]:
    return None


_INT8_KV = (torch.int8,)
BACKENDS = {
    "sdpa": Backend("sdpa", sdpa_backend, sdpa_limits, zeroes_nan_query_rows=True),
    "flex": Backend("flex", flex_backend, flex_limits, zeroes_nan_query_rows=True),
    "blocks": Backend("blocks", blocks_backend, blocks_limits, zeroes_nan_query_rows=True, documents=True),
    "math": Backend("math", math_backend, _no_limits, offsets=True, weights_fn=math_weights),
    "triton": Backend(
        "triton", triton_backend, triton_limits, offsets=True, cache_lengths=True, windows=True, quantized_kv=_INT8_KV
    ),
}
BACKEND_NAMES = ("auto", *BACKENDS)

#: Backends ``"auto"`` stopped using in this process because their kernels
#: failed to build on this machine (see :func:`call_guarded`).
AUTO_DISABLED: set = set()


def auto_order(call: AttentionCall) -> tuple:
    """Backends ``"auto"`` tries, best first, for this call."""
    if call.need_weights:
        return ("math",)
    if call.mask_kind == "block":
        # flex reads the BlockMask natively; where it cannot (CPU training), the blocks row runs over the
        # tiles the BlockMask keeps (forward and backward), never the dense mask.
        return ("flex", "blocks", "sdpa", "math")
    if call.device.type == "cuda" and auto_validated(call.device):
        # Our kernels where they serve the call (no mask, causal, bool masks), on GPUs where they were
        # measured correct and faster (kernels/triton/validated.json); elsewhere SDPA's flash / cuDNN.
        return ("triton", "sdpa", "math")
    if call.mask_kind == "bool" and call.device.type == "cpu":
        return ("blocks", "sdpa", "math")  # blocks only where the mask hides most tiles or is packed documents
    return ("sdpa", "math")


def check_backend_name(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")


def make_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    dropout_p: float,
    need_weights: bool,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
):
    grads = (q.requires_grad or k.requires_grad or v.requires_grad) or (sinks is not None and sinks.requires_grad)
    needs_grad = torch.is_grad_enabled() and grads
    value_head_dim = v.shape[-1] if v.shape[-1] != q.shape[-1] else None
    # With sinks and no keys every row still gives 0, so the reference answers that too.
    empty = q.numel() == 0 or k.shape[2] == 0
    return AttentionCall(
        q.device, q.dtype, q.shape[-1], mask, dropout_p, need_weights, needs_grad, value_head_dim, empty,
        softcap, sinks is not None, lengths=(q.shape[2], k.shape[2]),
    )  # fmt: skip


def select_backend(call: AttentionCall, backend: str = "auto") -> Backend:
    """The backend that will run ``call``; ``ValueError`` if ``backend`` cannot."""
    check_backend_name(backend)
    if call.empty:
        # Nothing to attend (or nothing asks): the answer is defined (an empty output,
        # or zeros for s_kv = 0) and the reference computes it for any backend.
        return BACKENDS["math"]
    if backend != "auto":
        reason = BACKENDS[backend].limits(call)
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run this call: {reason}")
        return BACKENDS[backend]
    for name in auto_order(call):
        if name not in AUTO_DISABLED and BACKENDS[name].limits(call) is None:
            return BACKENDS[name]
    raise AssertionError("the math backend accepts every call")  # pragma: no cover


def _build_failure(name: str, err: Exception) -> bool:
    """Whether ``err`` is a kernel of backend ``name`` failing to *build* on this machine: a Triton error from
    our kernels, or compiled flex running out of GPU shared memory (torchtune#2218: flex's default block
    sizes exceed the shared memory of some GPUs)."""
    module = type(err).__module__
    if name == "triton":
        return module.startswith("triton")
    if name == "flex":
        compiler = module.startswith(("triton", "torch._inductor", "torch._dynamo"))
        text = f"{err!r} {err.__cause__!r}"
        return compiler and ("OutOfResources" in text or "shared memory" in text)
    return False


def call_guarded(name: str, requested: str, run: Callable, rerun: Callable):
    """Run ``name``'s kernel; under ``"auto"``, a kernel that fails to *build* on this machine (our Triton
    kernels, or compiled flex out of shared memory) is dropped from ``"auto"`` with a warning and ``rerun``
    picks the next backend (for a BlockMask, SDPA over its kept tiles). An explicit backend, or any other
    error, propagates.
    """
    if requested != "auto" or name not in ("triton", "flex"):
        return run()
    try:
        return run()
    except Exception as err:
        if not _build_failure(name, err):
            raise
        warnings.warn(
            f"backend='auto': the {name} kernels failed to build here ({err!r}); using the next backend",
            stacklevel=2,
        )
        AUTO_DISABLED.add(name)
        return rerun()


# ---------------------------------------------------------------- the one door


@dataclass(frozen=True)
class AttentionSpec:
    """One attention call, described once, for every backend.

    Attributes:
        mask: bool (True = attend) or additive float tensor broadcastable to ``[b, n_h, s_q, s_kv]``,
            or a flex ``BlockMask``.
        causal (bool): causal masking. Query ``i`` sits at key position ``i + causal_offset``
            (0: torch's top-left alignment; ``s_kv - s_q``: bottom-right, a cache chunk), or, with
            ``seqlens``, at ``seqlens[b] - s_q + i`` (the end of each row's filled keys).
        causal_offset (int): see ``causal``.
        seqlens (Optional[torch.Tensor]): ``[b]`` filled lengths of a KV cache whose whole buffers are
            passed as K/V: keys at or past a row's length are empty. On the device, so a compiled step
            needs no host value.
        max_seqlen (Optional[int]): a host-side bound of the filled lengths (the eager fill): only that
            prefix of the buffers is read. Without ``seqlens``, every row is filled to it.
        window (Optional[int]): sliding window, ``|query position - key position| < window``.
        softcap (Optional[float]): logit soft-cap ``c * tanh(s / c)``, before masking.
        sinks (Optional[torch.Tensor]): ``[n_h]`` sink logits.
        scale (Optional[float]): score multiplier, default ``h_d ** -0.5`` (resolved here, once).
        dropout_p (float): dropout on the weights.
        kv_scales (Optional[Tuple[torch.Tensor, torch.Tensor]]): K/V are quantized (int8 or float8, e.g. a
            quantized KV cache's buffers) with these float32 scales ``[b, n_kv, s_kv]``: key ``j`` is
            ``k[..., j, :] * k_scale[..., j]`` (:mod:`gqa_tune.ops.kv_quant`).
        need_weights (bool): also return the attention weights ``[b, n_h, s_q, s_kv]`` (only a backend with a
            ``weights_fn``, the math one, serves it).
        key_positions (Optional[torch.Tensor]): ``[s_kv]`` the positions the keys stand for, -1 for an empty
            slot (a ring cache's slots, which wrap); with ``query_positions`` ``[s_q]``. Causality, the window
            and a torchtune mask ``[b, 1, s_q, max_seq_len]`` (read at the keys' positions) then apply by
            position; the lowering turns them into one mask.
        query_positions (Optional[torch.Tensor]): see ``key_positions``.
        document_ids (Optional[torch.Tensor]): ``[b, s]`` ids of the packed documents a block-causal ``mask``
            keeps apart (:func:`gqa_tune.ops.masks.document_ids`): the ``"blocks"`` backend then attends
            within each document, at the documents' own cost.
    """

    mask: Optional[MaskType] = None
    causal: bool = False
    causal_offset: int = 0
    seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None
    window: Optional[int] = None
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None
    scale: Optional[float] = None
    dropout_p: float = 0.0
    kv_scales: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    need_weights: bool = False
    key_positions: Optional[torch.Tensor] = None
    query_positions: Optional[torch.Tensor] = None
    document_ids: Optional[torch.Tensor] = None

    @property
    def cached(self) -> bool:
        return self.seqlens is not None or self.max_seqlen is not None


@dataclass(frozen=True)
class AttentionPlan:
    """What :func:`plan_attention` decided: the backend and the arguments it will be called with."""

    backend: Backend
    call: AttentionCall
    requested: str
    spec: AttentionSpec
    k: torch.Tensor  # as the backend reads them (sliced to the filled prefix where it does not take lengths)
    v: torch.Tensor
    kwargs: dict
    k_given: torch.Tensor  # as the caller gave them (to plan again)
    v_given: torch.Tensor


def _with(mask: Optional[torch.Tensor], allowed: torch.Tensor) -> torch.Tensor:
    """``mask`` (``None``, bool or additive float) restricted to ``allowed`` (bool, broadcastable)."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def _query_positions(spec: AttentionSpec, b: int, s_q: int, device: torch.device) -> torch.Tensor:
    """``[b or 1, 1, s_q, 1]`` key position of each query (see :class:`AttentionSpec`)."""
    rows = torch.arange(s_q, device=device)
    if spec.seqlens is not None:
        return (spec.seqlens.to(rows.dtype).view(-1, 1) - s_q + rows.view(1, -1)).view(-1, 1, s_q, 1)
    return (rows + spec.causal_offset).view(1, 1, s_q, 1)


def _by_position(spec: AttentionSpec) -> AttentionSpec:
    """``spec`` with keys and queries at explicit positions (a ring cache) as one mask ``[b or 1, 1, s_q, s_kv]``:
    a key is seen if its slot is filled, within the window, not after the query (causal), and allowed by the
    torchtune mask at the key's position."""
    key_pos, query_pos = spec.key_positions, spec.query_positions
    gap = query_pos[:, None] - key_pos[None, :]  # [s_q, s_kv]
    visible = key_pos[None, :] >= 0
    if spec.window is not None:
        visible = visible & (gap.abs() < spec.window)
    if spec.causal:
        visible = visible & (gap >= 0)
    visible = visible[None, None]
    mask = spec.mask
    if mask is not None:
        mask = _with(mask[..., key_pos.clamp(min=0)], visible)  # [b, 1, s_q, s_kv]
    return replace(spec, mask=visible if mask is None else mask, causal=False, window=None, key_positions=None,
                   query_positions=None)  # fmt: skip


def _lower(
    spec: AttentionSpec, row: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """The call ``row`` gets for ``spec``: K/V (sliced to the filled prefix where the backend does not read
    cache lengths) and its keyword arguments, every mask 4-D. Allocates only the masks it must build."""
    b, n_h, s_q, h_d = q.shape
    if spec.key_positions is not None:
        spec = _by_position(spec)
    mask = spec.mask
    if isinstance(mask, torch.Tensor) and mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))  # broadcasting made explicit, once
    causal, offset = spec.causal, spec.causal_offset
    lengths = {}
    window = spec.window if row.windows else None  # read natively, else folded into the mask below
    scales = spec.kv_scales
    if spec.cached and row.cache_lengths:
        seqlens = spec.seqlens
        if seqlens is None:
            seqlens = torch.full((b,), spec.max_seqlen, dtype=torch.int32, device=q.device)
        lengths = {"seqlens": seqlens, "max_seqlen": spec.max_seqlen}
    else:
        if spec.max_seqlen is not None:
            k, v = k[:, :, : spec.max_seqlen], v[:, :, : spec.max_seqlen]
            if scales is not None:
                scales = tuple(t[:, :, : spec.max_seqlen] for t in scales)
            if isinstance(mask, torch.Tensor) and mask.shape[-1] > spec.max_seqlen:
                mask = mask[..., : spec.max_seqlen]
            if spec.seqlens is None and causal:
                offset = spec.max_seqlen - s_q
        s_kv = k.shape[2]
        keys = torch.arange(s_kv, device=q.device).view(1, 1, 1, -1)
        if spec.seqlens is not None:
            mask = _with(mask, keys < spec.seqlens.view(-1, 1, 1, 1))
            if causal:
                mask, causal = _with(mask, keys <= _query_positions(spec, b, s_q, q.device)), False
        if spec.window is not None and window is None:
            positions = _query_positions(replace(spec, causal_offset=offset), b, s_q, q.device)
            mask = _with(dense_mask(mask, b, n_h, s_q, s_kv, q.device), (positions - keys).abs() < spec.window)
        if causal and offset >= s_kv - 1:
            causal = False  # every query sees every key (a decode step)
        elif causal and (mask is not None or offset != 0) and not row.offsets:
            mask, causal = _with(dense_mask(mask, b, n_h, s_q, s_kv, q.device), keys <= _query_positions(
                replace(spec, causal_offset=offset, seqlens=None), b, s_q, q.device)), False  # fmt: skip
    scale = h_d**-0.5 if spec.scale is None else float(spec.scale)
    kwargs = dict(mask=mask, scale=scale, is_causal=causal, dropout_p=spec.dropout_p)
    if row.offsets:
        kwargs["causal_offset"] = offset
    if window is not None:
        kwargs["window"] = window
    if spec.softcap is not None or spec.sinks is not None:
        kwargs.update(softcap=spec.softcap, sinks=spec.sinks)
    if spec.sinks is not None:
        # A +inf sink takes every row's whole softmax mass, so its head's output is 0 (its value is zero);
        # inside a backend inf - inf is NaN, so the head runs with a finite sink and is zeroed after.
        infinite = torch.isposinf(spec.sinks)  # [n_h]
        kwargs["sinks"] = torch.where(infinite, 0.0, spec.sinks)
        kwargs["zero_heads"] = infinite
    kwargs.update(lengths)
    if row.documents and spec.document_ids is not None:
        kwargs["document_ids"] = spec.document_ids
    if scales is not None and lengths and k.dtype in row.quantized_kv:
        kwargs["kv_scales"] = scales
    elif scales is not None:
        # Dequantized by _run up to the fill: all of K/V where they are sliced to it, else up to the host
        # bound (max_seqlen) or, compiled, the longest of the device-side seqlens.
        sliced = not lengths and (spec.max_seqlen is not None or spec.seqlens is None)
        filled = None if sliced else (spec.max_seqlen if spec.max_seqlen is not None else spec.seqlens)
        kwargs["dequantize"] = (*scales, filled)
    return k, v, kwargs


def lower_for(
    spec: AttentionSpec, backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """``spec`` lowered for the named backend (what :func:`plan_attention` does once it has chosen)."""
    return _lower(spec, BACKENDS[backend], q, k, v)


def _predicted_call(q, k, v, spec: AttentionSpec, row: Backend, need_weights: bool) -> AttentionCall:
    """What ``row`` would be asked, without building any mask (for its limits). On the decode hot path: cheap."""
    decode = spec.cached and row.cache_lengths
    mask = spec.mask
    builds_mask = (spec.window is not None and not row.windows) or (spec.seqlens is not None and not decode)
    builds_mask = builds_mask or spec.key_positions is not None
    builds_mask = builds_mask or (spec.causal and not row.offsets and (mask is not None or spec.causal_offset != 0))
    if builds_mask and (mask is None or isinstance(mask, BlockMask)):
        mask = _BOOL_PROBE  # the lowering builds a bool mask
    sinks = spec.sinks
    grads = q.requires_grad or k.requires_grad or v.requires_grad or (sinks is not None and sinks.requires_grad)
    s_kv = k.shape[2] if spec.max_seqlen is None or decode else min(k.shape[2], spec.max_seqlen)
    per_head = isinstance(spec.mask, torch.Tensor) and spec.mask.dim() >= 3 and spec.mask.shape[-3] > 1
    return AttentionCall(
        q.device, q.dtype, q.shape[-1], mask, spec.dropout_p, need_weights, torch.is_grad_enabled() and grads,
        v.shape[-1] if v.shape[-1] != q.shape[-1] else None, q.numel() == 0 or s_kv == 0, spec.softcap,
        sinks is not None, decode, per_head, k.dtype if spec.kv_scales is not None else None, (q.shape[2], s_kv),
    )  # fmt: skip


_BOOL_PROBE = torch.ones(1, dtype=torch.bool)


def plan_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, backend: str = "auto"
) -> AttentionPlan:
    """Choose the backend for ``spec`` and lower ``spec`` for it, without running anything.

    The single place that decides eligibility, fallback and mask shaping. Raises ``ValueError``
    (naming the backend and why) if an explicit ``backend`` cannot serve the call, so a caller can plan
    before it changes any state (the module plans before it writes its KV cache).
    """
    check_backend_name(backend)
    if backend != "auto":
        call = _predicted_call(q, k, v, spec, BACKENDS[backend], spec.need_weights)
        chosen = select_backend(call, backend)
    else:
        chosen, call = None, _predicted_call(q, k, v, spec, BACKENDS["math"], spec.need_weights)
        for name in auto_order(call):
            row = BACKENDS[name]
            candidate = call if row.offsets == BACKENDS["math"].offsets and not row.cache_lengths else None
            candidate = candidate or _predicted_call(q, k, v, spec, row, spec.need_weights)
            if candidate.empty:
                break  # nothing to attend: the reference answers (empty, or zeros)
            if name not in AUTO_DISABLED and row.limits(candidate) is None:
                chosen, call = row, candidate
                break
        if chosen is None:
            chosen = BACKENDS["math"]
            call = _predicted_call(q, k, v, spec, chosen, spec.need_weights)
    if call.empty:
        chosen = BACKENDS["math"]
    k_in, v_in, kwargs = _lower(spec, chosen, q, k, v)
    return AttentionPlan(chosen, call, backend, spec, k_in, v_in, kwargs, k, v)


def _run(chosen: Backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict, need_weights: bool = False):
    """The backend's call under the NaN rule; ``(out, weights)`` with ``need_weights``."""
    if "dequantize" in kwargs:  # quantized K/V for a backend that reads floats: the filled prefix only
        kwargs = dict(kwargs)
        k_scale, v_scale, seqlens = kwargs.pop("dequantize")
        k, v = dequantize_filled(k, k_scale, q.dtype, seqlens), dequantize_filled(v, v_scale, q.dtype, seqlens)
    zero_heads = kwargs.get("zero_heads")
    if zero_heads is not None:
        kwargs = {key: value for key, value in kwargs.items() if key != "zero_heads"}
    if "seqlens" in kwargs:  # the decode kernel reads only each row's filled keys
        k, v, restore = hide_masked_nans(q, k, v, None, False, chosen.zeroes_nan_query_rows)
    else:
        k, v, restore = hide_masked_nans(
            q, k, v, kwargs["mask"], kwargs["is_causal"], chosen.zeroes_nan_query_rows, kwargs.get("causal_offset", 0)
        )
    if need_weights:
        out, weights = chosen.weights_fn(q, k, v, **kwargs)
    else:
        out, weights = chosen.fn(q, k, v, **kwargs), None
    out = restore(out)
    if zero_heads is not None:  # heads with a +inf sink: all their weight is on the sink
        out = torch.where(zero_heads.view(1, -1, 1, 1), 0.0, out)
        weights = None if weights is None else torch.where(zero_heads.view(1, -1, 1, 1), 0.0, weights)
    return out if not need_weights else (out, weights)


def execute(plan: AttentionPlan, q: torch.Tensor):
    """Run a plan under the NaN rule (:mod:`gqa_tune.ops.nan_rule`); K/V are read when it runs. Returns the
    output ``[b, n_h, s_q, h_dv]``, or ``(out, weights)`` for a spec with ``need_weights``."""

    need_weights = plan.spec.need_weights

    def rerun() -> torch.Tensor:  # a Triton kernel failed to build under "auto": plan again without it
        again = plan_attention(q, plan.k_given, plan.v_given, plan.spec, "auto")
        return _run(again.backend, q, again.k, again.v, again.kwargs, need_weights)

    return call_guarded(
        plan.backend.name,
        plan.requested,
        lambda: _run(plan.backend, q, plan.k, plan.v, plan.kwargs, need_weights),
        rerun,
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, backend: str = "auto"):
    """:func:`plan_attention` then :func:`execute`: the one door for an already validated call."""
    return execute(plan_attention(q, k, v, spec, backend), q)
