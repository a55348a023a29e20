"""MHA -> GQA conversion of Hugging Face checkpoint directories (gqa_tune.convert.hf)."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf
from torchtune.models.llama3_2 import llama3_2
from torchtune.training import FullModelHFCheckpointer

from gqa_tune.convert import convert_hf_checkpoint, convert_model_, convert_state_dict
from gqa_tune.models import gqa_decoder, init_from_scratch
from gqa_tune.training.checkpoint import load_checkpoint, save_checkpoint

VOCAB, DIM, HEADS, HEAD_DIM, LAYERS, MAX_LEN = 64, 32, 4, 8, 2, 32
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def model_args(num_kv_heads):
    return dict(
        vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=num_kv_heads, embed_dim=DIM,
        intermediate_dim=64, max_seq_len=MAX_LEN, rope_base=10_000,
    )  # fmt: skip


def small_gqa(num_kv_heads=HEADS):
    return gqa_decoder(**model_args(num_kv_heads)).eval()


def hf_kwargs(num_kv_heads):
    return dict(num_heads=HEADS, num_kv_heads=num_kv_heads, dim=DIM, head_dim=HEAD_DIM)


@pytest.fixture
def saved(tmp_path):
    """A small MHA gqa_decoder, saved by gqa_tune's save_checkpoint (with recipe state and a tokenizer file)."""
    model = small_gqa()
    builder = {"_component_": "gqa_tune.models.gqa_decoder", **model_args(HEADS)}
    path = save_checkpoint(
        tmp_path / "run", "mha", model, model.state_dict(), builder=builder, recipe_state={"global_step": 3},
        extra=lambda tmp: (tmp / "tokenizer.json").write_text("{}\n"),
    )  # fmt: skip
    return model, path


def read_weights(path, files):
    out = {}
    for name in files:
        out.update(load_file(str(path / name)))
    return out


def write_shards(src, dst, with_index):
    """Copy ``src`` (single file) into ``dst`` as two shards: layer 0 (+ embeddings) and the rest."""
    dst.mkdir()
    weights = load_file(str(src / "model.safetensors"))
    first = {k: v for k, v in weights.items() if "layers.0." in k or "embed_tokens" in k}
    rest = {k: v for k, v in weights.items() if k not in first}
    save_file(first, str(dst / SHARDS[0]), metadata={"format": "pt"})
    save_file(rest, str(dst / SHARDS[1]), metadata={"format": "pt"})
    if with_index:
        weight_map = {**{k: SHARDS[0] for k in first}, **{k: SHARDS[1] for k in rest}}
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())}}
        (dst / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return weights


def torchtune_load(path, files, num_kv_heads, tmp_path):
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(path), checkpoint_files=list(files), model_type="LLAMA3_2", output_dir=str(tmp_path / "tt")
    )
    model = llama3_2(**model_args(num_kv_heads), scale_factor=1).eval()
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    return model


@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("old, new", [(4, 2), (4, 1), (2, 1)])
def test_pooling_commutes_with_torchtunes_hf_permutation(method, old, new):
    tune_sd = small_gqa(num_kv_heads=old).state_dict()
    common = dict(num_kv_heads=old, new_num_kv_heads=new, head_dim=HEAD_DIM, method=method)
    via_tune = tune_to_hf(convert_state_dict(tune_sd, **common), **hf_kwargs(new))
    via_hf = convert_state_dict(tune_to_hf(tune_sd, **hf_kwargs(old)), fmt="hf", **common)
    assert via_tune.keys() == via_hf.keys()
    for key in via_tune:
        assert torch.equal(via_tune[key], via_hf[key]), key
    back = hf_to_tune(via_hf, **hf_kwargs(new))
    assert all(torch.equal(back[k], v) for k, v in convert_state_dict(tune_sd, **common).items())


def test_converts_a_gqa_tune_checkpoint(saved, tmp_path):
    model, src = saved
    src_files = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = convert_hf_checkpoint(src, tmp_path / "gqa", 2)
    assert dst == tmp_path / "gqa"
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == src_files  # the source is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left

    old, new = json.loads((src / "config.json").read_text()), json.loads((dst / "config.json").read_text())
    assert new["num_key_value_heads"] == 2 and new["gqa_tune"]["model"]["num_kv_heads"] == 2
    assert {k: v for k, v in new.items() if k not in ("num_key_value_heads", "gqa_tune")} == {
        k: v for k, v in old.items() if k not in ("num_key_value_heads", "gqa_tune")
    }
    assert {**new["gqa_tune"]["model"], "num_kv_heads": HEADS} == old["gqa_tune"]["model"]

    # gqa_tune reads it into a model built with the new head count: the live conversion, exactly
    state_dict, config, recipe_state = load_checkpoint(dst)
    assert recipe_state is None and config == new
    ours = small_gqa(num_kv_heads=2)
    ours.load_state_dict(state_dict)
    convert_model_(model, 2)
    for key, value in model.state_dict().items():
        assert torch.equal(state_dict[key], value), key
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = model(tokens)
        assert torch.equal(ours(tokens), expected)
        # torchtune's own checkpointer reads it too
        theirs = torchtune_load(dst, ["model.safetensors"], 2, tmp_path)
        torch.testing.assert_close(theirs(tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no_index"])
def test_converts_sharded_checkpoints(saved, tmp_path, with_index):
    _, src = saved
    sharded = tmp_path / "sharded"
    write_shards(src, sharded, with_index)
    (sharded / "tokenizer_config.json").write_text("{}\n")
    dst = convert_hf_checkpoint(sharded, tmp_path / "gqa", 1)
    names = sorted(p.name for p in dst.iterdir())
    index = ["model.safetensors.index.json"] if with_index else []
    assert names == sorted(["config.json", "tokenizer_config.json", *SHARDS, *index])
    weights = read_weights(dst, SHARDS)
    single = read_weights(convert_hf_checkpoint(src, tmp_path / "single", 1), ["model.safetensors"])
    assert weights.keys() == single.keys() and all(torch.equal(weights[k], single[k]) for k in single)
    assert load_file(str(dst / SHARDS[0])).keys() == load_file(str(sharded / SHARDS[0])).keys()  # same layout
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (HEAD_DIM, DIM)
    if with_index:
        data = json.loads((dst / "model.safetensors.index.json").read_text())
        assert data["weight_map"] == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
        assert data["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in weights.values())
    theirs = torchtune_load(dst, SHARDS, 1, tmp_path)
    ours = small_gqa(num_kv_heads=1)
    ours.load_state_dict(hf_to_tune(weights, **hf_kwargs(1)))
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens), ours(tokens), rtol=1e-5, atol=1e-5)


def test_config_defaults_and_random_method(saved, tmp_path):
    _, src = saved
    config = json.loads((src / "config.json").read_text())
    del config["num_key_value_heads"], config["head_dim"], config["gqa_tune"]  # MHA, head_dim = hidden // heads
    (src / "config.json").write_text(json.dumps(config))
    a = convert_hf_checkpoint(src, tmp_path / "a", 2, method="random", seed=5)
    b = convert_hf_checkpoint(src, tmp_path / "b", 2, method="random", seed=5)
    c = convert_hf_checkpoint(src, tmp_path / "c", 2, method="random", seed=6)
    new = json.loads((a / "config.json").read_text())
    assert new == {**config, "num_key_value_heads": 2} and "gqa_tune" not in new
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    key = "model.layers.0.self_attn.k_proj.weight"
    assert wa[key].shape == (2 * HEAD_DIM, DIM)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and not torch.equal(wa[key], wc[key])


def test_overwrite_and_same_directory(saved, tmp_path):
    _, src = saved
    dst = tmp_path / "gqa"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=re.escape(f"dst_dir '{dst}' exists and is not empty; pass overwrite=True")):
        convert_hf_checkpoint(src, dst, 2)
    assert (dst / "notes.txt").read_text() == "mine"
    convert_hf_checkpoint(src, dst, 2, overwrite=True)
    assert not (dst / "notes.txt").exists() and (dst / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="is the source checkpoint"):
        convert_hf_checkpoint(src, src, 2, overwrite=True)


def test_overwriting_cleans_up_a_killed_conversion(saved, tmp_path):
    _, src = saved
    dst = tmp_path / "gqa"
    convert_hf_checkpoint(src, dst, 2)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a dead process, as a conversion killed mid-write leaves its directory
    (tmp_path / f".gqa.tmp-{pid}-ab").mkdir()
    (tmp_path / f".other.tmp-{pid}-ab").mkdir()  # not this destination's: left alone
    convert_hf_checkpoint(src, dst, 1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [f".other.tmp-{pid}-ab"]
    assert json.loads((dst / "config.json").read_text())["num_key_value_heads"] == 1


def test_a_converted_scaled_rope_checkpoint_reloads_in_transformers(tmp_path, one_thread):
    """The converted directory keeps RoPE scaling, token ids and generation_config.json: transformers rebuilds it."""
    transformers = pytest.importorskip("transformers")
    args = {**model_args(HEADS), "rope_base": 500_000, "rope_scale_factor": 32, "max_seq_len": 16_384}
    model = init_from_scratch(gqa_decoder(**args), std=0.2).eval()
    source = tmp_path / "hf_source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}))
    (source / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}\n')
    src = save_checkpoint(tmp_path / "run", "mha", model, model.state_dict(), source_dir=source)
    dst = convert_hf_checkpoint(src, tmp_path / "gqa", 2)
    assert (dst / "generation_config.json").read_text() == (source / "generation_config.json").read_text()
    convert_model_(model, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert (hf.config.num_key_value_heads, hf.config.rope_parameters["rope_type"]) == (2, "llama3")
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (1, 2, 3)
    assert hf.generation_config.eos_token_id == 2
    tokens = torch.randint(0, VOCAB, (2, 200))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is None:
            del config[key]
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "break_it, kv, method, match",
    [
        (lambda p: None, 3, "mean", "num_kv_heads 3 does not divide the current 4 kv heads"),
        (lambda p: None, 8, "mean", r"more kv heads \(8\) than the model has \(4\)"),
        (lambda p: None, 2, "median", "unknown pooling method 'median'"),
        (lambda p: None, 0, "mean", "positive int, got 0"),
        (lambda p: (p / "config.json").unlink(), 2, "mean", r"checkpoint '{src}' has no config.json"),
        (lambda p: (p / "config.json").write_text("{"), 2, "mean", r"checkpoint '{src}': cannot read config.json"),
        (lambda p: _edit_config(p, hidden_size=None), 2, "mean", r"'{src}': config.json lacks 'hidden_size'"),
        (lambda p: _edit_config(p, num_key_value_heads=3), 2, "mean", "heads 4 is not a multiple of .* 3"),
        (
            lambda p: _edit_config(p, num_key_value_heads=2),
            1,
            "mean",
            r"'model.layers.0.self_attn.k_proj.weight' in '{src}/model.safetensors' has shape \(32, 32\); expected 16",
        ),
        (lambda p: (p / "model.safetensors").unlink(), 2, "mean", r"'{src}' has no model.safetensors and no \*"),
        (lambda p: (p / "model.safetensors").write_bytes(b"junk"), 2, "mean", r"cannot read '{src}/model.safetensors'"),
        (
            lambda p: save_file(
                {k: v for k, v in load_file(str(p / "model.safetensors")).items() if "layers.1.self_attn.v" not in k},
                str(p / "model.safetensors"),
            ),
            2,
            "mean",
            r"'{src}' lacks key/value projection weights: model.layers.1.self_attn.v_proj.weight",
        ),
    ],
    ids=[
        "not_dividing", "more", "method", "zero", "no_config", "bad_json", "no_hidden_size", "bad_config_heads",
        "shape", "no_weights", "corrupt_weights", "missing_key",
    ],
)  # fmt: skip
def test_bad_inputs_raise_and_write_nothing(saved, tmp_path, break_it, kv, method, match):
    _, src = saved
    break_it(src)
    dst = tmp_path / "gqa"
    with pytest.raises(ValueError, match=match.format(src=re.escape(str(src)))):
        convert_hf_checkpoint(src, dst, kv, method)
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_directory_and_shards(saved, tmp_path):
    _, src = saved
    with pytest.raises(ValueError, match=re.escape(f"checkpoint directory '{tmp_path / 'nope'}' does not exist")):
        convert_hf_checkpoint(tmp_path / "nope", tmp_path / "gqa", 2)
    sharded = tmp_path / "sharded"
    write_shards(src, sharded, with_index=True)
    (sharded / SHARDS[1]).unlink()
    with pytest.raises(ValueError, match=re.escape(f"names missing weight files in '{sharded}': {SHARDS[1]}")):
        convert_hf_checkpoint(sharded, tmp_path / "gqa", 2)
    (sharded / "model.safetensors.index.json").unlink()
    save_file(load_file(str(sharded / SHARDS[0])), str(sharded / SHARDS[1]))  # every key twice
    with pytest.raises(ValueError, match=f"is in both '{SHARDS[0]}' and '{SHARDS[1]}'"):
        convert_hf_checkpoint(sharded, tmp_path / "gqa", 2)
    assert not (tmp_path / "gqa").exists()
