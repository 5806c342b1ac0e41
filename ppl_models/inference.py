"""Queries about a trained model answered by inference, for any family: the posterior over the
latents given the observed pixels, and the posterior predictive of the missing ones.

Which algorithm answers what (``method=``):

- ``exact``: enumeration of every latent state (the family's `exact_posterior`, where it has one).
- ``importance``: self-normalised importance sampling, the trained guide q(z | x) as proposal. The
  guide sees the digit with its missing pixels set to 0: it was never trained on partial digits, so
  it is a proposal, not the answer; the weights correct for it, and the effective sample size says
  how well.
- ``prior``: the same with the prior p(z) as proposal: the baseline that shows what q is worth.
- ``nuts``: Pyro's ``MCMC(NUTS)`` on continuous latents with the networks fixed, every digit's z in
  one chain (independent latents); split R-hat and the effective sample size per coordinate.

Every method gives the posterior as weighted latent values (``Posterior.weighted``): all states with
their posterior probabilities (exact), proposal draws with normalised importance weights, or MCMC
draws with equal weights. The fill-in is then one formula whatever the method,
p(x_missing | x_observed) = sum_s w_s p(x_missing | z_s), exact where the weighted values are every
state, an estimate otherwise.
"""

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_sample, init_to_value
from pyro.infer.mcmc.util import initialize_model

from .compiled import Compiled
from .distributions import bernoulli_log_likelihood, table_log_likelihood
from .evaluate import importance_traces, log_densities

LOW_ESS = 10  # an importance estimate resting on fewer effective samples than this is flagged
HIGH_R_HAT = 1.1  # an MCMC chain whose split R-hat exceeds this has not mixed


@dataclass
class Posterior:
    """p(z | x_observed) for each of N digits, and how it was found: what `TrainedModel.posterior`
    returns.

    Attributes:
        method: which algorithm, in words, with its sizes, e.g. ``"importance sampling, the trained
            guide q(z | x) as proposal, 1000 draws per digit"``.
        exact: whether the numbers are exact (every latent state summed) or estimates.
        weighted: () -> iterator of (latent values (S, N or 1, ...), log weights (S, N) normalised
            over all chunks): the posterior as weighted values, in chunks so that 2^20 states fit in
            memory; None once the posteriors of several batches of digits are joined.
        samples: (num_samples, N, ...) draws of z from the posterior.
        summary: {name: (N, ...) tensor}: what the family reports of it (probabilities, means, modes).
        diagnostics: {name: (N,) tensor}: effective sample sizes, split R-hat (empty when exact).
    """

    method: str
    exact: bool
    weighted: Callable | None
    samples: torch.Tensor
    summary: dict
    diagnostics: dict = field(default_factory=dict)

    def warnings(self):
        """Sentences naming the digits whose estimate should not be trusted: fewer than 10 effective
        samples, a chain whose split R-hat is above 1.1 or that had divergent transitions. An empty
        list when every estimate passes (and always for exact posteriors)."""
        checks = {"effective sample size": (lambda v: v < LOW_ESS, f"rest on fewer than {LOW_ESS} effective samples"),
                  "effective sample size, worst coordinate": (lambda v: v < LOW_ESS, f"have fewer than {LOW_ESS} "
                                                                                     "effective samples"),
                  "split R-hat, worst coordinate": (lambda v: v > HIGH_R_HAT, f"have a split R-hat above {HIGH_R_HAT}: "
                                                                              "the chain has not mixed"),
                  "divergent transitions of the chain": (lambda v: v > 0, "share a chain with divergent transitions")}
        found = []
        for name, (bad, what) in checks.items():
            flagged = bad(self.diagnostics[name]).nonzero().flatten().tolist() if name in self.diagnostics else []
            if flagged:
                found.append(f"{self.method}: digits {short_list(flagged)} {what}; their estimates are unreliable "
                             "(use more draws, or another method)")
        return found


@dataclass
class FillIn:
    """The posterior predictive of the missing pixels of N digits given their observed ones: what
    `TrainedModel.fill_in` returns.

    Attributes:
        probabilities: (N, D) p(x_d = 1 | x_observed); the observed pixels keep their values.
        samples: (num_samples, N, D) completed digits, observed pixels as given.
        log_prob_missing: (N,) log p(x_missing | x_observed) in nats, of the values the digits hold
            at their missing pixels (their truth, where it is known).
        estimator: ``"exact"``, or ``"estimate: "`` followed by the posterior's method
            (``"estimate: NUTS, 200 draws after 200 warm-up steps"``).
        posterior: the `Posterior` it came from.
    """

    probabilities: torch.Tensor
    samples: torch.Tensor
    log_prob_missing: torch.Tensor | None
    estimator: str
    posterior: Posterior


# ---- importance sampling -------------------------------------------------------------------
def prior_proposal(model):
    """The prior p(z) as a proposal: the model with its observed site hidden, so only the latents
    are sampled (and scored) from it. The importance weights are then p(x_observed | z)."""
    return poutine.block(model, hide=["x"])


def importance_sampler(model, proposal, latent_site):
    """`draw(seen, observed, particles)` -> (latent values (particles, N, ...), log p(x_observed, z),
    log q(z)): `particles` proposal draws per digit of `seen` (x with its missing pixels set to 0, as
    the proposal sees it), the model scoring the observed pixels only. A function of tensors alone,
    which `compiled.Compiled` can trace."""
    def draw(seen, observed, particles):
        proposal_trace, model_trace = importance_traces(model, proposal, seen, particles, observed=observed)
        return proposal_trace.nodes[latent_site]["value"], log_densities(model_trace, seen), \
            log_densities(proposal_trace, seen)

    return draw


@torch.no_grad()
def importance_posterior(draw, x, observed, particles, num_samples, method, summarise):
    """Self-normalised importance sampling with `particles` proposal draws per digit, from
    `importance_sampler`'s `draw`. `summarise(values, weights)` says what the weighted draws
    estimate ({name: (N, ...)})."""
    values, log_joint, log_proposal = draw(torch.where(observed, x, torch.zeros_like(x)), observed, particles)
    log_weights = log_joint - log_proposal
    normalised = log_weights - torch.logsumexp(log_weights, 0)
    ess = 1 / normalised.mul(2).exp().sum(0)
    draws = torch.multinomial(normalised.T.exp(), num_samples, replacement=True).T  # (num_samples, N)
    digit = torch.arange(x.shape[0], device=x.device)
    return Posterior(
        method=f"{method}, {particles} draws per digit", exact=False,
        weighted=lambda: iter([(values, normalised)]),
        samples=values[draws, digit],
        summary={**summarise(values, normalised.exp()), "most probable z": values[log_joint.argmax(0), digit]},
        diagnostics={"effective sample size": ess},
    )


# ---- MCMC -----------------------------------------------------------------------------------
def nuts_posterior(model, x, observed, draws, num_samples, warmup, init, latent_site, progress=False,
                   compile=False):
    """Pyro's NUTS on the latents of all N digits at once (they are independent given the fixed
    networks, so one chain over N x dims coordinates with a diagonal mass matrix adapted per
    coordinate), started at `init` (the proposal's mean; a prior draw if None): `draws` samples after
    `warmup` steps, `num_samples` of them returned. One chain: R-hat is the split R-hat. NUTS
    differentiates the potential in z only, so the networks stay as they are. `compile`: the
    potential energy and its gradient run as one compiled graph (`CompiledPotential`), which NUTS
    calls at every leapfrog step."""
    conditioned = partial(model, torch.where(observed, x, torch.zeros_like(x)), observed=observed)
    start = init_to_sample if init is None else init_to_value(values={latent_site: init})
    initial, potential, transforms, _ = initialize_model(conditioned, init_strategy=start)  # as NUTS(model) does
    kernel = NUTS(potential_fn=CompiledPotential(potential) if compile else potential, transforms=transforms)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, num_chains=1, initial_params=initial,
                transforms=transforms, disable_progbar=not progress)
    mcmc.run()
    chain = mcmc.get_samples()[latent_site].detach()  # (draws, N, ...)
    per_digit = tuple(range(1, chain.dim() - 1))  # the latent's own dims
    report = mcmc.diagnostics()
    divergent = sum(len(steps) for steps in report["divergences"].values())
    diagnostics = {"divergent transitions of the chain": torch.full(x.shape[:1], float(divergent))}
    if draws >= 4:  # split R-hat halves the chain, and needs two draws a half
        diagnostics.update({"split R-hat, worst coordinate": report[latent_site]["r_hat"].amax(per_digit),
                            "effective sample size, worst coordinate": report[latent_site]["n_eff"].amin(per_digit)})
    return Posterior(
        method=f"NUTS, {draws} draws after {warmup} warm-up steps", exact=False,
        weighted=lambda: iter([(chain, torch.full(chain.shape[:2], -math.log(draws), device=x.device))]),
        samples=chain[torch.randint(draws, (num_samples,))],
        summary={"posterior mean": chain.mean(0), "posterior sd": chain.std(0) if draws > 1 else chain[0] * math.nan},
        diagnostics=diagnostics,
    )


class CompiledPotential:
    """A potential energy `potential({site: unconstrained value})` for Pyro's HMC and NUTS, run with
    its gradient as one compiled graph (`compiled.Compiled`): autograd, which NUTS asks for the
    gradient, is handed the one the graph computed (`GivenGradient`)."""

    def __init__(self, potential):
        self.potential, self.names = potential, None
        self.compiled = Compiled(self.energy_and_grads, "NUTS's potential energy", gradients=True,
                                 eager=self.energy_and_grads)

    def energy_and_grads(self, *values):
        values = [value.detach().requires_grad_() for value in values]
        energy = self.potential(dict(zip(self.names, values)))
        return energy.detach(), *torch.autograd.grad(energy, values)

    def __call__(self, params):
        self.names = self.names or sorted(params)
        values = [params[name] for name in self.names]
        energy, *grads = self.compiled(*(value.detach() for value in values))
        return GivenGradient.apply(energy, grads, *values)


class GivenGradient(torch.autograd.Function):
    """`energy`, whose gradient with respect to `values` is `grads` (computed already)."""

    @staticmethod
    def forward(ctx, energy, grads, *values):
        ctx.grads = grads
        return energy.clone()

    @staticmethod
    def backward(ctx, upstream):
        return None, None, *(upstream * grad for grad in ctx.grads)


# ---- the posterior predictive ------------------------------------------------------------------
def fill_in(pixel_logits, x, observed, posterior, num_samples):
    """The fill-in from any `Posterior`: sum over its weighted latent values of p(x | z), for the
    probabilities and for log p(x_missing | x_observed); completions drawn from its samples."""
    missing = ~observed
    probabilities = torch.zeros(x.shape, device=x.device)
    log_prob_missing = torch.full(x.shape[:1], -math.inf, device=x.device)
    for values, log_weights in posterior.weighted():
        logits = pixel_logits(values)  # (S, N or 1, D)
        weights = log_weights.exp()
        if logits.shape[1] == 1:  # the same states for every digit: matrix products
            probabilities += weights.T @ torch.sigmoid(logits[:, 0])
            log_lik = table_log_likelihood(x, logits[:, 0], missing).T
        else:
            probabilities += torch.einsum("sn,snd->nd", weights, torch.sigmoid(logits))
            log_lik = bernoulli_log_likelihood(x, logits, missing)
        log_prob_missing = torch.logaddexp(log_prob_missing, torch.logsumexp(log_weights + log_lik, 0))
    drawn = torch.bernoulli(torch.sigmoid(pixel_logits(posterior.samples[:num_samples])))
    return FillIn(
        probabilities=torch.where(observed, x, probabilities.clamp(0, 1)),
        samples=torch.where(observed, x, drawn),
        log_prob_missing=log_prob_missing,
        estimator="exact" if posterior.exact else f"estimate: {posterior.method}",
        posterior=posterior,
    )


def short_list(indices, shown=8):
    """'0, 3, 7' or '0, 3, ... (12 digits)'."""
    text = ", ".join(map(str, indices[:shown]))
    return text if len(indices) <= shown else f"{text}, ... ({len(indices)} digits)"


def join_posteriors(parts):
    """One Posterior from those of consecutive chunks of digits (digits are dim 0 of summaries and
    diagnostics, dim 1 of samples); the weighted values stay with the chunks."""
    first = parts[0]
    return Posterior(
        method=first.method, exact=first.exact, weighted=first.weighted if len(parts) == 1 else None,
        samples=torch.cat([part.samples for part in parts], 1),
        summary={name: torch.cat([part.summary[name] for part in parts]) for name in first.summary},
        diagnostics={name: torch.cat([part.diagnostics[name] for part in parts]) for name in first.diagnostics},
    )


def join_fill_ins(parts):
    """One FillIn from those of consecutive chunks of digits."""
    first = parts[0]
    return FillIn(
        probabilities=torch.cat([part.probabilities for part in parts]),
        samples=torch.cat([part.samples for part in parts], 1),
        log_prob_missing=torch.cat([part.log_prob_missing for part in parts]),
        estimator=first.estimator,
        posterior=join_posteriors([part.posterior for part in parts]),
    )


@torch.no_grad()
def proposal(guide, x, observed, latent_site):
    """The guide's q(z | x) for x with its missing pixels set to 0 (a distribution over the digits)."""
    seen = torch.where(observed, x, torch.zeros_like(x))
    return poutine.trace(guide).get_trace(seen, observed=observed).nodes[latent_site]["fn"]


@torch.no_grad()
def proposal_summary(q, draws=1000):
    """What q(z | x) is, per digit: a categorical's probabilities, else its mean and standard
    deviation (its own where the distribution has them, else from `draws` samples, e.g. a flow)."""
    if q.support.is_discrete and not q.event_shape:
        return {"q(z = k | x)": q.probs}
    try:
        return {"q(z | x) mean": q.mean, "q(z | x) sd": q.stddev}
    except NotImplementedError:
        z = q.sample((draws,))
        return {"q(z | x) mean": z.mean(0), "q(z | x) sd": z.std(0)}
