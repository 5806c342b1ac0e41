import signal

import numpy as np
import pyro
import pytest
import torch

import run
from ppl_models.data import Dataset


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A command stopped by a signal ignores further ones until its process ends: not pytest's."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def sample_prototype_digits(num_digits, num_prototypes=4, seed=0):
    """Binary 784-pixel 'digits' from a known mixture: each prototype lights its own block of
    rows, pixels flip with probability 0.05. Returns (images, prototype labels)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_prototypes, (num_digits,), generator=generator)
    rows = torch.arange(784) // 28
    prototypes = torch.stack([((rows // 7) == k).float() for k in range(num_prototypes)])
    probs = 0.05 + 0.9 * prototypes[labels]
    return torch.bernoulli(probs, generator=generator), labels


@pytest.fixture
def tiny_dataset():
    train, train_labels = sample_prototype_digits(600, seed=1)
    test, test_labels = sample_prototype_digits(200, seed=2)
    return Dataset(
        name="tiny", binarize="threshold", images={"train": train, "test": test},
        labels={"train": train_labels, "test": test_labels},
        sources={"train": "generated", "test": "generated"}, seed=0,
    )


def run_cli(*args):
    """run.py's main as a user calls it, quietly and offline."""
    return run.main([*args, "--quiet", "--no-download"])


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No $PPL_MODELS_DATA, an empty cache: what a fresh machine without internet has."""
    monkeypatch.delenv("PPL_MODELS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def tiny_binarized(tmp_path):
    """A data folder holding a small random binarized_mnist.npz (300 / 100 / 100 digits)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    arrays = {split: (rng.random((n, 784)) < 0.2).astype(np.uint8) for split, n in
              (("train", 300), ("valid", 100), ("test", 100))}
    np.savez(root / "binarized_mnist.npz", **arrays)
    return root
