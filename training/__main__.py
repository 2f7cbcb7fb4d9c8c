"""`python -m training --arch alexnet_bn --data DIR --out RUN_DIR [...]`: every TrainConfig field is a flag."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys

from training.config import TrainConfig
from training.models import MODELS
from training.stability import TrainingDiverged


def field_help() -> dict[str, str]:
    """Each field's inline comment in TrainConfig, so the config's documentation is the --help text."""
    source = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^ {4}(\w+): [^#\n]*# (.+)$", source, re.M)}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    comments = field_help()
    parser = argparse.ArgumentParser(prog="python -m training", description="Train an image classifier on an ImageFolder tree.")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING else field.default_factory())
        options: dict = {"dest": field.name, "required": required}
        if field.name == "arch":
            options.update(choices=sorted(MODELS), default=default)
        elif isinstance(default, tuple):
            options.update(nargs=len(default), type=type(default[0]), default=default)
        elif isinstance(default, dict):
            options.update(type=json.loads, default=default, metavar="JSON")
        else:
            options.update(type=str if required else type(default), default=default)
        options["help"] = comments.get(field.name, "") + ("" if required else f" (default: {default})")
        parser.add_argument(flag, **options)
    args = parser.parse_args(argv)
    try:
        return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})
    except ValueError as exc:
        parser.error(str(exc))


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
