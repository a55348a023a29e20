"""``plot_training_curves``: a valid PNG of the loss and evaluation curves, or a warning without matplotlib."""

import builtins

import pytest
from PIL import Image

from gqa_tune.training.curves import CURVES_FILE, curves_dir, plot_training_curves

LOSSES = [5.5, 5.0, 4.2, 3.9, 3.1, 2.8]
EVALS = [(0, {"heldout_loss": 5.6, "accuracy_all": 0.0}), (6, {"heldout_loss": 2.9, "accuracy_all": 0.25})]


def read_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
        return image.format, image.size


@pytest.mark.parametrize("evals, panels", [((), 1), (EVALS[:1], 2), (EVALS, 2)])
def test_writes_a_png_with_a_panel_for_accuracy_when_there_is_some(tmp_path, evals, panels):
    path = tmp_path / "logs" / CURVES_FILE  # the directory is created
    assert plot_training_curves(path, LOSSES, evals) == path
    fmt, (width, height) = read_png(path)
    assert fmt == "PNG" and (width > height * 2) == (panels == 2)
    assert [p.name for p in path.parent.iterdir()] == [CURVES_FILE]  # no temporary file left


def test_without_matplotlib_it_warns_and_writes_nothing(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match=r"matplotlib is not installed.*gqa_tune\[plots\]"):
        assert plot_training_curves(tmp_path / CURVES_FILE, LOSSES) is None
    assert not (tmp_path / CURVES_FILE).exists()


def test_the_picture_goes_beside_the_logs_else_in_output_dir(tmp_path):
    assert curves_dir({"_component_": "x.DiskLogger", "log_dir": str(tmp_path / "logs")}, tmp_path) == tmp_path / "logs"
    assert curves_dir({"_component_": "x.StdoutLogger"}, tmp_path) == tmp_path
    assert curves_dir(None, tmp_path) == tmp_path
