"""The mixture's report: seed problems 6-9 (component means, samples, learning curves,
Frankenstein digits), and filling in and inferring with the trained model."""

import torch

from .. import plots
from ..data import DataError, labelled_test_digits, random_digits
from ..evaluate import batch_test, cluster_purity, roc_auc
from ..family import Report
from ..inference import fill_in
from ..masks import observe
from ..report import draw_learning_curves, draw_samples

BATCH_SIZES = (1, 2, 5, 10, 20)  # digits per batch of the Frankenstein batch test


def report(model, run):
    cfg, out, x_test = run.cfg, run.out, run.data.binary("test")
    generator = torch.Generator().manual_seed(cfg.seed)  # the digits shown, then the Frankenstein splits
    draw_learning_curves(run, f"{model.summary(cfg.guide)}: {cfg.eval_digits} fixed random train / test digits")
    draw_component_means(model, out)
    samples = draw_samples(model, run, "a component z ~ p(z) (above each)",
                           lambda latents: [f"z={k}" for k in latents["z"].tolist()])
    shown_digits = random_digits(x_test, 10, generator=generator)  # test files can be ordered by class
    findings = {"fill_in": draw_fill_in(model, x_test, shown_digits, out)}
    draw_inferred_components(model, shown_digits, out)
    if run.data.labels["test"] is not None:
        findings["cluster_purity_test"] = cluster_purity(model.component_probabilities(x_test).argmax(-1),
                                                         run.data.labels["test"])
    figures = [("learning_curves.png", f"Exact log-likelihood of {cfg.eval_digits} fixed random digits of each split "
                "during training (seed problem 8); the untrained model starts near -543 nats."),
               ("component_means.png", "What each component draws: p(x_d = 1 | z = k), the pixel probabilities of "
                "component k (seed problem 6)."),
               ("samples.png", f"Seed problem 7. {samples}"),
               ("fill_in.png", "Filling in missing pixels: given only the top half, the posterior over components "
                "gives the expected bottom half, beside the true digit."),
               ("infer.png", "Inferring the latent: test digits and the mean image of their most probable component, "
                "with p(z | x).")]
    try:
        findings["frankenstein"] = frankenstein_report(model, run, generator)
        figures += [("frankenstein.png", "Natural test digits and Frankenstein digits (two halves of digits of "
                     f"different classes) with their exact log p(x) (seed problem 9), from "
                     f"{findings['frankenstein']['source']}."),
                    ("frankenstein_hist.png", "Exact log p(x) of natural and Frankenstein test digits: how well the "
                     "model tells them apart; ROC AUC and the batch test's power are under Other findings.")]
    except DataError as error:  # said in the report too: a section left out says why
        findings["frankenstein"] = f"left out: splicing digits of two classes needs labelled test digits; {error}"
        run.log(f"note: Frankenstein digits skipped: {error}")
    return Report(figures, findings)


def draw_component_means(model, out):
    shown = min(model.components, 100)
    plots.image_grid(model.component_means()[:shown], out / "component_means.png",
                     f"p(x_d = 1 | z = k): the {'first 100 of ' if model.components > 100 else ''}{model.components} "
                     "component means", captions=[f"k={k}" for k in range(shown)], ncols=10)


def draw_fill_in(model, x_test, shown_digits, out):
    """The bottom half given the top half, drawn for the shown digits; returns the exact
    log p(bottom | top) = log p(x) - log p(top), averaged over the test split."""
    top = observe("top", x_test.shape[1:], x_test.device)
    observed = top.expand_as(shown_digits)
    completions = fill_in(model.pixel_logits, shown_digits, observed, model.exact_posterior(shown_digits, observed, 1),
                          1).probabilities
    conditional = model.log_likelihood(x_test) - model.log_likelihood(x_test, top)
    plots.image_grid(torch.cat([shown_digits * top + 0.35 * ~top, completions, shown_digits]),
                     out / "fill_in.png", "Fill in the bottom half: observed top (grey = missing), "
                     "E[x | top half], truth", row_labels=["observed", "completion", "truth"], ncols=10)
    return {"exact log p(bottom half | top half), test": conditional.mean().item(), "digits": x_test.shape[0]}


def draw_inferred_components(model, shown_digits, out):
    """p(z | x) for the shown digits; the most probable component's mean beside each."""
    shown = model.component_probabilities(shown_digits).max(-1)
    plots.image_grid(torch.cat([shown_digits, model.component_means()[shown.indices]]), out / "infer.png",
                     "Infer the latent: test digits and the mean of their most probable component",
                     captions=[""] * len(shown_digits) + [f"k={k} p={p:.2f}" for k, p in
                                                          zip(shown.indices.tolist(), shown.values.tolist())],
                     row_labels=["digit", "argmax p(z|x)"], ncols=10)


# ---- seed problem 9: Frankenstein digits ------------------------------------------------------
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


def frankenstein_report(model, run, generator):
    """Seed problem 9, made quantitative, on labelled test digits of the run's own data set
    (`data.labelled_test_digits`), split three ways: natural digits to calibrate the batch test,
    natural digits to measure it on, and digits spliced into Frankenstein digits. Splicing binary
    digits is splicing grayscale ones and then binarizing: every rule binarizes pixel by pixel."""
    digits, labels, source = labelled_test_digits(run.data, run.cfg.data_dir, download=run.download)
    digits, labels = digits.cpu(), labels.cpu()
    order = torch.randperm(len(labels), generator=generator)
    calibrate, natural, spliced = order.tensor_split(3)
    device = run.data.binary("test").device

    def score(x):
        return model.log_likelihood(x.to(device)).cpu()

    frankenstein = frankenstein_digits(digits[spliced], labels[spliced], generator)
    log_p = {"calibration": score(digits[calibrate]), "natural": score(digits[natural]),
             "frankenstein": score(frankenstein)}
    plots.image_grid(torch.cat([digits[natural][:10], frankenstein[:10]]), run.out / "frankenstein.png",
                     "Natural (top) and Frankenstein (bottom) test digits, exact log p(x)",
                     captions=[f"{v:.0f}" for v in torch.cat([log_p["natural"][:10], log_p["frankenstein"][:10]])],
                     row_labels=["natural", "Frankenstein"], ncols=10)
    plots.two_histograms(log_p["natural"], log_p["frankenstein"],
                         [f"natural ({len(natural)})", f"Frankenstein ({len(frankenstein)})"],
                         run.out / "frankenstein_hist.png", "Exact log p(x) of natural and Frankenstein test digits",
                         "log p(x) (nats)")
    tests = batch_test(log_p["calibration"], log_p["natural"], log_p["frankenstein"], BATCH_SIZES, seed=run.cfg.seed)
    return {
        "source": source,
        "digits": {name: len(v) for name, v in log_p.items()},
        "mean_log_p": {name: v.mean().item() for name, v in log_p.items()},
        "roc_auc": roc_auc(log_p["natural"], log_p["frankenstein"]),
        "batch_test": {
            "statistic": "mean exact log p over the batch; reject 'natural' below the 5% quantile of "
                         "calibration batches",
            "by_batch_size": {str(n): r for n, r in tests.items()},
        },
    }
