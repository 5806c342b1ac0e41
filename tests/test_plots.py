"""Figures a person can read: the learning curves' axes."""

from ppl_models import plots


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
