"""``gqa_tune.data.hf_tokenizer``: a Hugging Face tokenizer directory as a torchtune ``ModelTokenizer``, its chat
template rendered as transformers renders it, token for token (a small BPE tokenizer trained here; the real
model's is checked in tests/real_model)."""

import json

import pytest
from torchtune.data import Message

from gqa_tune.data import HFTokenizer, hf_tokenizer

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What is the capital of France? Paris is.", "Add 12 and 30: 42.", "héllo wörld, ünïcode 🤖"] * 20
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


CONVERSATIONS = [
    [Message("user", "What is the capital of France?", masked=True), Message("assistant", "Paris.")],
    [Message("system", "Be terse.", masked=True), Message("user", "Add 12 and 30", masked=True),
     Message("assistant", "42"), Message("user", "héllo 🤖", masked=True), Message("assistant", "ünïcode")],
    [Message("user", "  spaces\nand lines  ", masked=True)],
]  # fmt: skip


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_end_tokens", [True, False])
def test_tokens_are_transformers_apply_chat_template(tokenizer_dir, index, add_end_tokens):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = CONVERSATIONS[index]
    plain = [{"role": m.role, "content": m.text_content} for m in messages]
    prompt = not add_end_tokens and plain[-1]["role"] != "assistant"
    expected = reference.apply_chat_template(plain, tokenize=True, add_generation_prompt=prompt)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    tokens, mask = hf_tokenizer(tokenizer_dir).tokenize_messages(messages, add_end_tokens=add_end_tokens)
    assert tokens == expected and len(mask) == len(tokens)


def test_the_loss_mask_is_on_the_assistant_turns(tokenizer_dir):
    tok = hf_tokenizer(tokenizer_dir)
    tokens, mask = tok.tokenize_messages(CONVERSATIONS[1])
    trained = tok.decode([t for t, m in zip(tokens, mask) if not m], skip_special_tokens=False)
    assert trained == "<|im_start|>assistant\n42<|im_end|>\n<|im_start|>assistant\nünïcode<|im_end|>\n"
    _, mask = tok.tokenize_messages(CONVERSATIONS[0][:1], add_end_tokens=False)  # a prompt: nothing trained
    assert all(mask)


def test_special_ids_encode_decode_and_truncation(tokenizer_dir):
    tok = HFTokenizer(tokenizer_dir, max_seq_len=7)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.stop_tokens == [2]
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    ids = tok.encode("Paris is.", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "Paris is."
    tokens, mask = tok.tokenize_messages(CONVERSATIONS[0])
    assert len(tokens) == len(mask) == 7
    sample = tok({"messages": CONVERSATIONS[0]})
    assert sample["tokens"] == tokens


def test_bad_directories_and_roles_are_refused(tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        hf_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="max_seq_len must be None or a positive int, got 0"):
        hf_tokenizer(tokenizer_dir, max_seq_len=0)
    (tmp_path / "tokenizer.json").write_text((tokenizer_dir / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match="has no chat template"):
        hf_tokenizer(tmp_path).tokenize_messages(CONVERSATIONS[0])
