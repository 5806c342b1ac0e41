"""A trained model in use (ppl_models.load and its four queries) against brute force: every latent
state and every completion of the missing pixels summed by hand, and numerical quadrature for a
VAE with one latent dimension."""

import itertools
import json
import math

import numpy as np
import pyro
import pytest
import torch
from conftest import run_cli

from ppl_models import load
from ppl_models.cli import main
from ppl_models.config import Config, SettingError
from ppl_models.data import DataError
from ppl_models.masks import observe
from ppl_models.models import FAMILIES
from ppl_models.rundir import TrainingError
from ppl_models.trained import TrainedModel, register_networks

D = 5  # pixels of the tiny models: 2^5 digits to sum over


def tiny(name, guide, **model_args):
    """A TrainedModel of `name` on D pixels with random, far-from-uniform params."""
    family = FAMILIES[name](num_pixels=D, **model_args)
    with pyro.get_param_store().scope() as params:
        register_networks(family, guide)
        store = pyro.get_param_store()
        for site in ("b", "w", "c"):
            if site in store:
                with torch.no_grad():
                    store[site].copy_(2 * torch.randn(store[site].shape))
        for parameter in (family.decoder if name == "vae" else family).parameters():  # q as it comes: a proposal
            with torch.no_grad():
                parameter.mul_(3)
    return TrainedModel(family, Config(model=name, guide=guide), params, "test")


def states_and_likelihoods(model):
    """Every latent state z, log p(z) and p(x_d = 1 | z) for it, by hand from the params."""
    with pyro.get_param_store().scope(model._params):
        b, w, c = (pyro.param(name).detach().double() for name in "bwc")
    if model.cfg.model == "mixture":
        return torch.arange(len(b)), torch.log_softmax(b, -1), torch.sigmoid(w + c)
    codes = torch.tensor(list(itertools.product([0.0, 1.0], repeat=len(b))), dtype=torch.float64)
    log_prior = (codes * torch.nn.functional.logsigmoid(b) + (1 - codes) * torch.nn.functional.logsigmoid(-b)).sum(-1)
    return codes, log_prior, torch.sigmoid(codes @ w + c)


def brute_force(model, digit, observed):
    """log p(x), log p(x_observed), p(x_d = 1 | x_observed) and p(z | x_observed) for one digit,
    summing p(z) p(x | z) over every state z and every completion of the missing pixels."""
    states, log_prior, probs = states_and_likelihoods(model)
    completions = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=torch.float64)
    completions = completions[(completions[:, observed] == digit[observed].double()).all(-1)]
    log_pixels = torch.where(completions[:, None].bool(), probs, 1 - probs).log().sum(-1)  # (completions, states)
    log_joint = log_prior + log_pixels
    log_p_observed = torch.logsumexp(log_joint, (0, 1))
    full = (completions == digit.double()).all(-1)
    weights = torch.softmax(log_joint.flatten(), 0).reshape(log_joint.shape)
    return dict(log_p=torch.logsumexp(log_joint[full], (0, 1)), log_p_observed=log_p_observed,
                fill=(weights.sum(1)[:, None] * completions).sum(0), posterior=weights.sum(0), states=states)


def random_digits_and_masks(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((n, D), 0.5), generator=generator)
    observed = torch.rand(n, D, generator=generator) < 0.5
    observed[:, 0], observed[:, 1] = True, False  # at least one observed and one missing pixel each
    return x, observed


CASES = [("mixture", "enum", {"components": 3}), ("sbn", "enum", {"latents": 6}), ("sbn", "bernoulli", {"latents": 3})]


@pytest.mark.parametrize("name,guide,args", CASES)
def test_exact_fill_in_and_conditional_log_likelihood_equal_brute_force(name, guide, args):
    model = tiny(name, guide, **args)
    x, observed = random_digits_and_masks(6)
    filled = model.fill_in(x, observed, method="exact", num_samples=4)
    assert filled.estimator == "exact"
    for digit, mask, probs, log_missing in zip(x, observed, filled.probabilities, filled.log_prob_missing):
        truth = brute_force(model, digit, mask)
        assert torch.allclose(probs.double(), truth["fill"], atol=1e-5)
        assert log_missing.item() == pytest.approx((truth["log_p"] - truth["log_p_observed"]).item(), abs=1e-4)
    assert torch.equal(filled.probabilities[observed], x[observed])  # observed pixels are kept, in samples too
    assert torch.equal(filled.samples[:, observed], x[observed].expand(4, -1))


@pytest.mark.parametrize("name,guide,args", CASES)
def test_exact_posterior_equals_brute_force_given_all_or_part_of_a_digit(name, guide, args):
    model = tiny(name, guide, **args)
    x, observed = random_digits_and_masks(5, seed=1)
    for mask in (observed, torch.ones_like(observed)):
        posterior = model.posterior(x, mask, method="exact")
        for n, (digit, digit_mask) in enumerate(zip(x, mask)):
            truth = brute_force(model, digit, digit_mask)
            if name == "mixture":
                assert torch.allclose(posterior.summary["p(z = k | x)"][n].double(), truth["posterior"], atol=1e-5)
                assert posterior.summary["most probable z"][n] == truth["posterior"].argmax()
            else:
                marginals = truth["posterior"] @ truth["states"]
                assert torch.allclose(posterior.summary["p(z_m = 1 | x)"][n].double(), marginals, atol=1e-5)
                assert torch.equal(posterior.summary["most probable z"][n].double(),
                                   truth["states"][truth["posterior"].argmax()])
    assert model.log_prob(x, observed).log_prob.double() == pytest.approx(
        torch.stack([brute_force(model, d, m)["log_p_observed"] for d, m in zip(x, observed)]), abs=1e-4)


@pytest.mark.parametrize("name,guide,args", CASES[:2])
def test_exact_posterior_draws_follow_the_posterior(name, guide, args):
    model = tiny(name, guide, **args)
    x, observed = random_digits_and_masks(2, seed=2)
    draws = model.posterior(x, observed, method="exact", num_samples=4000).samples  # (4000, 2, ...)
    for n in range(2):
        truth = brute_force(model, x[n], observed[n])
        index = draws[:, n] if name == "mixture" else (draws[:, n] @ 2 ** torch.arange(args["latents"] - 1, -1, -1.0))
        frequencies = torch.bincount(index.long(), minlength=len(truth["states"])).double() / 4000
        assert (frequencies - truth["posterior"]).abs().max() < 0.03


@pytest.mark.parametrize("method", ["importance", "prior"])
def test_importance_estimates_converge_to_the_exact_answers(method):
    model = tiny("sbn", "bernoulli", latents=3)
    x, observed = random_digits_and_masks(4, seed=3)
    exact = model.fill_in(x, observed, method="exact")
    estimate = model.fill_in(x, observed, method=method, draws=20000)
    proposal = "trained guide" if method == "importance" else "prior"
    assert estimate.estimator.startswith(f"estimate: importance sampling, the {proposal}")
    assert torch.allclose(estimate.log_prob_missing, exact.log_prob_missing, atol=0.05)
    assert torch.allclose(estimate.probabilities, exact.probabilities, atol=0.02)
    marginals = model.posterior(x, observed, method=method, draws=20000).summary["p(z_m = 1 | x)"]
    assert torch.allclose(marginals, exact.posterior.summary["p(z_m = 1 | x)"], atol=0.02)
    assert (estimate.posterior.diagnostics["effective sample size"] > 50).all()


def vae_quadrature(model, digit, observed, grid=torch.linspace(-8, 8, 4001)):
    """The posterior mean of z and log p(x_missing | x_observed) of a z-dim-1 VAE by the trapezoid rule."""
    with pyro.get_param_store().scope(model._params), torch.no_grad():
        logits = model.family.pixel_logits(grid[:, None]).double()
    log_pixels = torch.distributions.Bernoulli(logits=logits).log_prob(digit.double())  # (grid, D)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid).double()
    log_observed = log_prior + (log_pixels * observed).sum(-1)
    log_full = log_prior + log_pixels.sum(-1)
    posterior = torch.softmax(log_observed, 0)  # (the grid's step cancels from both)
    return (posterior * grid).sum().item(), (torch.logsumexp(log_full, 0) - torch.logsumexp(log_observed, 0)).item()


@pytest.mark.filterwarnings("ignore:ConditionalAutoRegressiveNN input_dim = 1")  # the iaf guide's flows, unused
@pytest.mark.parametrize("method,draws,tolerance", [("importance", 20000, 0.03), ("prior", 20000, 0.03),
                                                    ("nuts", 400, 0.15)])
def test_vae_posterior_mean_and_fill_in_agree_with_quadrature(method, draws, tolerance):
    model = tiny("vae", "normal", z_dim=1, hidden=(8,))
    x, observed = random_digits_and_masks(3, seed=4)
    filled = model.fill_in(x, observed, method=method, draws=draws, warmup=200)
    assert filled.estimator.startswith("estimate: ")
    for n in range(3):
        mean, log_missing = vae_quadrature(model, x[n], observed[n])
        assert filled.posterior.summary["posterior mean"][n].item() == pytest.approx(mean, abs=tolerance)
        assert filled.log_prob_missing[n].item() == pytest.approx(log_missing, abs=3 * tolerance)
    assert {"q(z | x) mean", "q(z | x) sd"} <= set(filled.posterior.summary)
    if method == "nuts":
        assert (filled.posterior.diagnostics["split R-hat, worst coordinate"] < 1.1).all()


def test_one_digit_any_dtype_and_images_give_the_same_answers():
    model = tiny("mixture", "enum", components=4)
    x, observed = random_digits_and_masks(1, seed=5)
    reference = model.fill_in(x, observed, num_samples=2)
    for digit in (x[0], x[0].to(torch.uint8), x[0].bool(), x[0].numpy().astype(np.int64)):
        again = model.fill_in(digit, observed[0], num_samples=2)
        assert torch.equal(again.probabilities, reference.probabilities)
        assert torch.equal(model.posterior(digit).summary["p(z = k | x)"], model.posterior(x).summary["p(z = k | x)"])


def test_bad_inputs_are_refused_with_what_to_do():
    model = tiny("sbn", "enum", latents=2)
    x, observed = random_digits_and_masks(3)
    with pytest.raises(DataError, match="values other than 0 and 1"):
        model.log_prob(x * 0.5)
    with pytest.raises(SettingError, match=r"digits must be \(5,\) or \(N, 5\)"):
        model.log_prob(torch.zeros(3, 6))
    with pytest.raises(SettingError, match="marks no pixel of digit 0 as observed: nothing to condition on"):
        model.posterior(x, torch.zeros(D, dtype=torch.bool))
    with pytest.raises(SettingError, match="marks every pixel of digit 0 as observed: nothing to fill in"):
        model.fill_in(x, torch.ones(D, dtype=torch.bool))
    with pytest.raises(SettingError, match="choose one of: exact, prior"):
        model.fill_in(x, observed, method="nuts")
    with pytest.raises(SettingError, match="has no exact log-likelihood|guide 'enum' is exact"):
        model.log_prob(x, estimator="iwae-10")
    with pytest.raises(SettingError, match="unknown `estimator=iwae`"):
        model.log_prob(x, estimator="iwae")
    with pytest.raises(SettingError, match="`draws` must be a positive integer"):
        model.fill_in(x, observed, method="prior", draws=0)
    with pytest.raises(SettingError, match="unknown `observe=middle`"):
        observe("middle")
    with pytest.raises(SettingError, match="a mask of observed pixels is needed"):
        model.fill_in(x, None)
    for too_many in (10**20, 10**6 + 1):  # (memory no machine has, or days of computing)
        with pytest.raises(SettingError, match=f"`n` must be a positive integer up to 1,000,000, got {too_many}"):
            model.sample(too_many)
    with pytest.raises(SettingError, match="`warmup` must be an integer from 0 up to 1,000,000, got 2.5"):
        model.posterior(x, method="prior", warmup=2.5)
    assert model.sample(np.int64(3)).digits.shape == (3, D)  # numpy's integers are integers


def test_masks_observe_halves_and_random_fractions():
    top = observe("top")
    assert top.shape == (784,) and top.sum() == 392 and top[:392].all()
    assert torch.equal(observe("left").reshape(28, 28)[:, :14], torch.ones(28, 14, dtype=torch.bool))
    assert torch.equal(observe("bottom"), ~top) and torch.equal(observe("right"), ~observe("left"))
    random = observe("random:0.25", (3, 784), generator=torch.Generator().manual_seed(0))
    assert random.shape == (3, 784) and (random.sum(-1) == 196).all() and not torch.equal(random[0], random[1])
    for bad in ("random:0", "random:1", "random:x"):
        with pytest.raises(SettingError, match="between 0 and 1"):
            observe(bad)


@pytest.mark.parametrize("family,flags", [("mixture", ["--components", "3"]),
                                          ("sbn", ["--latents", "4", "--guide", "bernoulli", "--eval-samples", "20"]),
                                          ("vae", ["--guide", "iaf", "--eval-samples", "20", "--patience", "1"])])
def test_load_gives_the_trained_model_and_the_numbers_metrics_json_has(offline, tiny_binarized, tmp_path, family,
                                                                       flags):
    out = tmp_path / family
    args = ["--model", family, *flags, "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
            "--epochs", "2", "--batch-size", "50", "--out", str(out)]
    assert run_cli(*args) == 0
    pyro.clear_param_store()
    pyro.get_param_store()["unrelated"] = torch.ones(2)
    rng = torch.get_rng_state()
    model = load(out)
    assert set(pyro.get_param_store().keys()) == {"unrelated"}  # the global store is left alone, and the RNG
    assert torch.equal(torch.get_rng_state(), rng)
    final = json.loads((out / "metrics.json").read_text())["final"]["test"]
    test_digits = np.load(tiny_binarized / "binarized_mnist.npz")["test"]  # uint8, as the data file holds them
    for estimator, value in final.items():
        assert model.log_prob(test_digits, estimator=estimator, seed=0).mean == pytest.approx(value, abs=1e-4)
    default = model.log_prob(test_digits[:3])
    assert default.estimator == ("exact" if family != "vae" else "iwae-1000") and math.isfinite(default.stderr)
    samples = model.sample(6, seed=3)
    assert samples.digits.shape == (6, 784) and torch.equal(samples.digits, model.sample(6, seed=3).digits)
    assert ((samples.probabilities > 0) & (samples.probabilities < 1)).all()
    rng = torch.get_rng_state()  # a random mask is the query's, drawn from its seed: the same call, the same answer
    filled = [model.fill_in(test_digits[:3], "random:0.5", seed=1, draws=20) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(filled[0].log_prob_missing, filled[1].log_prob_missing)
    assert torch.equal(filled[0].probabilities, filled[1].probabilities)


def test_load_refuses_what_is_not_a_trained_run(tmp_path):
    with pytest.raises(TrainingError, match="is not a training run"):
        load(tmp_path / "missing")
    (tmp_path / "experiment.json").write_text("{}")
    with pytest.raises(TrainingError, match="holds an experiment"):
        load(tmp_path)
    run_dir = tmp_path / "damaged"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="corrupt or not a ppl_models checkpoint"):
        load(run_dir)


def test_load_refuses_a_run_directory_whose_files_do_not_belong_together(offline, tiny_binarized, tmp_path, capsys):
    runs = {}
    for seed in (0, 1):  # two runs of the same settings
        runs[seed] = tmp_path / f"seed{seed}"
        assert run_cli("--model", "vae", "--z-dim", "2", "--hidden", "8", "--dataset", "binarized-mnist", "--data-dir",
                       str(tiny_binarized), "--epochs", "2", "--batch-size", "50", "--patience", "2", "--seed",
                       str(seed), "--out", str(runs[seed])) == 0
    run = runs[0]
    originals = {name: (run / name).read_bytes() for name in ("best.pt", "checkpoint.pt", "metrics.json")}

    def edited_checkpoint(edit):
        checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
        edit(checkpoint["config"])
        torch.save(checkpoint, run / "checkpoint.pt")

    damages = [
        (lambda: (run / "best.pt").write_bytes((runs[1] / "best.pt").read_bytes()),
         f"{run / 'best.pt'} is another run's (run "),
        (lambda: edited_checkpoint(lambda cfg: cfg["model_args"].update(z_dim=3)),
         f"{run / 'best.pt'} does not fit the run's settings (VAE, z-dim 3"),
        (lambda: edited_checkpoint(lambda cfg: cfg.update(guide="bogus")),
         "checkpoint.pt holds settings that build no model (`guide='bogus'` does not belong to model 'vae'"),
        (lambda: edited_checkpoint(lambda cfg: cfg.update(model_args={"z_dim": 2, "hidden": [8], "depth": 9})),
         "checkpoint.pt holds settings that build no model ("),
    ]
    for damage, message in damages:
        damage()
        with pytest.raises(TrainingError) as refusal:
            load(run)
        assert message in str(refusal.value), refusal.value
        assert main(["score", str(run), "test:0", "--quiet"]) == 2  # the commands: one line, exit 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
        for name, data in originals.items():
            (run / name).write_bytes(data)
    (run / "metrics.json").write_text("[1, 2]")  # not what a run writes, and not needed to use one
    assert "(the best valid epoch, ?)" in load(run).source
    with pytest.raises(SettingError, match="`device='meta'`: ppl_models runs on cpu or cuda, not meta"):
        load(run, device="meta")


def test_two_loaded_models_keep_their_own_params():
    first, second = tiny("mixture", "enum", components=3), tiny("mixture", "enum", components=3)
    x, _ = random_digits_and_masks(4)
    assert not torch.allclose(first.log_prob(x).log_prob, second.log_prob(x).log_prob)
    assert torch.equal(first.log_prob(x).log_prob, first.log_prob(x).log_prob)
