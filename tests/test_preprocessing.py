"""The one image pipeline: decoding every kind of upload, and agreement between its users."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.data_loading import photo  # a photograph stand-in, shared with the benchmark
from service.preprocessing import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    find_images,
    preprocess,
    preprocess_bytes,
    resize_and_crop,
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


@pytest.mark.parametrize("mode, fmt", [
    ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("PA", "TIFF"), ("RGBA", "PNG"), ("CMYK", "TIFF"), ("I;16", "PNG"),
    ("I", "TIFF"), ("F", "TIFF"), ("1", "PNG"), ("LAB", "TIFF"), ("YCbCr", "TIFF"), ("RGBA", "WEBP"),
    ("CMYK", "JPEG"), ("L", "JPEG"), ("P", "GIF"), ("RGB", "BMP"),
])
def test_every_mode_becomes_the_right_rgb(mode, fmt):
    """Each mode, from a file format that stores it, decodes to RGB close to the original colour
    (greyscale and 1-bit modes to its grey, palettes to their nearest entry)."""
    colour = (200, 30, 30)
    original = Image.new("RGB", (20, 10), colour)
    image = original.convert(mode)
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)
    expected = np.asarray(image.convert("RGB") if mode not in ("I;16", "I", "F")
                          else original.convert("L").convert("RGB"), dtype=float)
    tolerance = 8 if fmt in ("JPEG", "WEBP") or mode in ("LAB", "YCbCr") else 1
    assert np.abs(np.asarray(decoded, dtype=float) - expected).max() <= tolerance, (mode, fmt)


def test_float_images_in_unit_range_are_scaled_not_black():
    ramp = Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    pixels = np.asarray(decode_image(encode(ramp, "TIFF")))
    assert pixels.min() == 0 and pixels.max() == 255


def test_palette_transparency_is_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert np.asarray(decode_image(encode(image, "GIF", transparency=0))).min() == 255
    assert np.asarray(decode_image(encode(image, "PNG", transparency=0))).min() == 255


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
    from training.data import ImageFolder, collate, find_classes, normalize_batch, pixel_table

    classes = find_classes(shapes_data / "test")
    dataset = ImageFolder(shapes_data / "test", classes, SPEC)
    indices = (0, len(dataset) // 2, len(dataset) - 1)
    pixels, _, _ = collate([dataset[index] for index in indices])  # uint8, as the loader's workers hand it over
    tensors = normalize_batch(pixels, pixel_table(SPEC))  # as the training process makes it, on the device
    for tensor, index in zip(tensors, indices):
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


# The stated tolerance of the reduced JPEG decode (KEEL_JPEG_DRAFT, on by default), in 8-bit
# levels of the model input before normalization: mean |difference| under 1 level and no pixel
# off by more than 8, against a full decode. Measured: mean 0.2-0.4, max 1-6 on these sizes.
DRAFT_MEAN_LEVELS, DRAFT_MAX_LEVELS = 1.0, 8.0


@pytest.mark.parametrize("size, spec", [
    ((1920, 1080), PreprocessSpec()),  # a phone photo for an ImageNet-sized model: decoded at 1/2
    ((4000, 3000), PreprocessSpec()),  # a 12 MP camera image: 1/4
    ((1024, 768), PreprocessSpec(resize=64, crop=64)),  # the shapes models' input: 1/4
])
def test_reduced_jpeg_decode_stays_within_the_stated_tolerance(size, spec):
    data = encode(photo(*size, seed=size[0]), "JPEG", quality=90)
    full, draft = preprocess_bytes(data, spec), preprocess_bytes(data, spec, draft=True)
    levels = np.abs(full - draft) * np.asarray(spec.std, np.float32)[:, None, None] * 255
    assert 0 < levels.mean() <= DRAFT_MEAN_LEVELS and levels.max() <= DRAFT_MAX_LEVELS


def test_reduced_decode_leaves_small_jpegs_and_other_formats_exact():
    spec = PreprocessSpec()
    small = encode(photo(800, 600, seed=1), "JPEG", quality=90)  # under 2 x 2 x resize: full decode
    png = encode(photo(2400, 1600, seed=2), "PNG")
    for data in (small, png):
        np.testing.assert_array_equal(preprocess_bytes(data, spec, draft=True), preprocess_bytes(data, spec))


def test_reduced_decode_keeps_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(1200, 600, seed=3), "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(data, draft_to=64).size[1] > decode_image(data, draft_to=64).size[0]  # upright: tall


def test_reduced_decode_does_not_change_the_model_answer(shapes_data, exported_model):
    """The served model's probabilities on large JPEGs of the test shapes barely move under draft."""
    from service.inference import OnnxClassifier

    model = OnnxClassifier(exported_model, device="cpu")
    spec = model.info.preprocessing
    images = find_images(shapes_data / "test")[::25]
    uploads = [encode(Image.open(path).convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC), "JPEG",
                      quality=90) for path in images]
    full = model.predict(np.stack([preprocess_bytes(data, spec) for data in uploads]))
    draft = model.predict(np.stack([preprocess_bytes(data, spec, draft=True) for data in uploads]))
    assert (full.argmax(1) == draft.argmax(1)).all()
    assert np.abs(full - draft).max() < 0.05
