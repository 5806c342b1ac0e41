"""Reading a user's digits and masks, for the `ppl-models` commands and from Python: digits from
image files, .npy arrays or the run's own data set (``test:0-15``), and masks of observed pixels
(``top``, ``random:0.5``, or a mask image)."""

import re
from pathlib import Path

import numpy as np
import torch

from .config import SettingError
from .data import DataError, binarization_of, binarize_new, load_dataset

SPLIT_DIGITS = re.compile(r"^(?P<split>[a-z]+):(?P<indices>[0-9][0-9,\-]*)$")


def read_digits(specs, model, log=print, download=True):
    """Read digits for `model` to use, as the ``ppl-models`` commands do.

    Example::

        model = ppl_models.load("figures/vae")
        x, names = ppl_models.read_digits(["my_digit.png"], model)
        filled = model.fill_in(x, "top", method="nuts")   # its bottom half, from its top half

    Args:
        specs: a list (or one) of image files (PNG, JPEG, ...; any size, made 28 x 28 grayscale, inverted if
            dark on light), ``.npy`` arrays ((D,), (N, D), (28, 28) or (N, 28, 28); 0/1 values as
            they are, grayscale binarized as the run's data were), or ``split:indices`` of the run's
            own data set (``test:0-15``, ``test:3,7``).
        model: the `ppl_models.trained.TrainedModel` the digits are for (its data set and binarization).
        log: where notes go (an image that was inverted, grayscale that was binarized).
        download: fetch the run's data set if it is missing (for ``split:indices``).

    Returns:
        (digits, names): an (N, D) float tensor of 0/1 values, and a name for each digit
        (``"my_digit.png"``, ``"test:3"``, ``"digits.npy[2]"``).

    Raises:
        ppl_models.data.DataError: a missing or unreadable file, an array of the wrong shape, a split
            the run's data set does not have.
        ppl_models.config.SettingError: no specs; ``split:indices`` past the split's end, or malformed.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]  # one file
    if not specs:
        raise SettingError("no digits to read: give image files, .npy arrays or split:indices, e.g. ['test:0-15']")
    digits, names = [], []
    for spec in map(str, specs):
        match = SPLIT_DIGITS.match(spec)
        if match and not Path(spec).exists():
            x, indices = split_digits(model, match["split"], match["indices"], download)
            digits.append(x)
            names += [f"{match['split']}:{i}" for i in indices]
        elif Path(spec).suffix.lower() == ".npy":
            x = npy_digits(spec, model, log)
            digits.append(x)
            names += [spec] if len(x) == 1 else [f"{spec}[{i}]" for i in range(len(x))]
        else:
            digits.append(image_digit(spec, model, log))
            names.append(spec)
    return torch.cat(digits), names


def split_digits(model, split, text, download):
    indices = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (last and int(last) < int(first)):
            raise SettingError(f"{split}:{text}: give digit indices as 0-15 or 3,7,9")
        indices += range(int(first), int(last or first) + 1)
    cfg = model.cfg
    data = load_dataset(cfg.dataset, binarize=cfg.binarize, data_dir=cfg.data_dir, seed=cfg.seed, download=download,
                        progress=False)
    x = data.binary(split)
    if max(indices) >= len(x):
        raise SettingError(f"{split}:{text}: the {split} split of {cfg.dataset} has {len(x):,} digits (0-{len(x) - 1})")
    return x[indices], indices


def npy_digits(path, model, log):
    """An array of digits: (D,), (N, D), (28, 28) or (N, 28, 28); 0/1 values are taken as they are,
    grayscale (0..255, or 0..1 floats) is binarized as the run's data were."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as a .npy array ({type(error).__name__}: {error})") from None
    real = array.dtype == bool or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if not real or not array.size or not (np.isfinite(array).all() and 0 <= array.min() and array.max() <= 255):
        raise DataError(f"{path} holds {array.dtype} values of shape {array.shape}: give digits as 0/1 or grayscale "
                        "(0..255, or 0..1) numbers")
    x = torch.as_tensor(array.astype(np.float32))
    if not ((x == 0) | (x == 1)).all():
        log(f"{path}: grayscale values, binarized as the run's data were ({binarization(model)})")
        x = binarize_new((x / 255 if x.max() > 1 else x).clamp(0, 1), binarization(model), model.cfg.seed)
    try:
        return model.digits(x)
    except SettingError as error:
        raise DataError(f"{path}: {error}") from None


def image_digit(path, model, log):
    """One digit from an image file of any size: grayscale, resized to 28 x 28, inverted if it is
    dark on light (the training digits are light on dark), binarized as the run's data were."""
    x = read_gray(path, "LANCZOS").flatten()
    if x.shape[-1] != model.family.num_pixels:
        raise DataError(f"{path}: this model's digits have {model.family.num_pixels} pixels, not 28 x 28")
    border = x.reshape(28, 28)[[0, -1]].mean() / 2 + x.reshape(28, 28)[:, [0, -1]].mean() / 2
    if border > 0.5:
        x = 1 - x
        log(f"{path}: dark on light, inverted to the training data's light on dark")
    return binarize_new(x[None], binarization(model), model.cfg.seed)


def read_gray(path, resample):
    """An image file as (28, 28) grayscale intensities in [0, 1], resized by PIL's `resample` filter."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if min(image.size) < 8:
                raise DataError(f"{path} is {image.size[0]} x {image.size[1]} pixels: too small to hold a digit")
            gray = image.convert("L").resize((28, 28), getattr(Image.Resampling, resample))
    except FileNotFoundError:
        raise DataError(f"no file {path}: give image files, .npy arrays, or digits of the run's data like test:0-15") \
            from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read {path} as an image ({type(error).__name__}); give a PNG or JPEG") from None
    return torch.as_tensor(np.asarray(gray, dtype=np.float32) / 255)


def binarization(model):
    return binarization_of(model.cfg.dataset, model.cfg.binarize)


def read_mask(spec, shape):
    """What the queries take as ``observed`` from the command line's ``--observe``: a mask image
    (white = observed) as a boolean tensor of `shape` (N, D), or a name (top, bottom, left, right,
    random:F; see `ppl_models.masks.observe`) as it is, which the query turns into its mask (a
    random one drawn from the query's seed)."""
    if Path(spec).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif"):
        return (read_gray(spec, "NEAREST") > 0.5).flatten().expand(shape)
    return spec
