"""Helpers shared by the test files (importable as ``helpers``: pytest puts ``tests/`` on the path).

One copy of what the tests used to repeat: q/k/v factories, causal ``mask_mod``s and torchtune-style
decoding masks, a greedy loop without a cache, and the repository root.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import torch

#: The repository root.
REPO = Path(__file__).resolve().parents[1]
#: torchtune's ``tune`` beside this interpreter.
TUNE = str(Path(sys.executable).with_name("tune"))


def make_qkv(b, n_h, n_kv, s_q, s_kv, h_d, h_dv=None, dtype=torch.float32, requires_grad=False):
    """Random ``q [b, n_h, s_q, h_d]``, ``k [b, n_kv, s_kv, h_d]``, ``v [b, n_kv, s_kv, h_dv]``."""
    h_dv = h_d if h_dv is None else h_dv
    q = torch.randn(b, n_h, s_q, h_d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(b, n_kv, s_kv, h_d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(b, n_kv, s_kv, h_dv, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def causal_mod(b, h, q_idx, kv_idx):
    """flex ``mask_mod``: top-left causal."""
    return q_idx >= kv_idx


def decoding_mask(s: int, length: int, start: int = 0) -> torch.Tensor:
    """torchtune's decoding mask ``[1, s, length]``: the ``s`` tokens at positions ``start..`` see every
    position up to their own."""
    return torch.ones(s, length, dtype=torch.bool).tril(start)[None]


@torch.no_grad()
def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``prompt`` ``[b, s]`` followed by ``steps`` greedy tokens, the whole sequence through ``model`` each step."""
    tokens = prompt
    for _ in range(steps):
        nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens


#: The tiny Hugging Face models of the ``hf_model_dir`` tests: every architecture gqa_tune builds from a
#: ``config.json``, each with what sets it apart. Vocabulary 300: the byte tokenizer's ids (260) fit.
TINY_HF = {
    "llama3": dict(
        model_type="llama", rope_theta=500_000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "qwen2": dict(model_type="qwen2", rope_theta=1_000_000.0, tie_word_embeddings=False),  # q/k/v biases
    "mistral": dict(model_type="mistral", sliding_window=16, tie_word_embeddings=False),
    "gemma": dict(model_type="gemma", head_dim=24),
    "gemma2": dict(
        model_type="gemma2", head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
    ),
}  # fmt: skip
TINY_HF_SHAPE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip


def tiny_hf_model(path: Path, kind: str, seed: int = 0, **overrides):
    """Save a tiny random ``transformers`` model of :data:`TINY_HF` ``kind`` to ``path`` and return it (fp32).

    Weights are drawn larger than transformers' init (``N(0, 0.2)``, biases too; norm scales around their
    identity) so that RoPE, bias, norm or capping mistakes show in the logits.
    """
    import transformers

    settings = {**TINY_HF_SHAPE, **TINY_HF[kind], **overrides}
    model_type = settings.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    gemma = model_type.startswith("gemma")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5) if gemma else param.uniform_(0.5, 1.5)  # gemma scales by (1 + w)
            else:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


def run_tune(
    recipe: str,
    config: str,
    overrides: List[str],
    nproc: Optional[int] = None,
    timeout: int = 300,
    check: bool = False,
):
    """``tune run [--nproc_per_node N] gqa_tune/recipes/<recipe>.py --config <config> k=v ...`` from the repo root.

    With ``check``, a failing run raises ``AssertionError`` with the end of its output.
    """
    cmd = [TUNE, "run"]
    if nproc:
        cmd += ["--nproc_per_node", str(nproc)]
    cmd += [f"gqa_tune/recipes/{recipe}.py", "--config", config, *overrides]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tune run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
