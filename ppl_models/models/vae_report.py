"""The VAE's report (seed problems 22-24: learning curves, samples through training, the latent
manifold, reconstructions, where digits sit in latent space) and its own experiment: log p(x) by
Monte Carlo from the prior against importance sampling from q (seed problem 13)."""

import warnings
from dataclasses import replace

import numpy as np
import pyro
import torch
from pyro import poutine

from .. import plots
from ..data import random_digits
from ..evaluate import per_digit_estimate
from ..family import Experiment, Report
from ..files import atomic_torch_save, write_json
from ..report import draw_learning_curves, draw_samples
from ..train import train

DRAWS_THROUGH_TRAINING = 10  # fixed z draws followed through training: the columns of its figure
EPOCHS_SHOWN = 8  # at most, rows of that figure
HISTORY_FILE = "samples_through_training.pt"  # the decoder's means at fixed z, kept per epoch
MANIFOLD_SIDE = 16  # digits along each side of the manifold: 16 fill the report's page at about 60 px each


def sample_recorder(model, out, cfg):
    """Epoch hook: the decoder's mean image at 10 fixed z ~ N(0, I), kept per epoch in
    samples_through_training.pt (atomically rewritten, so a resumed run keeps its history)."""
    # 20 drawn and the first 10 kept: the draws of runs that recorded all 20, so their histories resume
    z = torch.randn(20, model.z_dim, generator=torch.Generator().manual_seed(cfg.seed))[:DRAWS_THROUGH_TRAINING]
    z = z.to(cfg.device)
    path = out / HISTORY_FILE

    def record(epoch):
        history = read_history(path) if epoch > 0 else {}
        history[epoch] = model.decode(z).cpu()
        atomic_torch_save(history, path)

    return record


def read_history(path):
    """{epoch: decoder means} from samples_through_training.pt; a missing or unreadable file is said
    in a warning and its history starts again (a figure is not worth stopping a run for)."""
    if not path.exists():
        return {}
    try:
        history = torch.load(path, weights_only=True)
        if isinstance(history, dict) and all(isinstance(k, int) and torch.is_tensor(v) for k, v in history.items()):
            return history
        reason = "not a history of samples"
    except Exception as error:
        reason = type(error).__name__
    warnings.warn(f"{path} is unreadable ({reason}): samples_through_training.png shows only the epochs from now on")
    return {}


def report(model, run):
    cfg = run.cfg
    bound = draw_learning_curves(run, f"{model.summary(cfg.guide)}, guide {cfg.guide}: {cfg.eval_digits} fixed random "
                                      "digits per split")
    shown_epochs = draw_samples_through_training(run.out, run.reported_epoch)
    samples = draw_samples(model, run, "z ~ N(0, I)")
    draw_manifold(model, run.out, cfg.device)
    draw_reconstructions_and_latents(model, run)
    return Report([
        ("learning_curves.png", f"ELBO of {cfg.eval_digits} fixed random digits of each split during training "
         f"(seed problem 22): a lower bound on log p(x); the untrained model starts near -544 nats.{bound}"),
        ("samples_through_training.png", f"The decoder's mean image p(x_d = 1 | z) for the same "
         f"{DRAWS_THROUGH_TRAINING} draws of z ~ N(0, I) (columns) through training (seed problem 23): one row "
         f"for each of epochs {', '.join(map(str, shown_epochs))} (0: untrained)."),
        ("samples.png", samples),
        ("manifold.png", "The learned manifold (seed problem 24): the decoder's mean over a grid of the latent "
         "plane, placed through the inverse Normal CDF so each cell holds equal prior mass."),
        ("reconstructions.png", "Test digits and the decoder's mean at a z drawn from q(z | x): what the "
         "latent keeps of a digit."),
        ("latent_means.png", "Where test digits sit in latent space: the mean of q(z | x), coloured by class "
         "where labels exist.")])


def draw_samples_through_training(out, reported_epoch):
    """The recorded decoder means, one row per chosen epoch (`chosen_epochs`); returns those epochs."""
    history = read_history(out / HISTORY_FILE)
    if not history:
        return []
    epochs = chosen_epochs(sorted(history), reported_epoch)
    # [:DRAWS_THROUGH_TRAINING]: histories recorded before it was 10 hold 20 draws an epoch
    plots.image_grid(torch.cat([history[e][:DRAWS_THROUGH_TRAINING] for e in epochs]),
                     out / "samples_through_training.png",
                     f"Decoder mean p(x_d = 1 | z) for {DRAWS_THROUGH_TRAINING} fixed z ~ N(0, I) (columns) through "
                     f"training; the report's model is that of epoch {reported_epoch}",
                     ncols=DRAWS_THROUGH_TRAINING,
                     row_labels=[f"epoch {e}" + ("\nuntrained" if e == 0 else "") for e in epochs])
    return epochs


def chosen_epochs(epochs, reported_epoch):
    """At most EPOCHS_SHOWN of the recorded epochs: spread evenly from the first to the last, and
    the epoch whose model the report shows (early stopping's best)."""
    spread = {epochs[round(i)] for i in np.linspace(0, len(epochs) - 1, EPOCHS_SHOWN - 1)}
    return sorted(spread | ({reported_epoch} & set(epochs)))


def draw_manifold(model, out, device):
    """A grid over (z_1, z_2) through the inverse Normal CDF, the rest of z at 0 (with one latent,
    a line over z_1)."""
    grid = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, MANIFOLD_SIDE))
    if model.z_dim == 1:
        plots.image_grid(model.decode(grid[:, None].to(device)), out / "manifold.png",
                         "Decoder mean along the latent line (z-dim 1)", captions=[f"{v:.1f}" for v in grid], ncols=8)
        return
    z = torch.zeros(MANIFOLD_SIDE, MANIFOLD_SIDE, model.z_dim)
    z[..., 0], z[..., 1] = grid[None, :], grid.flip(0)[:, None]  # z_2 grows upwards
    others = "" if model.z_dim == 2 else f" (z_1, z_2; the other {model.z_dim - 2} at 0)"
    plots.manifold(model.decode(z.reshape(-1, model.z_dim).to(device)), grid, out / "manifold.png",
                   f"Decoder mean p(x_d = 1 | z) over a {MANIFOLD_SIDE} x {MANIFOLD_SIDE} grid of the latent plane"
                   + others)


def draw_reconstructions_and_latents(model, run):
    x_test, guide = run.data.binary("test"), run.cfg.guide
    with torch.random.fork_rng():
        torch.manual_seed(run.cfg.seed)
        digits = random_digits(x_test, 10, seed=run.cfg.seed)
        z_digits = poutine.trace(model.guide(guide)).get_trace(digits).nodes["z"]["value"]
        z_all = latent_means(model, guide, x_test[:5000])
    plots.image_grid(torch.cat([digits, model.decode(z_digits)]), run.out / "reconstructions.png",
                     f"{len(digits)} random test digits (top) and the decoder mean p(x_d = 1 | z) at one z ~ q(z | x) "
                     "of each (bottom)", ncols=10,
                     row_labels=["digit", "reconstruction"])
    labels = run.data.labels["test"]
    shown = z_all[:, :2] if model.z_dim > 1 else torch.cat([z_all, torch.zeros_like(z_all)], 1)
    which = {1: "; one latent, drawn at z_2 = 0", 2: ""}.get(model.z_dim, ", first two coordinates")
    plots.latent_scatter(shown, None if labels is None else labels[:5000], run.out / "latent_means.png",
                         f"Mean of q(z | x) for {len(z_all)} test digits (guide {guide}; 100 samples each){which}")


@torch.no_grad()
def latent_means(model, guide_name, x, num_samples=100):
    """E_q[z | x] by averaging guide samples: the same for every guide, flows included."""
    with pyro.plate("particles", num_samples, dim=-2):
        z = poutine.trace(model.guide(guide_name)).get_trace(x).nodes["z"]["value"]
    return z.mean(0)


LATENT_SIZES = (2, 5, 20)  # prior-vs-importance's z-dims


def prior_vs_importance(family, cfg, data, out, progress, log=print, z_dims=LATENT_SIZES,
                        sample_counts=(1, 10, 100, 1000, 10000), digits=20, repeats=10):
    """Seed problem 13, measured: log p(x) by plain Monte Carlo from the prior, log mean p(x | z_m)
    with z_m ~ p(z), against importance sampling from q, for growing M and several latent sizes.
    Each estimate is repeated `repeats` times on the same `digits` fixed random test digits; the
    plot shows the mean over digits of the mean estimate, and of its spread (sd over repeats)."""
    x = random_digits(data.binary("test"), digits)
    panels, results = {}, {}
    for z_dim, run_cfg in latent_size_runs(cfg, z_dims).items():
        model = family(**run_cfg.model_args).to(cfg.device)
        log(f"training the VAE with z-dim {z_dim}")
        train(model, data, run_cfg, out / f"z{z_dim}", progress=progress, log=log, overwrite=True)
        lines, estimates = estimate_by_proposal(model, x, cfg, sample_counts, repeats)
        panels[f"z-dim {z_dim}"], results[f"z-dim {z_dim}"] = lines, estimates
    plots.estimates_against_samples(panels, out / "prior_vs_importance.png",
                                    f"Estimating log p(x) of {digits} test digits: mean over digits of {repeats} "
                                    "repeated estimates, band = their sd")
    write_json({"digits": digits, "repeats": repeats, "estimates": results}, out / "prior_vs_importance.json")
    for z_dim, by_proposal in results.items():
        log(f"{z_dim}: M={sample_counts[-1]}: prior {by_proposal['prior']['mean'][-1]:.2f} "
            f"(sd {by_proposal['prior']['sd_over_repeats'][-1]:.2f}), q {by_proposal[cfg.guide]['mean'][-1]:.2f} "
            f"(sd {by_proposal[cfg.guide]['sd_over_repeats'][-1]:.2f}) nats")
    by_samples = {z_dim: {"by_samples_M": {M: {f"{proposal} {what} (nats)": estimates[key][i]
                                                for proposal, estimates in by_proposal.items()
                                                for key, what in (("mean", "mean"), ("sd_over_repeats", "sd"))}
                                            for i, M in enumerate(sample_counts)}}
                  for z_dim, by_proposal in results.items()}
    return Report([("prior_vs_importance.png", f"log p(x) of {digits} fixed test digits estimated from M samples of "
                    f"the prior (plain Monte Carlo) and of q ({cfg.guide}, importance sampling), one panel per "
                    f"latent size: the mean over digits of {repeats} repeated estimates, the band their sd.")],
                  {"estimates": by_samples, "what": f"mean over {digits} test digits of {repeats} repeated iwae-M "
                   "estimates of log p(x), and their sd over repeats (averaged over digits); prior: the prior p(z) "
                   f"as proposal; {cfg.guide}: the trained q(z | x)"})


def estimate_by_proposal(model, x, cfg, sample_counts, repeats):
    """Repeated iwae-M estimates of log p(x) with the prior and with q as proposals: the plot's lines
    {label: (counts, means, spreads)} and the results {proposal: {samples, mean, sd_over_repeats}}."""
    lines, results = {}, {}
    for proposal, label in (("prior", "Monte Carlo from the prior p(z)"),
                            (cfg.guide, f"importance sampling from q ({cfg.guide})")):
        means, spreads = [], []
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            for M in sample_counts:
                runs = torch.stack([per_digit_estimate(model, proposal, x, f"iwae-{M}") for _ in range(repeats)])
                means.append(runs.mean().item())
                spreads.append(runs.std(0).mean().item())
        lines[label] = (list(sample_counts), means, spreads)
        results[proposal] = {"samples": list(sample_counts), "mean": means, "sd_over_repeats": spreads}
    return lines, results


def latent_size_runs(cfg, z_dims=LATENT_SIZES):
    """{z-dim: the Config of prior-vs-importance's training run with it} (its estimates are its result:
    the runs report none)."""
    return {z_dim: replace(cfg, model_args={**cfg.model_args, "z_dim": z_dim}, eval_samples=0) for z_dim in z_dims}


PRIOR_VS_IMPORTANCE = Experiment(
    "seed problem 13: log p(x) by Monte Carlo from the prior vs. importance sampling from q, M = 1..10^4 samples, "
    "z-dim 2, 5, 20", prior_vs_importance,
    sets={"z_dim": "it trains z-dim 2, 5 and 20", "eval_samples": "its own estimates are its result: its runs report "
          "no iwae-k"}, trains=lambda family, cfg: list(latent_size_runs(cfg).values()))
