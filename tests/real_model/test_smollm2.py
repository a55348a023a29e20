"""SmolLM2-135M-Instruct (a real pretrained GQA model: 9 query heads, 3 kv heads, 30 layers) against transformers
and torchtune: the tokenizer, the logits, batched greedy generation, the transformers door, torchtune's generate
after ``swap_attention``."""

import copy

import pytest
import torch
from helpers import run_tune
from torchtune.data import Message

import gqa_tune
from gqa_tune.data import hf_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is the capital of France?", "Name a primary color.", "Write one short sentence about the sea."]


def _prompts(tokenizer):
    """The chat-templated questions, left-padded with <|endoftext|> (a token no prompt holds: <|im_end|>, the
    tokenizer's pad, also ends every turn of the template, and generate takes every pad_id token for padding)."""
    rows = [tokenizer.tokenize_messages([Message("user", q, masked=True)], add_end_tokens=False)[0] for q in QUESTIONS]
    pad = tokenizer.special_tokens["<|endoftext|>"]
    assert all(pad not in row for row in rows)
    return gqa_tune.generation.left_padded(rows, pad), pad


def test_the_tokenizer_is_transformers_chat_template(smollm2):
    from transformers import AutoTokenizer

    reference, ours = AutoTokenizer.from_pretrained(smollm2), hf_tokenizer(smollm2)
    conversation = [Message("system", "Be brief.", masked=True), Message("user", "2+2? Ünïcode 🤖", masked=True),
                    Message("assistant", "4."), Message("user", "And 3+3?", masked=True)]  # fmt: skip
    plain = [{"role": m.role, "content": m.text_content} for m in conversation]
    for end, prompt in ((True, False), (False, True)):
        expected = reference.apply_chat_template(plain, tokenize=True, add_generation_prompt=prompt)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert ours.tokenize_messages(conversation, add_end_tokens=end)[0] == expected
    assert (ours.bos_id, ours.eos_id, ours.stop_tokens, ours.vocab_size) == (1, 2, [2], 49152)


def test_logits_equal_transformers_on_real_english(smollm2, hf_smollm2, ours_smollm2):
    import pydoc_data.topics

    text = pydoc_data.topics.topics["if"][:2000]  # the language reference, shipped with Python
    ids = torch.tensor([hf_tokenizer(smollm2).encode(text, add_bos=False, add_eos=False)[:384]])
    with torch.no_grad():
        ours, theirs = ours_smollm2(ids), hf_smollm2(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-4)


def test_batched_greedy_generation_gives_transformers_tokens(smollm2, hf_smollm2, ours_smollm2):
    tokenizer = hf_tokenizer(smollm2)
    prompt, pad = _prompts(tokenizer)
    n = 12
    attention_mask = (prompt != pad).long()
    expected = hf_smollm2.generate(prompt, attention_mask=attention_mask, max_new_tokens=n, do_sample=False,
                                   pad_token_id=pad, eos_token_id=tokenizer.eos_id)[:, prompt.shape[1]:]  # fmt: skip
    tokens, _ = gqa_tune.generate(ours_smollm2, prompt, n, pad_id=pad, stop_tokens=tokenizer.stop_tokens)
    ours = tokens[:, prompt.shape[1] :]
    for row in range(len(QUESTIONS)):  # transformers pads after EOS, torchtune's contract zeros: compare up to EOS
        stop = next((i + 1 for i, t in enumerate(expected[row].tolist()) if t == tokenizer.eos_id), n)
        assert ours[row, :stop].tolist() == expected[row, :stop].tolist(), row
    assert "Paris" in tokenizer.decode(ours[0].tolist())


def test_the_transformers_door_generates_sdpas_tokens(smollm2, hf_smollm2):
    tokenizer = hf_tokenizer(smollm2)
    prompt, pad = _prompts(tokenizer)
    model = copy.deepcopy(hf_smollm2)
    kwargs = dict(attention_mask=(prompt != pad).long(), max_new_tokens=8, do_sample=False, pad_token_id=pad)
    expected = model.generate(prompt, **kwargs)
    model.set_attn_implementation("gqa_tune")
    assert torch.equal(model.generate(prompt, **kwargs), expected)


@pytest.mark.parametrize("batch", [1, 4])
def test_torchtune_generate_after_swap_attention(smollm2, ours_smollm2, batch):
    from torchtune.generation import generate
    from torchtune.models.llama3_2 import llama3_2

    theirs = llama3_2(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
                      intermediate_dim=1536, max_seq_len=2048, rope_base=100_000, norm_eps=1e-5,
                      scale_factor=1)  # fmt: skip   (scale factor 1: plain RoPE, SmolLM2's)
    theirs.load_state_dict(ours_smollm2.state_dict())
    theirs.eval()
    swapped = copy.deepcopy(theirs)
    gqa_tune.swap_attention(swapped)
    tokenizer = hf_tokenizer(smollm2)
    prompt, pad = _prompts(tokenizer)
    prompt = torch.cat([prompt, prompt[:1]])[:batch]  # batch 4: three lengths, left-padded; batch 1: the first
    if batch == 1:
        prompt = prompt[:, (prompt[0] == pad).sum() :]  # no padding
    results = [generate(model, prompt, max_generated_tokens=8, pad_id=pad, temperature=1e-9, top_k=1,
                        stop_tokens=tokenizer.stop_tokens)[0] for model in (theirs, swapped)]  # fmt: skip
    assert torch.equal(results[1], results[0])


@pytest.mark.slow  # torch.compile of the 30-layer decode step takes about 2.5 minutes on 2 CPU cores
def test_compiled_generation_gives_the_eager_tokens(smollm2, ours_smollm2):
    tokenizer = hf_tokenizer(smollm2)
    prompt, pad = _prompts(tokenizer)
    eager, _ = gqa_tune.generate(ours_smollm2, prompt, 12, pad_id=pad, stop_tokens=tokenizer.stop_tokens)
    compiled, _ = gqa_tune.generate(ours_smollm2, prompt, 12, pad_id=pad, stop_tokens=tokenizer.stop_tokens,
                                    compile=True)  # fmt: skip
    assert torch.equal(compiled, eager)


def test_a_gguf_file_loads_as_its_converted_directory(smollm2, ours_smollm2, tmp_path):
    from gqa_tune.hf.gguf import SMOLLM2_GGUF, cache_dir

    gguf_file = cache_dir() / "gguf" / SMOLLM2_GGUF.split("/")[-1]
    model = gqa_tune.from_pretrained(gguf_file)  # hf_model_dir= takes the same path
    ids = torch.tensor([hf_tokenizer(smollm2).encode("GGUF in, the same model out.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ours_smollm2(ids), rtol=0, atol=0)


def _tune_run(recipe: str, config: str, *overrides: str) -> str:
    proc = run_tune(recipe, config, list(overrides), timeout=900, check=True)
    return proc.stdout + proc.stderr


def test_a_lora_tune_run_whose_output_transformers_reloads_to_our_logits(smollm2, ours_smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from gqa_tune.training.checkpoint import latest_checkpoint

    out = tmp_path / "lora"
    log = _tune_run("lora_finetune_single_device", "configs/smollm2_135m/lora.yaml", f"hf_model_dir={smollm2}",
                    f"output_dir={out}", "max_steps_per_epoch=2", "batch_size=2", "eval=null",
                    "model.lora_rank=4")  # fmt: skip
    assert "tokenizer: gqa_tune.data.hf_tokenizer from" in log and "(hf_model_dir's own)" in log
    checkpoint = latest_checkpoint(out)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ours = gqa_tune.from_pretrained(checkpoint)
    ids = torch.tensor([hf_tokenizer(smollm2).encode("Fine-tuned, then reloaded by transformers.")])
    with torch.no_grad():
        logits = ours(ids)
        torch.testing.assert_close(theirs(ids).logits, logits, rtol=2e-4, atol=2e-4)
        assert (logits - ours_smollm2(ids)).abs().max() > 1e-4  # the adapters were merged into the weights


def test_the_generate_recipe_chats_as_transformers_does(smollm2, hf_smollm2, tmp_path):
    import json

    out = tmp_path / "generated.json"
    _tune_run("generate", "configs/smollm2_135m/generate.yaml", f"hf_model_dir={smollm2}",
              f"tokenizer.path={smollm2}", "max_new_tokens=10", f"output_file={out}")  # fmt: skip
    result = json.loads(out.read_text())
    tokenizer = hf_tokenizer(smollm2)
    prompt, pad = _prompts(tokenizer)
    expected = hf_smollm2.generate(prompt, attention_mask=(prompt != pad).long(), max_new_tokens=10,
                                   do_sample=False, pad_token_id=pad)[:, prompt.shape[1]:]  # fmt: skip
    for row, tokens in enumerate(result["tokens"]):
        assert tokens == expected[row, : len(tokens)].tolist(), row
    assert result["texts"][0].startswith("The capital of France is Paris")
