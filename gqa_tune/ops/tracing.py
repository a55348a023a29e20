"""Compiled or eager: the one place that decides what a step may do in each.

Eagerly, a step may read device values on the host (``int(t)``, ``bool(t)``) and keep state in Python ints.
Under ``torch.compile`` a host read breaks the graph (and on a GPU stalls the device), so every decision that
depends on it asks this module:

=============================================  =======================================  ==============================
decision                                       eager                                    compiled
=============================================  =======================================  ==============================
value checks (positions in range, a cache      run, raising ``ValueError``              skipped (shape checks still
write that fits, float16 overflow)                                                      run)
a cache's fill and the new positions           a Python int, sliced on the host         device buffers (``cache_pos``)
cache writes                                   indexed by the host fill                 custom ops on device positions
how much of a cache attention reads            the filled prefix (``max_seqlen``)       whole buffers + ``seqlens``
the NaN rule's finiteness look (CPU only)      one host read skips its work             the sync-free path always
=============================================  =======================================  ==============================

:func:`compiling` is what the modules call; :func:`may_read_host` adds the device (a host read is free on CPU
only).
"""

from typing import Optional

import torch


def compiling() -> bool:
    """Whether this code is being traced by ``torch.compile``: no host reads, state lives on the device."""
    return torch.compiler.is_compiling()


def may_read_host(t: Optional[torch.Tensor]) -> bool:
    """Whether reading ``t``'s values on the host is free: on CPU, eagerly."""
    return t is not None and t.device.type == "cpu" and not compiling()
