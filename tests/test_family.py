"""The family protocol: a family defined in this file alone, registered at run time, trains through
the shared loop and CLI, resumes, scores and writes its report; flags of other families are refused;
shared code names no family, guide or objective."""

import ast
import json
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import run_cli

import run
from ppl_models.family import Family, Hyperparameter, pyro_elbo
from ppl_models.models import FAMILIES


class IndependentPixels(Family):
    """x_d ~ Bernoulli(sigm(c_d)) independently: no latent, an exact log-likelihood."""

    name = "pixels"
    title = "independent Bernoulli pixels"
    guides = {"none": "nothing to infer: the model has no latent"}
    default_guide = "none"
    exact_guides = ("none",)
    exact = True
    hyperparameters = {"init_logit": Hyperparameter("every pixel's logit before training", float)}
    training_defaults = dict(lr=0.05, batch_size=50, epochs=1, eval_samples=0)  # the optimizer: Family's default

    def __init__(self, init_logit=0.0, num_pixels=784):
        super().__init__(num_pixels)
        self.init_logit = init_logit

    def logits(self):
        return pyro.param("c", lambda: torch.full((self.num_pixels,), self.init_logit, device=self.device))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Bernoulli(logits=self.logits()).to_event(1), obs=x)

    def guide_none(self, x):
        pass

    def elbo(self, guide, elbo=None, jit=False, particles=1, compile=False):
        return pyro_elbo("Trace_ELBO", jit, particles, compile=compile)

    @torch.no_grad()
    def log_likelihood(self, x):
        return dist.Bernoulli(logits=self.logits()).to_event(1).log_prob(x)


class BrighterPixels(IndependentPixels):
    """Another family with a hyperparameter of the same name: one flag serves both."""

    name = "brighter"
    title = "independent Bernoulli pixels, brighter"
    hyperparameters = {"init_logit": Hyperparameter("the logit every pixel starts from", float)}

    def __init__(self, init_logit=2.0, num_pixels=784):
        super().__init__(init_logit, num_pixels)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(FAMILIES, IndependentPixels.name, IndependentPixels)
    monkeypatch.setitem(FAMILIES, BrighterPixels.name, BrighterPixels)


def test_a_family_defined_outside_the_package_trains_resumes_scores_and_reports(registered, offline, tiny_binarized,
                                                                                 tmp_path, capsys):
    data = ["--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized)]
    assert run_cli("--model", "pixels", "--init-logit", "-1", *data, "--epochs", "2",
                   "--out", str(tmp_path / "two")) == 0
    straight = json.loads((tmp_path / "two" / "metrics.json").read_text())

    assert run_cli("--model", "pixels", "--init-logit", "-1", *data, "--out", str(tmp_path / "one")) == 0
    assert run_cli("--resume", str(tmp_path / "one"), "--epochs", "2") == 0  # one more epoch, from the checkpoint
    resumed = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert resumed["final"] == straight["final"] and set(straight["final"]["test"]) == {"exact"}

    # The score is the family's own log-likelihood of the trained params, over every test digit.
    c = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["params"]["c"]
    x_test = torch.from_numpy(__import__("numpy").load(tiny_binarized / "binarized_mnist.npz")["test"]).float()
    by_hand = (x_test * c - torch.nn.functional.softplus(c)).sum(-1).mean().item()
    assert straight["final"]["test"]["exact"] == pytest.approx(by_hand, abs=1e-3)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["model_args"] == {"init_logit": -1.0}

    page = (tmp_path / "two" / "report.html").read_text()
    assert re.findall(r'<img src="([^"]+)"', page) == ["learning_curves.png"]
    assert (tmp_path / "two" / "learning_curves.png").stat().st_size > 1000
    assert "pixels / none" in capsys.readouterr().out


def test_help_lists_a_registered_familys_guides_and_flags(registered, capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    text = capsys.readouterr().out
    assert "pixels: none (nothing to infer: the model has no latent)" in " ".join(text.split())
    assert "--init-logit" in text and "independent Bernoulli pixels (--model pixels)" in text
    assert "with --model brighter: the logit every pixel starts from (default: 2.0)" in " ".join(text.split())


def test_two_families_share_a_flag_and_each_gets_its_own_default(registered, offline, tiny_binarized, tmp_path):
    data = ["--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized)]
    for model, given, expected in (("brighter", [], 2.0), ("brighter", ["--init-logit", "-3"], -3.0),
                                   ("pixels", [], 0.0)):
        out = tmp_path / f"{model}{len(given)}"
        assert run_cli("--model", model, *given, *data, "--out", str(out)) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["model_args"] == {"init_logit": expected} and config["optimizer"] == "adam"


def test_sampling_comes_from_the_model_itself(registered):
    family = IndependentPixels(init_logit=3.0)
    drawn = family.sample(500)
    assert drawn.latents == {} and drawn.digits.shape == (500, 784)
    assert abs(drawn.digits.mean().item() - torch.sigmoid(torch.tensor(3.0)).item()) < 0.01


@pytest.mark.parametrize("name", FAMILIES)
def test_samples_come_with_the_bernoulli_means_they_were_drawn_from(name):
    family = FAMILIES[name]()
    drawn = family.sample(8)
    z = drawn.latents[family.latent_site]
    assert torch.allclose(drawn.probabilities, torch.sigmoid(family.pixel_logits(z)))
    assert drawn.digits.shape == drawn.probabilities.shape == (8, 784)


@pytest.mark.parametrize("args, message", [
    (["--model", "vae", "--latents", "5"], "--latents is a setting of model sbn, not of model vae; drop it"),
    (["--components", "5", "--model", "sbn"], "--components is a setting of model mixture, not of model sbn"),
    (["--model", "pixels", "--z-dim", "3"], "--z-dim is a setting of model vae, not of model pixels"),
    (["--model", "mixture", "--init-logit", "1"],
     "--init-logit is a setting of model pixels and brighter, not of model mixture"),
    (["--model", "pixels", "--particles", "2"], "--particles does not apply to guide 'none': its objective is the "
                                                "exact log-likelihood, nothing is sampled; drop --particles"),
    (["--model", "mixture", "--particles", "2"], "--particles does not apply to guide 'enum'"),
    (["--model", "pixels", "--elbo", "iwae"], "--elbo does not apply to model 'pixels'"),
    (["--model", "pixels", "--experiment", "enum-vs-sampled"], "unknown --experiment enum-vs-sampled for model pixels"),
])
def test_a_flag_of_another_family_exits_2_with_one_line(registered, offline, tmp_path, capsys, args, message):
    assert run_cli(*args, "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" or (err.startswith(f"error: {message}") and len(err.splitlines()) == 1), err


def test_a_resumed_run_refuses_a_hyperparameter_flag(offline, tiny_binarized, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--components", "3", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized),
                   "--out", str(out)) == 0
    capsys.readouterr()
    assert run_cli("--resume", str(out), "--components", "5") == 2
    assert "--components cannot change when resuming" in capsys.readouterr().err


def test_shared_code_names_no_family_guide_or_objective():
    """Only a family's own modules (models/) may name it, its guides or its ELBOs."""
    names = {name for family in FAMILIES.values()
             for name in (family.name, *family.guides, *family.elbos, *family.hyperparameters)}
    package = Path(run.__file__).parent / "ppl_models"
    for path in [*package.glob("*.py"), *package.glob("cli/*.py"), package.parent / "run.py"]:
        literals = {node.value for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not literals & names, (path.name, literals & names)
