"""gqa_tune.generate against torchtune.generation.generate (0.6.1) on the same weights."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torchtune.generation import generate as tt_generate
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules.common_utils import delete_kv_caches, local_kv_cache

import gqa_tune
from gqa_tune.generation import STOP_CHECK_EVERY, GenerationStats

VOCAB, MAX_SEQ_LEN = 96, 64


@pytest.fixture(scope="module")
def models(one_thread):
    """torchtune's tiny Llama 3.2 (its own attention) and a copy with gqa_tune's, sharing no state."""
    torch.manual_seed(0)
    theirs = llama3_2(
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        embed_dim=64,
        max_seq_len=MAX_SEQ_LEN,
        intermediate_dim=64,
        tie_word_embeddings=False,  # tied random embeddings make every row repeat its last token
    ).eval()
    ours = copy.deepcopy(theirs)
    gqa_tune.swap_attention(ours)
    return theirs, ours


def torchtune_generate(model, prompt, steps, **kwargs):
    """torchtune's generate with caches of prompt + steps positions (as gqa_tune.generate sets up)."""
    b = 1 if prompt.dim() == 1 else prompt.shape[0]
    with local_kv_cache(model, batch_size=b, device=prompt.device, dtype=torch.float32,
                        decoder_max_seq_len=prompt.shape[-1] + steps):  # fmt: skip
        return tt_generate(model, prompt, max_generated_tokens=steps, **kwargs)


def padded(prompts, pad_id=0):
    """Left-pad lists of ids into one [b, s] batch."""
    width = max(len(p) for p in prompts)
    return torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])


def random_prompt(b, s, seed=1):
    return torch.randint(1, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_greedy_matches_torchtune(models):
    theirs, ours = models
    prompt = random_prompt(2, 5)
    tokens, logits = gqa_tune.generate(ours, prompt, 6)
    assert tokens.shape == (2, 11) and logits.shape == (2, 6, VOCAB)
    assert torch.equal(tokens[:, :5], prompt)
    # top_k=1 makes torchtune's sampling the argmax (its temperature 0 divides by 1e-5 and samples).
    for model in (theirs, ours):  # torchtune's attention, and torchtune's loop over ours
        ref_tokens, ref_logits = torchtune_generate(model, prompt, 6, top_k=1)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_sampling_matches_torchtune_with_a_fixed_rng(models):
    theirs, ours = models
    prompt = random_prompt(3, 4)
    kwargs = dict(temperature=0.7, top_k=12)
    tokens, logits = gqa_tune.generate(ours, prompt, 8, rng=torch.Generator().manual_seed(5), **kwargs)
    ref_tokens, ref_logits = torchtune_generate(theirs, prompt, 8, rng=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    greedy, _ = gqa_tune.generate(ours, prompt, 8)
    assert not torch.equal(tokens, greedy)  # it did sample
    # Without rng both draw from torch's global generator, in the same order.
    torch.manual_seed(11)
    tokens, _ = gqa_tune.generate(ours, prompt, 8, **kwargs)
    torch.manual_seed(11)
    ref_tokens, _ = torchtune_generate(theirs, prompt, 8, **kwargs)
    assert torch.equal(tokens, ref_tokens)


def stops_for(tokens, s):
    """Stop tokens that end row 0 at its 2nd generated token and row 1 at its 4th (or earlier)."""
    return [int(tokens[0, s + 1]), int(tokens[1, s + 3])]


def test_stop_tokens_match_torchtune(models):
    theirs, ours = models
    prompt = random_prompt(3, 5, seed=2)
    free, _ = gqa_tune.generate(ours, prompt, 10)
    # Rows 0 and 1 stop; row 2 runs on unless it meets one of those tokens.
    stop_tokens = stops_for(free, 5)
    tokens, logits = gqa_tune.generate(ours, prompt, 10, stop_tokens=stop_tokens)
    ref_tokens, ref_logits = torchtune_generate(theirs, prompt, 10, top_k=1, stop_tokens=stop_tokens)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    hit = torch.isin(tokens[0, 5:], torch.tensor(stop_tokens)).nonzero()[0, 0]
    assert (tokens[0, 5 + hit + 1 :] == 0).all() and (logits[0, hit + 1 :] == 0).all()
    assert (logits[0, : hit + 1] != 0).any(-1).all()

    # Every row stops: generation ends at the step where the last one does.
    two = prompt[:2]
    tokens, logits = gqa_tune.generate(ours, two, 10, stop_tokens=stop_tokens)
    ref_tokens, ref_logits = torchtune_generate(theirs, two, 10, top_k=1, stop_tokens=stop_tokens)
    assert tokens.shape[1] < 5 + 10
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_left_padded_rows_match_each_prompt_alone(models):
    theirs, ours = models
    prompts = [[5, 17, 3], [40, 2, 9, 33, 71, 8, 12], [60, 61, 1, 4, 90]]
    batch = padded(prompts)
    tokens, logits = gqa_tune.generate(ours, batch, 7)
    width = batch.shape[1]
    for row, prompt in enumerate(prompts):
        alone, alone_logits = gqa_tune.generate(ours, torch.tensor(prompt), 7)
        assert torch.equal(tokens[row, width:], alone[0, len(prompt) :]), row
        torch.testing.assert_close(logits[row], alone_logits[0], rtol=1e-5, atol=1e-5)
    ref_tokens, ref_logits = torchtune_generate(theirs, batch, 7, top_k=1)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_compiled_step_gives_the_eager_tokens_without_recompiling(models):
    _, ours = models
    torch._dynamo.reset()
    prompts = padded([[5, 17, 3], [40, 2, 9, 33, 71, 8, 12]])
    steps = STOP_CHECK_EVERY + 4
    eager_free, _ = gqa_tune.generate(ours, prompts, steps)
    # Both rows stop early, between two of the compiled loop's stop checks: the extra steps are dropped.
    stop_tokens = stops_for(eager_free, prompts.shape[1])
    eager, eager_logits = gqa_tune.generate(ours, prompts, steps, stop_tokens=stop_tokens)
    assert eager.shape[1] - prompts.shape[1] < STOP_CHECK_EVERY

    graphs = counters["stats"]["unique_graphs"]
    stats = GenerationStats()
    compiled, compiled_logits = gqa_tune.generate(ours, prompts, steps, stop_tokens=stop_tokens, compile=True,
                                                  stats=stats)  # fmt: skip
    assert counters["stats"]["unique_graphs"] == graphs + 1  # the decode step, compiled once
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert stats.compiled and stats.compile_seconds > 0
    assert stats.decode_steps == STOP_CHECK_EVERY  # ran on to the first stop check
    assert not ours.caches_are_setup()

    # Other prompts of the same shape, sampling off, no stops: the same graph, every step.
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, _ = gqa_tune.generate(ours, prompts.flip(0), steps, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert torch.equal(again, gqa_tune.generate(ours, prompts.flip(0), steps)[0])


def test_caches_set_up_for_the_call_are_deleted(models):
    _, ours = models
    assert not ours.caches_are_setup()
    gqa_tune.generate(ours, random_prompt(2, 4), 3)
    assert not ours.caches_are_setup()
    assert all(layer.attn.kv_cache is None for layer in ours.layers)


def test_caches_already_set_up_are_reset_and_reused(models):
    _, ours = models
    prompt = random_prompt(2, 6, seed=3)
    fresh, fresh_logits = gqa_tune.generate(ours, prompt, 5)
    ours.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=32)
    try:
        caches = [layer.attn.kv_cache for layer in ours.layers]
        gqa_tune.generate(ours, random_prompt(2, 9, seed=4), 7)  # leaves the caches filled
        assert caches[0].size == 9 + 7 - 1
        tokens, logits = gqa_tune.generate(ours, prompt, 5)
        assert torch.equal(tokens, fresh)
        torch.testing.assert_close(logits, fresh_logits, rtol=1e-5, atol=1e-5)
        assert [layer.attn.kv_cache for layer in ours.layers] == caches  # the same caches, still set up
        assert all(cache.size == 6 + 5 - 1 for cache in caches)  # as torchtune's generate leaves them
    finally:
        delete_kv_caches(ours)


@pytest.mark.parametrize(
    "batch, seq, match",
    [(2, 33, r"max_seq_len 32; this call needs batch 2 x 36"), (3, 8, r"batch_size 2 .* needs batch 3 x 11")],
)
def test_caches_too_small_raise(models, batch, seq, match):
    _, ours = models
    ours.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=32)
    try:
        with pytest.raises(ValueError, match=match):
            gqa_tune.generate(ours, random_prompt(batch, seq), 3)
    finally:
        delete_kv_caches(ours)


def test_max_generated_tokens_positional_or_keyword_and_1d_prompts(models):
    _, ours = models
    prompt = random_prompt(1, 5)[0]
    positional, _ = gqa_tune.generate(ours, prompt, 4)
    keyword, _ = gqa_tune.generate(ours, prompt, max_generated_tokens=4)
    assert positional.shape == (1, 9) and torch.equal(positional, keyword)
    assert torch.equal(positional, gqa_tune.generate(ours, prompt[None], 4)[0])
    assert gqa_tune.generate(ours, prompt.to(torch.int32), 4)[0].dtype == torch.int32


def test_stats_report_prefill_and_decode(models):
    _, ours = models
    stats = GenerationStats()
    gqa_tune.generate(ours, random_prompt(3, 7), 5, stats=stats)
    assert not stats.compiled and stats.compile_seconds == 0.0
    assert stats.prefill_tokens == 21 and stats.decode_steps == 4 and stats.decode_tokens == 12
    assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    assert stats.decode_ms_per_step == pytest.approx(stats.decode_seconds / 4 * 1e3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_generated_tokens=0), "max_generated_tokens must be an int >= 1, got 0"),
        (dict(max_generated_tokens=2.0), "max_generated_tokens must be an int >= 1, got 2.0"),
        (dict(max_generated_tokens=True), "max_generated_tokens must be an int >= 1, got True"),
        (dict(prompt=torch.ones(2, 3)), r"int32/int64 tensor of token ids, got torch.float32 \(2, 3\)"),
        (dict(prompt=torch.ones(1, 2, 3, dtype=torch.long)), r"got torch.int64 \(1, 2, 3\)"),
        (dict(prompt=[1, 2, 3]), "token ids, got list"),
        (dict(prompt=torch.ones(2, 0, dtype=torch.long)), r"at least one token per row, got shape \(2, 0\)"),
        (dict(prompt=torch.tensor([1, VOCAB])), rf"lie in \[0, {VOCAB}\) \(the vocabulary\), got 1..{VOCAB}"),
        (dict(max_generated_tokens=MAX_SEQ_LEN), rf"= {MAX_SEQ_LEN + 3} exceeds the model's max_seq_len"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0 .*, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be .*, got nan"),
        (dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
        (dict(top_k=2.5), "top_k must be None or an int >= 1, got 2.5"),
        (dict(pad_id=None), "pad_id must be an int, got None"),
        (dict(stop_tokens="ab"), "stop_tokens must be None or a list of ints, got 'ab'"),
        (dict(rng=3), "rng must be None or a torch.Generator, got int"),
        (dict(compile="yes"), "compile must be True or False, got 'yes'"),
        (dict(stats={}), "stats must be None or a GenerationStats, got dict"),
    ],
)
def test_bad_inputs_raise_naming_the_value(models, kwargs, match):
    _, ours = models
    call = dict(prompt=torch.tensor([1, 2, 3]), max_generated_tokens=2)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gqa_tune.generate(ours, **call)
    assert not ours.caches_are_setup()


def test_models_without_gqa_attention_are_refused(models):
    theirs, _ = models
    with pytest.raises(ValueError, match=r"torchtune MultiHeadAttention layer\(s\); .*swap_attention"):
        gqa_tune.generate(theirs, torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="must be a torchtune TransformerDecoder, got Linear"):
        gqa_tune.generate(torch.nn.Linear(2, 2), torch.tensor([1, 2]), 2)


def test_compiled_generation_of_a_torchao_quantized_model(models):
    """torchao's int8 weight-only linears under compile=True (their fast path on a CPU): the decode step used to
    die in Dynamo on the few-row linear rewrite, which now leaves torchao's weights to their own kernel."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    _, ours = models
    model = copy.deepcopy(ours)
    quantize_(model, Int8WeightOnlyConfig())
    prompt = random_prompt(2, 5)
    eager, eager_logits = gqa_tune.generate(model, prompt, 5)
    compiled, compiled_logits = gqa_tune.generate(model, prompt, 5, compile=True)
    assert torch.equal(compiled, eager)
    torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-4, rtol=1e-4)


def test_compiled_generation_with_stop_tokens_on_ring_caches():
    """Sliding-window layers keep ring caches, which cannot rewind steps run past the last stop: the compiled loop
    looks at the tokens every step there, and gives the eager tokens."""
    from gqa_tune.models import gqa_decoder

    torch.manual_seed(3)
    model = gqa_decoder(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                        intermediate_dim=64, max_seq_len=MAX_SEQ_LEN, sliding_window_size=4).eval()  # fmt: skip
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)  # varied tokens, so stop tokens can end the rows a few steps in
    prompt = random_prompt(2, 6)
    eager, _ = gqa_tune.generate(model, prompt, 10)
    first_two = set(eager[:, 6:8].flatten().tolist())
    stop = [next(t for t in eager[row, 8:].tolist() if t not in first_two) for row in range(2)]
    expected, _ = gqa_tune.generate(model, prompt, 10, stop_tokens=stop)
    assert 6 + 2 < expected.shape[1] < 6 + STOP_CHECK_EVERY  # every row stops after a few steps, before 8
    stats = GenerationStats()
    got, _ = gqa_tune.generate(model, prompt, 10, stop_tokens=stop, compile=True, stats=stats)
    assert torch.equal(got, expected)
