"""``gqa_tune.hf.gguf``: refusals that name the file, before anything is converted (the real GGUF file is
converted in tests/real_model)."""

import pytest
from omegaconf import OmegaConf

from gqa_tune import config_check as cc
from gqa_tune.cli import main
from gqa_tune.hf.gguf import gguf_to_hf_dir, resolve_model_dir


@pytest.fixture
def not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")
    return path


def test_missing_and_foreign_files_are_refused_naming_them(not_gguf, tmp_path):
    with pytest.raises(ValueError, match="the GGUF file does not exist"):
        gguf_to_hf_dir(tmp_path / "absent.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match=r"model.gguf': not a GGUF file \(it does not start with b'GGUF'\)"):
        resolve_model_dir(not_gguf, cache=tmp_path / "cache")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert resolve_model_dir(tmp_path) == tmp_path  # a directory is used as it is


def test_validate_and_the_cli_refuse_a_file_that_is_not_gguf(not_gguf, tmp_path, capsys):
    problems = []
    cc._check_hf_model_dir(OmegaConf.create({"hf_model_dir": str(not_gguf)}), problems)
    assert problems == [f"hf_model_dir {str(not_gguf)!r}: not a GGUF file (it does not start with b'GGUF')"]
    assert main(["gguf", str(not_gguf), str(tmp_path / "out")]) == 1
    assert "not a GGUF file" in capsys.readouterr().err and not (tmp_path / "out").exists()
