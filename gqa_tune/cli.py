"""``gqa-tune``: list, copy, validate and run the project's recipes and configs.

::

    gqa-tune ls
    gqa-tune cp gqa_tiny/full my_config.yaml [--force]
    gqa-tune validate my_config.yaml [key=value ...] [--recipe NAME]
    gqa-tune run [--dry-run] [--no-validate] [TORCHRUN-OPTIONS] <recipe> --config <config> [key=value ...]

``run`` resolves a recipe name to ``gqa_tune/recipes/<name>.py`` and a config
name (``gqa_tiny/full``) to its file, validates the config with its overrides
(:mod:`gqa_tune.config_check`), and then runs torchtune's ``tune run`` with
the same arguments, torchrun options (``--nproc_per_node 2``) included. The
recipes run the same check themselves when started with plain ``tune run``.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from gqa_tune import config_check as cc

PROG = "gqa-tune"

RUN_SYNOPSIS = f"{PROG} run [--dry-run] [--no-validate] [TORCHRUN-OPTIONS] <recipe> --config <config> [key=value ...]"
RUN_USAGE = f"""usage: {RUN_SYNOPSIS}

Validate the config (with the overrides), then run `tune run gqa_tune/recipes/<recipe>.py --config <config file> ...`.

  <recipe>         one of gqa_tune's recipes (see `{PROG} ls`), or a path to a recipe .py file
  --config         a config name (e.g. gqa_tiny/full) or a path to a YAML file
  key=value, ~key  overrides, as `tune run` takes them
  --dry-run        validate and print the `tune run` command without running it
  --no-validate    run without validating the config first
  TORCHRUN-OPTIONS e.g. --nproc_per_node 2 (run through torchrun, as `tune run` does)
"""


class CLIError(Exception):
    """A user error: printed as ``gqa-tune <command>: <message>``, exit code 1."""


def _choices() -> str:
    return f"recipes: {', '.join(cc.recipe_names()) or '-'}; configs: {', '.join(cc.config_names()) or '-'}"


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, cc.recipe_names() + cc.config_names(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _config_path(name: str) -> Path:
    """A config name (``gqa_tiny/full``) or a path to a YAML file."""
    found = cc.find_config(name)
    if found is not None:
        return found
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise CLIError(
        f"unknown config {name!r}{_suggest(name)}: give a YAML file or one of: {', '.join(cc.config_names()) or '-'}"
    )


def _print_problems(path: Path, problems: Sequence[str], what: str) -> None:
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    print(f"{path}: {count}{what}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


# ---------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace) -> int:
    table = cc.recipe_configs()
    rows = [(recipe, ", ".join(configs) or "-") for recipe, configs in table.items() if recipe is not None]
    if table.get(None):
        rows.append(("(no recipe)", ", ".join(table[None])))
    width = max([len("RECIPE")] + [len(r) for r, _ in rows]) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe, configs in rows:
        print(f"{recipe:<{width}}{configs}")
    return 0


# ---------------------------------------------------------------- cp


def cmd_cp(args: argparse.Namespace) -> int:
    recipe = cc.find_recipe(args.file)
    if recipe is not None:
        source = cc.recipe_file(recipe)
    else:
        source = cc.find_config(args.file)
        if source is None:
            raise CLIError(f"unknown recipe or config {args.file!r}{_suggest(args.file)}; choose from {_choices()}")
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


# ---------------------------------------------------------------- validate


def cmd_validate(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    recipe = args.recipe
    if recipe is not None and cc.find_recipe(recipe) is None and not Path(recipe).is_file():
        raise CLIError(f"unknown recipe {recipe!r}; choose from {', '.join(cc.recipe_names())} or a .py file")
    problems = cc.check_config_file(path, args.overrides, recipe=recipe, check_files=not args.no_file_checks)
    if problems:
        _print_problems(path, problems, "")
        return 1
    print(f"{path}: config is valid")
    return 0


# ---------------------------------------------------------------- run


def _tune_executable() -> List[str]:
    sibling = Path(sys.executable).with_name("tune")
    if sibling.is_file():
        return [str(sibling)]
    found = shutil.which("tune")
    return [found] if found else [sys.executable, "-m", "torchtune._cli.tune"]


def tune_run_command(tokens: Sequence[str]) -> Tuple[List[str], Path, str, List[str]]:
    """``(tune run command, config file, recipe, overrides)`` for ``gqa-tune run``'s arguments (after ``run``).

    Raises:
        CLIError: for a missing ``--config``, an unknown recipe or config.
    """
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = f"{PROG} run"
    parsed = parser.parse_args(list(tokens))  # torchrun's options, the recipe, then everything after it
    recipe_args = list(parsed.training_script_args)
    launcher = list(tokens[: len(tokens) - len(recipe_args) - 1])

    recipe = cc.find_recipe(parsed.training_script)
    if recipe is not None:
        recipe_arg = f"gqa_tune/recipes/{recipe}.py"  # tune run turns it into the module gqa_tune.recipes.<name>
    elif parsed.training_script.endswith(".py") and Path(parsed.training_script).is_file():
        recipe = recipe_arg = parsed.training_script  # a recipe of one's own, e.g. one copied out with cp
    else:
        name = parsed.training_script
        raise CLIError(
            f"unknown recipe {name!r}{_suggest(name)}: give a .py file or one of: {', '.join(cc.recipe_names())}"
        )

    config, overrides, i = None, [], 0
    while i < len(recipe_args):
        arg = recipe_args[i]
        if arg == "--config":
            if i + 1 == len(recipe_args):
                raise CLIError("--config needs a value")
            config, i = recipe_args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
        i += 1
    if config is None:
        raise CLIError(f"--config is required; configs: {', '.join(cc.config_names()) or '-'}")
    config_path = _config_path(config)
    command = [*_tune_executable(), "run", *launcher, recipe_arg, "--config", str(config_path), *overrides]
    return command, config_path, recipe, overrides


def cmd_run(tokens: Sequence[str]) -> int:
    tokens = list(tokens)
    if not tokens or tokens[0] in ("-h", "--help"):
        print(RUN_USAGE)
        return 0 if tokens else 2
    dry_run, validate = False, True
    while tokens and tokens[0] in ("--dry-run", "--no-validate"):
        flag = tokens.pop(0)
        dry_run |= flag == "--dry-run"
        validate &= flag != "--no-validate"
    command, config_path, recipe, overrides = tune_run_command(tokens)
    if validate:
        problems = cc.check_config_file(config_path, overrides, recipe=recipe)
        if problems:
            _print_problems(config_path, problems, "; not starting the recipe")
            return 1
    print("$ " + shlex.join(command), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    code = subprocess.call(command)
    return 128 - code if code < 0 else code  # killed by a signal: the shell's convention


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="gqa_tune's recipes and configs, on top of `tune`.")
    sub = parser.add_subparsers(dest="command", metavar="{ls,cp,validate,run}")

    ls = sub.add_parser("ls", help="list the recipes and their configs")
    ls.set_defaults(func=cmd_ls)

    cp = sub.add_parser("cp", help="copy a recipe or config to edit it")
    cp.add_argument("file", help="a recipe name (full_finetune_single_device) or config name (gqa_tiny/full)")
    cp.add_argument("destination", help="file or directory to copy to")
    cp.add_argument("-f", "--force", action="store_true", help="overwrite the destination if it exists")
    cp.set_defaults(func=cmd_cp)

    validate = sub.add_parser("validate", help="check a config (and overrides) before running it")
    validate.add_argument("config", help="a config name (gqa_tiny/full) or a path to a YAML file")
    validate.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as `tune run` takes them")
    validate.add_argument(
        "--recipe", help="the recipe that will read the config (default: the one its header comment names)"
    )
    validate.add_argument("--no-file-checks", action="store_true", help="do not check that input files exist")
    validate.set_defaults(func=cmd_validate)

    sub.add_parser(
        "run",
        help="validate a config, then `tune run` a recipe with it",
        usage=RUN_SYNOPSIS,
        add_help=False,
    )
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
        command = argv[0] if argv else ""
        print(f"{PROG} {command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
