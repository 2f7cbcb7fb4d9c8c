"""Training augmentation (training/augment.py): deterministic per seed, torchvision's definitions, identity at zero."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from training.augment import (
    BatchAugment,
    ImageAugment,
    apply_op,
    augmentation_space,
    color_jitter,
    crop_box,
    mix,
    rand_augment,
    random_erasing,
    trivial_augment_wide,
)


def noise_image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("augment", [
    ImageAugment(32),
    ImageAugment(32, (0.5, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1)),
    ImageAugment(32, auto_augment="ta_wide"),
    ImageAugment(32, auto_augment="ra", ra_num_ops=3, ra_magnitude=15),
])
def test_same_seed_same_image_and_seeds_differ(augment):
    image = noise_image()
    first = [pixels(augment(image, random.Random(seed))) for seed in range(12)]
    again = [pixels(augment(image, random.Random(seed))) for seed in range(12)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in first)
    assert len({a.tobytes() for a in first}) == 12  # a dozen seeds, a dozen different images


def test_the_augmentation_spaces_are_torchvisions():
    """Bins, ranges and signs as torchvision's v2 _AUGMENTATION_SPACE, whose formulas are written out
    here in torch (torchvision itself does not import beside the pinned torch)."""
    bins, width, height = 31, 224, 160
    linspace = lambda a, b: torch.linspace(a, b, bins).tolist()  # noqa: E731
    expected = {
        "ta_wide": {"Identity": None, "ShearX": linspace(0.0, 0.99), "ShearY": linspace(0.0, 0.99),
                    "TranslateX": linspace(0.0, 32.0), "TranslateY": linspace(0.0, 32.0),
                    "Rotate": linspace(0.0, 135.0), "Brightness": linspace(0.0, 0.99), "Color": linspace(0.0, 0.99),
                    "Contrast": linspace(0.0, 0.99), "Sharpness": linspace(0.0, 0.99),
                    "Posterize": (8 - (torch.arange(bins) / ((bins - 1) / 6)).round().int()).tolist(),
                    "Solarize": linspace(1.0, 0.0), "AutoContrast": None, "Equalize": None},
        "ra": {"Identity": None, "ShearX": linspace(0.0, 0.3), "ShearY": linspace(0.0, 0.3),
               "TranslateX": linspace(0.0, 150.0 / 331.0 * width), "TranslateY": linspace(0.0, 150.0 / 331.0 * height),
               "Rotate": linspace(0.0, 30.0), "Brightness": linspace(0.0, 0.9), "Color": linspace(0.0, 0.9),
               "Contrast": linspace(0.0, 0.9), "Sharpness": linspace(0.0, 0.9),
               "Posterize": (8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int()).tolist(),
               "Solarize": linspace(1.0, 0.0), "AutoContrast": None, "Equalize": None},
    }
    signed = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}
    for policy, ops in expected.items():
        space = augmentation_space(policy, bins, width, height)
        assert list(space) == list(ops), policy  # the same ops, in torchvision's order
        for op, magnitudes in ops.items():
            ours, is_signed = space[op]
            assert is_signed == (op in signed), (policy, op)
            if magnitudes is None:
                assert ours is None, (policy, op)
            else:
                assert ours == pytest.approx(magnitudes, abs=1e-5), (policy, op)


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_every_op_is_the_identity_at_magnitude_zero(policy):
    """Bin 0 of every op that has a magnitude leaves the image alone (Solarize included, see the module)."""
    image = noise_image()
    image.putpixel((0, 0), (255, 255, 255))  # pure white, which torchvision's weakest Solarize would invert
    for op, (magnitudes, _) in augmentation_space(policy, 31, *image.size).items():
        if magnitudes is not None or op == "Identity":
            assert np.array_equal(pixels(apply_op(image, op, magnitudes[0] if magnitudes else 0.0)), pixels(image)), op


def test_rand_augment_at_magnitude_zero_changes_only_through_the_ops_without_one():
    image = noise_image()
    fixed = {pixels(image).tobytes()}
    for first in ("Identity", "AutoContrast", "Equalize"):
        for second in ("Identity", "AutoContrast", "Equalize"):
            fixed.add(pixels(apply_op(apply_op(image, first, 0.0), second, 0.0)).tobytes())
    outputs = {pixels(rand_augment(image, random.Random(seed), num_ops=2, magnitude=0)).tobytes() for seed in range(60)}
    assert outputs <= fixed and len(outputs) > 1


def test_geometric_ops_move_pixels_as_torchvision_does():
    """One white pixel on black: where torchvision's affine matrices send it (nearest neighbour)."""
    def moved(op, magnitude, at=(20, 10), size=(48, 40)):
        image = Image.new("RGB", size)
        image.putpixel(at, (255, 255, 255))
        ys, xs = np.nonzero(pixels(apply_op(image, op, magnitude))[:, :, 0])
        return list(zip(xs.tolist(), ys.tolist()))

    assert moved("TranslateX", 5.7) == [(25, 10)]  # whole pixels, towards +x
    assert moved("TranslateY", -3.0) == [(20, 7)]
    assert moved("ShearX", 0.5) == [(15, 10)]  # x' = x - m y: sheared about the top-left corner
    assert moved("ShearY", 0.5) == [(20, 0)]  # y' = y - m x
    assert moved("Rotate", 90.0, at=(30, 24), size=(48, 48)) == [(24, 17)]  # counter-clockwise about the centre


def test_colour_ops_follow_pillow_enhance_and_ops():
    image = noise_image()
    assert np.array_equal(pixels(apply_op(image, "Brightness", -1.0)), np.zeros_like(pixels(image)))  # factor 0: black
    assert pixels(apply_op(image, "Posterize", 2)).max() <= 0b11000000
    solarized = pixels(apply_op(image, "Solarize", 0.5)).astype(int)
    original = pixels(image).astype(int)
    assert np.array_equal(solarized, np.where(original >= 127.5, 255 - original, original))


def test_trivial_augment_draws_every_op():
    """Over many seeds, TrivialAugmentWide picks each of its 14 ops (identities included)."""
    image = noise_image()
    picked = set()
    original = random.Random.choice

    def spy(rng, seq):
        choice = original(rng, seq)
        picked.add(choice)
        return choice

    random.Random.choice = spy
    try:
        for seed in range(400):
            trivial_augment_wide(image, random.Random(seed))
    finally:
        random.Random.choice = original
    assert picked == set(augmentation_space("ta_wide", 31, 48, 40))


def test_colour_jitter_of_zero_is_the_identity_and_otherwise_seeded():
    image = noise_image()
    assert np.array_equal(pixels(color_jitter(image, 0, 0, 0, 0, random.Random(1))), pixels(image))
    a = pixels(color_jitter(image, 0.4, 0.4, 0.4, 0.1, random.Random(1)))
    b = pixels(color_jitter(image, 0.4, 0.4, 0.4, 0.1, random.Random(1)))
    assert np.array_equal(a, b) and not np.array_equal(a, pixels(image))


def test_the_crop_scale_range_is_respected():
    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = crop_box(200, 150, (0.3, 0.6), rng)
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        assert 0.3 * 0.95 <= w * h / (200 * 150) <= 0.6 * 1.05  # up to rounding of the sides
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05


def test_the_reduced_training_decode_keeps_the_smallest_crop_at_full_resolution():
    """A 1920x1080 JPEG decodes at half size for 224 px crops of >= 25% of the area, and no crop the
    transform can cut from it is then smaller than 224 px on a side: none is upscaled."""
    from service.preprocessing import decode_image

    buffer = io.BytesIO()
    noise_image(1920, 1080).save(buffer, "JPEG", quality=90)
    augment = ImageAugment(224, (0.25, 1.0))
    decoded = decode_image(buffer.getvalue(), draft_area=augment.draft_area)
    assert decoded.size == (960, 540)
    rng = random.Random(0)
    assert min(min(crop_box(960, 540, (0.25, 0.25), rng)[2:]) for _ in range(2000)) >= 224
    assert min(min(crop_box(480, 270, (0.25, 0.25), rng)[2:]) for _ in range(2000)) < 224  # why not a quarter
    assert decode_image(buffer.getvalue(), draft_area=ImageAugment(224, (0.08, 1.0)).draft_area).size == (1920, 1080)


def test_random_erasing_is_seeded_and_erases_to_the_mean():
    images = torch.randn(16, 3, 32, 32)
    assert torch.equal(random_erasing(images, 0.0, random.Random(0)), images)
    a, b = random_erasing(images, 1.0, random.Random(5)), random_erasing(images, 1.0, random.Random(5))
    assert torch.equal(a, b)
    changed = (a != images).any(dim=1)  # N x H x W: erased pixels
    erased_share = changed.flatten(1).float().mean(1)
    assert ((erased_share > 0.015) & (erased_share < 0.34)).all()  # every image, 2%-33% of its area
    assert (a.permute(0, 2, 3, 1)[changed] == 0).all()  # set to 0: the mean colour after normalisation


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.2, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_targets_sum_to_one_and_match_the_pixels(mixup_alpha, cutmix_alpha):
    images = torch.randn(8, 3, 16, 16)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    for seed in range(20):
        mixed, soft = mix(images, targets, 10, mixup_alpha, cutmix_alpha, random.Random(seed))
        again, soft_again = mix(images, targets, 10, mixup_alpha, cutmix_alpha, random.Random(seed))
        assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
        assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
        lam = soft[0, 0].item()  # image 0 is mixed with image 7 (the batch rolled by one)
        assert soft[0, 7].item() == pytest.approx(1 - lam, abs=1e-6)
        from_self = (mixed[0] == images[0]).all(0).float().mean().item()
        if cutmix_alpha and not torch.allclose(mixed[0], lam * images[0] + (1 - lam) * images[7], atol=1e-5):
            assert from_self == pytest.approx(lam, abs=1e-6)  # cutmix: lam is the share of pixels kept


def test_batch_augment_is_a_function_of_seed_and_step():
    images, targets = torch.randn(8, 3, 16, 16), torch.arange(8)
    augment = BatchAugment(10, random_erase=0.5, mixup_alpha=0.2, cutmix_alpha=1.0, seed="3/0")
    a, b = augment(images, targets, 41), augment(images, targets, 41)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], augment(images, targets, 42)[0])
    plain = BatchAugment(10)
    assert plain(images, targets, 41)[0] is images and plain(images, targets, 41)[1] is targets


def test_label_smoothing_still_applies_to_soft_targets():
    """nn.CrossEntropyLoss smooths probability targets as it does class indices: the training loss
    on mixed targets is the cross-entropy with (1 - e) x target + e / classes."""
    from training.train import training_loss

    logits, epsilon = torch.randn(4, 10), 0.1
    soft = torch.softmax(torch.randn(4, 10), 1)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=epsilon)
    smoothed = (1 - epsilon) * soft + epsilon / 10
    manual = -(smoothed * torch.log_softmax(logits, 1)).sum(1).mean()
    assert training_loss(logits, soft, criterion, 0.3).item() == pytest.approx(manual.item(), rel=1e-6)
    hard = torch.tensor([1, 2, 3, 4])
    one_hot = torch.nn.functional.one_hot(hard, 10).float()
    assert criterion(logits, hard).item() == pytest.approx(criterion(logits, one_hot).item(), rel=1e-6)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_crop_scale"):
        ImageAugment(32, (0.6, 0.5))
    with pytest.raises(ValueError, match="auto_augment"):
        ImageAugment(32, auto_augment="autoaugment")
    with pytest.raises(ValueError, match="ra_magnitude"):
        ImageAugment(32, auto_augment="ra", ra_magnitude=31)
    assert math.isclose(ImageAugment(224, (0.08, 1.0)).draft_area, 224**2 / 0.06, rel_tol=1e-9, abs_tol=1)
