"""benchmarks/bench_recipes.py --mode packed: its arguments and the configs it runs (nothing is trained here;
a 3-run smoke of the mode takes about 40 s on 2 cores, too slow for the suite)."""

import sys

import pytest
from helpers import REPO
from omegaconf import OmegaConf

from gqa_tune import config_check as cc

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_recipes  # noqa: E402


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs name data files relative to the repository root


def test_packed_mode_arguments_and_configs(tmp_path):
    argv = ["--mode", "packed", "--steps", "2", "--warmup-steps", "1", "--seq", "256", "--workdir", str(tmp_path)]
    args = bench_recipes.with_defaults(bench_recipes.build_parser().parse_args(argv), bench_recipes.PACKED)
    assert (args.steps, args.warmup_steps, args.seq, args.batch, args.tt_loss) == (2, 1, 256, 4, "chunked")
    train = bench_recipes.with_defaults(bench_recipes.build_parser().parse_args([]), bench_recipes.TRAIN)
    assert (train.steps, train.seq, train.batch, train.tt_loss) == (100, 64, 64, "both")

    cases = bench_recipes.packed_cases(args, unpacked_batch=81)
    assert [c.name for c in cases] == ["gqa_tune_packed", "gqa_tune_unpacked", "torchtune_packed_chunked"]
    for case in cases:
        cmd = bench_recipes.recipe_command(case, args, tmp_path / case.name)
        config = cmd[cmd.index("--config") + 1]
        overrides = cmd[cmd.index("--config") + 2 :]
        cfg = OmegaConf.merge(OmegaConf.load(REPO / config), OmegaConf.from_dotlist(overrides))
        assert cfg.tokenizer.max_seq_len == cfg.model.max_seq_len == 256
        assert cfg.shuffle is False and cfg.max_steps_per_epoch == 2
        assert cfg.dataset.get("packed", False) is (case.name != "gqa_tune_unpacked")
        assert cfg.batch_size == (81 if case.name == "gqa_tune_unpacked" else 4)
        if case.which == "gqa_tune":  # the recipe's own schema accepts the overrides
            assert cmd[2] == "gqa_tune/recipes/full_finetune_single_device.py"
            problems = cc.validate_config(cc.load_config(REPO / config, overrides), recipe=cmd[2], check_files=False)
            assert problems == []
        else:
            assert cmd[2] == "full_finetune_single_device" and "loss=torch.nn.CrossEntropyLoss" not in cmd
