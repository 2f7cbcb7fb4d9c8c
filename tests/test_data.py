"""The training input pipeline (training/data.py): seeded per sample, persistent workers, uint8 to the device,
unreadable images replaced or left out and logged."""

from __future__ import annotations

import json

import pytest
import torch

from service.preprocessing import PreprocessSpec
from training.augment import ImageAugment
from training.data import (
    DeviceBatches,
    EpochSampler,
    ImageFolder,
    PixelNormalizer,
    UnreadableImageError,
    UnreadableImages,
    find_classes,
    make_loader,
    normalize_batch,
    pixel_table,
)

SPEC = PreprocessSpec(resize=64, crop=64)
AUGMENT = ImageAugment(48, (0.5, 1.0), color_jitter=(0.3, 0.3, 0.3, 0.05), auto_augment="ta_wide")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from training.shapes import ShapesConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("tiny") / "shapes",
                            ShapesConfig(size=64, train_per_class=6, val_per_class=2, test_per_class=0), progress=False)


def train_set(root, augment=AUGMENT) -> ImageFolder:
    return ImageFolder(root / "train", find_classes(root / "train"), SPEC, augment)


def keys(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_the_sampler_orders_by_seed_and_epoch_and_splits_among_processes():
    sampler = EpochSampler(103, seed=5)
    first = keys(sampler, 1)
    assert first == keys(EpochSampler(103, seed=5), 1)  # a function of (seed, epoch): nothing else
    assert sorted(index for index, _ in first) == list(range(103))
    assert first != keys(sampler, 2) and first != keys(EpochSampler(103, seed=6), 1)
    ranks = [keys(EpochSampler(103, seed=5, rank=rank, world=3), 1) for rank in range(3)]
    assert [len(part) for part in ranks] == [34, 34, 34]  # the tail that does not divide is dropped
    assert sorted(key for part in ranks for key in part) == sorted(first[:102])


def test_a_training_sample_is_a_function_of_its_key(tiny_data):
    dataset = train_set(tiny_data)
    image, target, unreadable = dataset[(7, 1234)]
    assert image.shape == (48, 48, 3) and image.dtype == torch.uint8 and unreadable == []
    assert torch.equal(image, dataset[(7, 1234)][0]) and target == dataset.samples[7][1]
    assert not torch.equal(image, dataset[(7, 1235)][0])


def batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return [(images, targets) for images, targets, _ in loader]


def test_persistent_workers_give_a_resumed_epoch_the_batches_of_an_uninterrupted_run(tiny_data):
    """Workers that ran epochs 1 and 2 produce epoch 3 exactly as fresh workers started at epoch 3 do."""
    dataset = train_set(tiny_data)
    running = make_loader(dataset, 8, 2, EpochSampler(len(dataset), seed=3))
    assert running.persistent_workers and running.num_workers == 2
    batches(running, 1)
    second = batches(running, 2)
    third = batches(running, 3)
    resumed = batches(make_loader(dataset, 8, 2, EpochSampler(len(dataset), seed=3)), 3)
    assert len(third) == len(resumed) == 60 // 8  # the last, partial batch is dropped in training
    for (a, y), (b, z) in zip(third, resumed):
        assert torch.equal(a, b) and torch.equal(y, z)
    assert not torch.equal(second[0][0], third[0][0])
    in_process = batches(make_loader(dataset, 8, 0, EpochSampler(len(dataset), seed=3)), 3)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(third, in_process))  # workers or not, the same


def test_the_workers_default_to_the_cpus_this_process_may_use(tiny_data, monkeypatch):
    from service.inference import container_cpus

    assert make_loader(train_set(tiny_data), 8, -1).num_workers == container_cpus()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * container_cpus()))  # torchrun: shared among processes
    assert make_loader(train_set(tiny_data), 8, -1).num_workers == 1


@pytest.fixture
def damaged(tiny_data, tmp_path):
    """The tiny data set with an unreadable file in train/ (garbage) and val/ (a truncated PNG)."""
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(tiny_data, root)
    (root / "train" / "circle" / "00002.png").write_bytes(b"not an image at all")
    good = (root / "val" / "star" / "00000.png").read_bytes()
    (root / "val" / "star" / "00000.png").write_bytes(good[: len(good) // 3])
    return root


def test_an_unreadable_training_image_is_replaced_by_the_next_and_batches_keep_their_size(damaged):
    dataset = train_set(damaged)
    bad = next(i for i, (path, _) in enumerate(dataset.samples) if path.name == "00002.png" and "circle" in str(path))
    image, target, unreadable = dataset[(bad, 99)]
    assert unreadable == [(str(dataset.samples[bad][0]), "not a recognised image format (UnidentifiedImageError)")]
    substitute, _, _ = dataset[(bad + 1, 99)]  # the next file in the data set, with the bad one's seed
    assert torch.equal(image, substitute) and target == dataset.samples[bad + 1][1]
    loader = make_loader(dataset, 6, 0, EpochSampler(len(dataset), seed=0))
    loader.sampler.set_epoch(1)
    sizes, reported = [], []
    for images, _, records in loader:
        sizes.append(len(images))
        reported += records
    assert sizes == [6] * 10 and len(reported) == 1


def test_an_unreadable_evaluation_image_is_left_out_and_logged_once(damaged, tmp_path):
    classes = find_classes(damaged / "val")
    log = tmp_path / "skipped.jsonl"
    unreadable = UnreadableImages("skip", log)
    val = DeviceBatches(make_loader(ImageFolder(damaged / "val", classes, SPEC), 8, 0), SPEC,
                        torch.device("cpu"), unreadable, "val")
    for epoch in (1, 2):
        assert sum(len(targets) for _, targets in val) == 19  # 20 images, one left out
        assert unreadable.end_epoch(epoch) == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 1 and records[0]["split"] == "val" and records[0]["epoch"] == 1
    assert records[0]["path"].endswith("val/star/00000.png") and "truncated" in records[0]["error"]
    resumed = UnreadableImages("skip", log, resume=True)  # a resumed run keeps the log and does not repeat it
    resumed.add("val", [(records[0]["path"], "again")])
    assert resumed.end_epoch(3) == 1 and len(log.read_text().splitlines()) == 1
    assert UnreadableImages("skip", log).seen == set() and log.read_text() == ""  # a new run starts it afresh


def test_under_fail_the_first_unreadable_image_stops_with_its_path():
    with pytest.raises(UnreadableImageError, match=r"^/data/train/a/1.jpg: corrupt"):
        UnreadableImages("fail", None).add("train", [("/data/train/a/1.jpg", "corrupt or truncated JPEG image")])


def test_normalisation_on_the_device_keeps_the_layout_asked_for():
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    table = pixel_table(SPEC)
    plain, nhwc = normalize_batch(images, table), normalize_batch(images, table, channels_last=True)
    assert plain.shape == nhwc.shape == (4, 3, 16, 16) and plain.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, nhwc)
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    assert torch.allclose(plain, (images.permute(0, 3, 1, 2).float() / 255 - mean) / std, atol=1e-6)


@pytest.mark.parametrize("spec", [SPEC, PreprocessSpec(resize=80, crop=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))])
def test_the_normaliser_computes_the_tables_values_in_either_layout(spec):
    """PixelNormalizer's arithmetic (the fast path) is bit for bit the service's normalisation, which the
    table holds, for every byte of every channel; on the CPU it takes the fast path."""
    normalizer = PixelNormalizer(spec)
    assert normalizer.arithmetic
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    table = pixel_table(spec)
    for channels_last in (False, True):
        fast = normalizer(images, channels_last)
        assert torch.equal(fast, normalize_batch(images, table, channels_last))
        assert fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
