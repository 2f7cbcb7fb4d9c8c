"""`python -m export CHECKPOINT --out model.onnx [--samples DIR] [--name NAME] [--bentoml NAME]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.onnx_export import OPSET, ExportError, export_checkpoint, save_to_bentoml
from training.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description="Export a Keel checkpoint to a verified ONNX model.")
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by `python -m training` (e.g. RUN_DIR/best.pt)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the .onnx file (a .parity.json lands beside it)")
    parser.add_argument("--samples", type=Path, default=None,
                        help="image folder for the parity check (default: the training data's val/ split)")
    parser.add_argument("--name", default=None, help="model name recorded in the metadata (default: the arch)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    parser.add_argument("--bentoml", metavar="NAME", default=None, help="also save the model to the BentoML model store as NAME")
    args = parser.parse_args(argv)

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - progress goes to stderr
    try:
        export_checkpoint(args.checkpoint, args.out, args.samples, args.name, args.opset, log=log)
        if args.bentoml:
            save_to_bentoml(args.out, args.bentoml, log=log)
    except (CheckpointError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
