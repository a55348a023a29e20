"""The backend table and what ``backend="auto"`` picks for each kind of call."""

import re

import pytest
import torch
from helpers import causal_mod as _causal
from torch.nn.attention.flex_attention import create_block_mask

from gqa_tune.ops import BACKEND_NAMES, BACKENDS, attention_ref, scaled_dot_product_gqa
from gqa_tune.ops.dispatch import AttentionCall, AttentionSpec, attend, auto_order, make_call, plan_attention


@pytest.fixture(scope="module")
def block_mask():
    return create_block_mask(_causal, None, None, 5, 7, device="cpu")


def qkv(dtype=torch.float32, requires_grad=False):
    q = torch.randn(2, 8, 5, 16, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 7, 16, dtype=dtype)
    v = torch.randn(2, 2, 7, 16, dtype=dtype)
    return q, k, v


def mask_of(kind, dtype, block_mask):
    return {
        "none": None,
        "bool": torch.ones(5, 7, dtype=torch.bool),
        "float": torch.zeros(2, 1, 5, 7, dtype=dtype),
        "block": block_mask,
    }[kind]


def chosen(q, k, v, mask=None, dropout_p=0.0, need_weights=False, backend="auto"):
    """The backend ``plan_attention`` (the path every call takes) picks."""
    spec = AttentionSpec(mask=mask, dropout_p=dropout_p, need_weights=need_weights)
    return plan_attention(q, k, v, spec, backend).backend.name


def test_backend_table():
    assert BACKEND_NAMES == ("auto", "sdpa", "flex", "blocks", "math", "triton")
    assert set(BACKENDS) == {"sdpa", "flex", "blocks", "math", "triton"}
    assert all(b.name == name for name, b in BACKENDS.items())


# ---------------------------------------------------------------- auto


@pytest.mark.parametrize("kind", ["none", "bool", "float", "block"])
def test_auto_picks_math_for_weights(kind, block_mask):
    q, k, v = qkv()
    assert chosen(q, k, v, mask_of(kind, q.dtype, block_mask), need_weights=True) == "math"


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_auto_picks_sdpa_for_dense_masks(kind, requires_grad):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q, k, v = qkv(dtype, requires_grad)
        assert chosen(q, k, v, mask_of(kind, dtype, block_mask=None)) == "sdpa"
        assert chosen(q, k, v, mask_of(kind, dtype, block_mask=None), dropout_p=0.1) == "sdpa"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_picks_flex_for_block_mask_without_grad(dtype, block_mask):
    q, k, v = qkv(dtype)
    assert chosen(q, k, v, block_mask) == "flex"
    q.requires_grad_(True)
    with torch.no_grad():  # requires_grad does not count when autograd is off
        assert chosen(q, k, v, block_mask) == "flex"


def test_auto_block_mask_with_grad_on_cpu_picks_blocks(block_mask):
    q, k, v = qkv(requires_grad=True)
    assert chosen(q, k, v, block_mask) == "blocks"
    q, k, v = qkv()
    v.requires_grad_(True)  # any of q, k, v
    assert chosen(q, k, v, block_mask) == "blocks"


def test_auto_block_mask_float64_on_cpu_picks_blocks(block_mask):
    q, k, v = qkv(torch.float64)
    assert chosen(q, k, v, block_mask) == "blocks"


def test_auto_block_mask_with_dropout_picks_blocks(block_mask):
    q, k, v = qkv()
    assert chosen(q, k, v, block_mask, dropout_p=0.1) == "blocks"


def test_a_block_mask_for_other_lengths_is_made_dense_by_sdpa(block_mask):
    q, k, v = qkv(requires_grad=True)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)  # the mask is for 5 x 7
    with pytest.raises(ValueError, match=r"the BlockMask is for \(s_q, s_kv\) = \(5, 7\), the call is \(5, 9\)"):
        chosen(q, k, v, block_mask, backend="blocks")
    assert chosen(q, k, v, block_mask) == "sdpa"


def test_blocks_serves_sparse_or_packed_bool_masks_on_cpu_only():
    from gqa_tune.data.packing import document_ids

    q = torch.randn(1, 4, 512, 16, requires_grad=True)
    k, v = torch.randn(1, 2, 512, 16), torch.randn(1, 2, 512, 16)
    ids = document_ids([torch.tensor([100, 300, 112])], 512)[0]
    packed = (ids[:, None] == ids[None, :]) & torch.ones(512, 512, dtype=torch.bool).tril()
    assert chosen(q, k, v, packed.view(1, 1, 512, 512)) == "blocks"
    dense = torch.ones(1, 1, 512, 512, dtype=torch.bool)  # keeps every tile
    assert chosen(q, k, v, dense) == "sdpa"
    with pytest.raises(ValueError, match="backend='blocks' cannot run this call: it takes a BlockMask"):
        chosen(q, k, v, dense, backend="blocks")
    out = attend(q, k, v, AttentionSpec(mask=packed.view(1, 1, 512, 512)))
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=packed)[0], atol=1e-5, rtol=1e-4)


def test_auto_order():
    q, k, v = qkv()
    assert auto_order(make_call(q, k, v, None, 0.0, True)) == ("math",)
    assert auto_order(make_call(q, k, v, None, 0.0, False)) == ("sdpa", "math")
    assert auto_order(make_call(q, k, v, torch.ones(5, 7, dtype=torch.bool), 0.0, False)) == ("blocks", "sdpa", "math")


def test_make_call(block_mask):
    q, k, v = qkv()
    call = make_call(q, k, v, None, 0.25, False)
    assert call.device.type == "cpu" and call.dtype == torch.float32 and call.dropout_p == 0.25
    assert not call.need_weights and not call.needs_grad
    k.requires_grad_(True)
    assert make_call(q, k, v, None, 0.0, False).needs_grad
    with torch.no_grad():
        assert not make_call(q, k, v, None, 0.0, False).needs_grad
    for kind in ("none", "bool", "float", "block"):
        assert make_call(q, k, v, mask_of(kind, q.dtype, block_mask), 0.0, False).mask_kind == kind


# ---------------------------------------------------------------- explicit backends


@pytest.mark.parametrize("kind", ["none", "bool", "float", "block"])
def test_explicit_sdpa_and_math_serve_any_call_without_weights(kind, block_mask):
    q, k, v = qkv(requires_grad=True)
    mask = mask_of(kind, q.dtype, block_mask)
    assert chosen(q, k, v, mask, backend="sdpa") == "sdpa"
    assert chosen(q, k, v, mask, dropout_p=0.2, need_weights=True, backend="math") == "math"


@pytest.mark.parametrize(
    "backend,kwargs,reason",
    [
        pytest.param("flex", dict(mask="block", dropout_p=0.1), "it has no dropout (dropout_p=0.1)", id="flex-dropout"),
        pytest.param("flex", dict(mask="block", grad=True), "no backward on CPU", id="flex-grad"),
        pytest.param("flex", dict(dtype=torch.float64), "does not support float64", id="flex-float64"),
        pytest.param("flex", dict(need_weights=True), "cannot return attention weights", id="flex-weights"),
        pytest.param("sdpa", dict(need_weights=True), "cannot return attention weights", id="sdpa-weights"),
        pytest.param("triton", dict(mask="block"), "not a block mask", id="triton-block"),
        pytest.param("triton", dict(mask="float"), "not a float mask", id="triton-float"),
        pytest.param("triton", dict(dropout_p=0.1), "it has no dropout (dropout_p=0.1)", id="triton-dropout"),
        pytest.param("triton", dict(need_weights=True), "cannot return attention weights", id="triton-weights"),
        pytest.param("triton", dict(dtype=torch.float64), "not torch.float64", id="triton-float64"),
    ],
)
def test_explicit_backend_that_cannot_serve_raises(backend, kwargs, reason, block_mask):
    q, k, v = qkv(kwargs.get("dtype", torch.float32), kwargs.get("grad", False))
    mask = mask_of(kwargs.get("mask", "none"), q.dtype, block_mask)
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run this call: .*{re.escape(reason)}") as info:
        chosen(q, k, v, mask, kwargs.get("dropout_p", 0.0), kwargs.get("need_weights", False), backend)
    assert reason in str(info.value)


def test_triton_on_cpu_without_the_interpreter_raises_value_error(monkeypatch):
    import gqa_tune.kernels.triton._common as common

    monkeypatch.setattr(common, "INTERPRET", False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="on CPU only in Triton's interpreter"):
        scaled_dot_product_gqa(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="on CPU only in Triton's interpreter"):
        attend(q, k, v, AttentionSpec(), "triton")
    assert chosen(q, k, v) == "sdpa"


def test_triton_without_triton_installed_says_how_to_install(monkeypatch):
    import gqa_tune.ops.backends.triton as triton_backend

    monkeypatch.setattr(triton_backend, "triton_available", lambda: False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"triton is not installed \(pip install 'gqa_tune\[triton\]'\)"):
        scaled_dot_product_gqa(q, k, v, backend="triton")


def test_auto_prefers_triton_on_cuda_only_where_the_record_validates_it(monkeypatch):
    from gqa_tune.ops import dispatch

    cuda_call = AttentionCall(torch.device("cuda"), torch.bfloat16, 64, None, 0.0, False, True)
    monkeypatch.setattr(dispatch, "auto_validated", lambda device: True)
    assert auto_order(cuda_call) == ("triton", "sdpa", "math")
    monkeypatch.setattr(dispatch, "auto_validated", lambda device: False)
    assert auto_order(cuda_call) == ("sdpa", "math")
    q, k, v = qkv()
    assert "triton" not in auto_order(make_call(q, k, v, None, 0.0, False))


def test_the_validation_record_decides_per_architecture(monkeypatch):
    import json

    import gqa_tune.ops.backends.triton as triton_backend

    record = json.loads(triton_backend._RECORD.read_text())  # committed, and installed with the package
    assert "architectures" in record
    entries = {
        "sm_90": {"correct": True, "faster_than_sdpa": True},
        "sm_80": {"correct": True, "faster_than_sdpa": False},
    }
    monkeypatch.setattr(triton_backend, "_validated_architectures", lambda: entries)
    for capability, expected in (((9, 0), True), ((8, 0), False), ((8, 9), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert triton_backend.auto_validated(torch.device("cuda")) is expected
    assert triton_backend.auto_validated(torch.device("cpu")) is False


@pytest.mark.parametrize("name", ["cuda", "SDPA", "", "flash"])
def test_unknown_backend_raises_with_choices(name):
    q, k, v = qkv()
    message = f"unknown attention backend {name!r}; choose one of auto, sdpa, flex, blocks, math, triton"
    with pytest.raises(ValueError) as info:
        chosen(q, k, v, backend=name)
    assert str(info.value) == message
    with pytest.raises(ValueError, match="unknown attention backend"):
        scaled_dot_product_gqa(q, k, v, backend=name)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_attend_matches_reference(backend):
    q, k, v = qkv(torch.float64)
    mask = torch.rand(2, 1, 5, 7) < 0.7
    mask[..., 0] = True
    out = attend(q, k, v, AttentionSpec(mask=mask, scale=0.3), backend)
    torch.testing.assert_close(out, attention_ref(q, k, v, mask=mask, scale=0.3)[0], atol=1e-12, rtol=0)
    out = attend(q, k, v, AttentionSpec(causal=True), backend)
    torch.testing.assert_close(out, attention_ref(q, k, v, is_causal=True)[0], atol=1e-12, rtol=0)


class _FakeTritonBuildError(RuntimeError):
    pass


_FakeTritonBuildError.__module__ = "triton.runtime.errors"


def _fail(error):
    def run():
        raise error

    return run


def test_auto_drops_a_triton_kernel_that_fails_to_build(monkeypatch):
    from gqa_tune.ops import dispatch

    monkeypatch.setattr(dispatch, "AUTO_DISABLED", set())
    with pytest.warns(UserWarning, match="failed to build"):
        assert dispatch.call_guarded("triton", "auto", _fail(_FakeTritonBuildError("out of resources")), lambda: 7) == 7
    assert dispatch.AUTO_DISABLED == {"triton"}
    monkeypatch.setattr(dispatch, "auto_validated", lambda device: True)
    cuda_call = AttentionCall(torch.device("cuda"), torch.bfloat16, 64, None, 0.0, False, False)
    assert dispatch.select_backend(cuda_call, "auto").name == "sdpa"


def test_explicit_triton_and_other_errors_propagate(monkeypatch):
    from gqa_tune.ops import dispatch

    monkeypatch.setattr(dispatch, "AUTO_DISABLED", set())
    with pytest.raises(_FakeTritonBuildError):
        dispatch.call_guarded("triton", "triton", _fail(_FakeTritonBuildError("x")), lambda: 7)
    with pytest.raises(ZeroDivisionError):
        dispatch.call_guarded("triton", "auto", _fail(ZeroDivisionError()), lambda: 7)
    assert dispatch.AUTO_DISABLED == set()


class _FakeInductorError(RuntimeError):
    """What compiled flex raises when its kernel needs more shared memory than the GPU has (torchtune#2218)."""


_FakeInductorError.__module__ = "torch._inductor.exc"


def _raising(error):
    def fn(*args, **kwargs):
        raise error

    return fn


def test_auto_falls_back_from_flex_out_of_shared_memory_to_sdpa_over_tiles(monkeypatch, block_mask):
    import dataclasses

    from gqa_tune.ops import dispatch

    monkeypatch.setattr(dispatch, "AUTO_DISABLED", set())
    error = _FakeInductorError(
        "OutOfResources: out of resource: shared memory, Required: 131072, Hardware limit: 101376"
    )
    broken = dataclasses.replace(dispatch.BACKENDS["flex"], fn=_raising(error))
    monkeypatch.setitem(dispatch.BACKENDS, "flex", broken)
    q, k, v = qkv()
    assert chosen(q, k, v, block_mask) == "flex"  # CPU, no grad: flex first
    with pytest.warns(UserWarning, match="the flex kernels failed to build here"):
        out = scaled_dot_product_gqa(q, k, v, block_mask)
    assert dispatch.AUTO_DISABLED == {"flex"}
    ref = scaled_dot_product_gqa(q, k, v, block_mask, backend="math")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # any other flex error, and an explicit backend="flex", propagate
    monkeypatch.setattr(dispatch, "AUTO_DISABLED", set())
    with pytest.raises(_FakeInductorError):
        scaled_dot_product_gqa(q, k, v, block_mask, backend="flex")
    monkeypatch.setitem(dispatch.BACKENDS, "flex", dataclasses.replace(broken, fn=_raising(_FakeInductorError("bug"))))
    with pytest.raises(_FakeInductorError):
        scaled_dot_product_gqa(q, k, v, block_mask)
