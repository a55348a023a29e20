"""Slot for the ``"triton"`` backend (GQA-native Triton kernels).

The kernels are not part of this release; until they land this backend
declines every call with a message saying so, and ``"auto"`` never picks it.
"""


def triton_backend(q, k, v, *, mask, scale, is_causal, dropout_p):
    raise NotImplementedError("the 'triton' backend has no kernels yet")


def triton_limits(call) -> "str | None":
    return "the Triton kernels are not implemented in this version of gqa_tune"
