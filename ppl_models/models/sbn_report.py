"""The sigmoid belief net's report (samples, what each cause draws) and its own experiments:
the cost of exact enumeration against M (seed problem 10) and the variance of the sampled guides'
gradient estimators."""

import resource
import time

import numpy as np
import pyro
import torch

from .. import plots
from ..evaluate import estimators
from ..family import Experiment, Report
from ..files import write_json
from ..report import draw_learning_curves, draw_samples
from ..train import SVI


def report(model, run):
    cfg, out = run.cfg, run.out
    estimates = " and ".join({"exact": "exact log-likelihood", "elbo": "ELBO"}[name]
                             for name in estimators(model, cfg.guide, split="curves"))
    bound = draw_learning_curves(run, f"{model.summary(cfg.guide)}, guide {cfg.guide}: {cfg.eval_digits} fixed random "
                                      "digits per split")
    samples = draw_samples(model, run, f"binary causes z ~ p(z) (above each: how many of the {model.latents} were "
                                       "on)", lambda latents: [f"{int(k)} on" for k in latents["z"].sum(-1)])
    causes = model.cause_images()[:100]
    scale = causes.abs().max().clamp(min=1e-6)
    plots.image_grid(0.5 + 0.5 * causes / scale, out / "causes.png",
                     "What each binary cause draws: row m of w (grey 0, dark adds ink, light removes it)",
                     captions=[f"m={m}" for m in range(len(causes))], ncols=10)
    return Report([("learning_curves.png", f"The {estimates} of {cfg.eval_digits} fixed random digits of each split "
                    f"during training.{bound}"),
                   ("samples.png", samples),
                   ("causes.png", "Row m of w as an image: the pixel logits that binary cause m adds when it is on.")])


def cost_against_latents(family, cfg, data, out, progress, log=print, latents=(2, 4, 6, 8, 10, 12, 14, 16, 18, 20),
                         steps=3):
    """Seed problem 10, measured: seconds per training step (batch `batch_size`) of each SBN
    guide as M grows, and the process's peak resident memory. Enumeration is O(2^M); the sampled
    guides are O(M)."""
    x = data.binary("train")[: cfg.batch_size]
    results = {}
    for guide in ("bernoulli", "relaxed", "enum"):  # enum last: peak memory only grows
        results[guide] = {"latents": [], "seconds_per_step": [], "peak_rss_mb": []}
        for M in latents:
            model = family(**{**cfg.model_args, "latents": M}).to(cfg.device)
            pyro.clear_param_store()
            pyro.set_rng_seed(cfg.seed)
            model.reset_parameters()  # the networks' weights follow the seed too
            svi = SVI(model.model, model.guide(guide), model.elbo(guide), torch.optim.Adam, cfg.lr, (x,))
            svi.step(x)  # warm-up: lazy imports, first-call allocations
            started = time.perf_counter()
            for _ in range(steps):
                svi.step(x)
            seconds = (time.perf_counter() - started) / steps
            results[guide]["latents"].append(M)
            results[guide]["seconds_per_step"].append(seconds)
            results[guide]["peak_rss_mb"].append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            log(f"guide {guide}, M = {M}: {seconds:.4f} s per step")
    plot_cost_against_latents(results, out / "cost_vs_latents.png", f"Cost of one training step (batch "
                              f"{cfg.batch_size}) against the number of binary latents")
    write_json({"batch_size": cfg.batch_size, "steps_timed": steps, "results": results}, out / "cost_vs_latents.json")
    by_latents = {M: {f"{guide} {what}": r[key][i] for guide, r in results.items()
                      for key, what in (("seconds_per_step", "s per step"), ("peak_rss_mb", "peak MB"))}
                  for i, M in enumerate(latents)}
    return Report([("cost_vs_latents.png", f"Seconds per training step (batch {cfg.batch_size}, mean of {steps}) "
                    "and the process's peak resident memory against M, each guide, with 2^M through enumeration's "
                    "last point.")],
                  {"by_latents_M": by_latents, "peak MB": "the whole process's peak resident memory so far (it "
                   "only grows: guides run in the order of the columns)"})


def gradient_variance(family, cfg, data, out, progress, log=print, draws=200):
    """The variance of each sampled guide's gradient estimator at fixed parameters (the untrained
    model of the seed, one batch of `batch_size` training digits). For the model's weights w the
    exact gradient of log p(x) is known by enumeration (M <= 20), so the mean estimated gradient is
    also compared with it (cosine similarity)."""
    model = family(**cfg.model_args).to(cfg.device)
    x = data.binary("train")[: cfg.batch_size]
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    model.reset_parameters()  # the networks' weights follow the seed too

    def gradients(elbo, guide):
        for _, p in pyro.get_param_store().named_parameters():
            p.grad = None
        elbo.loss_and_grads(model.model, guide, x)
        params = dict(pyro.get_param_store().named_parameters())
        encoder = [p.grad.flatten() for name, p in params.items() if name.startswith("encoder") and p.grad is not None]
        return params["w"].grad.flatten().clone(), torch.cat(encoder).clone() if encoder else None

    exact_w, _ = gradients(model.elbo("enum"), model.guide_enum)
    results = {}
    for guide in ("bernoulli", "relaxed"):
        elbo = model.elbo(guide)
        draws_w, draws_encoder = zip(*(gradients(elbo, model.guide(guide)) for _ in range(draws)))
        w, encoder = torch.stack(draws_w), torch.stack(draws_encoder)
        results[guide] = {
            "w_variance_per_coordinate": w.var(0).mean().item(),
            "encoder_variance_per_coordinate": encoder.var(0).mean().item(),
            "w_mean_cosine_to_exact_gradient": torch.nn.functional.cosine_similarity(w.mean(0), exact_w, 0).item(),
        }
        log(f"guide {guide}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[guide].items()))
    write_json({"latents": model.latents, "batch_size": cfg.batch_size, "draws": draws,
                "exact_w_gradient_norm": exact_w.norm().item(), "results": results}, out / "gradient_variance.json")
    return Report([], {"gradients": f"{draws} draws of each guide's gradient estimator on one batch of "
                       f"{cfg.batch_size} training digits, the untrained model of the seed, M = {model.latents}",
                       "exact_w_gradient_norm": exact_w.norm().item(), "by_guide": results})


def plot_cost_against_latents(results, path, title):
    """Seconds per step and peak memory against M, log scale, one line per guide."""
    fig, (time_ax, memory_ax) = plots.subplots(1, 2, figsize=(12, 4))
    for guide, r in results.items():
        time_ax.plot(r["latents"], r["seconds_per_step"], "o-", label=f"guide {guide}")
        memory_ax.plot(r["latents"], r["peak_rss_mb"], "o-", label=f"guide {guide}")
    enum = results.get("enum")
    if enum:  # the O(2^M) reference through the last enumerated point
        M = np.asarray(enum["latents"], dtype=float)
        time_ax.plot(M, enum["seconds_per_step"][-1] * 2.0 ** (M - M[-1]), "k:", label="2^M (scaled)")
    time_ax.set_yscale("log")
    time_ax.set_ylabel("seconds per training step")
    memory_ax.set_ylabel("peak resident memory of the process (MB)")
    for ax in (time_ax, memory_ax):
        ax.set_xticks(next(iter(results.values()))["latents"])
        ax.set_xlabel("M, binary latents")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    plots.save(fig, path)


COST_AGAINST_LATENTS = Experiment(
    "seconds and memory per training step against M, each guide (seed problem 10)", cost_against_latents,
    sets={"guide": "it times every guide", "latents": "it times every M it plots", "optimizer": "it times Adam steps",
          "compile": "it times eager steps",
          **dict.fromkeys(("epochs", "patience", "eval_every", "eval_digits", "eval_samples"),
                          "it times training steps, it trains no whole run")})
GRADIENT_VARIANCE = Experiment(
    "each sampled guide's gradient variance at fixed parameters, against the exact gradient", gradient_variance,
    sets={"guide": "it compares the sampled guides with the exact gradient",
          **dict.fromkeys(("epochs", "lr", "optimizer", "patience", "eval_every", "eval_digits", "eval_samples",
                           "train_subset", "elbo", "particles", "jit", "compile"),
                         "it trains nothing: the untrained model of the seed")})
