"""Figures a person can read: the learning curves' axes, grids no wider than report.html's page,
sampled digits shown with the Bernoulli means they were drawn from."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from ppl_models import plots
from ppl_models.models import vae_report


def drawn_axes(monkeypatch, rows, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig))
    plots.learning_curves(rows, tmp_path / "curves.png", "title", steps_per_epoch=40)
    return figures[0].axes[0]


def curve(points):
    return [dict(step=step, split="train", estimator="elbo", value=value) for step, value in points]


def test_a_short_run_shows_its_untrained_and_trained_points(monkeypatch, tmp_path):
    low, high = drawn_axes(monkeypatch, curve([(0, -545.0), (200, -186.0)]), tmp_path).get_ylim()
    assert low <= -545 and high >= -186  # not a sliver around the last point


def test_a_long_run_zooms_past_the_untrained_point(monkeypatch, tmp_path):
    points = [(0, -545.0)] + [(step, -200.0 + step / 100) for step in range(200, 4001, 200)]
    low, high = drawn_axes(monkeypatch, curve(points), tmp_path).get_ylim()
    assert -545 < low < -200 and high >= -160


def png_size(path):
    with Image.open(path) as image:
        return image.size


def test_a_grid_of_many_columns_fits_the_report_page(tmp_path):
    plots.image_grid(torch.rand(40, 784), tmp_path / "grid.png", "title", ncols=20)
    assert png_size(tmp_path / "grid.png")[0] <= 1100  # report.html is 1100 px wide: wider is shrunk to fit


def test_samples_through_training_stay_legible_after_many_epochs(tmp_path):
    # a history as older runs wrote it, 20 draws an epoch
    torch.save({epoch: torch.rand(20, 784) for epoch in range(301)}, tmp_path / "samples_through_training.pt")
    epochs = vae_report.draw_samples_through_training(tmp_path, reported_epoch=123)
    assert epochs[0] == 0 and epochs[-1] == 300 and 123 in epochs and len(epochs) <= 8
    width, height = png_size(tmp_path / "samples_through_training.png")
    columns = vae_report.DRAWS_THROUGH_TRAINING
    assert width <= 1100 and height <= 1300 and width / columns >= 90  # each digit's cell ~100 px at report size


def test_mean_and_draw_rows_put_each_blocks_means_above_its_draws():
    means, draws = torch.rand(5, 784), torch.bernoulli(torch.full((5, 784), 0.5))
    images, captions, row_labels = plots.mean_and_draw_rows(means, draws, ncols=3, captions=list("abcde"))
    rows = images.reshape(4, 3, 784)
    assert np.array_equal(rows[0], means[:3]) and np.array_equal(rows[1], draws[:3])
    assert np.array_equal(rows[2, :2], means[3:]) and np.array_equal(rows[3, :2], draws[3:])
    assert np.isnan(rows[2:, 2]).all()  # the last block's missing sample: an empty cell
    assert captions == ["a", "b", "c", "", "", "", "d", "e", "", "", "", ""]
    assert row_labels == list(plots.MEAN_AND_DRAW) * 2


@pytest.mark.parametrize("model, flags", [("sbn", ["--latents", "3"]),
                                          ("vae", ["--hidden", "16", "--eval-samples", "5"])])
def test_sampled_digits_are_drawn_with_the_bernoulli_means_they_came_from(offline, tiny_binarized, tmp_path,
                                                                          monkeypatch, model, flags):
    drawn, draw = [], plots.means_and_draws
    monkeypatch.setattr(plots, "means_and_draws", lambda means, draws, *args, **options: drawn.append(
        (means, draws)) or draw(means, draws, *args, **options))
    out = tmp_path / model
    assert run_cli("--model", model, *flags, "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
                   "--epochs", "1", "--batch-size", "50", "--out", str(out)) == 0
    [(means, draws)] = drawn
    assert set(draws.unique().tolist()) <= {0.0, 1.0} and ((means > 0) & (means < 1)).all()
    assert (out / "samples.png").stat().st_size > 1000
    assert '<img src="samples.png"' in (out / "report.html").read_text()


def test_importing_the_package_leaves_matplotlibs_backend_alone():
    """A notebook's inline figures must survive `import ppl_models` (its figures need no backend)."""
    check = ("import matplotlib; import ppl_models, ppl_models.plots, ppl_models.models; "
             "print(matplotlib.get_backend())")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env={**os.environ,
                          "MPLBACKEND": "svg"}, check=True)
    assert done.stdout.strip() == "svg"
