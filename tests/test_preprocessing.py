"""The one image pipeline: decoding every kind of upload, and agreement between its users."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.preprocessing import (
    ImageDecodeError, PreprocessSpec, decode_image, preprocess, preprocess_bytes, resize_and_crop,
)

SPEC = PreprocessSpec(resize=64, crop=56, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_spec_round_trips_through_json_and_rejects_unknown_keys():
    assert PreprocessSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_dict({**SPEC.to_dict(), "flip": True})
    with pytest.raises(ValueError, match="must not exceed"):
        PreprocessSpec(resize=32, crop=64)


def test_output_shape_dtype_and_normalization():
    white = Image.new("RGB", (100, 80), (255, 255, 255))
    array = preprocess(white, SPEC)
    assert array.shape == (3, 56, 56) and array.dtype == np.float32
    np.testing.assert_allclose(array, (1.0 - 0.5) / 0.25, rtol=1e-6)


def test_resize_keeps_aspect_ratio_and_crops_the_centre():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 50, 100))  # a red band on the far left is cropped away
    cropped = resize_and_crop(image, SPEC)
    assert cropped.size == (56, 56)
    assert np.asarray(cropped)[:, :, 0].max() == 0


@pytest.mark.parametrize("data, message", [
    (b"", "empty upload"),
    (b"definitely not an image", "not a recognised image format"),
])
def test_undecodable_bytes_raise_a_clear_error(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_truncated_image_is_refused():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 3])


def test_pixel_limit_is_checked_from_the_header():
    data = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(data, max_pixels=1_000_000)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "1"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (20, 10), (200, 30, 30)).convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I", "PA") else "PNG"
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_transparency_is_composited_on_white():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(transparent))).min() == 255


def test_sixteen_bit_greyscale_keeps_its_contrast():
    ramp = Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))
    pixels = np.asarray(decode_image(encode(ramp)))
    assert pixels.min() == 0 and pixels.max() == 255  # not clipped to white


def test_exif_orientation_is_applied():
    tall = Image.new("RGB", (20, 40), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(tall, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (40, 20)


def test_first_frame_of_an_animation_is_used():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    red, _, blue = np.asarray(decode_image(data)).mean(axis=(0, 1))
    assert red > 200 and blue < 50


def test_training_evaluation_transform_is_the_service_transform(shapes_data):
    """The model is evaluated on exactly the tensors the service and batch job will feed it."""
    from training.data import ImageFolder, find_classes

    classes = find_classes(shapes_data / "test")
    dataset = ImageFolder(shapes_data / "test", classes, SPEC, train=False)
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        tensor, _ = dataset[index]
        path, _ = dataset.samples[index]
        np.testing.assert_array_equal(tensor.numpy(), preprocess_bytes(path.read_bytes(), SPEC))


def test_checkpoint_export_and_service_share_one_spec(trained_run, exported_model):
    """The spec is written once by training and carried, unchanged, to the served model."""
    import onnxruntime as ort

    from service.inference import OnnxClassifier
    from training.checkpoint import load_checkpoint

    config = json.loads((trained_run / "config.json").read_text())
    checkpoint_spec = PreprocessSpec.from_dict(load_checkpoint(trained_run / "best.pt")["preprocessing"])
    assert (checkpoint_spec.crop, checkpoint_spec.resize) == (config["image_size"], config["resize"])
    assert OnnxClassifier(exported_model, device="cpu").info.preprocessing == checkpoint_spec
    assert ort.InferenceSession(str(exported_model)).get_inputs()[0].shape[2:] == [checkpoint_spec.crop] * 2
