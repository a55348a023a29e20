"""Checkpoints (gqa_tune.training.checkpoint): transformers reloads them exactly, and saves are atomic under SIGKILL.

Models are tiny and random; nothing is downloaded. The transformers tests compare our model's float32 logits
with ``AutoModelForCausalLM.from_pretrained(checkpoint)``'s on a 200-token input.
"""

import json
import os
import signal
import warnings

import pytest
import torch
from torch import nn
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules.peft import get_merged_lora_ckpt

import gqa_tune.training.checkpoint as ckpt
from gqa_tune.convert import convert_model_
from gqa_tune.data.tokenizer import ByteTokenizer
from gqa_tune.hf import hf_config, tokenizer_token_ids
from gqa_tune.models import gqa_decoder, gqa_llama3_2_1b, gqa_tiny, init_from_scratch
from gqa_tune.models._lora_builders import lora_gqa_decoder
from gqa_tune.training.checkpoint import (
    cleanup_stale,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint_dir,
    save_checkpoint,
)

transformers = pytest.importorskip("transformers")

SEQ = 200
#: gqa_llama3_2_1b's RoPE (base 500000, Llama 3 scaling by 32), at a tiny width.
SCALED = dict(
    vocab_size=300, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128,
    max_seq_len=16_384, rope_base=500_000, rope_scale_factor=32, norm_eps=1e-5,
)  # fmt: skip
LORA = dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True)


def random_init(model, std=0.2):
    """Weights large enough that RoPE and norm differences show in the logits."""
    init_from_scratch(model, std=std)
    for name, param in model.named_parameters():
        if "norm" in name:
            nn.init.uniform_(param, 0.5, 1.5)
    return model.eval()


def hf_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits, model


def assert_reloads_in_transformers(path, ours, vocab):
    tokens = torch.randint(0, vocab, (2, SEQ))
    with torch.no_grad():
        expected = ours(tokens)
    got, hf = hf_logits(path, tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    return hf


# ------------------------------------------------------------ config.json


def test_the_1b_config_carries_its_scaled_rope():
    with torch.device("meta"):
        model = gqa_llama3_2_1b(max_seq_len=2048)
    rope = model.layers[0].attn.pos_embeddings
    assert isinstance(rope, Llama3ScaledRoPE)
    config = hf_config(model, token_ids={"bos_token_id": 128000, "eos_token_id": 128001})
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    assert config["rope_scaling"] == scaling
    assert config["rope_parameters"] == {**scaling, "rope_theta": 500_000.0}
    assert config["rope_theta"] == 500_000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (128000, 128001, None)
    # the parameters are read off the module, not assumed
    rope.low_freq_factor, rope.old_context_len = 2, 4096
    config = hf_config(model)
    assert config["rope_scaling"]["low_freq_factor"] == 2.0
    assert config["rope_scaling"]["original_max_position_embeddings"] == 4096


def test_plain_rope_and_untied_embeddings():
    config = hf_config(gqa_decoder(**{**SCALED, "rope_scale_factor": None, "tie_word_embeddings": False}))
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500_000.0}
    assert "rope_scaling" not in config and config["tie_word_embeddings"] is False


def test_parts_no_supported_config_can_describe_are_value_errors():
    with pytest.raises(ValueError, match="llama config.json: it has q/k norms"):
        hf_config(gqa_decoder(**SCALED, qk_norm=True))
    # q/k/v biases are Qwen2's, sliding windows Mistral's; both at once is neither
    assert hf_config(gqa_decoder(**SCALED, attn_bias=True))["model_type"] == "qwen2"
    assert hf_config(gqa_decoder(**SCALED, sliding_window_size=8))["model_type"] == "mistral"
    with pytest.raises(ValueError, match="qwen2 config.json: it has sliding windows"):
        hf_config(gqa_decoder(**SCALED, attn_bias=True, sliding_window_size=8))


def test_token_ids_come_from_the_tokenizer_then_the_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 9}))
    (src / "generation_config.json").write_text('{"eos_token_id": [2, 3], "do_sample": false}\n')
    model = gqa_tiny()
    path = save_checkpoint(
        tmp_path / "out", "epoch_0", model, model.state_dict(), source_dir=src,
        token_ids={"bos_token_id": 256, "eos_token_id": None},
    )  # fmt: skip
    config = json.loads((path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, [2, 3], 9)
    assert (path / "generation_config.json").read_text() == (src / "generation_config.json").read_text()
    assert tokenizer_token_ids(ByteTokenizer()) == {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}


def test_kv_heads_that_disagree_with_the_weights_are_a_value_error_naming_both(tmp_path):
    model = gqa_tiny()
    path = save_checkpoint(tmp_path, "epoch_0", model, model.state_dict())
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(ValueError, match=r"num_key_value_heads=4, but .*k_proj.weight has 32 rows, i.e. 2 heads"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    with pytest.raises(ValueError, match=r"num_key_value_heads=1, but .* i.e. 2 heads"):
        load_checkpoint(path)


# ------------------------------------------------------------ transformers reloads every kind of checkpoint


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scaled", [True, False], ids=["llama3_rope", "plain_rope"])
def test_full_finetune_checkpoints_reload_in_transformers(tmp_path, one_thread, tied, scaled):
    args = {**SCALED, "tie_word_embeddings": tied, "rope_scale_factor": 32 if scaled else None}
    model = random_init(gqa_decoder(**args))
    path = save_checkpoint(tmp_path, "epoch_0", model, model.state_dict(), token_ids={"bos_token_id": 5})
    hf = assert_reloads_in_transformers(path, model, SCALED["vocab_size"])
    assert hf.config.tie_word_embeddings is tied and hf.config.rms_norm_eps == 1e-5
    assert hf.config.bos_token_id == 5 and hf.config.eos_token_id is None


def test_gqa_tiny_with_the_byte_tokenizer_reloads_in_transformers(tmp_path, one_thread):
    model = random_init(gqa_tiny())
    ids = tokenizer_token_ids(ByteTokenizer())
    path = save_checkpoint(tmp_path, "epoch_0", model, model.state_dict(), token_ids=ids)
    hf = assert_reloads_in_transformers(path, model, 260)
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (256, 257, 258)


def test_lora_merged_checkpoints_reload_in_transformers(tmp_path, one_thread):
    """As the LoRA recipe saves: torchtune's merge of the adapters, described by the plain model on meta."""
    model = random_init(lora_gqa_decoder(**LORA, lora_rank=4, lora_alpha=8.0, **SCALED))
    for name, param in model.named_parameters():
        if "lora_b" in name:
            nn.init.normal_(param, std=0.2)  # a trained adapter: the merge changes the weights
    merged = get_merged_lora_ckpt({k: v.clone() for k, v in model.state_dict().items()}, rank=4, alpha=8.0)
    with torch.device("meta"):
        base = gqa_decoder(**SCALED)
    path = save_checkpoint(tmp_path, "epoch_0", base, merged)
    assert_reloads_in_transformers(path, model, SCALED["vocab_size"])


def test_uptrained_checkpoints_reload_in_transformers(tmp_path, one_thread):
    """As the uptrain recipe saves: an MHA model whose kv heads were pooled in place."""
    model = random_init(gqa_decoder(**{**SCALED, "num_kv_heads": 4}))
    convert_model_(model, 2)
    path = save_checkpoint(tmp_path, "epoch_0", model, model.state_dict())
    hf = assert_reloads_in_transformers(path, model, SCALED["vocab_size"])
    assert hf.config.num_key_value_heads == 2


# ------------------------------------------------------------ atomic saves under SIGKILL

#: The os calls by which a save changes what is on disk (rmtree goes through unlink / rmdir).
STEPS = ("fsync", "rename", "replace", "unlink", "rmdir")


def _save_killed_at(kill_at, out, name, model, state_dict, exchange):
    """Save in a forked child that SIGKILLs itself just before its ``kill_at``-th disk step.

    Returns:
        True if the child was killed, False if the save finished first.
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            count = [0]

            def step(fn):
                def wrapped(*args, **kwargs):
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*args, **kwargs)

                return wrapped

            for op in STEPS:
                setattr(os, op, step(getattr(os, op)))
            ckpt._exchange = step(ckpt._exchange if exchange else lambda a, b: False)
            save_checkpoint(out, name, model, state_dict, recipe_state={"step": 1}, extra=_adapter_dir)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the save failed in the child"
    return False


def _adapter_dir(tmp):
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("{}\n")


def _hidden(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def _which(path, versions):
    """Which of ``versions`` (weights) the checkpoint at ``path`` holds."""
    weights = load_checkpoint(path)[0]["tok_embeddings.weight"]
    found = [i for i, v in enumerate(versions) if torch.equal(weights, v["tok_embeddings.weight"])]
    assert len(found) == 1, f"{path} holds none of the versions"
    return found[0]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("name", ["epoch_0", "epoch_1"], ids=["reused_name", "new_name"])
def test_a_save_killed_at_any_step_leaves_loadable_checkpoints(tmp_path, one_thread, exchange, name):
    model = gqa_decoder(**{**SCALED, "num_layers": 1, "vocab_size": 16, "max_seq_len": 16})
    old = model.state_dict()
    versions = [old, {k: v + 1 for k, v in old.items()}, {k: v + 2 for k, v in old.items()}]
    kills = 0
    for kill_at in range(1, 200):
        out = tmp_path / f"kill{kill_at}"
        save_checkpoint(out, "epoch_0", model, old)
        if not _save_killed_at(kill_at, out, name, model, versions[1], exchange):
            break
        kills += 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # LATEST names a complete checkpoint: no fallback needed
            latest = latest_checkpoint(out)
        assert latest is not None and latest.parent == out
        assert _which(latest, versions) in (0, 1)
        if name == "epoch_1":  # a new name: the old checkpoint stays, the new one is absent or complete
            assert _which(out / "epoch_0", versions) == 0
            assert not (out / name).exists() or _which(out / name, versions) == 1
        else:  # a reused name: absent only between the fallback's two renames, else old or new
            assert (out / name).exists() or not exchange
            assert not (out / name).exists() or _which(out / name, versions) in (0, 1)
        # the next save (the reused name again) cleans up what the killed one left
        save_checkpoint(out, name, model, versions[2])
        assert _hidden(out) == [], f"leftovers after a kill at step {kill_at}: {_hidden(out)}"
        assert latest_checkpoint(out) == out / name and _which(out / name, versions) == 2
    else:
        pytest.fail("the save never finished")
    assert kills >= 10  # every step of the protocol was a kill point


def test_the_fallback_keeps_latest_on_a_complete_copy_during_the_swap(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE, LATEST names the new or old copy while ``<name>`` is being replaced."""
    model = gqa_tiny(max_seq_len=16)
    save_checkpoint(tmp_path, "epoch_0", model, model.state_dict())
    seen = []
    rename = os.rename

    def watching(src, dst):
        target = (tmp_path / "LATEST").read_text().strip()
        seen.append(target)
        assert load_checkpoint(tmp_path / target)
        return rename(src, dst)

    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", watching)
    save_checkpoint(tmp_path, "epoch_0", model, model.state_dict())
    assert [t.split(".")[2].split("-")[0] for t in seen] == ["tmp", "old"]
    assert (tmp_path / "LATEST").read_text() == "epoch_0\n"


def test_cleanup_spares_live_processes_and_what_latest_names(tmp_path):
    model = gqa_tiny(max_seq_len=16)
    save_checkpoint(tmp_path, "epoch_0", model, model.state_dict())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a dead process
    live = os.getppid()
    for entry in (f".epoch_0.tmp-{live}-ab", f".epoch_0.tmp-{pid}-cd", f".epoch_0.old-{os.getpid()}-ef",
                  f".epoch_0.tmp-{pid}"):  # fmt: skip
        (tmp_path / entry).mkdir()
    (tmp_path / f".LATEST.tmp-{pid}-01").write_text("epoch_0\n")
    (tmp_path / f".epoch_0.old-{pid}-99").mkdir()
    (tmp_path / "LATEST").write_text(f".epoch_0.old-{pid}-99\n")  # as a killed fallback swap leaves it
    removed = sorted(p.name for p in cleanup_stale(tmp_path))
    assert removed == sorted([f".epoch_0.tmp-{pid}-cd", f".epoch_0.old-{os.getpid()}-ef", f".epoch_0.tmp-{pid}",
                              f".LATEST.tmp-{pid}-01"])  # fmt: skip
    assert _hidden(tmp_path) == [f".epoch_0.old-{pid}-99", f".epoch_0.tmp-{live}-ab"]


def test_latest_naming_a_missing_directory_falls_back_with_a_warning(tmp_path):
    model = gqa_tiny(max_seq_len=16)
    save_checkpoint(tmp_path, "epoch_0", model, model.state_dict())
    save_checkpoint(tmp_path, "epoch_1", model, model.state_dict())
    (tmp_path / "LATEST").write_text("epoch_2\n")  # as the old protocol could leave it
    with pytest.warns(UserWarning, match="'epoch_2', which is not a complete checkpoint; using the newest"):
        assert latest_checkpoint(tmp_path) == tmp_path / "epoch_1"
    with pytest.warns(UserWarning):
        assert resolve_checkpoint_dir(str(tmp_path), "key", "hint") == tmp_path / "epoch_1"
    for name in ("epoch_0", "epoch_1"):
        ckpt.shutil.rmtree(tmp_path / name)
    with pytest.warns(UserWarning, match="there is no other checkpoint"):
        assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="key .* names no complete checkpoint.*; hint"), pytest.warns(UserWarning):
        resolve_checkpoint_dir(str(tmp_path), "key", "hint")
