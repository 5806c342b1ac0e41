"""Figures. Each function takes plain tensors or rows and a path, and writes one PNG."""

import textwrap
from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from .files import atomic_write

SPLIT_STYLE = {"train": "-", "valid": "-.", "test": "--"}


def subplots(nrows=1, ncols=1, figsize=None, **options):
    """A figure and its axes, as `pyplot.subplots` gives them but outside pyplot: drawing files
    needs no backend, so importing ppl_models never changes the one a notebook or script uses."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **options)


def save(fig, path):
    """Write the figure as a PNG, atomically."""
    fig.tight_layout()
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=110))


MAX_WIDTH = 10  # inches: 1100 px at dpi 110, the width of report.html's page, so no grid is shrunk to fit it
MEAN_AND_DRAW = ("mean\np(x_d = 1 | z)", "draw\nx ~ p(x | z)")  # the row labels of `means_and_draws`


def fill(title, width):
    """The title's lines (\n where it says) wrapped to `width` characters: 12 an inch at fontsize 10."""
    return "\n".join(textwrap.fill(line, int(width)) for line in title.split("\n"))


def as_rows(images):
    """Digits as a float array (N, 784), from a tensor (on any device) or an array."""
    images = images.detach().cpu() if hasattr(images, "detach") else images
    return np.asarray(images, dtype=float).reshape(len(images), -1)


def image_grid(images, path, title, captions=None, ncols=10, row_labels=None):
    """Digits (N, 784) with values in [0, 1] as a grid of 28 x 28 images, black on white; an image
    of NaNs is an empty cell."""
    images = as_rows(images).reshape(-1, 28, 28)
    nrows = int(np.ceil(len(images) / ncols))
    cell = min(1.1, MAX_WIDTH / ncols)
    fig, axes = subplots(nrows, ncols, figsize=(cell * ncols, (cell + 0.15) * nrows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images) or np.isnan(images[i]).all():
            ax.axis("off")
            continue
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=1)
        if captions is not None:
            ax.set_title(captions[i], fontsize=8)
        if row_labels is not None and i % ncols == 0:
            ax.set_ylabel(row_labels[i // ncols], fontsize=8)
    fig.suptitle(fill(title, 12 * cell * ncols), fontsize=10)
    save(fig, path)


def mean_and_draw_rows(means, draws, ncols, captions=None):
    """The cells of `means_and_draws`: (images, captions, row labels), each `ncols` samples as a row
    of their means above the row of their draws; a last, shorter block ends in empty cells."""
    means, draws = as_rows(means), as_rows(draws)
    captions = [""] * len(means) if captions is None else list(captions)
    images, cell_captions = [], []
    for start in range(0, len(means), ncols):
        block = slice(start, start + ncols)
        empty = np.full((ncols - len(means[block]), means.shape[1]), np.nan)
        images += [means[block], empty, draws[block], empty]
        cell_captions += captions[block] + [""] * (2 * ncols - len(captions[block]))
    return np.concatenate(images), cell_captions, list(MEAN_AND_DRAW) * (len(cell_captions) // (2 * ncols))


def means_and_draws(means, draws, path, title, captions=None, ncols=8):
    """Samples of binary digits: the Bernoulli means p(x_d = 1 | z) each was drawn from, above the
    binary draw x ~ p(x | z) itself (alone, a draw from a blurry mean is speckle); `captions` (one per
    sample) go above the means."""
    images, cell_captions, row_labels = mean_and_draw_rows(means, draws, ncols, captions)
    image_grid(images, path, title, cell_captions, ncols, row_labels)


def learning_curves(rows, path, title, steps_per_epoch, early_stopping=None):
    """metrics.csv rows -> one line per (split, estimator) against training steps; with
    `early_stopping` = (estimator, [[epoch, valid score]], chosen epoch), the scores as dots and a
    vertical line at the chosen (best) epoch, whose model the run reports."""
    series = defaultdict(list)
    for row in rows:
        series[(row["split"], row["estimator"])].append((int(row["step"]), float(row["value"])))
    fig, ax = subplots(figsize=(6.5, 4))
    for (split, estimator), points in sorted(series.items()):
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, SPLIT_STYLE.get(split, "-"), marker="o" if len(steps) <= 12 else None, markersize=3,
                label=f"{split}: {estimator}")
    shown = [point for points in series.values() for point in points]
    if early_stopping:
        estimator, scores, chosen_epoch = early_stopping
        dots = [(epoch * steps_per_epoch, value) for epoch, value in scores]
        if dots:
            ax.plot(*zip(*dots), ".", color="gray", markersize=3,
                    label=f"valid: {estimator} after each epoch (early stopping)")
            shown += dots
        ax.axvline(chosen_epoch * steps_per_epoch, color="gray", linestyle=":",
                   label=f"epoch {chosen_epoch}: best valid score, the model reported")
    ax.set_xlabel(f"SVI step ({steps_per_epoch} per epoch)")
    ax.set_ylabel("mean log-likelihood per digit (nats)")
    focus_on_training(ax, shown)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    save(fig, path)


def focus_on_training(ax, points):
    """Clip the y-axis to the (x, y) points past the first tenth of the x range (steps or seconds),
    so the untrained model's points do not squash the part of the curve worth reading; a run with
    fewer than three evaluations past that point keeps them all (else it would be a sliver)."""
    if points:
        last = max(x for x, _ in points)
        later = [(x, y) for x, y in points if x >= 0.1 * last]
        if len({x for x, _ in later}) < 3:  # too few evaluations to read a curve from: show every point
            return
        low, high = min(y for _, y in later), max(y for _, y in later)
        ax.set_ylim(low - 0.15 * (high - low) - 0.5, high + 0.1 * (high - low) + 0.5)


def two_histograms(a, b, labels, path, title, xlabel):
    a, b = np.asarray(a), np.asarray(b)
    fig, ax = subplots(figsize=(6.5, 4))
    bins = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 60)
    ax.hist(a, bins=bins, alpha=0.6, density=True, label=labels[0])
    ax.hist(b, bins=bins, alpha=0.6, density=True, label=labels[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(title, fontsize=10)
    save(fig, path)


def curves_against(panels, path, title):
    """Several panels of named (x, y) lines: panels = [(xlabel, ylabel, {label: (xs, ys, style)})]. The
    panels share the y-axis that the first one's x (e.g. steps) focuses on: the same lines against
    another x (e.g. seconds) would clip a different start."""
    fig, axes = subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (xlabel, ylabel, lines) in zip(axes.flat, panels):
        for label, (xs, ys, style) in lines.items():
            ax.plot(xs, ys, style, label=label)
        if ax is axes.flat[0]:
            focus_on_training(ax, [point for xs, ys, _ in lines.values() for point in zip(xs, ys)])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)


def manifold(images, grid_values, path, title):
    """A square grid of decoder mean images; grid_values label the latent value of each row/column."""
    n = len(grid_values)
    canvas = np.asarray(images.detach().cpu()).reshape(n, n, 28, 28).transpose(0, 2, 1, 3).reshape(n * 28, n * 28)
    fig, ax = subplots(figsize=(MAX_WIDTH, MAX_WIDTH))
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1)
    ticks = np.arange(n) * 28 + 14
    labels = [f"{v:.1f}" for v in np.asarray(grid_values)]
    ax.set_xticks(ticks[::2], labels[::2], fontsize=9)
    ax.set_yticks(ticks[::2], labels[::-1][::2], fontsize=9)  # rows run from high z_2 (top) to low
    ax.set_xlabel("z_1")
    ax.set_ylabel("z_2")
    ax.set_title(title, fontsize=10)
    save(fig, path)


def latent_scatter(points, labels, path, title):
    """2-D latent points, coloured by class where labels exist."""
    points = np.asarray(points.detach().cpu())
    fig, ax = subplots(figsize=(6.5, 5.5))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5)
    else:
        labels = np.asarray(labels.cpu())
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7)
        fig.colorbar(scatter, ax=ax, ticks=range(10), label="digit class")
    ax.set_xlabel("z_1")
    ax.set_ylabel("z_2")
    ax.set_title(textwrap.fill(title, 75), fontsize=10)
    save(fig, path)


def estimates_against_samples(panels, path, title):
    """One panel per setting: {label: (sample counts, means, spreads)} with a +-spread band."""
    fig, axes = subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=False)
    for ax, (panel_title, lines) in zip(axes.flat, panels.items()):
        for label, (counts, means, spreads) in lines.items():
            means, spreads = np.asarray(means), np.asarray(spreads)
            ax.plot(counts, means, "o-", label=label)
            ax.fill_between(counts, means - spreads, means + spreads, alpha=0.25)
        ax.set_xscale("log")
        ax.set_xlabel("samples M")
        ax.set_ylabel("estimate of log p(x) (nats)")
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, path)
