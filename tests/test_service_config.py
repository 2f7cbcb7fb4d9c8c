"""The service's configuration and provider logic, without a server: what runs where, and why."""

from __future__ import annotations

import numpy as np
import pytest

from service.config import ServiceConfig
from service.inference import (
    CPU,
    CUDA,
    TENSORRT,
    ModelLoadError,
    OnnxClassifier,
    batch_buckets,
    cgroup_cpu_quota,
    container_cpus,
    provider_options,
    select_providers,
)
from tests.support import run_python

ALL = [TENSORRT, CUDA, CPU]


@pytest.mark.parametrize("device, available, has_gpu, tensorrt, expected", [
    ("auto", ALL, True, False, [CUDA, CPU]),
    ("auto", ALL, False, False, [CPU]),  # onnxruntime-gpu on a machine without a GPU: never try CUDA
    ("auto", [CPU], True, False, [CPU]),  # CPU-only build
    ("auto", ALL, True, True, [TENSORRT, CUDA, CPU]),
    ("auto", [CUDA, CPU], True, True, [CUDA, CPU]),  # TensorRT asked for, not built in: CUDA still
    ("cpu", ALL, True, True, [CPU]),
    ("cuda", ALL, False, False, [CUDA, CPU]),  # insists; the session's real provider is checked after
])
def test_provider_selection(device, available, has_gpu, tensorrt, expected):
    assert select_providers(device, available, has_gpu, tensorrt) == expected


def test_cuda_required_from_a_cpu_only_build_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="device 'cuda' requested but this onnxruntime offers only"):
        select_providers("cuda", [CPU], True)
    with pytest.raises(ValueError, match="device must be one of"):
        select_providers("gpu", ALL, True)


def test_cuda_options_are_the_deliberate_ones():
    (name, cuda), (cpu_name, cpu) = provider_options([CUDA, CPU])
    assert (name, cpu_name, cpu) == (CUDA, CPU, {})
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE" and cuda["arena_extend_strategy"] == "kSameAsRequested"
    trt = dict(provider_options([TENSORRT], cache_dir="/cache"))[TENSORRT]
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == "/cache"


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_cpu_sessions_use_the_container_cpus(exported_model):
    import os

    cpus = container_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert OnnxClassifier(exported_model, device="cpu").threads == cpus
    assert OnnxClassifier(exported_model, device="cpu", threads=1).threads == 1


def test_gpu_style_padding_to_buckets_gives_the_same_answers(exported_model):
    """The GPU path pads batches to warmed-up sizes; the padding must never leak into the answer."""
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32] and batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]
    model = OnnxClassifier(exported_model, device="cpu")
    crop = model.info.preprocessing.crop
    batch = np.random.default_rng(0).normal(size=(5, 3, crop, crop)).astype(np.float32)
    plain = model.predict(batch)
    model.buckets = batch_buckets(8)  # as on CUDA: 5 images run as a batch of 8
    padded = model.predict(batch)
    assert padded.shape == plain.shape
    np.testing.assert_allclose(padded, plain, atol=1e-5)


def test_config_reads_every_type_and_names_the_bad_variable():
    config = ServiceConfig.from_env({"KEEL_TENSORRT": "yes", "KEEL_REQUEST_TIMEOUT_S": "2.5", "KEEL_TOP_K": "3",
                                     "KEEL_MODEL": "m.onnx"})
    assert (config.tensorrt, config.request_timeout_s, config.top_k, config.model) == (True, 2.5, 3, "m.onnx")
    for variable, value, message in [
        ("KEEL_TOP_K", "many", "KEEL_TOP_K must be a number"),
        ("KEEL_TENSORRT", "maybe", "KEEL_TENSORRT must be true or false"),
        ("KEEL_MAX_BATCH_SIZE", "0", "KEEL_MAX_BATCH_SIZE must be positive"),
        ("KEEL_DEVICE", "gpu", "KEEL_DEVICE must be one of"),
        ("KEEL_MODELS", "a=x.onnx,b", "KEEL_MODELS entries are name=path_or_tag"),
        ("KEEL_MODELS", "a=x.onnx,a=y.onnx", "KEEL_MODELS names 'a' twice"),
        ("KEEL_MODELS", "bad/name=x.onnx", "KEEL_MODELS entries"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServiceConfig.from_env({variable: value})


def test_models_list_replaces_the_single_model():
    assert ServiceConfig(model="a.onnx").model_refs() == [(None, "a.onnx")]
    assert ServiceConfig(model="a.onnx", models="x=b.onnx, y=keel-classifier:latest").model_refs() == [
        ("x", "b.onnx"), ("y", "keel-classifier:latest")]


@pytest.mark.parametrize("options, expected", [
    ("", {"excluded_urls": "."}),  # no exporter: BentoML's spans would all be dropped, so none are made
    ("tracing.exporter_type=in_memory", {}),  # an exporter: BentoML traces every request, as it would
])
def test_requests_are_traced_only_when_an_exporter_is_configured(options, expected):
    # BentoML reads its configuration once, at import: a fresh interpreter per case
    probe = "from service.bentoml_internals import bentoml_tracing; print(repr(bentoml_tracing()))"
    result = run_python("-c", probe, env={"BENTOML_CONFIG_OPTIONS": options}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr(expected)


@pytest.mark.parametrize("costs, cpus, expected", [
    ([0.15], 2, 2),  # the 64 px quick-start model: HTTP and decoding are the cost, one worker per CPU
    ([0.15], 16, 16),
    ([9.2], 16, 1),  # the 224 px AlexNet: inference is, one worker batches for every CPU
    ([0.15, 9.2], 4, 1),  # several models: the most expensive decides
    ([], 4, 1),
])
def test_worker_count_follows_what_inference_costs(costs, cpus, expected):
    from service.workers import auto_workers

    assert auto_workers(costs, cpus) == expected


@pytest.mark.parametrize("workers, cpus, on_loop", [
    (2, 2, True),  # the cheap model's default: a CPU per worker, nothing for a decode thread to run on
    (1, 1, True),
    (4, 2, True),
    (1, 16, False),  # one worker with every CPU: threads decode in parallel beside inference
    (2, 4, False),
])
def test_workers_decode_on_their_event_loop_only_without_spare_cpus(workers, cpus, on_loop):
    from service.workers import decode_on_loop

    assert decode_on_loop(workers, cpus) is on_loop


def test_workers_must_not_be_negative():
    assert ServiceConfig.from_env({}).workers == 0  # chosen at start-up
    with pytest.raises(ValueError, match="KEEL_WORKERS"):
        ServiceConfig.from_env({"KEEL_WORKERS": "-1"})


def test_batch_job_settings(tmp_path):
    assert ServiceConfig.from_env({"KEEL_BATCH_ROOT": str(tmp_path), "KEEL_JOB_MAX_IMAGES": "7"}) == \
        ServiceConfig(batch_root=str(tmp_path), job_max_images=7)
    for env, message in (({"KEEL_BATCH_ROOT": str(tmp_path / "nope")}, "is not a folder"),
                         ({"KEEL_JOB_MAX_IMAGES": "many"}, "KEEL_JOB_MAX_IMAGES must be a number"),
                         ({"KEEL_JOB_MAX_IMAGES": "0"}, "KEEL_JOB_MAX_IMAGES must be positive")):
        with pytest.raises(ValueError, match=message):
            ServiceConfig.from_env(env)
