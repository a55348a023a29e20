"""``prune_checkpoints`` (``keep_last_n_checkpoints``): the newest complete loop checkpoints stay, LATEST's always."""

import os

import pytest
import torch

from gqa_tune.hf import CONFIG
from gqa_tune.models import gqa_tiny
from gqa_tune.training.checkpoint import (
    LATEST,
    cleanup_stale,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return gqa_tiny(max_seq_len=16)


def save(out, name, model, age):
    """Save checkpoint ``name``, marked as written ``age`` seconds after the epoch (the pruning order)."""
    path = save_checkpoint(out, name, model, model.state_dict())
    os.utime(path / CONFIG, ns=(age * 10**9, age * 10**9))
    return path


def names(out):
    return sorted(p.name for p in out.iterdir())


def test_keeps_the_newest_and_latest_loads(tmp_path, model):
    out = tmp_path / "out"
    for age, name in enumerate(["step_2", "epoch_0", "step_6", "epoch_1"], start=1):
        save(out, name, model, age)
    (out / "notes").mkdir()  # not a loop checkpoint: left alone
    (out / "step_9").mkdir()  # incomplete: not a checkpoint, left alone

    removed = prune_checkpoints(out, keep=2)
    assert sorted(p.name for p in removed) == ["epoch_0", "step_2"]
    assert names(out) == [LATEST, "epoch_1", "notes", "step_6", "step_9"]
    assert latest_checkpoint(out) == out / "epoch_1"
    weights, _, _ = load_checkpoint(latest_checkpoint(out))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert prune_checkpoints(out, keep=2) == []  # nothing more to remove

    assert [p.name for p in prune_checkpoints(out, keep=1)] == ["step_6"]
    assert names(out) == [LATEST, "epoch_1", "notes", "step_9"]


def test_never_removes_what_latest_names_even_when_it_is_not_the_newest(tmp_path, model):
    out = tmp_path / "out"
    for age, name in enumerate(["epoch_0", "epoch_1", "epoch_2"], start=1):
        save(out, name, model, age)
    (out / LATEST).write_text("epoch_0\n")  # pointed back at the oldest
    assert sorted(p.name for p in prune_checkpoints(out, keep=2)) == ["epoch_1"]
    assert names(out) == [LATEST, "epoch_0", "epoch_2"]
    assert latest_checkpoint(out) == out / "epoch_0"


def test_removes_nothing_when_latest_names_no_complete_checkpoint(tmp_path, model):
    out = tmp_path / "out"
    for age, name in enumerate(["epoch_0", "epoch_1"], start=1):
        save(out, name, model, age)
    (out / LATEST).write_text("epoch_7\n")
    assert prune_checkpoints(out, keep=1) == []
    (out / LATEST).unlink()
    assert prune_checkpoints(out, keep=1) == []
    assert names(out) == ["epoch_0", "epoch_1"]


def test_a_prune_killed_after_the_rename_leaves_only_a_hidden_leftover_for_cleanup(tmp_path, model, monkeypatch):
    out = tmp_path / "out"
    for age, name in enumerate(["epoch_0", "epoch_1"], start=1):
        save(out, name, model, age)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gqa_tune.training.checkpoint.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(out, keep=1)
    monkeypatch.undo()
    leftovers = [p for p in out.iterdir() if p.name.startswith(".epoch_0.old-")]
    assert len(leftovers) == 1 and not (out / "epoch_0").exists()
    assert latest_checkpoint(out) == out / "epoch_1"
    assert cleanup_stale(out) == leftovers  # this process's own, and no prune is writing it any more
    assert names(out) == [LATEST, "epoch_1"]


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, "2"])
def test_keep_must_be_an_int_of_at_least_one(tmp_path, keep):
    with pytest.raises(ValueError, match=f"keep_last_n_checkpoints: expected an int >= 1 .*got {keep!r}"):
        prune_checkpoints(tmp_path, keep=keep)
