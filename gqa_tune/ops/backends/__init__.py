"""Attention backends. Each is a function with one signature::

    fn(q, k, v, *, mask, scale, is_causal, dropout_p) -> out

with ``q`` ``[b, n_h, s_q, h_d]``, ``k``/``v`` ``[b, n_kv, s_kv, h_d]`` (grouped,
never expanded by the caller), plus a ``*_limits(call)`` function that says
why it cannot serve a call (``None`` when it can). Adding a backend is one
module here and one row in :mod:`gqa_tune.ops.dispatch`.
"""
