"""`keel-train [--recipe FILE.yaml] --data DIR --out RUN_DIR [...]` (or `python -m training`): every
TrainConfig field is a flag. Exit status: 0 trained; 2 bad usage or unusable data, recipe or checkpoint;
3 the run diverged (training.stability).

A recipe (training/recipes/<arch>.yaml) holds TrainConfig fields; flags given on the command line
override it. Data-parallel: `torchrun --nproc_per_node N -m training ...` (see README).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path

import service
from training.config import TrainConfig
from training.models import MODELS
from training.stability import TrainingDiverged


def field_help() -> dict[str, str]:
    """Each field's inline comment in TrainConfig, so the config's documentation is the --help text."""
    source = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^ {4}(\w+): [^#\n]*# (.+)$", source, re.M)}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    comments = field_help()
    # The recipe is read first: its values become the defaults that the other flags override.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    recipe_path = pre.parse_known_args(argv)[0].recipe
    parser = argparse.ArgumentParser(prog="keel-train", description="Train an image classifier on an ImageFolder tree.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {service.__version__}")
    parser.add_argument("--recipe", metavar="YAML",
                        help="a file of TrainConfig fields (training/recipes/); flags override it")
    try:
        recipe = load_recipe(recipe_path) if recipe_path else {}
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING
                                         else field.default_factory())
        options: dict = {"dest": field.name, "required": required and field.name not in recipe}
        if field.name == "arch":
            options.update(choices=sorted(MODELS), default=default)
        elif isinstance(default, bool):
            options.update(action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            options.update(nargs=len(default), type=type(default[0]), default=default)
        elif isinstance(default, dict):
            options.update(type=json.loads, default=default, metavar="JSON")
        else:
            options.update(type=str if required else type(default), default=default)
        options["help"] = comments.get(field.name, "") + ("" if required else f" (default: {default})")
        parser.add_argument(flag, **options)
    parser.set_defaults(**recipe)
    args = vars(parser.parse_args(argv))
    args.pop("recipe")
    try:
        return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except ValueError as exc:
        parser.error(str(exc))


def load_recipe(path: str | Path) -> dict:
    """A YAML recipe's TrainConfig fields, checked: an unknown key or a value of the wrong type is an
    error naming the file, not something silently ignored."""
    import yaml

    path = Path(path)
    try:
        recipe = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such recipe file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe is a mapping of TrainConfig fields, not a {type(recipe).__name__}")
    fields = {field.name: field for field in dataclasses.fields(TrainConfig)}
    unknown = [key for key in recipe if key not in fields]
    if unknown:
        raise ValueError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(fields)})")
    checked = {}
    for key, value in recipe.items():
        field = fields[key]
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else "")
        checked[key] = recipe_value(path, key, value, default)
    return checked


def recipe_value(path: Path, key: str, value, default):
    """`value` as the type of the field's default (ints pass as floats, lists as tuples)."""
    expected = type(default)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and len(value) == len(default) and all(isinstance(v, (int, float)) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        shape = f"a list of {len(default)} numbers" if isinstance(default, tuple) else f"a {expected.__name__}"
        raise ValueError(f"{path}: {key} must be {shape}, not {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    from training.train import train

    config = parse_args(argv)
    try:
        train(config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
