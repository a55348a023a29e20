"""The synthetic task data ships inside the package, and a non-editable install finds it from anywhere."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

from gqa_tune.data import PACKAGED_TASKS, byte_tokenizer, resolve_data_file, task_dataset


def test_configs_names_resolve_to_the_packaged_files_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_file("data/tasks/train.jsonl") == PACKAGED_TASKS / "train.jsonl"
    assert resolve_data_file("./data/tasks/val.jsonl") == PACKAGED_TASKS / "val.jsonl"
    assert len(task_dataset(byte_tokenizer(), data_file="data/tasks/val.jsonl")) == 500
    # names that are not the shipped ones are taken as given, and a missing one is named in the error
    assert resolve_data_file("data/tasks/other.jsonl") == Path("data/tasks/other.jsonl")
    with pytest.raises(ValueError, match=r"'data/tasks/other.jsonl' does not exist"):
        task_dataset(byte_tokenizer(), data_file="data/tasks/other.jsonl")


def test_regenerating_writes_to_the_working_directory_and_wins(tmp_path, monkeypatch):
    proc = subprocess.run([sys.executable, "-m", "gqa_tune.data.tasks"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for split in ("train", "val"):
        local = tmp_path / "data" / "tasks" / f"{split}.jsonl"
        assert local.read_bytes() == (PACKAGED_TASKS / f"{split}.jsonl").read_bytes()  # deterministic
    monkeypatch.chdir(tmp_path)
    assert resolve_data_file("data/tasks/train.jsonl").resolve() == (tmp_path / "data/tasks/train.jsonl").resolve()


def test_a_non_editable_install_validates_and_loads_the_default_config_anywhere(tmp_path):
    """Build the wheel, unpack it, and use it from a directory with no checkout around."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)]
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = wheels.glob("gqa_tune-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    for shipped in ("gqa_tune/data/synthetic/train.jsonl", "gqa_tune/configs/gqa_tiny/full.yaml",
                    "gqa_tune/recipes/full_finetune_single_device.py"):  # fmt: skip
        assert shipped in names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, {str(site)!r})
import gqa_tune
from gqa_tune import catalog
from gqa_tune import config_check as cc
from gqa_tune.data import byte_tokenizer, task_dataset
assert gqa_tune.__file__.startswith({str(site)!r}), gqa_tune.__file__
for name in catalog.config_names():
    assert cc.check_config_file(catalog.find_config(name)) == [], name
print(len(task_dataset(byte_tokenizer(), data_file="data/tasks/train.jsonl")))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "20000"
