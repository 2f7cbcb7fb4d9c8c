"""`keel-export CHECKPOINT --out model.onnx [--fp16] [--int8] [--bentoml NAME] ...` (or `python -m export`; see --help).

Exit status: 0 written; 1 a model was made and refused by a check (parity, a variant's accuracy),
and not written; 2 bad usage, or a checkpoint, image folder or output folder that cannot be used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import service
from export.onnx_export import OPSET, ExportConfig, ExportError, ExportRefused, export_checkpoint, save_to_bentoml
from training.checkpoint import CheckpointError

DEFAULTS = ExportConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="keel-export",
        description=f"Export a Keel checkpoint to a verified ONNX model (opset {OPSET}, batch norm folded), "
                    "optionally with fp16 and int8 variants beside it.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {service.__version__}")
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint written by `python -m training` (e.g. RUN_DIR/best.pt) or "
                             "`python -m training.convert`")
    parser.add_argument("--out", type=Path, required=True,
                        help="where to write the .onnx file; its .parity.json and any variants (NAME.fp16.onnx, "
                             "NAME.int8.onnx) land beside it")
    parser.add_argument("--name", default=None, help="model name recorded in the metadata (default: the arch)")
    parser.add_argument("--parity-images", "--samples", dest="samples", type=Path, default=None,
                        help="image folder for the parity check (default: the training data's val/ split; "
                             "without training data, as for a converted checkpoint: synthetic images)")
    parser.add_argument("--fp16", action="store_true",
                        help="also write a float16 variant for the CUDA provider (input and output stay float32)")
    parser.add_argument("--int8", action="store_true",
                        help="also write a statically quantized int8 variant (QDQ, per-channel) for the CPU")
    parser.add_argument("--uint8-input", action="store_true",
                        help="also write NAME.uint8-nhwc.onnx: input `image` N x S x S x 3 uint8 RGB, normalized "
                             "in the graph (export only: the service does not load it yet)")
    parser.add_argument("--test-images", type=Path, default=None,
                        help="labelled ImageFolder split on which variants' top-1 accuracy is compared with fp32 "
                             "(default: the training data's test/ split)")
    parser.add_argument("--calibration-images", type=Path, default=None,
                        help="images for int8 calibration (default: the training data's train/ split)")
    parser.add_argument("--calibration-count", type=int, default=DEFAULTS.calibration_count,
                        help="calibration images used, spread over the classes "
                             f"(default: {DEFAULTS.calibration_count})")
    parser.add_argument("--max-accuracy-drop", type=float, default=DEFAULTS.max_accuracy_drop,
                        help="refuse a variant whose test top-1 is more than this below fp32's, as a fraction "
                             f"(default: {DEFAULTS.max_accuracy_drop}, "
                             f"i.e. {100 * DEFAULTS.max_accuracy_drop:g} point)")
    parser.add_argument("--bentoml", metavar="NAME", default=None,
                        help="also save the model, its variants and parity reports to the BentoML model store as NAME")
    args = parser.parse_args(argv)

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731 - progress goes to stderr
    try:
        config = ExportConfig(
            name=args.name, samples=str(args.samples) if args.samples else None, fp16=args.fp16, int8=args.int8,
            uint8_input=args.uint8_input,
            test_images=str(args.test_images) if args.test_images else None,
            calibration_images=str(args.calibration_images) if args.calibration_images else None,
            calibration_count=args.calibration_count, max_accuracy_drop=args.max_accuracy_drop,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        export_checkpoint(args.checkpoint, args.out, config, log=log)
        if args.bentoml:
            log(f"[+] saving to the BentoML model store as {args.bentoml}")
            save_to_bentoml(args.out, args.bentoml, log=log)
    except ExportRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
