"""The mixture of Bernoullis against brute force and against Pyro's generic path."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from ppl_models.config import Config
from ppl_models.data import DataError
from ppl_models.distributions import IndexedBernoulli
from ppl_models.evaluate import importance_log_weights
from ppl_models.models.mixture import BernoulliMixture
from ppl_models.train import train


def tiny_model(K=3, D=5, scale=1.5):
    model = BernoulliMixture(components=K, num_pixels=D, init_scale=scale)
    model.params()
    pyro.param("b", torch.randn(K))
    pyro.param("c", torch.randn(D))
    return model


def brute_force_log_likelihood(x, b, w, c):
    """log sum_k p(z=k) prod_d p(x_d | z=k), one digit and one component at a time."""
    values = []
    for digit in x:
        total = 0.0
        for k in range(len(b)):
            probs = torch.sigmoid(w[k] + c).double()
            pixels = torch.where(digit.bool(), probs, 1 - probs)
            total += torch.softmax(b.double(), -1)[k] * pixels.prod()
        values.append(torch.log(total))
    return torch.stack(values)


def random_binary(n, d, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.5), generator=torch.Generator().manual_seed(seed))


def test_exact_log_likelihood_equals_brute_force_sum_over_components():
    model = tiny_model()
    x = random_binary(16, 5)
    b, w, c = (p.detach() for p in model.params())
    assert torch.allclose(model.log_likelihood(x).double(), brute_force_log_likelihood(x, b, w, c), atol=1e-4)


def test_traceenum_loss_is_minus_the_exact_log_likelihood():
    model = tiny_model()
    x = random_binary(16, 5)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, model.guide_enum, x)
    assert loss == pytest.approx(-model.log_likelihood(x).sum().item(), rel=1e-5)


def test_pyro_gradients_equal_the_plain_pytorch_loss_gradients():
    model = tiny_model(K=4, D=7)
    x = random_binary(10, 7)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    elbo.loss_and_grads(model.model, model.guide_enum, x)
    params = {name: pyro.param(name).unconstrained() for name in ("b", "w", "c")}
    pyro_grads = {name: p.grad.clone() for name, p in params.items()}

    b, w, c = (params[n].detach().clone().requires_grad_() for n in ("b", "w", "c"))
    # The textbook N x K x D broadcast (seed problem 4), written without any of the package's code.
    log_px_given_z = dist.Bernoulli(logits=(w + c)).log_prob(x[:, None, :]).sum(-1)
    loss = -torch.logsumexp(torch.log_softmax(b, -1) + log_px_given_z, -1).sum()
    loss.backward()
    for name, grad in (("b", b.grad), ("w", w.grad), ("c", c.grad)):
        assert torch.allclose(pyro_grads[name], grad, atol=1e-5), name


@pytest.mark.parametrize("index_shape", [(6,), (3, 1), (2, 6)])
@pytest.mark.parametrize("masked", [False, True])
def test_indexed_bernoulli_matches_bernoulli_of_the_chosen_rows(index_shape, masked):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(3, 5, generator=generator)
    index = torch.randint(3, index_shape, generator=generator)
    x = random_binary(6, 5)
    mask = (torch.rand(6, 5, generator=generator) < 0.6).float() if masked else None
    batch_shape = torch.broadcast_shapes(index_shape, (6,))
    expected = dist.Bernoulli(logits=table[index]).log_prob(x)
    if masked:
        expected = expected * mask
    fast = IndexedBernoulli(table, index, mask).expand(batch_shape)
    assert torch.allclose(fast.log_prob(x), expected.sum(-1).expand(batch_shape), atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_indexed_bernoulli_on_pyros_enumerated_support_matches_bernoulli(masked):
    table = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    support = dist.Categorical(logits=torch.zeros(3)).enumerate_support(expand=False).reshape(3, 1, 1)
    support._pyro_categorical_support = 1  # as pyro's EnumMessenger leaves a parallel-enumerated value
    x = random_binary(6, 5)
    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) < 0.6).float() if masked else None
    fast = IndexedBernoulli(table, support, mask).expand((3, 1, 6))
    assert fast.enumerated
    expected = dist.Bernoulli(logits=table[support]).log_prob(x) * (1.0 if mask is None else mask)
    assert torch.allclose(fast.log_prob(x), expected.sum(-1), atol=1e-5)


def test_indexed_bernoulli_never_materialises_the_expanded_logits():
    table = torch.randn(500, 784)
    fast = IndexedBernoulli(table, torch.arange(500).unsqueeze(-1)).expand((500, 100))
    assert fast.logits_table is table  # expand keeps the (K, D) table; only the index is broadcast
    assert fast.index.stride() == (1, 0)


def test_posterior_is_bayes_rule_and_the_pyro_marginal():
    model = tiny_model()
    x = random_binary(8, 5)
    b, w, c = (p.detach() for p in model.params())
    log_joint = torch.log_softmax(b, -1) + dist.Bernoulli(logits=w + c).log_prob(x[:, None, :]).sum(-1)
    assert torch.allclose(model.component_probabilities(x), torch.softmax(log_joint, -1), atol=1e-5)


def test_masked_log_likelihood_is_the_marginal_of_the_observed_pixels():
    model = tiny_model()
    x = random_binary(4, 5)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    b, w, c = (p.detach() for p in model.params())
    marginal = brute_force_log_likelihood(x[:, mask.bool()], b, w[:, mask.bool()], c[mask.bool()])
    assert torch.allclose(model.log_likelihood(x, mask).double(), marginal, atol=1e-4)


def test_samples_are_binary_digits_from_valid_components():
    model = BernoulliMixture(components=5)
    drawn = model.sample(32)
    x, z = drawn.digits, drawn.latents["z"]
    assert x.shape == (32, 784) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert z.shape == (32,) and z.min() >= 0 and z.max() < 5


def test_sampled_guide_elbo_never_exceeds_exact_log_likelihood():
    model = tiny_model(K=4, D=8)
    x = random_binary(20, 8)
    pyro.module("encoder", model.encoder)
    log_w = importance_log_weights(model.model, model.guide_sampled, x[:, :8].expand(20, 8), 4000)
    elbo, exact = log_w.mean(0), model.log_likelihood(x)
    standard_error = log_w.std(0) / 4000**0.5
    assert (elbo <= exact + 4 * standard_error + 1e-5).all()
    assert (elbo < exact - 1e-3).any()  # and the gap is real: q is not the posterior


@pytest.mark.parametrize("guide", ["enum", "sampled"])
def test_training_raises_the_held_out_exact_log_likelihood(tiny_dataset, tmp_path, guide):
    model = BernoulliMixture(components=4)
    cfg = Config(model="mixture", guide=guide, epochs=3, batch_size=50, eval_every=1000, eval_digits=200, lr=0.05)
    pyro.set_rng_seed(0)
    model.params(torch.device("cpu"))
    before = model.log_likelihood(tiny_dataset.binary("test")).mean().item()
    summary = train(model, tiny_dataset, cfg, tmp_path, progress=False, log=lambda *a: None)
    after = summary["final"]["test"]["exact"]
    assert after > before + (300 if guide == "enum" else 50), (before, after)  # enum: -543 -> -161
    if guide == "sampled":
        assert summary["final"]["test"]["elbo"] <= after + 1e-3


def test_bad_component_count_is_refused():
    with pytest.raises(ValueError, match="`components` must be a positive integer"):
        BernoulliMixture(components=0)


def test_non_binary_digits_get_a_clear_error_not_a_wrong_number():
    model = tiny_model()
    with pytest.raises(DataError, match="digits to score has values other than 0 and 1; binarize it first"):
        model.log_likelihood(torch.full((2, 5), 0.5))
    with pytest.raises(DataError, match="digits to infer z for has values other than 0 and 1"):
        model.component_probabilities(torch.full((2, 5), 0.5))
    with pytest.raises(DataError, match=r"expected \(N, 5\)"):
        model.log_likelihood(torch.zeros(2, 6))


def test_scoring_and_inferring_in_chunks_of_digits_changes_nothing(monkeypatch):
    import ppl_models.models.mixture as mixture

    model, x = BernoulliMixture(components=7), torch.bernoulli(torch.full((50, 784), 0.3))
    model.params()
    mask = (torch.arange(784) < 300).float()
    probabilities = model.component_probabilities
    whole = model.log_likelihood(x), model.log_likelihood(x, mask), probabilities(x), probabilities(x, mask)
    monkeypatch.setattr(mixture, "TABLE_FLOATS", 7 * 6)  # six digits at a time
    chunked = model.log_likelihood(x), model.log_likelihood(x, mask), probabilities(x), probabilities(x, mask)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, chunked))


def test_one_component_is_a_model_too():
    model, x = BernoulliMixture(components=1), torch.bernoulli(torch.full((5, 784), 0.3))
    model.params()
    assert torch.equal(model.component_probabilities(x), torch.ones(5, 1))
    exact = brute_force_log_likelihood(x, *(p.detach() for p in model.params()))
    assert torch.allclose(model.log_likelihood(x).double(), exact, atol=1e-3)
