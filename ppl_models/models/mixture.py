"""Mixture of Bernoullis ("Naive Bayes" with a categorical latent), seed equations 1-2::

    z ~ Categorical(softmax(b))
    x_d | z = k ~ Bernoulli(sigm(w_kd + c_d))      d = 1..784

Guides:

- ``enum``: no guide at all: z is enumerated in the model, so TraceEnum_ELBO is the exact negative
  log-likelihood (seed equations 3-5).
- ``sampled``: an amortized q(z | x) (an MLP giving Categorical logits), trained with the
  score-function ELBO of TraceGraph_ELBO, variance reduced by an input-dependent neural baseline
  (as in NVIL, Mnih & Gregor 2014).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate, infer_discrete
from torch import nn

from ..config import SettingError
from ..data import check_binary
from ..distributions import IndexedBernoulli, table_log_likelihood
from ..experiments import ENUM_VS_SAMPLED
from ..family import Family, Hyperparameter, pyro_elbo
from ..inference import Posterior
from . import mixture_report

TABLE_FLOATS = 2**25  # digits x components scored at once when scoring or inferring: 128 MB


class BernoulliMixture(Family):
    """The mixture of Bernoullis (``--model mixture``), its params b (K,), w (K, D) and c (D,) in
    Pyro's param store; the module's docstring gives its equations and guides.

    Args:
        components: K, the number of components (``--components``).
        num_pixels: D.
        init_scale: the spread of w's random initial values.
        encoder_hidden: the hidden units of guide ``sampled``'s encoder and baseline networks.

    Raises:
        SettingError: a K that is not a positive integer.
    """

    name = "mixture"
    title = "mixture of Bernoullis"
    guides = {
        "enum": "z enumerated in the model, TraceEnum_ELBO is the exact log-likelihood; the default",
        "sampled": "amortized q(z|x), score-function TraceGraph_ELBO with a neural baseline",
    }
    default_guide = "enum"
    exact_guides = ("enum",)
    exact = True  # log p(x) is tractable: a sum over K components
    hyperparameters = {"components": Hyperparameter("K, the number of mixture components")}
    training_defaults = dict(optimizer="rmsprop", lr=0.01, batch_size=100, epochs=20)  # the seed's
    experiments = {"enum-vs-sampled": ENUM_VS_SAMPLED}

    def __init__(self, components=20, num_pixels=784, init_scale=0.01, encoder_hidden=200):
        if components < 1:
            raise SettingError(f"`components` must be a positive integer, got {components}")
        super().__init__(num_pixels)
        self.components = components
        self.init_scale = init_scale
        # q(z | x) for the sampled guide; created here so its weights follow pyro.set_rng_seed.
        self.encoder = nn.Sequential(
            nn.Linear(num_pixels, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, components)
        )
        # An input-dependent baseline (NVIL): log p(x | z) differs by hundreds of nats between
        # digits, so a single running average leaves the score-function gradient mostly noise.
        self.baseline = nn.Sequential(
            nn.Linear(num_pixels, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, 1), nn.Flatten(-2)
        )

    # ---- parameters -------------------------------------------------------------------
    def params(self, device=None):
        """(b, w, c) from the param store, created on first use with the seed template's init."""
        K, D = self.components, self.num_pixels
        b = pyro.param("b", lambda: torch.zeros(K, device=device))
        w = pyro.param("w", lambda: self.init_scale * torch.randn(K, D, device=device))
        c = pyro.param("c", lambda: torch.zeros(D, device=device))
        return b, w, c

    def logits_table(self):
        """theta_kd = w_kd + c_d: the pixel logits of each component."""
        _, w, c = self.params()
        return w + c

    # ---- model and guides -------------------------------------------------------------
    @config_enumerate
    def model(self, x, observed=None):
        b, w, c = self.params(x.device)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=b))
            pyro.sample("x", IndexedBernoulli(w + c, z, observed), obs=x)

    def guide_enum(self, x, observed=None):
        """Empty guide: the model enumerates z, nothing is sampled."""

    def guide_sampled(self, x, observed=None):
        pyro.module("encoder", self.encoder)
        pyro.module("baseline", self.baseline)
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z",
                dist.Categorical(logits=self.encoder(x)),
                # (Pyro's decaying-average baseline is left out: JitTraceGraph_ELBO cannot trace it.)
                infer={"baseline": {"nn_baseline": self.baseline, "nn_baseline_input": x}},
            )

    def elbo(self, guide, elbo=None, jit=False, particles=1, compile=False):
        """The ELBO this guide calls for: exact enumeration, or the score-function ELBO."""
        if guide == "sampled" and particles > 1:
            raise SettingError("`particles` > 1 is not available with guide 'sampled': its neural baseline scores one "
                               "sample per digit; use `particles=1`")
        if guide == "enum":
            return pyro_elbo("TraceEnum_ELBO", jit, compile=compile)  # exact: one pass, whatever `particles` says
        return pyro_elbo("TraceGraph_ELBO", jit, particles, compile=compile)

    # ---- what a generative model is for -----------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, x, observed=None):
        """Exact log p(x) per digit (nats), or log p(x_observed) under a pixel mask; in chunks of
        digits, so the (digits x K) table stays under TABLE_FLOATS numbers whatever K is."""
        check_binary(x, "digits to score", self.num_pixels)
        b, _, _ = self.params()
        logits, log_prior = self.logits_table(), torch.log_softmax(b, -1)
        return torch.cat([torch.logsumexp(log_prior + table_log_likelihood(chunk, logits, mask), -1)
                          for chunk, mask in self.digit_chunks(x, observed)])

    def digit_chunks(self, x, observed=None):
        """(digits, their pixel mask) in chunks of at most TABLE_FLOATS / K digits."""
        size = max(1, TABLE_FLOATS // self.components)
        masks = [observed] * len(x.split(size)) if observed is None or observed.dim() == 1 else \
            observed.expand_as(x).split(size)
        return zip(x.split(size), masks)

    @torch.no_grad()
    def component_probabilities(self, x, observed=None):
        """p(z = k | x) (or p(z = k | x_observed)) per digit, as the (N, K) probabilities Pyro's
        TraceEnum_ELBO.compute_marginals finds for the enumerated site."""
        check_binary(x, "digits to infer z for", self.num_pixels)
        if self.components == 1:  # Pyro drops an enumerated dimension of size one: nothing to infer
            return x.new_ones(x.shape[0], 1)
        marginals = TraceEnum_ELBO(max_plate_nesting=1)
        return torch.cat([marginals.compute_marginals(self.model, self.guide_enum, *two_or_more(chunk, mask))["z"]
                          .probs[: len(chunk)] for chunk, mask in self.digit_chunks(x, observed)])

    @torch.no_grad()
    def exact_posterior(self, x, observed, num_samples):
        """p(z | x_observed) over the K components (compute_marginals), with posterior draws of z by
        Pyro's infer_discrete (temperature 1) on the model, num_samples at once in a plate."""
        probs = self.component_probabilities(x, observed)

        def draws(x, observed):
            with pyro.plate("draws", num_samples, dim=-2):
                self.model(x, observed=observed)

        sampler = infer_discrete(draws, first_available_dim=-3, temperature=1)
        samples = torch.zeros(num_samples, len(x), dtype=torch.long, device=x.device) if self.components == 1 else \
            torch.cat([poutine.trace(sampler).get_trace(chunk, mask).nodes["z"]["value"].expand(num_samples, len(chunk))
                       for chunk, mask in self.digit_chunks(x, observed)], 1)  # (one state: Pyro drops its dim)
        states = torch.arange(self.components, device=x.device)[:, None]
        return Posterior(
            method=f"exact: enumeration of the {self.components} components (TraceEnum_ELBO.compute_marginals, "
                   "infer_discrete)", exact=True,
            weighted=lambda: iter([(states, probs.T.log())]), samples=samples,
            summary={"p(z = k | x)": probs, "most probable z": probs.argmax(-1)},
        )

    def weighted_summary(self, values, weights):
        """p(z = k | x) estimated from weighted draws of z."""
        one_hot = torch.nn.functional.one_hot(values, self.components).to(weights.dtype)
        return {"p(z = k | x)": (weights[..., None] * one_hot).sum(0)}

    def pixel_logits(self, z):
        """theta_z: the pixel logits of component z (any shape of component indices)."""
        return self.logits_table()[z]

    @torch.no_grad()
    def component_means(self):
        """p(x_d = 1 | z = k): (K, D), seed problem 6."""
        return torch.sigmoid(self.logits_table())

    def report(self, run):
        return mixture_report.report(self, run)

    def summary(self, guide=None):
        size = self.components * (self.num_pixels + 1) + self.num_pixels  # b, w and c
        if guide != "sampled":  # the enumerated guide has no parameters of its own
            return f"mixture of {self.components} Bernoulli components ({size:,} parameters)"
        networks = sum(p.numel() for network in (self.encoder, self.baseline) for p in network.parameters())
        return (f"mixture of {self.components} Bernoulli components ({size:,} parameters, and {networks:,} in the "
                "sampled guide's encoder and baseline)")



def two_or_more(x, observed):
    """A single digit doubled: Pyro's compute_marginals fails on a plate of size one (KeyError in
    pyro.ops.rings.broadcast), so one digit is scored as two copies and the first row kept."""
    if len(x) > 1:
        return x, observed
    return x.expand(2, -1), None if observed is None or observed.dim() == 1 else observed.expand(2, -1)
