"""The sigmoid belief net against brute force over all 2^M states."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

import ppl_models.distributions as distributions
import run
from ppl_models.config import Config
from ppl_models.distributions import IndependentBits, all_codes, chunked_table_log_likelihood, table_log_likelihood
from ppl_models.evaluate import importance_log_weights
from ppl_models.models.sbn import SigmoidBeliefNet
from ppl_models.objectives import VIMCO, leave_one_out_bounds
from ppl_models.train import train


def tiny_sbn(M=4, D=6):
    model = SigmoidBeliefNet(latents=M, num_pixels=D)
    generator = torch.Generator().manual_seed(0)
    pyro.param("b", torch.randn(M, generator=generator))
    pyro.param("w", 2 * torch.randn(M, D, generator=generator))
    pyro.param("c", torch.randn(D, generator=generator))
    return model


def brute_force_log_likelihood(x, b, w, c):
    """log sum_z p(z) p(x | z), one state and one digit at a time (seed equation 10)."""
    values = []
    for digit in x:
        total = 0.0
        for bits in itertools.product((0.0, 1.0), repeat=len(b)):
            z = torch.tensor(bits)
            prior = torch.where(z.bool(), torch.sigmoid(b), torch.sigmoid(-b)).double().prod()
            probs = torch.sigmoid(z @ w + c).double()
            total += prior * torch.where(digit.bool(), probs, 1 - probs).prod()
        values.append(torch.log(total))
    return torch.stack(values)


def digits(n, d, seed=1):
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("M", [1, 3, 6])
def test_exact_log_likelihood_equals_the_sum_over_every_state(M):
    model = tiny_sbn(M)
    x = digits(7, 6)
    b, w, c = (p.detach() for p in model.params())
    assert torch.allclose(model.log_likelihood(x).double(), brute_force_log_likelihood(x, b, w, c), atol=1e-4)


def test_exact_log_likelihood_accumulated_over_chunks_of_states(monkeypatch):
    monkeypatch.setattr(distributions, "STATE_CHUNK", 5)  # 64 states in 13 chunks
    model = tiny_sbn(6)
    x = digits(7, 6)
    b, w, c = (p.detach() for p in model.params())
    assert torch.allclose(model.log_likelihood(x).double(), brute_force_log_likelihood(x, b, w, c), atol=1e-4)


def test_enumerated_elbo_is_the_exact_log_likelihood():
    model = tiny_sbn(5)
    x = digits(9, 6)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide_enum, x)
    assert loss == pytest.approx(-model.log_likelihood(x).sum().item(), rel=1e-5)


def test_chunked_table_equals_unchunked_values_and_gradients(monkeypatch):
    monkeypatch.setattr(distributions, "STATE_CHUNK", 5)
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=generator, requires_grad=True)
    c = torch.randn(6, generator=generator)
    x, codes = digits(3, 6), all_codes(4)
    chunked = chunked_table_log_likelihood(x, codes, w, c)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), w)
    whole = table_log_likelihood(x, codes @ w + c)
    (grad_whole,) = torch.autograd.grad(whole.sum(), w)
    assert torch.allclose(chunked, whole, atol=1e-5) and torch.allclose(grad_chunked, grad_whole, atol=1e-5)


def test_independent_bits_enumerate_every_code_with_the_product_probability():
    logits = torch.tensor([0.3, -1.0, 2.0])
    bits = IndependentBits(logits)
    support = bits.enumerate_support()
    assert support.shape == (8, 3) and len({tuple(row.tolist()) for row in support}) == 8
    assert torch.allclose(bits.log_prob(support), dist.Bernoulli(logits=logits).log_prob(support).sum(-1))
    assert torch.allclose(bits.log_prob(support).exp().sum(), torch.tensor(1.0))


@pytest.mark.parametrize("guide", ["bernoulli", "relaxed"])
def test_a_sampled_guides_elbo_never_exceeds_the_exact_log_likelihood(guide):
    model = tiny_sbn(4)
    x = digits(12, 6)
    pyro.module("encoder", model.encoder)
    log_w = importance_log_weights(model.model, model.guide(guide), x, 4000)
    elbo, exact = log_w.mean(0), model.log_likelihood(x)
    assert (elbo <= exact + 4 * log_w.std(0) / 4000**0.5 + 1e-5).all()


def test_enumeration_over_a_huge_m_is_refused_with_an_estimate():
    model = SigmoidBeliefNet(latents=30)
    with pytest.raises(ValueError,
                       match=r"2\^30 = 1,073,741,824 states: about 429 GB .* hours per step .*`guide='bernoulli'`"):
        model.elbo("enum")
    assert not model.exact


@pytest.mark.parametrize("guide, elbo, particles, baseline",
                         [(guide, None, 1, "neural") for guide in SigmoidBeliefNet.guides] +
                         [("bernoulli", None, 1, "average"), ("bernoulli", None, 1, "both"),
                          ("bernoulli", "vimco", 4, "neural")])
def test_training_raises_the_held_out_exact_log_likelihood(tiny_dataset, tmp_path, guide, elbo, particles, baseline):
    model = SigmoidBeliefNet(latents=6, baseline=baseline)
    cfg = Config(model="sbn", guide=guide, elbo=elbo, particles=particles, optimizer="adam", lr=0.03, epochs=3,
                 batch_size=50, eval_every=1000, eval_digits=100, eval_samples=0,
                 model_args={"latents": 6, "baseline": baseline})
    summary = train(model, tiny_dataset, cfg, tmp_path, progress=False, log=lambda *a: None)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    untrained = float(next(r for r in rows if r.startswith("0,0,0.0,test,exact")).split(",")[-1])
    gain = 100 if guide == "enum" else 50  # sampled guides learn more slowly: 36 steps here
    assert summary["final"]["test"]["exact"] > untrained + gain, (untrained, summary["final"])


def test_cli_refuses_enum_for_a_huge_m(offline, tiny_binarized, tmp_path, capsys):
    code = run.main(["--model", "sbn", "--latents", "40", "--dataset", "binarized-mnist", "--data-dir",
                     str(tiny_binarized), "--out", str(tmp_path / "run"), "--quiet", "--no-download"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "2^40 = 1,099,511,627,776 states" in err and len(err.splitlines()) == 1, err


def test_enum_vs_sampled_trains_every_guide_and_compares_them(tiny_dataset, tmp_path):
    from ppl_models.experiments import enum_vs_sampled

    cfg = Config(model="sbn", guide="enum", optimizer="adam", lr=0.03, epochs=1, batch_size=50, eval_every=4,
                 eval_digits=50, model_args={"latents": 4, "temperature": 0.5})
    report = enum_vs_sampled(SigmoidBeliefNet, cfg, tiny_dataset, tmp_path, progress=False, log=lambda *a: None)
    by_guide = report.findings["by_guide"]
    assert set(by_guide) == {"enum", "bernoulli", "relaxed"}
    for guide in ("bernoulli", "relaxed"):  # every model is scored exactly; a sampled ELBO sits below
        assert by_guide[guide]["test elbo (nats)"] <= by_guide[guide]["test exact (nats)"] + 1e-3
    assert (tmp_path / "enum_vs_sampled.png").stat().st_size > 1000


def test_cost_against_latents_measures_every_guide(tiny_dataset, tmp_path):
    from ppl_models.models.sbn_report import cost_against_latents

    cfg = Config(model="sbn", guide="enum", lr=1e-3, batch_size=50, model_args={"latents": 2, "temperature": 0.5})
    report = cost_against_latents(SigmoidBeliefNet, cfg, tiny_dataset, tmp_path, progress=False, log=lambda *a: None,
                                  latents=(2, 6), steps=1)
    by_latents = report.findings["by_latents_M"]
    assert set(by_latents) == {2, 6}
    assert all(by_latents[M][f"{guide} s per step"] > 0 for M in (2, 6) for guide in ("bernoulli", "relaxed", "enum"))
    assert (tmp_path / "cost_vs_latents.png").exists() and (tmp_path / "cost_vs_latents.json").exists()


def test_a_costly_exact_sum_is_reported_on_the_test_split_only():
    from ppl_models.evaluate import estimators

    big, small = SigmoidBeliefNet(latents=18), SigmoidBeliefNet(latents=10)
    assert estimators(big, "bernoulli", split="test") == ["exact", "elbo"]
    assert estimators(big, "bernoulli", split="curves") == ["elbo"] == estimators(big, "bernoulli", split="train")
    assert estimators(big, "enum", split="curves") == ["exact"]  # its loss is exact anyway
    assert estimators(small, "bernoulli", split="curves") == ["exact", "elbo"]


def test_gradient_variance_compares_each_estimator_with_the_exact_gradient(tiny_dataset, tmp_path):
    from ppl_models.models.sbn_report import gradient_variance

    cfg = Config(model="sbn", guide="enum", batch_size=50, model_args={"latents": 5, "temperature": 0.5})
    report = gradient_variance(SigmoidBeliefNet, cfg, tiny_dataset, tmp_path, progress=False, log=lambda *a: None,
                               draws=30)
    results = report.findings["by_guide"]
    assert set(results) == {"bernoulli", "relaxed"}
    for r in results.values():
        assert r["w_variance_per_coordinate"] > 0 and r["encoder_variance_per_coordinate"] > 0
        assert -1 <= r["w_mean_cosine_to_exact_gradient"] <= 1
    assert (tmp_path / "gradient_variance.json").exists()
    again = gradient_variance(SigmoidBeliefNet, cfg, tiny_dataset, tmp_path, progress=False, log=lambda *a: None,
                              draws=30)
    assert again.findings == report.findings  # the networks' weights follow the seed


def test_enumerated_prior_is_never_broadcast_against_the_batch():
    prior = IndependentBits(torch.zeros(12)).expand((100,))  # as pyro.plate leaves it
    codes = prior.enumerate_support(expand=False)
    log_prob = prior.log_prob(codes)
    assert codes.shape == (4096, 1, 12) and log_prob.shape == (4096, 100)
    assert log_prob.stride(-1) == 0  # a view: 4096 numbers, not 4096 x 100 (x 12 before the sum)


def test_leave_one_out_bounds_put_the_geometric_mean_of_the_others_in_place_of_each_weight():
    log_weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        others = torch.cat([log_weights[:k], log_weights[k + 1:]])
        replaced = torch.cat([others, others.mean(0, keepdim=True)])
        expected = torch.logsumexp(replaced, 0) - math.log(4)
        assert torch.allclose(leave_one_out_bounds(log_weights)[k], expected, atol=1e-6)


def test_vimco_gradient_averages_to_the_gradient_of_the_exact_expected_bound():
    """E_q[log (w_1 + w_2) / 2] summed exactly over every pair of codes (M = 2, K = 2), against the
    mean of VIMCO's sampled gradient, for a model param (b) and a guide param (the encoder's output bias)."""
    pyro.set_rng_seed(0)
    model = tiny_sbn(M=2, D=5)
    x = (torch.rand(3, 5, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    objective = VIMCO(2)
    objective.loss(model.model, model.guide_bernoulli, x)  # creates the encoder's params
    store = dict(pyro.get_param_store().named_parameters())
    params = [store["b"], store["encoder$$$2.bias"]]

    b, w, c = model.params()
    codes = all_codes(2)
    log_q = dist.Bernoulli(logits=model.encoder(x)[:, None, :]).log_prob(codes).sum(-1)  # (digits, codes)
    log_w = IndependentBits(b).log_prob(codes) + table_log_likelihood(x, codes @ w + c) - log_q
    pair_bounds = torch.logaddexp(log_w[:, :, None], log_w[:, None, :]) - math.log(2)
    expected_bound = ((log_q[:, :, None] + log_q[:, None, :]).exp() * pair_bounds).sum()
    exact = torch.autograd.grad(expected_bound, params)

    draws = []
    for _ in range(3000):
        for p in params:
            p.grad = None
        objective.loss_and_grads(model.model, model.guide_bernoulli, x)
        draws.append(torch.cat([-p.grad.flatten() for p in params]))  # the loss is -L: its gradient is -grad L
    draws = torch.stack(draws)
    mean, standard_error = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    exact = torch.cat([g.flatten() for g in exact])
    assert ((mean - exact).abs() < 4 * standard_error + 1e-4).all(), (mean, exact, standard_error)


def test_vimco_is_refused_where_it_does_not_apply():
    model = SigmoidBeliefNet(latents=4)
    with pytest.raises(ValueError, match="`elbo='vimco'` trains the score-function guide: use `guide='bernoulli'`"):
        model.elbo("relaxed", "vimco", particles=4)
    with pytest.raises(ValueError, match="`elbo='vimco'` needs `particles` of at least 2"):
        model.elbo("bernoulli", "vimco", particles=1)
    with pytest.raises(ValueError, match="`jit=True` is not available with `elbo='vimco'`"):
        model.elbo("bernoulli", "vimco", jit=True, particles=4)


def test_a_decaying_average_baseline_is_refused_under_jit():
    with pytest.raises(ValueError,
                       match=r"`jit=True` cannot trace Pyro's decaying-average baseline \(`baseline='both'`\)"):
        SigmoidBeliefNet(latents=4, baseline="both").elbo("bernoulli", jit=True)
    with pytest.raises(ValueError, match="`baseline` must be one of neural, average, both"):
        SigmoidBeliefNet(latents=4, baseline="median")
