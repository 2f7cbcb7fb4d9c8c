"""The training stage's one configuration object; the resolved copy is saved in every run directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from training.augment import ImageAugment
from training.clipping import CLIP_MODES
from training.precision import PRECISIONS

DEFAULT_IMAGE_SIZE = 224  # image_size when neither the config nor the initial weights name one


@dataclass(frozen=True)
class TrainConfig:
    data: str  # ImageFolder root holding train/ and val/ (test/ is evaluated at the end when present)
    out: str  # run directory: checkpoints, metrics.jsonl, config.json, plots
    arch: str = "alexnet_bn"  # a name from training.models.MODELS
    width: float = 1.0  # channel multiplier; 1.0 is the published architecture
    image_size: int = 0  # model input side (the centre crop); 0: the initial weights' (Inception-v3: 299), else 224
    resize: int = 0  # shorter side before the crop; 0: the initial weights', else image_size / 0.875 as for ImageNet
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB statistics, or the initial weights'
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # divides each channel after the mean
    epochs: int = 30  # passes over the training split
    batch_size: int = 64  # images per optimizer step
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    lr: float = 0.05  # peak learning rate, reached after the warmup
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4  # never applied to batch-norm parameters or biases
    warmup_epochs: float = 1.0  # linear warmup to lr, then the schedule
    schedule: str = "cosine"  # "cosine" (decay to zero at the end) or "step" (times step_gamma every step_epochs)
    step_epochs: float = 30.0  # "step" schedule: epochs between decays
    step_gamma: float = 0.1  # "step" schedule: factor applied at each decay
    label_smoothing: float = 0.1  # share of the target probability spread over all classes
    clip: str = "norm"  # gradient clipping: "norm" (global L2), "value" (per element), "agc" (unit-wise), "none"
    clip_threshold: float = 2.0  # max global norm ("norm"), max |g| ("value"), max |g|/|w| per unit ("agc": ~0.01-0.16)
    rollback_skips: int = 5  # this many skipped steps within rollback_window mean the run diverges
    rollback_window: int = 50  # steps
    rollback_loss_factor: float = 5.0  # so does a loss above this multiple of its running median; 0 turns it off
    rollback_lr_factor: float = 0.5  # after a rollback to the last good state, the learning rate is scaled by this
    max_rollbacks: int = 3  # one more divergence and training stops with an error
    snapshot_every: int = 100  # steps between in-memory copies of the last good state
    aux_weight: float = 0.3  # weight of auxiliary-head losses (Inception with aux heads)
    min_crop_scale: float = 0.5  # random-resized-crop keeps at least this fraction of the area
    max_crop_scale: float = 1.0  # ... and at most this one (torchvision's RandomResizedCrop scale=(min, max))
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    auto_augment: str = ""  # "ta_wide" (TrivialAugmentWide), "ra" (RandAugment) or "" (none)
    ra_num_ops: int = 2  # RandAugment: ops per image
    ra_magnitude: int = 9  # RandAugment: magnitude bin, 0-30 (at 0 every op that has a magnitude is the identity)
    random_erase: float = 0.0  # probability of erasing a random box of each training image (to the mean colour)
    mixup_alpha: float = 0.0  # mixup: Beta(alpha, alpha) blend of image pairs and their labels; 0 turns it off
    cutmix_alpha: float = 0.0  # cutmix: a box pasted from another image; with mixup too, each batch picks one
    ema_decay: float = 0.0  # exponential moving average of the weights, evaluated each epoch; 0 turns it off
    best_weights: str = "either"  # with ema_decay: best.pt holds the "model", the "ema", or "either" (better val_acc)
    bad_images: str = "skip"  # an unreadable image: "skip" (logged in skipped.jsonl, run goes on) or "fail"
    layer_norms_every: int = 25  # steps between per-layer gradient norms in steps.jsonl; 0 turns them off
    plots: bool = True  # training.png, steps.png, confusion_test.png at the end; off for sweeps of many runs
    workers: int = -1  # data-loading processes; -1: one per CPU the process may use; 0: in the training process
    seed: int = 0  # initialisation, data order and augmentation
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda"; under torchrun each process uses cuda:LOCAL_RANK
    precision: str = "auto"  # "auto" (bf16 if supported, else fp16 + loss scaling; fp32 on CPU), "fp32", "bf16", "fp16"
    channels_last: str = "auto"  # NHWC weights and images: "auto" (on CUDA only), "on", "off"
    deterministic: bool = False  # CUDA: deterministic kernels, no cuDNN autotuning (bit-identical reruns, slower)
    guard: bool = True  # skip non-finite steps, roll back divergence; off only to watch a run explode (training.study)
    resume: str = ""  # a run's last.pt: go on from it (same data, arch and schedule) to `epochs`
    init_from: str = ""  # initial weights: a torchvision state dict or a Keel checkpoint of this arch (see README)
    trainable_from: str = ""  # freeze every layer before this one (e.g. inception4e, features.conv4, fc); "": none
    head_lr_scale: float = 1.0  # learning-rate multiplier for the classifier layers (e.g. 10 for a new head)
    model_args: dict = field(default_factory=dict)  # extra builder arguments, e.g. {"aux_logits": True}

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', not {self.optimizer!r}")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', not {self.schedule!r}")
        if self.clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {', '.join(CLIP_MODES)}, not {self.clip!r}")
        if self.clip != "none" and not self.clip_threshold > 0:
            raise ValueError(f"clip_threshold must be positive, not {self.clip_threshold}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.channels_last not in ("auto", "on", "off"):
            raise ValueError(f"channels_last must be 'auto', 'on' or 'off', not {self.channels_last!r}")
        if self.image_size < 0 or self.resize < 0:
            raise ValueError("image_size and resize must not be negative (0: automatic)")
        if not self.head_lr_scale > 0:
            raise ValueError(f"head_lr_scale must be positive, not {self.head_lr_scale}")
        self.image_augment()  # checks the crop scales, auto_augment, ra_magnitude and color_jitter
        if not 0 <= self.random_erase <= 1 or self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("random_erase must be a probability and mixup_alpha, cutmix_alpha non-negative")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), not {self.ema_decay}")
        if self.best_weights not in ("model", "ema", "either"):
            raise ValueError(f"best_weights must be 'model', 'ema' or 'either', not {self.best_weights!r}")
        if self.bad_images not in ("skip", "fail"):
            raise ValueError(f"bad_images must be 'skip' or 'fail', not {self.bad_images!r}")
        if self.resize and self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be at least image_size ({self.image_size})")

    def image_augment(self) -> ImageAugment:
        """The per-image training transform these fields describe (training/augment.py)."""
        return ImageAugment(crop=self.image_size, scale=(self.min_crop_scale, self.max_crop_scale),
                            color_jitter=self.color_jitter, auto_augment=self.auto_augment,
                            ra_num_ops=self.ra_num_ops, ra_magnitude=self.ra_magnitude)

    @property
    def resize_to(self) -> int:
        return self.resize or round((self.image_size or DEFAULT_IMAGE_SIZE) / 0.875)

    def to_dict(self) -> dict:
        return asdict(self)
