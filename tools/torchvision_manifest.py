"""Generate tests/fixtures/torchvision_manifest.json and torchvision_reference.json from torchvision itself.

Keel maps torchvision's state-dict names onto its own models (training/pretrained.py). That map is
tested against what torchvision really saves, not against Keel's idea of it: this script builds
torchvision's models and records

  * the manifest: every state-dict name, shape and dtype of `alexnet`, `googlenet` and
    `inception_v3`, in each layout a user's file can have. The released GoogLeNet and Inception-v3
    files (googlenet-1378be20.pth, inception_v3_google-0cc3c7bd.pth) hold the auxiliary heads:
    the builders load them strictly into a model with aux_logits=True, and only then drop the
    heads unless the caller asked for them (GoogLeNet's heads are not trained, Inception-v3's
    are). So `torch.save(googlenet(weights="DEFAULT").state_dict())` has no aux heads, and the
    released file has them: both layouts are recorded, for both models;
  * the reference: for weights drawn from a fixed seed (`seeded_state_dict`), torchvision's logits
    on a fixed input (`seeded_pixels`, normalised the way torchvision's transforms do, through the
    model's own transform_input for GoogLeNet and Inception-v3), with digests of the weights and
    the input, so a test under Keel's torch can regenerate both, check they are bit-identical to
    what this script used, and compare Keel's logits with torchvision's.

torchvision's wheel does not import beside the torch Keel pins, so run this in a throwaway venv:

    python3.11 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/python tools/torchvision_manifest.py

Nothing here imports Keel, and the two seeded generators use only torch's CPU Mersenne Twister
(`torch.rand` with an explicit Generator), whose stream is the same in torch 2.13 and 2.14: the
test module imports them from this file and checks the digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
MANIFEST = FIXTURES / "torchvision_manifest.json"
REFERENCE = FIXTURES / "torchvision_reference.json"

# name in the manifest -> (torchvision builder, its arguments): every layout a torchvision file can have
LAYOUTS = {
    "alexnet": ("alexnet", {}),
    "googlenet": ("googlenet", {"aux_logits": True}),  # the released file (aux heads present, not trained)
    "googlenet_no_aux": ("googlenet", {"aux_logits": False}),  # state_dict() of googlenet(weights=...)
    "inception_v3": ("inception_v3", {"aux_logits": True}),  # the released file (aux head trained)
    "inception_v3_no_aux": ("inception_v3", {"aux_logits": False}),
}
# The reference logits: one model per torchvision architecture, at the input size of its weights.
REFERENCE_MODELS = {"alexnet": 224, "googlenet": 224, "inception_v3": 299}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SEED = 1234
BATCH = 2


def seeded_state_dict(manifest_entry: list[list], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Weights for a state-dict layout [[name, shape, dtype], ...], drawn in that order from one seeded
    generator, scaled so that activations stay in a sane range through a deep ReLU network (He-uniform
    weights, batch-norm statistics near the identity): logits then depend on the input and the map."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape, dtype in manifest_entry:
        if dtype == "int64":  # num_batches_tracked
            tensors[name] = torch.tensor(100, dtype=torch.int64)
            continue
        uniform = torch.rand(shape, generator=generator, dtype=torch.float32)  # [0, 1)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) > 1:  # conv or linear: He-uniform
            fan_in = math.prod(shape[1:])
            tensors[name] = (uniform * 2 - 1) * math.sqrt(6 / fan_in)
        elif leaf == "weight":  # batch-norm scale
            tensors[name] = 0.75 + 0.5 * uniform
        elif leaf == "running_var":
            tensors[name] = 0.75 + 0.5 * uniform
        else:  # biases, batch-norm shifts and running means
            tensors[name] = (uniform - 0.5) * 0.2
    return tensors


def seeded_pixels(size: int, seed: int = SEED) -> torch.Tensor:
    """BATCH x 3 x size x size pixels in [0, 1]: an upsampled 8 x 8 random image plus fine noise, so
    the input has both structure and detail."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(BATCH, 3, 8, 8, generator=generator)
    fine = torch.rand(BATCH, 3, size, size, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    return (0.8 * smooth + 0.2 * fine).clamp(0, 1)


def digest(tensors: dict[str, torch.Tensor] | torch.Tensor) -> str:
    """SHA-256 of the tensors' names and bytes, in order."""
    hasher = hashlib.sha256()
    for name, tensor in (tensors.items() if isinstance(tensors, dict) else [("", tensors)]):
        hasher.update(name.encode())
        hasher.update(tensor.contiguous().numpy().tobytes())
    return hasher.hexdigest()


def compact_json(value, indent: str = "") -> str:
    """JSON with one line per state-dict entry or logits row: small diffs, readable by eye."""
    flat = json.dumps(value)
    if len(flat) <= 100 or not isinstance(value, dict | list) or all(isinstance(v, float) for v in value):
        return flat
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {compact_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    return "[\n" + ",\n".join(inner + compact_json(v, inner) for v in value) + "\n" + indent + "]"


def layout_of(model: torch.nn.Module) -> list[list]:
    return [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in model.state_dict().items()]


def build(name: str, **kwargs) -> torch.nn.Module:
    import torchvision

    # init_weights=False: torchvision's own initialisation is slow (truncated normal) and irrelevant here
    extra = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return getattr(torchvision.models, name)(weights=None, **extra, **kwargs)


def main(argv: list[str] | None = None) -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    versions = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    FIXTURES.mkdir(parents=True, exist_ok=True)

    manifest = {"generated_by": "tools/torchvision_manifest.py", **versions, "layouts": {}}
    for layout, (builder, kwargs) in LAYOUTS.items():
        model = build(builder, **kwargs)
        manifest["layouts"][layout] = {"builder": builder, "kwargs": kwargs, "state_dict": layout_of(model)}
    MANIFEST.write_text(compact_json(manifest) + "\n")

    reference = {"generated_by": "tools/torchvision_manifest.py", **versions, "seed": SEED, "batch": BATCH,
                 "input": "seeded_pixels(size), normalised with ImageNet's mean/std as torchvision's transforms do",
                 "models": {}}
    torch.set_num_threads(1)  # the reference numbers should not depend on this machine's thread count
    for name, size in REFERENCE_MODELS.items():
        extra = {"transform_input": True} if name != "alexnet" else {}  # as torchvision's pretrained builders
        model = build(name, **extra, **LAYOUTS[name][1]).eval()
        weights = seeded_state_dict(layout_of(model))
        model.load_state_dict(weights)
        pixels = seeded_pixels(size)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            logits = model((pixels - mean) / std)
        reference["models"][name] = {
            "layout": name, "size": size, "kwargs": {**LAYOUTS[name][1], **extra},
            "weights_sha256": digest(weights), "pixels_sha256": digest(pixels),
            "logits": [[float(f"{v:.7g}") for v in row] for row in logits.tolist()],
        }
        print(f"{name}: logits max |x| {logits.abs().max():.3g}, std {logits.std():.3g}")
    REFERENCE.write_text(compact_json(reference) + "\n")
    print(f"wrote {MANIFEST} and {REFERENCE} with torch {versions['torch']}, torchvision {versions['torchvision']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
