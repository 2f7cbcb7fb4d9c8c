"""`python -m training.convert WEIGHTS.pth --arch inception_v3 --labels labels.txt --out model.pt`

A pretrained torchvision file as a servable Keel checkpoint: the weights under Keel's names
(training/pretrained.py: every tensor must fit, nothing is re-initialised), the labels in the
classifier's order, and the preprocessing the weights expect (GoogLeNet and Inception-v3: mean =
std = 0.5; Inception-v3: a 299 px crop of a 342 px resize). Export and the service take it like a
trained checkpoint, so ImageNet GoogLeNet is served in three commands:

    python -m training.convert googlenet-1378be20.pth --arch googlenet --labels imagenet_classes.txt \\
        --out googlenet.pt
    python -m export googlenet.pt --out artifacts/googlenet.onnx
    KEEL_MODEL=artifacts/googlenet.onnx bentoml serve service.service:Classifier

The auxiliary heads are dropped: a served model never runs them. The labels file has one class name
per line (blank lines skipped) or is a JSON list. Exit status 0, or 2 with one `error: PATH: ...` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.checkpoint import checkpoint_payload, save_checkpoint
from training.models import build_model
from training.pretrained import LAYOUTS, TORCHVISION_ARCHS, WeightsError, initialise, read_weights


def read_labels(path: Path) -> list[str]:
    """Class names in the classifier's order, from a text file (one per line) or a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read the labels ({exc})") from None
    if path.suffix.lower() == ".json":
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise WeightsError(f"{path}: a JSON labels file holds a list of strings")
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if not labels or duplicates:
        raise WeightsError(f"{path}: " + ("no labels" if not labels else f"duplicate labels {duplicates[:5]}"))
    return labels


def convert(weights_path: str | Path, arch: str, labels_path: str | Path, out: str | Path,
            log=lambda message: print(message, file=sys.stderr)) -> Path:
    """Write the Keel checkpoint `out` from torchvision's weights for `arch` (a Keel or torchvision name)."""
    arch = TORCHVISION_ARCHS.get(arch, arch)
    labels = read_labels(Path(labels_path))
    weights = read_weights(weights_path, arch)
    if weights.labels is not None:
        raise WeightsError(f"{weights.path}: already a Keel checkpoint; export it as it is")
    model_args = {"num_classes": len(labels), "width": 1.0}
    if LAYOUTS[arch].aux_heads:
        model_args["aux_logits"] = False
    model = build_model(arch, **model_args)
    report = initialise(model, weights, labels, reinitialise=False)
    for line in report.lines():
        log(line)
    payload = checkpoint_payload(model.eval(), arch=arch, model_args=model_args, labels=labels,
                                 preprocessing=weights.preprocessing.to_dict(), init_from=report.record(),
                                 metrics={}, stability={})
    path = save_checkpoint(out, payload)
    log(f"wrote {path}: {arch}, {len(labels)} classes, input {weights.preprocessing.crop} px "
        f"(resize {weights.preprocessing.resize}, mean {weights.preprocessing.mean}, std {weights.preprocessing.std})")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, help="a torchvision state dict saved with torch.save (.pth)")
    parser.add_argument("--arch", required=True, choices=sorted({*TORCHVISION_ARCHS, *TORCHVISION_ARCHS.values()}),
                        help="the architecture, by Keel's or torchvision's name (googlenet is inception_v1_bn)")
    parser.add_argument("--labels", type=Path, required=True,
                        help="class names in the classifier's order: one per line, or a JSON list")
    parser.add_argument("--out", type=Path, required=True, help="the Keel checkpoint to write (.pt)")
    args = parser.parse_args(argv)
    try:
        convert(args.weights, args.arch, args.labels, args.out)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {args.out}: cannot write the checkpoint ({exc.strerror or exc})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
