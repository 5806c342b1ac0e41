"""The VAE: KL and bounds against Monte Carlo, gradients, and every guide and ELBO end to end."""

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import run
from ppl_models.config import Config
from ppl_models.evaluate import importance_log_weights, iwae_bound
from ppl_models.models.vae import VAE
from ppl_models.rundir import read_metrics
from ppl_models.train import train

QUIET = dict(progress=False, log=lambda *args: None)


def digits(n=8, seed=0):
    return torch.bernoulli(torch.full((n, 784), 0.2), generator=torch.Generator().manual_seed(seed))


def test_closed_form_kl_of_seed_problem_14_equals_monte_carlo():
    mu, sigma = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.5, 1.3, 0.1])
    closed_form = (-torch.log(sigma) + (sigma**2 + mu**2 - 1) / 2).sum()
    q, p = dist.Normal(mu, sigma).to_event(1), dist.Normal(0.0, 1.0).expand([3]).to_event(1)
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean()
    assert torch.allclose(closed_form, torch.distributions.kl_divergence(q, p), atol=1e-5)
    assert abs(monte_carlo - closed_form) < 0.05


@pytest.mark.parametrize("masked", [False, True])
def test_the_likelihood_site_scores_as_pyros_bernoulli_on_the_decoder_logits(masked):
    """The model's x site folds x into the decoder's last layer (LinearBernoulli); it must score
    exactly as the generic Bernoulli(logits = decoder(z)), for many z per digit, values and gradients."""
    vae, x = VAE(z_dim=3, hidden=(16, 8)), digits(5)
    observed = torch.rand(5, 784, generator=torch.Generator().manual_seed(1)) < 0.5 if masked else None
    z = torch.randn(7, 5, 3)  # 7 draws for each of 5 digits, as under an iwae-k particles plate
    trace = pyro.poutine.trace(pyro.poutine.condition(vae.model, data={"z": z})).get_trace(x, observed=observed)
    fast = trace.nodes["x"]["fn"].log_prob(x)
    generic = dist.Bernoulli(logits=vae.decoder(z))
    generic = (generic if observed is None else generic.mask(observed)).to_event(1).log_prob(x)
    assert fast.shape == generic.shape == (7, 5)
    assert torch.allclose(fast, generic, atol=1e-4, rtol=1e-5)
    weight = vae.decoder[1].weight
    fast_grad, = torch.autograd.grad(fast.sum(), weight)
    generic_grad, = torch.autograd.grad(generic.sum(), weight)
    assert torch.allclose(fast_grad, generic_grad, atol=1e-4, rtol=1e-4)


def test_meanfield_and_trace_elbos_agree_in_expectation():
    vae, x = VAE(z_dim=3, hidden=(32,)), digits()
    pyro.module("encoder", vae.encoder)
    meanfield = TraceMeanField_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    trace = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    a, b = (elbo.loss(vae.model, vae.guide_normal, x) for elbo in (meanfield, trace))
    assert abs(a - b) / len(x) < 0.5, (a, b)  # nats per digit; the sampled KL's standard error is ~0.05


def test_importance_sampled_estimate_is_above_the_elbo_and_grows_with_k():
    vae, x = VAE(z_dim=2, hidden=(32,)), digits(16)
    pyro.module("encoder", vae.encoder)
    elbo = importance_log_weights(vae.model, vae.guide_normal, x, 4000).mean().item()
    estimates = [torch.stack([iwae_bound(importance_log_weights(vae.model, vae.guide_normal, x, k))
                              for _ in range(200 // k)]).mean().item() for k in (1, 10, 100)]
    assert abs(estimates[0] - elbo) < 1.0  # IWAE-1 is the ELBO
    assert estimates[0] < estimates[1] < estimates[2], estimates


@pytest.mark.parametrize("guide", VAE.guides)
def test_gradients_reach_the_encoder(guide):
    vae = VAE(z_dim=3, hidden=(32,))
    Trace_ELBO(max_plate_nesting=1).loss_and_grads(vae.model, vae.guide(guide), digits())
    encoder = vae.lowrank_encoder if guide == "lowrank" else vae.encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    if guide == "iaf":
        assert all(p.grad is not None for p in vae.flows.parameters())


@pytest.mark.parametrize("elbo, particles, kl_warmup, activation", [
    ("trace", 1, 0, "relu"), ("meanfield", 1, 0, "relu"), ("iwae", 5, 0, "relu"), ("trace", 1, 1.5, "relu"),
    ("trace", 1, 0, "tanh"), ("iwae", 5, 0, "gated"),
])
def test_every_elbo_and_activation_raises_the_held_out_elbo(tiny_dataset, tmp_path, elbo, particles, kl_warmup,
                                                            activation):
    model_args = {"z_dim": 4, "hidden": [64], "activation": activation, "kl_warmup": kl_warmup}
    cfg = Config(model="vae", guide="normal", elbo=elbo, particles=particles, optimizer="adam", lr=3e-3,
                 epochs=2, batch_size=50, eval_every=1000, eval_digits=100, eval_samples=50, model_args=model_args)
    summary = train(VAE(**model_args), tiny_dataset, cfg, tmp_path, **QUIET)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    untrained = float(next(r for r in rows if r.startswith("0,0,0.0,test,elbo")).split(",")[-1])
    final = summary["final"]["test"]
    assert final["elbo"] > untrained + 150, (untrained, final)
    assert final["iwae-50"] >= final["elbo"] - 0.5


def test_gated_layer_multiplies_a_linear_map_by_a_sigmoid_gate():
    vae, z = VAE(z_dim=3, hidden=(5, 4), activation="gated"), torch.randn(6, 3)
    first, second, output = *vae.decoder[0], vae.decoder[1]
    by_hand = z
    for layer in (first, second):
        by_hand = (by_hand @ layer.value.weight.T + layer.value.bias) * torch.sigmoid(
            by_hand @ layer.gate.weight.T + layer.gate.bias)
    assert torch.allclose(vae.decode(z), torch.sigmoid(output(by_hand)), atol=1e-6)
    assert [layer.value.out_features for layer in vae.encoder.body] == [5, 4]  # encoder 784-5-4, decoder 3-4-5-784


def test_a_gated_run_resumes_as_a_gated_network(offline, tiny_binarized, tmp_path):
    common = ["--data-dir", str(tiny_binarized), "--dataset", "binarized-mnist", "--out", str(tmp_path / "run"),
              "--quiet", "--no-download", "--eval-samples", "5"]
    assert run.main(["--model", "vae", "--activation", "gated", "--z-dim", "2", "--hidden", "16", "--epochs", "1",
                     *common]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_args"]["activation"] == "gated"
    assert run.main(["--resume", str(tmp_path / "run"), "--epochs", "2", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2


def test_an_early_stopping_run_reports_every_epochs_score_and_its_choice(offline, tiny_binarized, tmp_path):
    out = tmp_path / "run"
    assert run.main(["--model", "vae", "--elbo", "iwae", "--particles", "2", "--patience", "2", "--epochs", "3",
                     "--z-dim", "2", "--hidden", "16", "--eval-samples", "5", "--data-dir", str(tiny_binarized),
                     "--dataset", "binarized-mnist", "--out", str(out), "--quiet", "--no-download"]) == 0
    chosen = json.loads((out / "metrics.json").read_text())["early_stopping"]
    epochs = [epoch for epoch, _ in chosen["valid_scores"]]
    assert epochs == list(range(1, chosen["epochs_trained"] + 1)) and chosen["estimator"] == "iwae-2"
    scores = dict(chosen["valid_scores"])
    assert scores[chosen["best_epoch"]] == chosen["best_value"] == max(scores.values())
    assert (out / "learning_curves.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert f"the best score on the validation split, {chosen['best_value']:.2f} (iwae-2 on 100 fixed random valid " \
           "digits)" in page
    assert "valid scores" not in page  # every epoch's score is drawn, not listed
    curves = {(row["split"], row["estimator"]) for row in read_metrics(out)}  # the bound it trained on, drawn
    assert {("train", "iwae-2"), ("valid", "iwae-2"), ("test", "iwae-2")} <= curves
    assert "The iwae-2 lines are the 2-sample importance-weighted bound this run trained on" in page


@pytest.mark.parametrize("guide", VAE.guides)
def test_the_parameter_count_is_of_every_network_the_guide_trains(guide):
    vae = VAE(z_dim=3, hidden=(16,))
    x = digits(2)
    trained = {name: site["value"] for program in (vae.model, vae.guide(guide))
               for name, site in pyro.poutine.trace(program).get_trace(x).nodes.items() if site["type"] == "param"}
    assert f"({sum(p.numel() for p in trained.values()):,} parameters in " in vae.summary(guide)


@pytest.mark.parametrize("guide", VAE.guides)
def test_every_guide_trains_through_the_cli_and_draws_its_figures(offline, tiny_binarized, tmp_path, guide):
    out = tmp_path / guide
    code = run.main(["--model", "vae", "--guide", guide, "--dataset", "binarized-mnist", "--data-dir",
                     str(tiny_binarized), "--epochs", "2", "--batch-size", "50", "--z-dim", "3", "--hidden", "32",
                     "--eval-samples", "20", "--out", str(out), "--quiet", "--no-download"])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["final"]["test"]) == {"elbo", "iwae-20"} and set(summary["final"]["train"]) == {"elbo"}
    figures = ("learning_curves", "samples_through_training", "samples", "manifold", "reconstructions", "latent_means")
    for figure in figures:
        assert (out / f"{figure}.png").stat().st_size > 1000, figure
    assert sorted(torch.load(out / "samples_through_training.pt", weights_only=True)) == [0, 1, 2]
    page = (out / "report.html").read_text()
    assert all(f'<img src="{figure}.png"' in page for figure in figures)
    assert "<td>test</td><td>iwae-20</td>" in page


@pytest.mark.parametrize("args, message", [
    (["--model", "vae", "--z-dim", "0"], "--z-dim must be positive"),
    (["--model", "vae", "--elbo", "iwae", "--jit"], "--jit is not available with --elbo iwae"),
    (["--model", "vae", "--guide", "enum"], "--guide enum does not belong to model 'vae'"),
    (["--model", "mixture", "--elbo", "iwae"], "--elbo does not apply to model 'mixture'"),
    (["--model", "vae", "--particles", "0"], "--particles must be a positive integer"),
    (["--model", "vae", "--kl-warmup", "-1"], "--kl-warmup must be 0 (none) or a positive number of epochs"),
    (["--model", "vae", "--elbo", "iwae", "--kl-warmup", "5"], "--kl-warmup weights the KL term of a one-sample ELBO"),
    (["--model", "sbn", "--guide", "relaxed", "--elbo", "vimco", "--particles", "4"],
     "--elbo vimco trains the score-function guide: use --guide bernoulli"),
])
def test_bad_vae_input_exits_2_with_one_line(offline, tiny_binarized, tmp_path, capsys, args, message):
    assert run.main([*args, "--data-dir", str(tiny_binarized), "--dataset", "binarized-mnist", "--out",
                     str(tmp_path / "run"), "--quiet", "--no-download"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_kl_warmup_weights_exactly_the_kl_term():
    """Same z (same seed), closed-form KL: -ELBO_beta = -E log p(x | z) + beta KL, so the losses at
    beta = 1 and beta = 0.25 differ by 0.75 KL(q || p)."""
    vae, x = VAE(z_dim=3, hidden=(32,), kl_warmup=10), digits()
    with torch.no_grad():
        vae.encoder.heads[0].bias.fill_(1.0)  # q away from the prior: a KL of about 12 nats over the batch
    pyro.module("encoder", vae.encoder)
    losses = {}
    for beta in (1.0, 0.25):
        pyro.set_rng_seed(0)
        losses[beta] = TraceMeanField_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide_normal, x, torch.tensor(beta))
    prior = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
    kl = torch.distributions.kl_divergence(vae.posterior_normal(x), prior).sum().item()
    assert losses[1.0] - losses[0.25] == pytest.approx(0.75 * kl, abs=2e-3)  # float32 sums of ~4400 nats


def test_kl_weight_grows_linearly_over_the_warmup_then_stays_one():
    schedule = VAE(z_dim=2, hidden=(8,), kl_warmup=4)
    assert [schedule.step_args(epochs, "cpu")[0].item() for epochs in (0.5, 2, 4, 9)] == [0.125, 0.5, 1.0, 1.0]
    assert VAE(z_dim=2, hidden=(8,)).step_args(0.5, "cpu") == ()


def test_prior_vs_importance_experiment_writes_its_estimates(tiny_dataset, tmp_path):
    from ppl_models.models.vae_report import prior_vs_importance

    cfg = Config(model="vae", guide="normal", optimizer="adam", lr=3e-3, epochs=1, batch_size=50, eval_every=1000,
                 eval_digits=50, model_args={"z_dim": 2, "hidden": [32]})
    report = prior_vs_importance(VAE, cfg, tiny_dataset, tmp_path, progress=False, log=lambda *a: None, z_dims=(2, 8),
                                 sample_counts=(1, 100), digits=4, repeats=3)
    assert (tmp_path / "prior_vs_importance.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "prior_vs_importance.json").read_text())["estimates"]
    assert set(saved) == {"z-dim 2", "z-dim 8"} and set(saved["z-dim 8"]) == {"prior", "normal"}
    for by_proposal in saved.values():
        for estimate in by_proposal.values():
            assert estimate["samples"] == [1, 100] and all(np.isfinite(estimate["mean"]))
            assert all(sd >= 0 for sd in estimate["sd_over_repeats"])
    assert set(report.findings["estimates"]["z-dim 8"]["by_samples_M"]) == {1, 100}


def test_scoring_non_binary_digits_is_refused():
    from ppl_models.data import DataError
    from ppl_models.evaluate import per_digit_estimate

    with pytest.raises(DataError, match="digits to score has values other than 0 and 1"):
        per_digit_estimate(VAE(z_dim=2, hidden=(8,)), "normal", torch.full((2, 784), 0.3), "iwae-10")


def test_early_stopping_of_a_k_sample_objective_selects_on_its_bound(tiny_dataset, tmp_path):
    import dataclasses

    data = dataclasses.replace(tiny_dataset, images={**tiny_dataset.images, "valid": tiny_dataset.images["test"]},
                               labels={**tiny_dataset.labels, "valid": None},
                               sources={**tiny_dataset.sources, "valid": "test"})
    cfg = Config(model="vae", guide="normal", elbo="iwae", particles=3, optimizer="adam", lr=3e-3, epochs=2,
                 batch_size=50, eval_every=1000, eval_digits=100, eval_samples=0, patience=5,
                 model_args={"z_dim": 4, "hidden": [64]})
    summary = train(VAE(z_dim=4, hidden=(64,)), data, cfg, tmp_path, **QUIET)
    assert summary["early_stopping"]["selected_by"] == "iwae-3 on 100 fixed random valid digits"
    assert summary["early_stopping"]["estimator"] == "iwae-3" and len(summary["early_stopping"]["valid_scores"]) == 2


@pytest.mark.filterwarnings("ignore:`jit=True` compiles with TorchScript:FutureWarning")
@pytest.mark.parametrize("guide, mode", [(guide, mode) for guide in VAE.guides for mode in ("eager", "jit")]
                         + [("normal", "compile"), ("iaf", "compile")])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_dataset, tmp_path, monkeypatch, guide, mode):
    """Every guide, eager and JIT, and compiled: Ctrl-C mid-epoch, resume, and the run ends bit for
    bit where an uninterrupted one does (a JIT ELBO draws extra random numbers when it compiles; IAF
    layers hold their order in buffers, saved in the checkpoint)."""
    import os
    import signal

    import ppl_models.train as train_module
    from ppl_models.rundir import TrainingError

    cfg = Config(model="vae", guide=guide, jit=mode == "jit", compile=mode == "compile", optimizer="adam", lr=3e-3,
                 epochs=2, batch_size=50, eval_every=5, eval_digits=50, eval_samples=5,
                 model_args={"z_dim": 3, "hidden": [32]})
    straight = train(VAE(z_dim=3, hidden=(32,)), tiny_dataset, cfg, tmp_path / "straight", **QUIET)
    rescored = train(VAE(z_dim=3, hidden=(32,)), tiny_dataset, cfg, tmp_path / "straight", resume=True, **QUIET)
    assert rescored["final"] == straight["final"]  # a finished run scores the same again

    class Interrupting(train_module.SVI):
        steps = 0

        def step(self, *args, **kwargs):
            loss = super().step(*args, **kwargs)
            Interrupting.steps += 1
            if Interrupting.steps == 17:  # mid second epoch (12 steps an epoch)
                os.kill(os.getpid(), signal.SIGINT)
            return loss

    monkeypatch.setattr(train_module, "SVI", Interrupting)
    with pytest.raises(TrainingError, match="interrupted at step 17"):
        train(VAE(z_dim=3, hidden=(32,)), tiny_dataset, cfg, tmp_path / "resumed", **QUIET)
    model = VAE(z_dim=3, hidden=(32,))
    if guide == "iaf":
        model.flows[0].arn.permutation.fill_(0)  # a buffer that differs from the run's: the checkpoint's wins
    resumed = train(model, tiny_dataset, cfg, tmp_path / "resumed", resume=True, **QUIET)
    assert resumed["final"] == straight["final"]
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["buffers"]
    assert set(saved) == {name for name, _ in model.named_buffers() if name != "device_marker"}
    assert all(torch.equal(model.get_buffer(name), value) for name, value in saved.items())
