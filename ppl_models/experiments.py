"""What `run.py` does: train a model, then use it for what a generative model is for (sample,
score, fill in, infer) and write the figures and numbers into the run directory."""

import csv
import json
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path

import pyro
import torch
from pyro import poutine

from . import plots
from .data import DataError, load_dataset, load_mnist_test_intensities
from .evaluate import batch_test, cluster_purity, per_digit_estimate, roc_auc
from .models import build_model, check_elbo, check_guide
from .report import write_report
from .train import SVI, atomic_torch_save, steps_per_epoch, train, write_json

BATCH_SIZES = (1, 2, 5, 10, 20)


def run(cfg, out, experiment=None, resume=False, progress=True, download=True, log=print):
    """The main job: one training run (or an experiment), its report, and a printed summary."""
    out = Path(out)
    model = build_model(cfg.model, cfg.model_args, cfg.device)
    check_guide(model, cfg.guide)
    check_elbo(model, cfg.elbo)
    data = load_dataset(cfg.dataset, binarize=cfg.binarize, data_dir=cfg.data_dir, device=cfg.device,
                        seed=cfg.seed, download=download, progress=progress)
    log(f"{model.summary()}, guide '{cfg.guide}'; {cfg.dataset} ({data.binarize} binarization): "
        + ", ".join(f"{split} {data.images[split].shape[0]:,} digits from {data.sources[split]}" for split in data.splits))
    if experiment:
        out.mkdir(parents=True, exist_ok=True)
        return EXPERIMENTS[experiment][1](cfg, data, out, progress, log)
    after_epoch = EPOCH_HOOKS[cfg.model](model, out, cfg) if cfg.model in EPOCH_HOOKS else None
    summary = train(model, data, cfg, out, resume=resume, progress=progress, log=log, after_epoch=after_epoch)
    figures = REPORTS[cfg.model](model, data, cfg, out, summary, download=download, log=log)
    write_json(summary, out / "metrics.json")
    write_report(out, asdict(cfg), summary, figures)
    log(describe(summary, out))
    return summary


def describe(summary, out):
    chosen = summary.get("early_stopping")
    when = f"epoch {chosen['best_epoch']} of {chosen['epochs_trained']} (best valid score)" if chosen else \
        f"after {summary['epochs']} epochs"
    lines = [f"final mean log-likelihood per digit (nats), {summary['model']} / {summary['guide']}, {when}:"]
    for split, values in summary["final"].items():
        figures = ", ".join(f"{name} {value:.2f}" for name, value in values.items())
        lines.append(f"  {split} ({summary['final_digits'][split]:,} digits): {figures}")
    lines.append(f"  {summary['seconds_per_epoch']:.1f} s per epoch of training; figures and metrics in {out}/")
    return "\n".join(lines)


def draw_learning_curves(out, cfg, data, summary, title):
    """learning_curves.png of a run from its metrics.csv, with early stopping's validation scores
    and the epoch it chose."""
    chosen = summary.get("early_stopping")
    plots.learning_curves(read_metrics(out), out / "learning_curves.png", title, steps_per_epoch(cfg, data),
                          chosen and (chosen["estimator"], chosen["valid_scores"], chosen["best_epoch"]))


def read_metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# ---- the mixture's report (seed problems 6-9, and fill-in / infer) -----------------------
def mixture_report(model, data, cfg, out, summary, download=True, log=print):
    x_test = data.binary("test")
    K = model.components
    generator = torch.Generator().manual_seed(cfg.seed)
    figures = [("learning_curves.png", f"Exact log-likelihood of {cfg.eval_digits} fixed random digits of each split "
                "during training (seed problem 8); the untrained model starts near -543 nats."),
               ("component_means.png", "What each component draws: p(x_d = 1 | z = k), the pixel probabilities of "
                "component k (seed problem 6)."),
               ("samples.png", "Digits sampled from the model, z first and then the pixels, with the component each "
                "came from (seed problem 7)."),
               ("fill_in.png", "Filling in missing pixels: given only the top half, the posterior over components "
                "gives the expected bottom half, beside the true digit."),
               ("infer.png", "Inferring the latent: test digits and the mean image of their most probable component, "
                "with p(z | x).")]

    shown = min(K, 100)
    plots.image_grid(model.component_means()[:shown], out / "component_means.png",
                     f"p(x_d = 1 | z = k): the {'first 100 of ' if K > 100 else ''}{K} component means",
                     captions=[f"k={k}" for k in range(shown)], ncols=10)

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        z, samples = model.sample(16)
    plots.image_grid(samples, out / "samples.png", "16 samples x ~ p(x), each with the component z it came from",
                     captions=[f"z={k}" for k in z.tolist()], ncols=8)

    draw_learning_curves(out, cfg, data, summary, f"{model.summary()}: {cfg.eval_digits} fixed random train / test digits")

    # Ten fixed random test digits to show (test files can be ordered by class).
    shown_digits = x_test[torch.randperm(x_test.shape[0], generator=generator)[:10].to(x_test.device)]

    # Fill in: the bottom half given the top half. log p(bottom | top) = log p(x) - log p(top) exactly.
    top = torch.zeros(784, device=x_test.device)
    top[: 14 * 28] = 1
    completions = model.fill_in(shown_digits, top.expand(10, 784))
    conditional = model.log_likelihood(x_test) - model.log_likelihood(x_test, top)
    summary["fill_in"] = {"exact log p(bottom half | top half), test": conditional.mean().item(),
                          "digits": x_test.shape[0]}
    plots.image_grid(torch.cat([shown_digits * top + 0.35 * (1 - top), completions, shown_digits]),
                     out / "fill_in.png", "Fill in the bottom half: observed top (grey = missing), "
                     "E[x | top half], truth", row_labels=["observed", "completion", "truth"], ncols=10)

    # Infer: p(z | x) for test digits; the most probable component beside each digit.
    shown = model.posterior(shown_digits).max(-1)
    plots.image_grid(torch.cat([shown_digits, model.component_means()[shown.indices]]), out / "infer.png",
                     "Infer the latent: test digits and the mean of their most probable component",
                     captions=[""] * 10 + [f"k={k} p={p:.2f}" for k, p in zip(shown.indices.tolist(),
                                                                               shown.values.tolist())],
                     row_labels=["digit", "argmax p(z|x)"], ncols=10)
    if data.labels["test"] is not None:
        summary["cluster_purity_test"] = cluster_purity(model.posterior(x_test).argmax(-1), data.labels["test"])

    try:
        summary["frankenstein"] = frankenstein_report(model, data, cfg, out, generator, download)
        figures += [("frankenstein.png", "Natural test digits and Frankenstein digits (two halves of digits of "
                     "different classes) with their exact log p(x) (seed problem 9)."),
                    ("frankenstein_hist.png", "Exact log p(x) of natural and Frankenstein test digits: how well the "
                     "model tells them apart; ROC AUC and the batch test's power are under Other findings.")]
    except DataError as error:
        log(f"note: Frankenstein digits skipped, they need the labelled MNIST test set: {error}")
    return figures


def frankenstein_digits(images, labels, generator):
    """The left half of each digit joined to the right half of a random digit of another class."""
    n = len(images)
    partner = torch.randint(n, (n,), generator=generator)
    clash = labels[partner] == labels
    while clash.any():  # redraw partners of the same class
        partner[clash] = torch.randint(n, (int(clash.sum()),), generator=generator)
        clash = labels[partner] == labels
    left = (torch.arange(784) % 28) < 14
    return torch.where(left, images, images[partner])


def frankenstein_report(model, data, cfg, out, generator, download):
    """Seed problem 9, made quantitative. The labelled MNIST test digits are split three ways:
    natural digits to calibrate the batch test, natural digits to measure it on, and digits
    spliced into Frankenstein digits. All are binarized the way the training data was."""
    intensities, labels = load_mnist_test_intensities(cfg.data_dir, download=download, progress=False)
    order = torch.randperm(len(labels), generator=generator)
    calibrate, natural, spliced = order.tensor_split(3)
    device = data.binary("test").device

    def binarize(grayscale):
        return data.binarize_like_training(grayscale).to(device)

    def score(grayscale):
        return model.log_likelihood(binarize(grayscale)).cpu()

    frankenstein = frankenstein_digits(intensities[spliced], labels[spliced], generator)
    log_p = {"calibration": score(intensities[calibrate]), "natural": score(intensities[natural]),
             "frankenstein": score(frankenstein)}

    plots.image_grid(torch.cat([binarize(intensities[natural][:10]), binarize(frankenstein[:10])]),
                     out / "frankenstein.png", "Natural (top) and Frankenstein (bottom) test digits, exact log p(x)",
                     captions=[f"{v:.0f}" for v in torch.cat([log_p["natural"][:10], log_p["frankenstein"][:10]])],
                     row_labels=["natural", "Frankenstein"], ncols=10)
    plots.two_histograms(log_p["natural"], log_p["frankenstein"],
                         [f"natural ({len(natural)})", f"Frankenstein ({len(frankenstein)})"],
                         out / "frankenstein_hist.png", "Exact log p(x) of natural and Frankenstein test digits",
                         "log p(x) (nats)")
    tests = batch_test(log_p["calibration"], log_p["natural"], log_p["frankenstein"], BATCH_SIZES, seed=cfg.seed)
    return {
        "digits": {name: len(v) for name, v in log_p.items()},
        "mean_log_p": {name: v.mean().item() for name, v in log_p.items()},
        "roc_auc": roc_auc(log_p["natural"], log_p["frankenstein"]),
        "batch_test": {
            "statistic": "mean exact log p over the batch; reject 'natural' below the 5% quantile of "
                         "calibration batches",
            "by_batch_size": {str(n): r for n, r in tests.items()},
        },
    }


# ---- the VAE's report (seed problems 22-24, and more) -------------------------------------
def vae_sample_recorder(model, out, cfg):
    """after_epoch hook: the decoder's mean image at 20 fixed z ~ N(0, I), kept per epoch in
    samples_through_training.pt (atomically rewritten, so a resumed run keeps its history)."""
    z = torch.randn(20, model.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(cfg.device)
    path = out / "samples_through_training.pt"

    def record(epoch):
        history = torch.load(path, weights_only=True) if epoch > 0 and path.exists() else {}
        history[epoch] = model.decode(z).cpu()
        atomic_torch_save(history, path)

    return record


def vae_report(model, data, cfg, out, summary, download=True, log=print):
    x_test = data.binary("test")
    generator = torch.Generator().manual_seed(cfg.seed)
    draw_learning_curves(out, cfg, data, summary,
                         f"{model.summary()}, guide {cfg.guide}: {cfg.eval_digits} fixed random digits per split")
    figures = [("learning_curves.png", f"ELBO of {cfg.eval_digits} fixed random digits of each split during training "
                "(seed problem 22): a lower bound on log p(x); the untrained model starts near -544 nats."),
               ("samples_through_training.png", "The decoder's mean image for the same 20 draws of z ~ N(0, I) before, "
                "part way through and after training (seed problem 24)."),
               ("manifold.png", "The learned manifold: the decoder's mean over a grid of the latent plane, placed "
                "through the inverse Normal CDF so each cell holds equal prior mass."),
               ("reconstructions.png", "Test digits and the decoder's mean at a z drawn from q(z | x): what the "
                "latent keeps of a digit."),
               ("latent_means.png", "Where test digits sit in latent space: the mean of q(z | x), coloured by class "
                "where labels exist.")]

    history = torch.load(out / "samples_through_training.pt", weights_only=True)
    epochs = sorted(history)
    shown_epochs = sorted({epochs[0], epochs[len(epochs) // 2], epochs[-1]})
    plots.image_grid(torch.cat([history[e] for e in shown_epochs]), out / "samples_through_training.png",
                     "Mean of p(x | z) for 20 fixed z ~ N(0, I), through training", ncols=20,
                     row_labels=[f"epoch {e}" if e else "untrained" for e in shown_epochs])

    # The latent manifold: a grid over (z_1, z_2) through the inverse Normal CDF, the rest of z at 0.
    grid = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 20))
    z = torch.zeros(20, 20, model.z_dim)
    z[..., 0], z[..., 1] = grid[None, :], grid.flip(0)[:, None]  # z_2 grows upwards
    plots.manifold(model.decode(z.reshape(-1, model.z_dim).to(cfg.device)), grid, out / "manifold.png",
                   "Decoder mean over the latent plane" + ("" if model.z_dim == 2 else
                                                            f" (z_1, z_2; the other {model.z_dim - 2} at 0)"))

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        digits = x_test[torch.randperm(x_test.shape[0], generator=generator)[:10].to(x_test.device)]
        z_digits = poutine.trace(model.guide(cfg.guide)).get_trace(digits).nodes["z"]["value"]
        z_all = latent_means(model, cfg.guide, x_test[:5000])
    plots.image_grid(torch.cat([digits, model.decode(z_digits)]), out / "reconstructions.png",
                     "Test digits and the decoder mean at one z ~ q(z | x)", ncols=10,
                     row_labels=["digit", "reconstruction"])
    labels = data.labels["test"]
    plots.latent_scatter(z_all[:, :2], None if labels is None else labels[:5000], out / "latent_means.png",
                         f"Mean of q(z | x) for 5000 test digits (guide {cfg.guide}; 100 samples each)"
                         + ("" if model.z_dim == 2 else ", first two coordinates"))
    return figures


@torch.no_grad()
def latent_means(model, guide_name, x, num_samples=100):
    """E_q[z | x] by averaging guide samples: the same for every guide, flows included."""
    with pyro.plate("particles", num_samples, dim=-2):
        z = poutine.trace(model.guide(guide_name)).get_trace(x).nodes["z"]["value"]
    return z.mean(0)


# ---- the sigmoid belief net's report --------------------------------------------------------
def sbn_report(model, data, cfg, out, summary, download=True, log=print):
    estimates = "exact log-likelihood" if model.exact else "ELBO"
    draw_learning_curves(out, cfg, data, summary,
                         f"{model.summary()}, guide {cfg.guide}: {cfg.eval_digits} fixed random digits per split")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        z, samples = model.sample(16)
    plots.image_grid(samples, out / "samples.png", "16 samples x ~ p(x), with how many causes were on",
                     captions=[f"{int(k)} on" for k in z.sum(-1).tolist()], ncols=8)
    causes = model.cause_images()[:100]
    scale = causes.abs().max().clamp(min=1e-6)
    plots.image_grid(0.5 + 0.5 * causes / scale, out / "causes.png",
                     "What each binary cause draws: row m of w (grey 0, dark adds ink, light removes it)",
                     captions=[f"m={m}" for m in range(len(causes))], ncols=10)
    return [("learning_curves.png", f"The {estimates} of {cfg.eval_digits} fixed random digits of each split during "
             "training."),
            ("samples.png", "Digits sampled from the model: the binary causes z first, then the pixels."),
            ("causes.png", "Row m of w as an image: the pixel logits that binary cause m adds when it is on.")]


# ---- experiments -----------------------------------------------------------------------------
def enum_vs_sampled(cfg, data, out, progress, log=print):
    """Train every guide of the model with the same settings: the exact (enumerated) one and the
    sampled ones. Plot the exact held-out log-likelihood of each against steps and against
    training time, with each sampled guide's ELBO beside it (their gap is KL(q || p(z | x)))."""
    guides = build_model(cfg.model, cfg.model_args, cfg.device).guides
    results = {}
    for guide in guides:
        log(f"training with guide '{guide}'")
        results[guide] = train(build_model(cfg.model, cfg.model_args, cfg.device), data, replace(cfg, guide=guide), out / guide,
                               progress=progress, log=log)
        write_json(results[guide], out / guide / "metrics.json")

    plot_enum_vs_sampled(out, guides, cfg.eval_digits)
    comparison = {guide: {"final": r["final"], "seconds_per_epoch": r["seconds_per_epoch"]} for guide, r in results.items()}
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    for guide, r in results.items():
        log(describe(r, out / guide))
    return comparison


def plot_enum_vs_sampled(out, guides, eval_digits):
    """enum_vs_sampled.png from the runs' metrics.csv (so it can be redrawn without training)."""
    by_step, by_time = {}, {}
    for guide in guides:
        rows = [r for r in read_metrics(out / guide) if r["split"] == "test"]
        for estimator in sorted({r["estimator"] for r in rows}):
            points = [r for r in rows if r["estimator"] == estimator]
            label = f"guide {guide}: test {estimator}"
            style = "-" if estimator == "exact" else ":"
            values = [float(r["value"]) for r in points]
            by_step[label] = ([int(r["step"]) for r in points], values, style)
            by_time[label] = ([float(r["seconds"]) for r in points], values, style)
    ylabel = "mean log-likelihood per digit (nats)"
    plots.curves_against([("SVI step", ylabel, by_step), ("training time (s, evaluation excluded)", ylabel, by_time)],
                         out / "enum_vs_sampled.png",
                         f"Exact enumeration vs. sampled ELBOs: exact log p(x) of each model, on {eval_digits} fixed "
                         "test digits")


def cost_against_latents(cfg, data, out, progress, log=print, latents=(2, 4, 6, 8, 10, 12, 14, 16, 18, 20), steps=3):
    """The seed's problem 10, measured: seconds per training step (batch --batch-size) of each SBN
    guide as M grows, and the process's peak resident memory. Enumeration is O(2^M); the sampled
    guides are O(M)."""
    x = data.binary("train")[: cfg.batch_size]
    results = {}
    for guide in ("bernoulli", "relaxed", "enum"):  # enum last: peak memory only grows
        results[guide] = {"latents": [], "seconds_per_step": [], "peak_rss_mb": []}
        for M in latents:
            model = build_model("sbn", {**cfg.model_args, "latents": M}, cfg.device)
            pyro.clear_param_store()
            pyro.set_rng_seed(cfg.seed)
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
    plots.cost_against_latents(results, out / "cost_vs_latents.png",
                               f"Cost of one training step (batch {cfg.batch_size}) against the number of binary latents")
    write_json({"batch_size": cfg.batch_size, "steps_timed": steps, "results": results}, out / "cost_vs_latents.json")
    return results


def gradient_variance(cfg, data, out, progress, log=print, draws=200):
    """Issue 5's third experiment: the variance of each sampled guide's gradient estimator at fixed
    parameters (the untrained model of --seed, one batch of --batch-size training digits). For the
    model's weights w the exact gradient of log p(x) is known by enumeration (M <= 20), so the
    mean estimated gradient is also compared with it (cosine similarity)."""
    model = build_model("sbn", cfg.model_args, cfg.device)
    x = data.binary("train")[: cfg.batch_size]
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)

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
    return results


def prior_vs_importance(cfg, data, out, progress, log=print, z_dims=(2, 5, 20),
                        sample_counts=(1, 10, 100, 1000, 10000), digits=20, repeats=10):
    """Seed problem 13, measured: log p(x) by plain Monte Carlo from the prior, log mean p(x | z_m)
    with z_m ~ p(z), against importance sampling from q, for growing M and several latent sizes.
    Each estimate is repeated `repeats` times on the same `digits` fixed random test digits; the
    plot shows the mean over digits of the mean estimate, and of its spread (sd over repeats)."""
    x_test = data.binary("test")
    x = x_test[torch.randperm(x_test.shape[0], generator=torch.Generator().manual_seed(0))[:digits].to(x_test.device)]
    panels, results = {}, {}
    for z_dim in z_dims:
        run_cfg = replace(cfg, model_args={**cfg.model_args, "z_dim": z_dim}, eval_samples=0)
        model = build_model(cfg.model, run_cfg.model_args, cfg.device)
        log(f"training the VAE with z-dim {z_dim}")
        train(model, data, run_cfg, out / f"z{z_dim}", progress=progress, log=log)
        lines = {}
        for proposal, label in (("prior", "Monte Carlo from the prior p(z)"), (cfg.guide, f"importance sampling from q ({cfg.guide})")):
            means, spreads = [], []
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                for M in sample_counts:
                    runs = torch.stack([per_digit_estimate(model, proposal, x, f"iwae-{M}") for _ in range(repeats)])
                    means.append(runs.mean().item())
                    spreads.append(runs.std(0).mean().item())
            lines[label] = (list(sample_counts), means, spreads)
            results[f"z-dim {z_dim}"] = results.get(f"z-dim {z_dim}", {}) | {
                proposal: {"samples": list(sample_counts), "mean": means, "sd_over_repeats": spreads}}
        panels[f"z-dim {z_dim}"] = lines
    plots.estimates_against_samples(panels, out / "prior_vs_importance.png",
                                    f"Estimating log p(x) of {digits} test digits: mean over digits of {repeats} "
                                    "repeated estimates, band = their sd")
    write_json({"digits": digits, "repeats": repeats, "estimates": results}, out / "prior_vs_importance.json")
    for z_dim, by_proposal in results.items():
        log(f"{z_dim}: M={sample_counts[-1]}: prior {by_proposal['prior']['mean'][-1]:.2f} "
            f"(sd {by_proposal['prior']['sd_over_repeats'][-1]:.2f}), q {by_proposal[cfg.guide]['mean'][-1]:.2f} "
            f"(sd {by_proposal[cfg.guide]['sd_over_repeats'][-1]:.2f}) nats")
    return results


REPORTS = {"mixture": mixture_report, "sbn": sbn_report, "vae": vae_report}
EPOCH_HOOKS = {"vae": vae_sample_recorder}
EXPERIMENTS = {  # name -> (the models it is for, what it does)
    "enum-vs-sampled": (("mixture", "sbn"), enum_vs_sampled),
    "cost-vs-latents": (("sbn",), cost_against_latents),
    "gradient-variance": (("sbn",), gradient_variance),
    "prior-vs-importance": (("vae",), prior_vs_importance),
}
