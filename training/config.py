"""The training stage's one configuration object; the resolved copy is saved in every run directory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from training.clipping import CLIP_MODES
from training.precision import PRECISIONS


@dataclass(frozen=True)
class TrainConfig:
    data: str  # ImageFolder root holding train/ and val/ (test/ is evaluated at the end when present)
    out: str  # run directory: checkpoints, metrics.jsonl, config.json, plots
    arch: str = "alexnet_bn"  # a name from training.models.MODELS
    width: float = 1.0  # channel multiplier; 1.0 is the published architecture
    image_size: int = 224  # model input side (the centre crop)
    resize: int = 0  # shorter side before the crop; 0 means image_size / 0.875, as for ImageNet
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet RGB statistics
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
    rollback_skips: int = 5  # this many non-finite steps within rollback_window mean the run diverges
    rollback_window: int = 50  # steps
    rollback_loss_factor: float = 5.0  # so does a loss above this multiple of its running median; 0 turns it off
    rollback_lr_factor: float = 0.5  # after a rollback to the last good state, the learning rate is scaled by this
    max_rollbacks: int = 3  # one more divergence and training stops with an error
    snapshot_every: int = 100  # steps between in-memory copies of the last good state
    aux_weight: float = 0.3  # weight of auxiliary-head losses (Inception with aux heads)
    min_crop_scale: float = 0.5  # random-resized-crop keeps at least this fraction of the area
    layer_norms_every: int = 25  # steps between per-layer gradient norms in steps.jsonl; 0 turns them off
    plots: bool = True  # training.png, steps.png, confusion_test.png at the end; off for sweeps of many runs
    workers: int = 2  # data-loading processes; 0 loads in the training process
    seed: int = 0  # initialisation, data order and augmentation
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda"; under torchrun each process uses cuda:LOCAL_RANK
    precision: str = "auto"  # "auto" (bf16 if supported, else fp16 + loss scaling; fp32 on CPU), "fp32", "bf16", "fp16"
    channels_last: str = "auto"  # NHWC weights and images: "auto" (on CUDA only), "on", "off"
    guard: bool = True  # skip non-finite steps, roll back divergence; off only to watch a run explode (training.study)
    resume: str = ""  # a run's last.pt: go on from it (same data, arch and schedule) to `epochs`
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
        if self.resize and self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be at least image_size ({self.image_size})")

    @property
    def resize_to(self) -> int:
        return self.resize or round(self.image_size / 0.875)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
