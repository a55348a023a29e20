import os

import pytest
import torch

# The Triton kernels run in Triton's CPU interpreter where there is no GPU.
# It must be chosen before gqa_tune's kernel modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
