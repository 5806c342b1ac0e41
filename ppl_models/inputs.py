"""Reading a user's digits and masks, for the `ppl-models` commands and from Python: digits from
image files, .npy arrays or the run's own data set (``test:0-15``), and masks of observed pixels
(``top``, ``random:0.5``, or a mask image)."""

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import SettingError
from .data import DataError, binarization_of, binarize_new, load_dataset

SPLIT_DIGITS = re.compile(r"^(?P<split>[a-z]+):(?P<indices>[0-9][0-9,\-]*)$")
MAX_DIGITS = 1_000_000  # digits read from one .npy or split:indices: 3 GB of float32 pixels
MAX_MEGAPIXELS = 80  # images over it are refused: well above a 48-megapixel photo, under Pillow's bomb warning (89.5)
# Pillow modes of more than 8 bits a pixel, and the value each reads as white (what a 16-bit PNG or TIFF
# holds, 0..1 floats): Pillow's convert("L") would clip them at 255 rather than scale them.
FULL_SCALE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_digits(specs, model, log=print, download=True):
    """Read digits for `model` to use, as the ``ppl-models`` commands do.

    Example::

        model = ppl_models.load("figures/vae")
        x, names = ppl_models.read_digits(["my_digit.png"], model)
        filled = model.fill_in(x, "top", method="nuts")   # its bottom half, from its top half

    Args:
        specs: a list (or one) of image files (PNG, JPEG, TIFF, ...; any size up to 80 megapixels, one
            frame; read as a viewer shows them: transparency over a background the strokes stand out
            from, 16-bit and float pixels scaled, EXIF rotation applied; then contrast stretched, made
            28 x 28 grayscale, inverted if dark on light), ``.npy`` arrays ((D,), (N, D), (28, 28) or
            (N, 28, 28); 0/1 values as they are, grayscale binarized as the run's data were), or
            ``split:indices`` of the run's own data set (``test:0-15``, ``test:3,7``).
        model: the `ppl_models.trained.TrainedModel` the digits are for (its data set and binarization).
        log: where notes go (an image that was inverted, grayscale that was binarized).
        download: fetch the run's data set if it is missing (for ``split:indices``).

    Returns:
        (digits, names): an (N, D) float tensor of 0/1 values, and a name for each digit
        (``"my_digit.png"``, ``"test:3"``, ``"digits.npy[2]"``).

    Raises:
        ppl_models.data.DataError: a missing or unreadable file, an array of the wrong shape, a split
            the run's data set does not have; an image of several frames, over 80 megapixels or
            transparent all over; a .npy whose header claims more than the file holds, or over
            1,000,000 digits.
        ppl_models.config.SettingError: no specs; ``split:indices`` past the split's end, malformed,
            or naming over 1,000,000 digits.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]  # one file
    if not specs:
        raise SettingError("no digits to read: give image files, .npy arrays or split:indices, e.g. ['test:0-15']")
    digits, names = [], []
    for spec in map(str, specs):
        match = SPLIT_DIGITS.match(spec)
        if match and not os.path.exists(spec):  # (False, not OSError, for a name too long to be a file)
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
    ranges = index_ranges(split, text)
    cfg = model.cfg
    data = load_dataset(cfg.dataset, binarize=cfg.binarize, data_dir=cfg.data_dir, seed=cfg.seed, download=download,
                        progress=False)
    x = data.binary(split)
    # Both checked on the ranges, before a list of indices is built: test:0-99999999999 would be 10^11 of them.
    if max(last for _, last in ranges) >= len(x):
        raise SettingError(f"{split}:{text}: the {split} split of {cfg.dataset} has {len(x):,} digits (0-{len(x) - 1})")
    count = sum(last - first + 1 for first, last in ranges)
    if count > MAX_DIGITS:
        raise SettingError(f"{split}:{text} names {count:,} digits: give at most {MAX_DIGITS:,} at once")
    indices = [i for first, last in ranges for i in range(first, last + 1)]
    return x[indices], indices


def index_ranges(split, text):
    """``0-15,20`` as [(0, 15), (20, 20)]: the form checked, not yet the split's size."""
    ranges = []
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (last and digit_index(last) < digit_index(first)):
            raise SettingError(f"{split}:{text}: give digit indices as 0-15 or 3,7,9")
        ranges.append((digit_index(first), digit_index(last or first)))
    return ranges


def digit_index(digits):
    # 19 digits or more: past every split's end (and Python's int() refuses strings of over 4,300 digits)
    return int(digits) if len(digits) < 19 else math.inf


def npy_digits(path, model, log):
    """An array of digits: (D,), (N, D), (28, 28) or (N, 28, 28); 0/1 values are taken as they are,
    grayscale (0..255, or 0..1 floats) is binarized as the run's data were."""
    array = read_npy(path, MAX_DIGITS * model.family.num_pixels)
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


def read_npy(path, most_values):
    """A .npy file's array, its header checked against the file's size first: numpy would allocate
    whatever a header claims (7 TiB for a damaged one claiming 10^10 digits)."""
    try:
        with open(path, "rb") as file:
            shape, dtype = npy_header(file, path)
            data_bytes = os.fstat(file.fileno()).st_size - file.tell()
            check_npy_header(path, shape, dtype, data_bytes, most_values)
            file.seek(0)
            return np.lib.format.read_array(file, allow_pickle=False)
    except DataError:  # (a ValueError) ours, already saying what to do
        raise
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as a .npy array ({type(error).__name__}: {error})") from None


def npy_header(file, path):
    """(shape, dtype) from the header of an open .npy file, which is left at the array's first byte."""
    npy = np.lib.format
    if file.read(len(npy.MAGIC_PREFIX)) != npy.MAGIC_PREFIX:  # np.load would open a .npz or a pickle instead
        raise DataError(f"{path} is not a .npy array (a .npz, pickle or other file named .npy?): save the digits "
                        "with numpy.save")
    file.seek(0)
    version = npy.read_magic(file)
    read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
    if read_header is None:  # version 3: a structured array with unicode field names
        raise DataError(f"{path} is a .npy array of format version {version[0]}.{version[1]}, not a plain "
                        "array of numbers: save the digits with numpy.save")
    shape, _, dtype = read_header(file)
    return shape, dtype


def check_npy_header(path, shape, dtype, data_bytes, most_values):
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects ({dtype}), not numbers: give digits as 0/1 or grayscale numbers")
    values = math.prod(shape)
    if values * dtype.itemsize > data_bytes:
        raise DataError(f"{path} claims a {dtype} array of shape {shape} ({values * dtype.itemsize:,} bytes) but holds "
                        f"{data_bytes:,} bytes: it is cut short or damaged; save the digits again")
    if values > most_values:
        raise DataError(f"{path} holds {values:,} values, over {MAX_DIGITS:,} digits: give them in parts")


def image_digit(path, model, log):
    """One digit from an image file of any size: grayscale as a viewer shows it, its contrast stretched
    to the full range (a faint scan reads as the digit it shows), resized to 28 x 28, inverted if it
    is dark on light (the training digits are light on dark), binarized as the run's data were."""
    x = read_gray(path, "LANCZOS", stretch=True).flatten()
    if x.shape[-1] != model.family.num_pixels:
        raise DataError(f"{path}: this model's digits have {model.family.num_pixels} pixels, not 28 x 28")
    border = x.reshape(28, 28)[[0, -1]].mean() / 2 + x.reshape(28, 28)[:, [0, -1]].mean() / 2
    if border > 0.5:
        x = 1 - x
        log(f"{path}: dark on light, inverted to the training data's light on dark")
    return binarize_new(x[None], binarization(model), model.cfg.seed)


def read_gray(path, resample, stretch=False):
    """An image file as (28, 28) grayscale intensities in [0, 1] as a viewer shows it (see `as_seen`),
    resized by PIL's `resample` filter."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused below, as too large
            with Image.open(path) as image:
                check_image_size(image, path)
                ImageOps.exif_transpose(image, in_place=True)  # a phone's photo, upright as it is shown
                gray = as_seen(image, path, stretch).resize((28, 28), getattr(Image.Resampling, resample))
    except DataError:  # (a ValueError) ours, already saying what to do
        raise
    except FileNotFoundError:
        raise DataError(f"no file {path}: give image files, .npy arrays, or digits of the run's data like test:0-15") \
            from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(too_large(path)) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as an image ({type(error).__name__}); give a PNG or JPEG") from None
    return torch.as_tensor(np.asarray(gray, dtype=np.float32) / 255)


def check_image_size(image, path):
    """Before any pixel is decoded: a digit's size, and one frame only (which one would be meant?)."""
    width, height = image.size
    if min(width, height) < 8:
        raise DataError(f"{path} is {width} x {height} pixels: too small to hold a digit")
    if width * height > MAX_MEGAPIXELS * 10**6:
        raise DataError(too_large(path))
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise DataError(f"{path} holds {frames} frames (an animated or multi-page image): save the one frame you "
                        "mean as its own PNG")


def too_large(path):
    return f"{path} is over {MAX_MEGAPIXELS} megapixels: save it smaller (a digit needs only 28 x 28 pixels)"


def as_seen(image, path, stretch):
    """An image as 8-bit grayscale (PIL mode "L") as a viewer shows it: 16-bit and float pixels
    scaled (FULL_SCALE reads as white), not clipped; transparency shown over a background its
    strokes stand out from; with `stretch`, the darkest pixel made black and the lightest white."""
    if image.mode in FULL_SCALE:
        image = eight_bit(image, path, stretch)
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        image = over_background(image.convert("RGBA"), path)
    gray = image.convert("L")
    return gray.point(stretched(*gray.getextrema(), np.arange(256.0)).tolist()) if stretch else gray


def eight_bit(image, path, stretch):
    """A 16-bit, 32-bit or float image as "L", or "LA" where it has a transparent value."""
    from PIL import Image

    values = np.asarray(image, dtype=np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{path} holds NaN or infinite values: save the digit with finite values, e.g. as a PNG")
    low, high = (values.min(), values.max()) if stretch else (0, FULL_SCALE[image.mode])
    gray = Image.fromarray(stretched(low, high, values), "L")
    if "transparency" not in image.info:
        return gray
    opaque = np.asarray(image) != image.info["transparency"]
    return Image.merge("LA", [gray, Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8), "L")])


def stretched(low, high, values):
    """`values` mapped from low..high onto 0..255 bytes; all 0 where there is no contrast (low == high):
    a blank page."""
    if high <= low:
        return np.zeros(np.shape(values), np.uint8)
    scaled = values - low  # in place from here: an image may have 80 million pixels
    scaled *= 255 / (high - low)
    return np.rint(np.clip(scaled, 0, 255, out=scaled), out=scaled).astype(np.uint8)


def over_background(rgba, path):
    """An RGBA image composited over white if its strokes are dark, over black if they are light
    (their colour: the mean gray of its pixels weighted by their opacity), as a viewer would have to
    show it for the digit to be seen; the transparent pixels' own colour (often black) is no guide."""
    from PIL import Image, ImageChops, ImageStat

    gray, alpha = rgba.convert("L"), rgba.getchannel("A")
    opacity = ImageStat.Stat(alpha).sum[0]
    if not opacity:
        raise DataError(f"{path} is transparent all over: it shows no digit")
    stroke = ImageStat.Stat(ImageChops.multiply(gray, alpha)).sum[0] / opacity  # 0..1: multiply divides by 255
    background = Image.new("RGBA", rgba.size, "white" if stroke < 0.5 else "black")
    return Image.alpha_composite(background, rgba)


def binarization(model):
    return binarization_of(model.cfg.dataset, model.cfg.binarize)


def read_mask(spec, shape):
    """What the queries take as ``observed`` from the command line's ``--observe``: a mask image
    (white = observed) as a boolean tensor of `shape` (N, D), or a name (top, bottom, left, right,
    random:F; see `ppl_models.masks.observe`) as it is, which the query turns into its mask (a
    random one drawn from the query's seed)."""
    if Path(spec).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"):
        return (read_gray(spec, "NEAREST") > 0.5).flatten().expand(shape)
    return spec
