import pytest
import torch
from torch._dynamo.testing import CompileCounter

from gqa_tune.modules import KVCache


def kv(b=2, h=2, s=3, d=4, fill=None):
    k = torch.randn(b, h, s, d) if fill is None else torch.full((b, h, s, d), float(fill))
    return k, k + 100


def test_update_appends_and_reports_size():
    cache = KVCache(batch_size=2, max_seq_len=8, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    k1, v1 = kv(s=3)
    k2, v2 = kv(s=1)
    cache.update(k1, v1)
    k_out, v_out = cache.update(k2, v2)
    assert cache.size == 4 and k_out.shape == (2, 2, 8, 4)
    torch.testing.assert_close(k_out[:, :, :4], torch.cat([k1, k2], dim=2))
    torch.testing.assert_close(v_out[:, :, :4], torch.cat([v1, v2], dim=2))
    assert torch.equal(cache.cache_pos[:2], torch.tensor([4, 5]))
    cache.reset()
    assert cache.size == 0 and cache.k_cache.abs().sum() == 0
    assert torch.equal(cache.cache_pos, torch.arange(8))


def test_smaller_batch_uses_first_rows_and_casts_dtype():
    cache = KVCache(4, 8, 2, 4, torch.bfloat16)
    k, v = kv(b=2, s=2)
    k_out, _ = cache.update(k, v)
    assert k_out.shape == (2, 2, 8, 4) and k_out.dtype == torch.bfloat16
    torch.testing.assert_close(k_out[:, :, :2], k.bfloat16())
    assert cache.k_cache[2:].abs().sum() == 0


@pytest.mark.parametrize(
    "shape_k,shape_v,message",
    [
        ((3, 2, 1, 4), (3, 2, 1, 4), "batch size 3 is larger than the cache's batch_size 2"),
        ((2, 8, 1, 4), (2, 8, 1, 4), "got 8 key/value heads, the cache holds 2"),
        ((2, 2, 1, 5), (2, 2, 1, 5), "got head_dim 5, the cache holds 4"),
        ((2, 2, 6, 4), (2, 2, 6, 4), r"cannot write 6 positions: 3 of max_seq_len 8 are filled \(5 free\)"),
        ((2, 2, 1, 4), (2, 2, 2, 4), "of one shape"),
        ((2, 1, 4), (2, 1, 4), "of one shape"),
    ],
)
def test_bad_update_raises_and_leaves_cache_unchanged(shape_k, shape_v, message):
    cache = KVCache(2, 8, 2, 4, torch.float32)
    cache.update(*kv(s=3))
    before = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.cache_pos)]
    with pytest.raises(ValueError, match=message):
        cache.update(torch.randn(shape_k), torch.randn(shape_v))
    for old, new in zip(before, (cache.k_cache, cache.v_cache, cache.cache_pos)):
        assert torch.equal(old, new)
    assert cache.size == 3


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_construction_raises(bad):
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        KVCache(1, bad, 2, 4, torch.float32)


def test_compiled_updates_do_not_recompile():
    cache = KVCache(1, 16, 2, 4, torch.float32)
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(k, v):
        k_out, v_out = cache.update(k, v)
        return k_out.sum() + v_out.sum()

    written = []
    for i in range(5):
        k, v = kv(b=1, s=1, fill=i + 1)
        written.append(k)
        step(k, v)
    assert counter.frame_count == 1
    assert cache.size == 5
    torch.testing.assert_close(cache.k_cache[:, :, :5], torch.cat(written, dim=2))


def test_truncate_forgets_positions_and_refuses_bad_lengths():
    cache = KVCache(1, 8, 2, 4, torch.float32)
    k, v = kv(b=1, s=5, fill=1)
    cache.update(k, v)
    cache.truncate(3)
    assert cache.size == 3 and int(cache.cache_pos[0]) == 3
    for bad in (-1, 4, 2.0, True):
        with pytest.raises(ValueError, match="length must be an int in"):
            cache.truncate(bad)
    assert cache.size == 3
    ring = KVCache(1, 8, 2, 4, torch.float32, window=2)
    ring.update(k, v)
    ring.truncate(4)
    assert ring.size == 4 and sorted(ring.slot_pos.tolist()) == [-1, 3]
