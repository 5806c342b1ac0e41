"""A user's digits read as the picture shows them, whatever the file's format (transparency, 16-bit,
float, a faint scan, a phone's rotation), and every unbounded or ambiguous input (huge images,
animations, lying .npy headers, endless index ranges) refused in one line before numpy or Pillow
gets to allocate it."""

import struct
import zlib

import numpy as np
import pyro
import pytest
import torch
from PIL import Image

from ppl_models.config import Config, SettingError
from ppl_models.data import DataError
from ppl_models.inputs import MAX_DIGITS, read_digits, read_gray, read_mask
from ppl_models.models import FAMILIES
from ppl_models.trained import TrainedModel, register_networks


@pytest.fixture
def model(tiny_binarized):
    """An untrained SBN for binarized-mnist's 784 pixels, its data the small file in `tiny_binarized`:
    reading digits needs only its pixels, binarization and data set."""
    family = FAMILIES["sbn"](num_pixels=784, latents=4)
    with pyro.get_param_store().scope() as params:
        register_networks(family, "bernoulli")
    cfg = Config(model="sbn", guide="bernoulli", dataset="binarized-mnist", data_dir=str(tiny_binarized))
    return TrainedModel(family, cfg, params, "untrained")


def ring(size=112):
    """A "0", light on dark, with soft (gray) edges: (size, size) intensities in 0..1, in steps of
    1/51 so that a faint 8-bit scan of it (0..51) holds the same picture."""
    y, x = np.mgrid[:size, :size] / size - 0.5
    radius = np.hypot(x / 0.6, y)
    return np.round(np.clip(2 - np.abs(radius - 0.3) / 0.04, 0, 1) * 51) / 51


def save_in_every_format(ink, folder):
    """The same picture, `ink` light on dark, as each kind of file a user may have; {name: path}."""
    byte = np.rint(ink * 255).astype(np.uint8)
    clear = np.zeros_like(byte)
    pictures = {
        "white_on_black.png": Image.fromarray(byte),
        "rgba_black_strokes.png": Image.fromarray(np.stack([clear, clear, clear, byte], -1), "RGBA"),
        "rgba_white_strokes.png": Image.fromarray(np.stack([clear + 255] * 3 + [byte], -1), "RGBA"),
        "la_black_strokes.png": Image.fromarray(np.stack([clear, byte], -1), "LA"),
        "faint_8bit.png": Image.fromarray(np.rint(ink * 51).astype(np.uint8)),
        "dark_16bit.png": Image.fromarray(byte.astype(np.uint16) * 257),
        "light_16bit.png": Image.fromarray((255 - byte).astype(np.uint16) * 257),
        "faint_16bit.png": Image.fromarray(np.rint(ink * 3000).astype(np.uint16)),
        "float_0_to_1.tif": Image.fromarray(ink.astype(np.float32)),
        "upright_by_exif.png": Image.fromarray(np.rot90(255 - byte).copy()),
    }
    paths = {}
    for name, picture in pictures.items():
        exif = Image.Exif()
        if name == "upright_by_exif.png":
            exif[0x0112] = 6  # Orientation: a viewer turns it 90 degrees clockwise
        picture.save(folder / name, exif=exif)
        paths[name] = folder / name
    Image.fromarray(byte).save(folder / "keyed.png", transparency=0)  # its black made transparent (tRNS)
    paths["keyed.png"] = folder / "keyed.png"
    return paths


def test_a_digit_reads_the_same_in_every_format_a_viewer_shows_alike(model, tmp_path):
    ink = ring()
    Image.fromarray(np.rint(255 - ink * 255).astype(np.uint8)).save(tmp_path / "black_on_white.png")
    reference = read_gray(tmp_path / "black_on_white.png", "LANCZOS", stretch=True)
    expected, _ = read_digits(tmp_path / "black_on_white.png", model, log=lambda note: None)
    assert 40 < expected.sum() < 300  # a ring of ink, neither blank nor black
    differing = {}
    for name, path in save_in_every_format(ink, tmp_path).items():
        digit, _ = read_digits(path, model, log=lambda note: None)
        gray = read_gray(path, "LANCZOS", stretch=True)  # (light on dark ones are inverted later, by read_digits)
        same_gray = any(torch.allclose(seen, reference, atol=1 / 255) for seen in (gray, 1 - gray))
        if not torch.equal(digit, expected) or not same_gray:
            differing[name] = int((digit != expected).sum())
    assert not differing, f"pixels that differ from the opaque black-on-white digit: {differing}"


def test_a_blank_page_reads_as_a_blank_digit_but_an_image_that_shows_nothing_is_refused(model, tmp_path):
    Image.new("L", (40, 40), 200).save(tmp_path / "gray.png")  # no contrast to stretch: no ink either
    blank, _ = read_digits(tmp_path / "gray.png", model)
    assert not blank.any()
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.raises(DataError, match="transparent all over: it shows no digit"):
        read_digits(tmp_path / "clear.png", model)
    Image.fromarray(np.full((40, 40), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="holds NaN or infinite values"):
        read_digits(tmp_path / "nan.tif", model)


def test_a_16_bit_mask_is_thresholded_at_half_its_range_not_stretched(tmp_path):
    left = np.zeros((28, 28), np.uint16)
    left[:, :14] = 65535
    Image.fromarray(left).save(tmp_path / "left.png")
    Image.fromarray(np.full((28, 28), 3000, np.uint16)).save(tmp_path / "dim.tif")  # 5% gray: nothing observed
    expected = torch.zeros(28, 28, dtype=torch.bool)
    expected[:, :14] = True
    assert torch.equal(read_mask(str(tmp_path / "left.png"), (2, 784)), expected.flatten().expand(2, 784))
    assert not read_mask(str(tmp_path / "dim.tif"), (1, 784)).any()


def png_header(width, height):
    """A PNG that claims width x height gray pixels and holds none: what a decompression bomb's
    header looks like, in a few bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def npy_header(path, shape, dtype="<f4", data_bytes=0):
    """A .npy file whose header claims `shape`, followed by `data_bytes` (sparse: no disk taken)."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": dtype, "fortran_order": False, "shape": shape})
        file.truncate(file.tell() + data_bytes)


def write_refused_inputs(folder):
    frames = [Image.fromarray(np.full((28, 28), level, np.uint8)) for level in (0, 255)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(folder / "pages.tif", save_all=True, append_images=frames[1:])
    (folder / "bomb.png").write_bytes(png_header(14_000, 14_000))  # past Pillow's own limit
    (folder / "huge.png").write_bytes(png_header(9_000, 9_000))  # 81 megapixels
    npy_header(folder / "lying.npy", (10**10, 784), data_bytes=784 * 4)
    npy_header(folder / "many.npy", (MAX_DIGITS + 1, 784), "|u1", data_bytes=(MAX_DIGITS + 1) * 784)
    np.savez(folder / "archive.npz", x=np.zeros(784))
    (folder / "archive.npz").rename(folder / "archive.npy")
    np.save(folder / "objects.npy", np.array([{"digit": 3}], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("spec,error,message", [
    ("animated.gif", DataError, "holds 2 frames (an animated or multi-page image): save the one frame you mean"),
    ("pages.tif", DataError, "holds 2 frames"),
    ("bomb.png", DataError, "is over 80 megapixels: save it smaller"),
    ("huge.png", DataError, "is over 80 megapixels: save it smaller"),
    ("lying.npy", DataError, "(31,360,000,000,000 bytes) but holds 3,136 bytes: it is cut short or damaged"),
    ("many.npy", DataError, "holds 784,000,784 values, over 1,000,000 digits: give them in parts"),
    ("archive.npy", DataError, "is not a .npy array (a .npz, pickle or other file named .npy?)"),
    ("objects.npy", DataError, "holds Python objects (object), not numbers"),
    ("test:0-99999999999", SettingError, "the test split of binarized-mnist has 100 digits (0-99)"),
    ("test:" + "9" * 5000, SettingError, "the test split of binarized-mnist has 100 digits"),
    ("test:" + ",".join(["0-99"] * 10_001), SettingError, "names 1,000,100 digits: give at most 1,000,000 at once"),
])
def test_unbounded_or_ambiguous_inputs_are_refused_in_one_line(model, tmp_path, spec, error, message):
    write_refused_inputs(tmp_path)
    path = spec if spec.startswith("test:") else str(tmp_path / spec)
    with pytest.raises(error) as refused:
        read_digits(path, model)
    assert message in str(refused.value) and len(str(refused.value).splitlines()) == 1
