"""How close q(z | x) comes to the true posterior of a z-dim-2 VAE: both on a grid, for a few test
digits and each guide: the figure of docs/filling_in.md.

    PPL_MODELS_DATA=../shared/data python bench/vae_posterior_grid.py RUN_DIR ... --out FIGURE.png

Each RUN_DIR is a z-dim-2 VAE run (one per guide). On a 241 x 241 grid over the box that holds
both densities (found on a coarse grid over [-6, 6]^2) the true posterior p(z | x) = p(z) p(x | z) /
p(x) is computed by the 2-D sum (its normaliser is log p(x), exact up to the grid), q(z | x) is the
guide's own density, and KL(q || p) = E_q[log q - log p(z | x)] is the grid sum; it equals
log p(x) - ELBO. Not a test: needs trained runs.
"""

import argparse
import math

import matplotlib.pyplot as plt
import torch
from pyro import poutine

from ppl_models import load
from ppl_models.data import load_dataset
from ppl_models.plots import save

POINTS = 241  # per axis


def grid_over(low, high):
    """(the two axes, the (POINTS^2, 2) grid points, the area of a cell) over the box [low, high]."""
    axes = [torch.linspace(low[i].item(), high[i].item(), POINTS) for i in range(2)]
    cell = ((high - low) / (POINTS - 1)).prod().item()
    return axes, torch.stack(torch.meshgrid(*axes, indexing="xy"), -1).reshape(-1, 2), cell


def densities(model, digit, grid, cell):
    """(log p(z | x), log q(z | x)) on the grid points, and log p(x) by the grid sum."""
    with model.active(), torch.no_grad():
        log_likelihood = torch.distributions.Bernoulli(logits=model.family.pixel_logits(grid)).log_prob(digit).sum(-1)
        log_joint = torch.distributions.Normal(0.0, 1.0).log_prob(grid).sum(-1) + log_likelihood
        log_evidence = torch.logsumexp(log_joint, 0) + math.log(cell)
        q = poutine.trace(model.family.guide(model.cfg.guide)).get_trace(digit[None]).nodes["z"]["fn"]
        log_q = q.log_prob(grid[:, None, :])[:, 0]
    return log_joint - log_evidence, log_q, log_evidence.item()


def fine_grid(model, digit):
    """A grid over the box holding both densities: located on a coarse grid over [-6, 6]^2, then
    each one's mean +- 6 standard deviations (posteriors are a few hundredths wide)."""
    _, coarse, cell = grid_over(torch.tensor([-6.0, -6.0]), torch.tensor([6.0, 6.0]))
    lows, highs = [], []
    for log_density in densities(model, digit, coarse, cell)[:2]:
        weights = torch.softmax(log_density, 0)[:, None]
        mean = (weights * coarse).sum(0)
        spread = ((weights * (coarse - mean) ** 2).sum(0).sqrt() * 6).clamp(min=0.1)
        lows.append(mean - spread)
        highs.append(mean + spread)
    return grid_over(torch.stack(lows).amin(0), torch.stack(highs).amax(0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="z-dim-2 VAE run folders, one per guide")
    parser.add_argument("--digits", type=int, nargs="+", default=[0, 1, 2, 3], help="test digit indices")
    parser.add_argument("--mean-over", type=int, default=0, help="also the mean KL(q||p) and log p(x) over this many "
                        "test digits (every 10,000 / N-th)")
    parser.add_argument("--out", default="vae_posterior_grid.png")
    args = parser.parse_args()
    models = [load(run) for run in args.runs]
    cfg = models[0].cfg
    x = load_dataset(cfg.dataset, binarize=cfg.binarize, data_dir=cfg.data_dir, seed=cfg.seed,
                     progress=False).binary("test")
    rows, cols = len(args.digits), len(models) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for row, index in enumerate(args.digits):
        digit = x[index]
        axes[row, 0].imshow(digit.reshape(28, 28), cmap="gray_r")
        axes[row, 0].set_title(f"test digit {index}", fontsize=9)
        axes[row, 0].axis("off")
        for col, model in enumerate(models, 1):
            axis, grid, cell = fine_grid(model, digit)
            log_posterior, log_q, log_evidence = densities(model, digit, grid, cell)
            q_mass = (log_q.exp() * cell).sum().item()
            kl = (log_q.exp() * cell * (log_q - log_posterior)).sum().item()
            ax = axes[row, col]
            for values, colour in ((log_posterior, "black"), (log_q, "tab:red")):
                density = values.exp().reshape(POINTS, POINTS)
                ax.contour(*axis, density, levels=density.max() * torch.tensor([0.05, 0.3, 0.7]), colors=colour,
                           linewidths=1)
            ax.set_title(f"{model.cfg.guide}: KL(q||p) = {kl:.2f} nats\nlog p(x) = {log_evidence:.1f}"
                         + ("" if q_mass > 0.99 else f", q mass on grid {q_mass:.2f}"), fontsize=8)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
            print(f"digit {index} guide {model.cfg.guide}: log p(x) {log_evidence:.3f} (grid), KL(q||p) {kl:.3f} "
                  f"nats, q's mass on the grid {q_mass:.4f}")
    fig.suptitle("z-dim-2 VAEs (seed defaults, one per guide): the true posterior p(z | x) on a grid (black) "
                 "against q(z | x) (red),\ncontours at 5%, 30%, 70% of each density's peak; each panel zoomed to where "
                 "they are", fontsize=10)
    save(fig, args.out)
    if args.mean_over:
        indices = range(0, len(x), len(x) // args.mean_over)
        for model in models:
            kl, evidence = [], []
            for index in indices:
                axis, grid, cell = fine_grid(model, x[index])
                log_posterior, log_q, log_evidence = densities(model, x[index], grid, cell)
                kl.append((log_q.exp() * cell * (log_q - log_posterior)).sum().item())
                evidence.append(log_evidence)
            kl = torch.tensor(kl)
            print(f"guide {model.cfg.guide}: over {len(kl)} test digits, KL(q||p) mean {kl.mean():.3f} median "
                  f"{kl.median():.3f} nats (standard error {kl.std() / len(kl) ** 0.5:.3f}); log p(x) by the grid "
                  f"{sum(evidence) / len(evidence):.2f}")


if __name__ == "__main__":
    main()
