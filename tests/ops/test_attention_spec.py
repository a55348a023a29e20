"""The one door: ``AttentionSpec`` describes a call once, ``plan_attention`` alone chooses the backend and
shapes the masks, and every backend (the decode kernel included) gives the same answer."""

import ast

import pytest
import torch
from helpers import REPO, make_qkv

from gqa_tune.ops.dispatch import AttentionSpec, attend, execute, plan_attention

BACKENDS = ["math", "sdpa", "flex", "triton"]


def oracle(q, k, v, allowed):
    """float64 attention with an explicit visibility ``allowed`` ``[b, 1, s_q, s_kv]`` (worked out by hand)."""
    group = q.shape[1] // k.shape[1]
    keys, values = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = (q.double() @ keys.transpose(-2, -1)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.nan_to_num(torch.softmax(s, -1))
    return (w @ values).float()


def qkv(b=2, s_q=3, s_kv=9):
    torch.manual_seed(0)
    return make_qkv(b, 4, 2, s_q, s_kv, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_offset_is_bottom_right_alignment_on_every_backend(backend):
    q, k, v = qkv()
    allowed = torch.tensor([[j <= i + 6 for j in range(9)] for i in range(3)]).view(1, 1, 3, 9)  # queries 6, 7, 8
    with torch.no_grad():
        out = attend(q, k, v, AttentionSpec(causal=True, causal_offset=6), backend)
    torch.testing.assert_close(out, oracle(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_the_triton_kernel_gets_the_offset_itself(monkeypatch):
    q, k, v = qkv()
    plan = plan_attention(q, k, v, AttentionSpec(causal=True, causal_offset=6), "triton")
    assert plan.kwargs["causal_offset"] == 6 and plan.kwargs["is_causal"] and plan.kwargs["mask"] is None
    plan = plan_attention(q, k, v, AttentionSpec(causal=True, causal_offset=6), "sdpa")
    assert not plan.kwargs["is_causal"] and plan.kwargs["mask"].shape == (1, 1, 3, 9)  # lowered into a mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_cache_lengths_per_row_on_every_backend(backend, causal):
    q, k, v = qkv(b=3, s_q=2, s_kv=10)
    seqlens = torch.tensor([2, 10, 6])
    k[0, :, 2:], v[0, :, 2:] = 1e4, 1e4  # past a row's length: must never be read
    allowed = torch.zeros(3, 1, 2, 10, dtype=torch.bool)
    for row, length in enumerate(seqlens.tolist()):
        for i in range(2):
            last = length - 2 + i if causal else length - 1
            allowed[row, 0, i, : last + 1] = True
    with torch.no_grad():
        out = attend(q, k, v, AttentionSpec(causal=causal, seqlens=seqlens), backend)
    torch.testing.assert_close(out, oracle(q, k, v, allowed), atol=1e-4, rtol=1e-4)


def test_a_cache_call_takes_the_triton_decode_row_and_others_read_only_the_filled_prefix():
    q, k, v = qkv(s_q=1, s_kv=32)
    spec = AttentionSpec(causal=True, max_seqlen=12, causal_offset=11)
    triton = plan_attention(q, k, v, spec, "triton")
    assert "seqlens" in triton.kwargs and triton.kwargs["max_seqlen"] == 12  # split-K over the filled part
    sdpa = plan_attention(q, k, v, spec, "sdpa")
    assert sdpa.k.shape[2] == 12 and not sdpa.kwargs["is_causal"] and sdpa.kwargs["mask"] is None  # a decode step
    with torch.no_grad():
        torch.testing.assert_close(execute(triton, q), execute(sdpa, q), atol=1e-5, rtol=1e-5)


def test_window_with_a_cache_follows_the_positions():
    q, k, v = qkv(b=1, s_q=2, s_kv=12)
    allowed = torch.zeros(1, 1, 2, 12, dtype=torch.bool)
    for i, position in enumerate((8, 9)):  # fill 10: the 2 new queries sit at 8 and 9
        allowed[0, 0, i, position - 2 : position + 1] = True  # window 3: keys position-2 .. position
    spec = AttentionSpec(causal=True, max_seqlen=10, causal_offset=8, window=3)
    for backend in BACKENDS:
        with torch.no_grad():
            out = attend(q, k, v, spec, backend)
        torch.testing.assert_close(out, oracle(q, k[:, :, :10], v[:, :, :10], allowed[..., :10]), atol=1e-5, rtol=1e-5)


def test_plan_refuses_before_anything_runs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this call: torch's SDPA has no logit"):
        plan_attention(q, k, v, AttentionSpec(softcap=5.0), "sdpa")
    plan = plan_attention(q, k, v, AttentionSpec(softcap=5.0), "auto")
    assert plan.backend.name == "math"


def test_the_module_imports_no_backend():
    tree = ast.parse((REPO / "gqa_tune" / "modules" / "attention.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith(("gqa_tune.ops.backends", "gqa_tune.kernels", "gqa_tune.ops.decode"))
                   for name in imported), imported  # fmt: skip
    assert "gqa_tune.ops.dispatch" in imported


@pytest.mark.parametrize("backend", ["math", "sdpa", "flex"])
def test_keys_at_explicit_positions_a_ring_cache(backend):
    """A ring cache's slots hold positions out of order (-1: empty); the plan turns causality, the window and a
    torchtune mask read at the keys' positions into one mask."""
    q, k, v = qkv(b=2, s_q=2, s_kv=5)
    key_pos = torch.tensor([5, 6, 2, 3, -1])
    query_pos = torch.tensor([5, 6])
    tt_mask = torch.ones(2, 1, 2, 8, dtype=torch.bool)
    tt_mask[1, 0, :, 3] = False  # row 1 may not see position 3
    spec = AttentionSpec(mask=tt_mask, causal=True, window=3, key_positions=key_pos, query_positions=query_pos)
    plan = plan_attention(q, k, v, spec, backend)
    gap = query_pos[:, None] - key_pos[None, :]
    allowed = ((key_pos >= 0) & (gap >= 0) & (gap < 3))[None, None] & tt_mask[..., key_pos.clamp(min=0)]
    assert torch.equal(plan.kwargs["mask"].expand(2, 1, 2, 5), allowed)
    assert not plan.kwargs["is_causal"] and "window" not in plan.kwargs
    torch.testing.assert_close(execute(plan, q), oracle(q, k, v, allowed), atol=2e-5, rtol=2e-5)


def test_document_ids_travel_in_the_spec_to_the_blocks_backend():
    from gqa_tune.data.packing import document_block_mask
    from gqa_tune.ops.masks import documents_of

    block_mask = document_block_mask([torch.tensor([100, 150, 6])], 256)
    ids = documents_of(block_mask)
    assert ids is not None and ids.shape == (1, 256) and documents_of(torch.ones(2, 2, dtype=torch.bool)) is None
    q, k, v = make_qkv(1, 4, 2, 256, 256, 16)
    q.requires_grad_(True)
    plan = plan_attention(q, k, v, AttentionSpec(mask=block_mask, document_ids=ids))
    assert plan.backend.name == "blocks" and plan.kwargs["document_ids"] is ids
    plain = plan_attention(q, k, v, AttentionSpec(mask=block_mask))  # no ids: over the tiles
    assert plain.backend.name == "blocks" and "document_ids" not in plain.kwargs
    same = (ids[0][:, None] == ids[0][None, :]) & torch.ones(256, 256, dtype=torch.bool).tril()
    for p in (plan, plain):
        torch.testing.assert_close(execute(p, q), oracle(q, k, v, same[None, None]), atol=2e-5, rtol=2e-5)
