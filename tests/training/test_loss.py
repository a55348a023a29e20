"""The fine-tune loop's ``loss:`` choices: each equals the default summed cross-entropy on the same batch.

The oracle is the sum over supervised tokens of ``-log_softmax`` at the label, written out here in
float64; the losses run on the tiny model's own logits (whole, or chunked by the model).
"""

import pytest
import torch
from omegaconf import OmegaConf
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from gqa_tune.models import gqa_tiny
from gqa_tune.training.evaluate import shift_labels
from gqa_tune.training.loss import build_loss, summed_loss, whole_logits

CHUNKED = "torchtune.modules.loss.CEWithChunkedOutputLoss"
B, S = 3, 17  # 17 tokens: chunks of unequal length


@pytest.fixture
def batch():
    torch.manual_seed(0)
    model = gqa_tiny(max_seq_len=32)
    tokens = torch.randint(0, 256, (B, S))
    labels = tokens.clone()
    labels[:, :5] = CROSS_ENTROPY_IGNORE_IDX  # a prompt
    labels[1, 12:] = CROSS_ENTROPY_IGNORE_IDX  # padding
    return model, tokens, shift_labels(labels)


def reference(logits, labels):
    """Sum over the supervised positions of -log p(label), in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    keep = labels != CROSS_ENTROPY_IGNORE_IDX
    return -logp[keep].gather(-1, labels[keep][:, None]).sum()


def loss_of(model, tokens, labels, loss_cfg):
    loss_fn = build_loss(None if loss_cfg is None else OmegaConf.create(loss_cfg), model)
    count = (labels != CROSS_ENTROPY_IGNORE_IDX).sum()
    return summed_loss(loss_fn, model(tokens), labels, count)


CHOICES = {
    "default": None,
    "ce_mean": {"_component_": "torch.nn.CrossEntropyLoss"},
    "ce_sum": {"_component_": "torch.nn.CrossEntropyLoss", "reduction": "sum"},
    "chunked_4": {"_component_": CHUNKED, "num_output_chunks": 4},
    "chunked_1": {"_component_": CHUNKED, "num_output_chunks": 1},
    "chunked_more_than_tokens": {"_component_": CHUNKED, "num_output_chunks": 32},
}


@pytest.mark.parametrize("choice", sorted(CHOICES))
def test_each_loss_is_the_summed_cross_entropy_and_has_its_gradients(batch, choice):
    model, tokens, labels = batch
    with torch.no_grad():
        expected = reference(model(tokens), labels)
    default = loss_of(model, tokens, labels, None)
    default.backward()
    default_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    got = loss_of(model, tokens, labels, CHOICES[choice])
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(got, default, rtol=1e-6, atol=0)
    got.backward()
    for p, grad in zip(model.parameters(), default_grads):
        torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-7)
    if choice == "ce_sum":  # the same computation as the default, bit for bit
        assert torch.equal(got, default)


def test_a_chunked_loss_makes_the_model_return_chunks_and_evaluation_sees_whole_logits(batch):
    model, tokens, _ = batch
    whole = model(tokens)
    build_loss(OmegaConf.create(CHOICES["chunked_4"]), model)
    chunks = model(tokens)
    assert isinstance(chunks, list) and len(chunks) == 4
    torch.testing.assert_close(torch.cat(chunks, dim=1).float(), whole)
    with whole_logits(model) as same:
        assert same is model and torch.equal(model(tokens), whole)
    assert model.num_output_chunks == 4  # restored


def test_a_mean_loss_over_a_micro_batch_without_supervised_tokens_adds_nothing(batch):
    model, tokens, labels = batch
    labels = torch.full_like(labels, CROSS_ENTROPY_IGNORE_IDX)
    for choice in ("ce_mean", "chunked_4"):
        got = loss_of(model, tokens, labels, CHOICES[choice])
        assert got.item() == 0.0
        got.backward()
        assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())
        model.zero_grad()


@pytest.mark.parametrize(
    "loss_cfg, message",
    [
        ({"_component_": "torch.nn.CrossEntropyLoss", "ignore_index": 0}, "loss.ignore_index: CrossEntropyLoss"),
        ({"_component_": "torch.nn.CrossEntropyLoss", "reduction": "none"}, "loss.reduction: .* got 'none'"),
        ({"_component_": CHUNKED, "num_output_chunks": 0}, "loss.num_output_chunks: expected an int >= 1, got 0"),
        ({"_component_": CHUNKED, "ignore_index": -1}, "loss.ignore_index: CEWithChunkedOutputLoss ignores -1"),
    ],
)
def test_losses_the_loop_cannot_use_are_value_errors_naming_the_key(loss_cfg, message):
    with pytest.raises(ValueError, match=message):
        build_loss(OmegaConf.create(loss_cfg), gqa_tiny(max_seq_len=32))


def test_class_weights_with_a_mean_and_chunks_without_a_decoder_are_value_errors(monkeypatch):
    from gqa_tune.training import loss as module

    weighted = torch.nn.CrossEntropyLoss(weight=torch.ones(256))  # as a builder component could return it
    monkeypatch.setattr(module.config, "instantiate", lambda cfg: weighted)
    with pytest.raises(ValueError, match="loss.weight: a class-weighted mean"):
        build_loss(OmegaConf.create({"_component_": "torch.nn.CrossEntropyLoss"}), gqa_tiny(max_seq_len=32))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="needs chunked logits, but the model \\(Linear\\)"):
        build_loss(OmegaConf.create(CHOICES["chunked_4"]), torch.nn.Linear(2, 2))
