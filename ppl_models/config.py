"""A run's settings (`Config`) and how a bad one is refused (`SettingError`).

Library errors name settings as Python does, in backquotes: `lr`, `guide='bernoulli'`, `jit=True`.
The command line says the same with its flags (`as_flags`): --lr, --guide bernoulli, --jit.
"""

import math
import re
from dataclasses import dataclass, field

import torch

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
}


class SettingError(ValueError):
    """A setting that cannot work, named as a parameter (`name` or `name=value` in backquotes)."""


def flag(setting: str) -> str:
    """The command-line flag of a setting: batch_size -> --batch-size, n -> -n."""
    return ("-" if len(setting) == 1 else "--") + setting.replace("_", "-")


def as_flags(message: str) -> str:
    """A library message in command-line words: ``batch_size`` -> --batch-size, ``guide='enum'`` ->
    --guide enum, ``jit=True`` -> --jit, ``compile=False`` -> --compile off. Text outside backquotes
    is left as it is.

    >>> as_flags("`batch_size` must be a positive integer; use `guide='bernoulli'` or drop `jit=True`")
    '--batch-size must be a positive integer; use --guide bernoulli or drop --jit'
    """
    def in_flags(match):
        value = match["value"]
        if value is None or value == "True":
            return flag(match["name"])
        if value == "False":
            return f"{flag(match['name'])} off"
        return f"{flag(match['name'])} {value.strip(chr(39))}"

    return re.sub(r"`(?P<name>[a-z][a-z0-9_]*)(?:=(?P<value>[^`]*))?`", in_flags, message)


def positive(value) -> bool:
    """True for a positive finite number (NaN and infinity are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def positive_int(value) -> bool:
    """True for a positive integer (not 2.5, "3" or True)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


MAX_LR = 1e6  # past this a step overflows float32 (1e308 as an optimizer's rate) or diverges at once
MAX_IWAE_SAMPLES = 10**6  # k of an iwae-k estimate: days of computing past this on a test set


@dataclass
class Config:
    """A run's settings: what ``ppl-models train``'s flags set (``--batch-size`` is ``batch_size``),
    saved as the run's config.json. `validate` refuses a setting that cannot work with a
    `SettingError`; a family's own settings (``components``, ``latents``, ``z_dim``, ...) are in
    ``model_args`` and checked by the family. The defaults here are the seed mixture's; the CLI
    starts from each family's ``training_defaults`` instead (the VAE's: Adam, lr 1e-3, 5 epochs).

    Attributes:
        model: a registered family's name (``mixture``, ``sbn``, ``vae``).
        guide: one of its guides (``enum``, ``sampled``; ``bernoulli``, ``relaxed``; ``normal``, ...).
        elbo: the training objective where the family offers a choice; None: the guide's own.
        particles: samples of the latents per digit in the objective (k of ``elbo='iwae'``).
        dataset: ``mnist``, ``binarized-mnist`` or ``fashion-mnist`` (`ppl_models.data.load_dataset`).
        binarize: how grayscale data is made binary: ``threshold``, ``dynamic`` or ``static``.
        data_dir: a folder looked in first for the data files.
        model_args: the family's hyperparameters.
        optimizer: ``adam``, ``rmsprop``, ``sgd`` or ``adagrad``, one over the whole param store.
        lr: its learning rate.
        batch_size: digits per step.
        epochs: passes over the training digits.
        seed: seed of initialisation, batches and every draw.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        jit: Pyro's JIT ELBOs (TorchScript, deprecated: use ``compile``).
        compile: compile the training step and evaluation: True, False or ``"auto"`` (where it pays).
        detect_anomaly: autograd's anomaly detection, to find the operation that made a NaN.
        eval_every: steps between two points of the learning curves.
        eval_digits: the fixed random digits of each split the learning curves are computed on.
        eval_samples: k of the final iwae-k test estimate; 0: none; None: 1000 where the model has no
            exact log-likelihood, none where it has.
        train_subset: train on the first N training digits only.
        patience: early stopping after this many epochs without a better validation score.
    """

    model: str  # a registered family's name
    guide: str  # one of its guides
    elbo: str | None = None  # None: the ELBO the guide calls for
    particles: int = 1
    dataset: str = "mnist"
    binarize: str = "threshold"
    data_dir: str | None = None
    model_args: dict = field(default_factory=dict)  # the model family's own hyperparameters
    optimizer: str = "rmsprop"
    lr: float = 0.01
    batch_size: int = 100
    epochs: int = 20
    seed: int = 0
    device: str = "cpu"
    jit: bool = False
    # compile the training step (and evaluation) with torch.compile: True, False, or "auto" (when the
    # run is long enough to repay the compile time and the guide can be compiled; `train.compile_decision`)
    compile: bool | str = "auto"
    detect_anomaly: bool = False
    eval_every: int = 200
    eval_digits: int = 1000
    # k of the final iwae-k estimate of test log p(x); 0: none; None: AUTO_EVAL_SAMPLES where the model
    # has no exact log-likelihood, none where it has (then iwae-k would only check the exact number)
    eval_samples: int | None = None
    train_subset: int | None = None
    patience: int | None = None  # early stopping: epochs without a better validation score before stopping

    def validate(self):
        optional = {"train_subset": self.train_subset, "patience": self.patience}
        counts = {"batch_size": self.batch_size, "epochs": self.epochs, "eval_every": self.eval_every,
                  "eval_digits": self.eval_digits, "particles": self.particles,
                  **{name: value for name, value in optional.items() if value is not None}}
        for name, value in counts.items():
            if not positive_int(value):
                raise SettingError(f"`{name}` must be a positive integer, got {value!r}")
        eval_samples = 0 if self.eval_samples is None else self.eval_samples
        checks = [
            (self.optimizer in OPTIMIZERS, f"`optimizer` must be one of {', '.join(OPTIMIZERS)}"),
            (positive(self.lr), f"`lr` must be a positive number, got {self.lr!r}"),
            (not positive(self.lr) or self.lr <= MAX_LR, f"`lr={self.lr}` is past {MAX_LR:g}, where a step overflows "
             "or diverges at once; rates of 1e-4 to 1e-1 train these models"),
            (eval_samples == 0 or positive_int(eval_samples), "`eval_samples` must be 0 (none) or a positive integer, "
                                                              f"got {self.eval_samples!r}"),
            (not positive_int(eval_samples) or eval_samples <= MAX_IWAE_SAMPLES,
             f"`eval_samples={self.eval_samples}`: at most {MAX_IWAE_SAMPLES:,} (days of computing past that)"),
            (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63,
             f"`seed` must be an integer from 0 to 2**63 - 1, got {self.seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingError(message)
        check_compile_setting(self.compile)
        resolve_device(self.device)


def resolve_device(name):
    """The device `name` asks for, checked: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` of a GPU PyTorch
    sees, or ``"auto"`` (a GPU if PyTorch sees one, else the CPU), which is resolved.

    >>> resolve_device("meta")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ppl_models.config.SettingError: `device='meta'`: ppl_models runs on cpu or cuda, not meta; use ...
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SettingError(f"`device={name!r}` is not a device; use `device='cpu'`, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise SettingError(f"`device={name!r}`: ppl_models runs on cpu or cuda, not {device.type}; use `device='cpu'`, "
                           "cuda, cuda:N or auto")
    gpus = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    if device.type == "cuda" and not gpus:
        raise SettingError(f"`device={name!r}` was asked for but PyTorch sees no CUDA GPU; use `device='cpu'` "
                           "(or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise SettingError(f"`device={name!r}`: PyTorch sees {gpus} GPU{'s' if gpus > 1 else ''} (cuda:0 to "
                           f"cuda:{gpus - 1}); choose one of them, or `device='cuda'`")
    return name


AUTO_EVAL_SAMPLES = 1000  # the k of `eval_samples=None` for a model without an exact log-likelihood
COMPILE_SETTINGS = (True, False, "auto")  # `compile=`: always, never, where it pays (docs/compiling.md)


def check_compile_setting(value):
    if value not in COMPILE_SETTINGS:
        raise SettingError(f"`compile` must be True, False or 'auto', got {value!r}")


def steps_per_epoch(cfg, data):
    """SVI steps in an epoch: the last partial batch is dropped (fixed shapes for `jit` and `compile`)."""
    return (cfg.train_subset or len(data.images["train"])) // cfg.batch_size
