"""Sigmoid belief net: M binary causes instead of one category (seed equations 8-9)::

    z_m ~ Bernoulli(sigm(b_m))                   m = 1..M, independently
    x_d | z ~ Bernoulli(sigm(z . w_d + c_d))     d = 1..784

Guides:

- ``enum``: no guide: all 2^M values of z are summed (one enumerated site over the codes, the
  likelihood as a chunked matrix product), so TraceEnum_ELBO is the exact log-likelihood. Cost
  O(2^M D (M + N)) a step (seed problem 10).
- ``bernoulli``: amortized q(z | x) = prod_m Bernoulli(sigm(f(x)_m)), score-function gradients
  (TraceGraph_ELBO) with baselines (``--baseline``): an input-dependent neural baseline (neural, the
  default), Pyro's decaying average of the learning signal (average), or the network fitting what is
  left after the average (both, as NVIL centres its signal).
- ``relaxed``: the same q, its discrete samples given gradients through a Concrete (relaxed
  Bernoulli) sample at ``--temperature``: the straight-through estimator, with Trace_ELBO.

``--elbo vimco --particles K`` trains guide bernoulli on VIMCO's K-sample bound instead, whose
baseline is built from the other samples (`ppl_models.objectives.VIMCO`).
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from torch import nn

from .. import distributions
from ..compiled import CompiledObjective
from ..config import SettingError
from ..data import check_binary
from ..distributed import current, share_of
from ..distributions import IndependentBits, LinearBernoulli, StraightThroughBernoulli, all_codes, table_log_likelihood
from ..experiments import ENUM_VS_SAMPLED
from ..family import Family, Hyperparameter, pyro_elbo
from ..inference import Posterior
from ..objectives import VIMCO
from . import sbn_report

BASELINES = ("neural", "average", "both")
MAX_EXACT_LATENTS = 20  # 2^20 = 1,048,576 states: exact test log-likelihood in minutes on 2 CPU cores
FLOPS = 2e10  # a 2-core CPU's sustained float throughput, for the refusal message's estimate


class SigmoidBeliefNet(Family):
    """The sigmoid belief net (``--model sbn``), its params b (M,), w (M, D) and c (D,) in Pyro's
    param store; the module's docstring gives its equations and guides. Its log-likelihood is exact
    (`exact`) for M <= 20, where the 2^M codes can be summed.

    Args:
        latents: M, the number of binary latents (``--latents``).
        temperature: the Concrete relaxation's temperature, for guide ``relaxed``.
        baseline: guide ``bernoulli``'s baseline: ``"neural"``, ``"average"`` or ``"both"``.
        num_pixels: D.
        encoder_hidden: the hidden units of the guides' encoder and baseline networks.

    Raises:
        SettingError: an M, temperature or baseline that cannot work.
    """

    name = "sbn"
    title = "sigmoid belief net"
    guides = {
        "enum": f"all 2^M states of z summed, exact, for `latents` M <= {MAX_EXACT_LATENTS}; the default",
        "bernoulli": "amortized q(z|x), score-function TraceGraph_ELBO with baselines (or VIMCO)",
        "relaxed": "the same q, straight-through Concrete gradients at `temperature`, Trace_ELBO",
    }
    default_guide = "enum"
    exact_guides = ("enum",)
    elbos = {"vimco": "with `guide='bernoulli'`: the importance-weighted bound over `particles` >= 2 samples with "
                      "VIMCO's leave-one-out score-function gradients; without it, TraceGraph_ELBO with the baseline"}
    importance_weighted_elbos = ("vimco",)
    hyperparameters = {
        "latents": Hyperparameter(f"M, the number of binary latents; `guide='enum'` sums all 2^M states, so M <= "
                                  f"{MAX_EXACT_LATENTS}"),
        "temperature": Hyperparameter("temperature of the Concrete relaxation of `guide='relaxed'`", float,
                                      guides=("relaxed",)),
        "baseline": Hyperparameter("baseline of `guide='bernoulli'`'s score-function gradient: neural (an "
                                   "input-dependent network), average (Pyro's decaying average of the learning "
                                   "signal), both (the network fits what is left after the average, as NVIL centres "
                                   "its signal; not with `jit`)", str, BASELINES, guides=("bernoulli",)),
    }
    training_defaults = dict(optimizer="adam", lr=1e-3, batch_size=100, epochs=20)
    experiments = {
        "enum-vs-sampled": ENUM_VS_SAMPLED,
        "cost-vs-latents": sbn_report.COST_AGAINST_LATENTS,
        "gradient-variance": sbn_report.GRADIENT_VARIANCE,
    }

    def __init__(self, latents=10, temperature=0.5, baseline="neural", num_pixels=784, encoder_hidden=200):
        if latents < 1:
            raise SettingError(f"`latents` must be a positive integer, got {latents}")
        if not temperature > 0 or temperature == math.inf:
            raise SettingError(f"`temperature` must be positive and finite, got {temperature}")
        if baseline not in BASELINES:
            raise SettingError(f"`baseline` must be one of {', '.join(BASELINES)}, got {baseline!r}")
        super().__init__(num_pixels)
        self.latents, self.temperature, self.baseline_kind = latents, temperature, baseline
        self.encoder = nn.Sequential(
            nn.Linear(num_pixels, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, latents)
        )
        self.baseline = nn.Sequential(
            nn.Linear(num_pixels, encoder_hidden), nn.ReLU(), nn.Linear(encoder_hidden, 1), nn.Flatten(-2)
        )

    @property
    def exact(self):
        """log p(x) is reported exactly when the 2^M states can be summed in reasonable time."""
        return self.latents <= MAX_EXACT_LATENTS

    @property
    def exact_is_costly(self):
        """Past 2^16 states an exact pass over a split takes minutes: test split only."""
        return self.latents > 16

    def params(self, device=None):
        M, D = self.latents, self.num_pixels
        b = pyro.param("b", lambda: torch.zeros(M, device=device))
        w = pyro.param("w", lambda: 0.01 * torch.randn(M, D, device=device))
        c = pyro.param("c", lambda: torch.zeros(D, device=device))
        return b, w, c

    # ---- model and guides -------------------------------------------------------------
    @config_enumerate
    def model(self, x, observed=None):
        b, w, c = self.params(x.device)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", IndependentBits(b))
            pyro.sample("x", LinearBernoulli(z, w, c, observed), obs=x)

    def guide_enum(self, x, observed=None):
        """Empty guide: the model enumerates z, nothing is sampled."""

    def _posterior_logits(self, x):
        pyro.module("encoder", self.encoder)
        return self.encoder(x)

    def guide_bernoulli(self, x, observed=None):
        logits = self._posterior_logits(x)
        baseline = {}
        if self.baseline_kind in ("neural", "both"):
            pyro.module("baseline", self.baseline)
            baseline.update(nn_baseline=self.baseline, nn_baseline_input=x)
        if self.baseline_kind in ("average", "both"):
            baseline.update(use_decaying_avg_baseline=True)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1), infer={"baseline": baseline})

    def guide_relaxed(self, x, observed=None):
        logits = self._posterior_logits(x)
        temperature = torch.tensor(self.temperature, device=x.device)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", StraightThroughBernoulli(temperature, logits=logits).to_event(1))

    def elbo(self, guide, elbo=None, jit=False, particles=1, compile=False):
        if elbo == "vimco":
            if guide != "bernoulli":
                raise SettingError(f"`elbo='vimco'` trains the score-function guide: use `guide='bernoulli'`, "
                                   f"not `guide='{guide}'`")
            if jit:
                raise SettingError("`jit=True` is not available with `elbo='vimco'` (its loss is not a Pyro ELBO); "
                                   "use `compile=True`, or drop `jit`")
            vimco = VIMCO(particles)
            return CompiledObjective(vimco, vimco) if compile else vimco
        if guide == "enum":
            check_enumerable(self.latents)
            if compile and 2**self.latents > distributions.STATE_CHUNK:
                raise SettingError(f"`compile=True` with `guide='enum'` and `latents={self.latents}`: its graph would "
                                   f"keep the logits of all 2^{self.latents} states for the backward pass, which eager "
                                   f"mode recomputes chunk by chunk; drop `compile`, or use `latents` of at most "
                                   f"{distributions.STATE_CHUNK.bit_length() - 1}")
            return pyro_elbo("TraceEnum_ELBO", jit, compile=compile)  # exact: one pass, whatever `particles` says
        if guide == "bernoulli" and particles > 1 and self.baseline_kind != "average":
            raise SettingError(f"`particles` > 1 is not available with the neural baseline (`baseline='"
                               f"{self.baseline_kind}'`), which scores one sample per digit; use `baseline='average'`, "
                               "`elbo='vimco'`, or `particles=1`")
        for asked, setting in ((jit, "jit"), (compile, "compile")):
            if guide == "bernoulli" and asked and self.baseline_kind != "neural":
                raise SettingError(f"`{setting}=True` cannot trace Pyro's decaying-average baseline "
                                   f"(`baseline='{self.baseline_kind}'`), a running average kept in Python; use "
                                   f"`baseline='neural'` or drop `{setting}`")
        return pyro_elbo("TraceGraph_ELBO" if guide == "bernoulli" else "Trace_ELBO", jit, particles, compile=compile)

    def data_parallel_refusal(self, guide, elbo=None):
        if guide == "bernoulli" and elbo != "vimco" and self.baseline_kind != "neural":
            return (f"Pyro's decaying-average baseline (`baseline='{self.baseline_kind}'`) keeps one running average "
                    "per position in the batch, of which each process would hold only its share; use "
                    "`baseline='neural'` or `elbo='vimco'` to train in several processes")
        return None

    def loss_name(self, guide, elbo=None):
        return "-VIMCO bound" if elbo == "vimco" else super().loss_name(guide, elbo)

    # ---- what a generative model is for -----------------------------------------------
    exact_sum_in_shares = True

    @torch.no_grad()
    def log_likelihood(self, x, observed=None, share=None):
        """Exact log p(x) (or log p(x_observed)) per digit: a log-sum-exp over all 2^M codes,
        accumulated over chunks of codes so memory holds (digits x STATE_CHUNK) numbers, not
        (digits x 2^M). With `share=(i, n)`, over the i-th of n equal shares of the codes only."""
        check_binary(x, "digits to score", self.num_pixels)
        total = torch.full(x.shape[:1], -math.inf, device=x.device)
        states = share_of(2**self.latents, *share) if share else None
        for _, log_joint in self.code_chunks(x, observed, self.params(), states):
            total = torch.logaddexp(total, torch.logsumexp(log_joint, -1))
        return total

    def code_chunks(self, x, observed, params, states=None):
        """(codes (S, M), log p(z = code, x_observed) (N, S)) for all 2^M codes (or those of the integers
        in `states`), STATE_CHUNK at a time."""
        check_enumerable(self.latents)
        b, w, c = (param.detach() for param in params)
        states = all_codes(self.latents, x.device, states)
        for codes in states.split(distributions.STATE_CHUNK) if len(states) else ():  # (an empty share: none)
            yield codes, IndependentBits(b).log_prob(codes) + table_log_likelihood(x, codes @ w + c, observed)

    @torch.no_grad()
    def exact_posterior(self, x, observed, num_samples):
        """p(z | x_observed) by enumerating all 2^M codes in chunks (two passes: the evidence, then
        the posterior): the marginals p(z_m = 1 | x), the most probable code, and exact posterior
        draws by inverting the cumulative distribution over codes. (Pyro's infer_discrete cannot
        draw this site: its support has an event dimension, which its packed tensors refuse.)"""
        log_evidence, params = self.log_likelihood(x, observed), self.params()  # (weighted() may run later)

        def weighted():
            for codes, log_joint in self.code_chunks(x, observed, params):
                yield codes[:, None], (log_joint - log_evidence[:, None]).T

        uniforms = torch.rand(len(x), num_samples, device=x.device, dtype=torch.float64)
        samples = torch.zeros(len(x), num_samples, self.latents, device=x.device)
        marginals, mode = torch.zeros(len(x), self.latents, device=x.device), torch.zeros_like(samples[:, 0])
        last = torch.zeros_like(mode)  # the last code with any mass: float rounding may leave the total just below 1
        best, below = torch.full_like(log_evidence, -math.inf), torch.zeros_like(uniforms[:, 0])
        for codes, log_posterior in weighted():
            probs = log_posterior.T.exp()  # (N, S)
            marginals += probs @ codes[:, 0]
            chunk_best, at = log_posterior.max(0)
            mode = torch.where((chunk_best > best)[:, None], codes[at, 0], mode)
            best = torch.maximum(best, chunk_best)
            cumulative = below[:, None] + probs.double().cumsum(-1)  # the CDF over codes so far
            inside = (uniforms > below[:, None]) & (uniforms <= cumulative[:, -1:])
            index = torch.searchsorted(cumulative, uniforms).clamp(max=len(codes) - 1)
            samples = torch.where(inside[..., None], codes[index, 0], samples)
            positive = probs > 0
            last_positive = codes[(positive * torch.arange(len(codes), device=x.device)).argmax(-1), 0]
            last = torch.where(positive.any(-1, keepdim=True), last_positive, last)
            below = cumulative[:, -1]
        samples = torch.where((uniforms > below[:, None])[..., None], last[:, None], samples)
        return Posterior(
            method=f"exact: enumeration of all 2^{self.latents} codes", exact=True, weighted=weighted,
            samples=samples.transpose(0, 1), summary={"p(z_m = 1 | x)": marginals, "most probable z": mode},
        )

    def weighted_summary(self, values, weights):
        """p(z_m = 1 | x) estimated from weighted draws of the codes."""
        return {"p(z_m = 1 | x)": (weights[..., None] * values).sum(0)}

    def pixel_logits(self, z):
        """z @ w + c: the pixel logits of codes z of any leading shape."""
        _, w, c = self.params()
        return z @ w + c

    @torch.no_grad()
    def cause_images(self):
        """What each binary cause adds to the pixel logits: the rows of w, (M, D)."""
        return self.params()[1]

    def report(self, run):
        return sbn_report.report(self, run)

    def summary(self, guide=None):
        states = f"{2**self.latents:,}" if self.latents <= 40 else f"2^{self.latents} = {2**self.latents:.2g}"
        return f"sigmoid belief net with {self.latents} binary latents ({states} states)"


def check_enumerable(latents, batch_size=100, pixels=784):
    """Refuse an M whose exact sum would be absurd, with the estimate that makes it so: per process
    where several train together (each sums every state for its share of the batch)."""
    if latents <= MAX_EXACT_LATENTS:
        return
    states, processes = 2**latents, current().size  # (read here: the families' elbo() knows no world)
    digits = batch_size / processes
    table_gb = digits * states * 4 / 1e9
    seconds = 3 * 2 * states * (latents + digits) * pixels / FLOPS  # forward, backward, recomputation
    where = "on this machine" if processes == 1 else f"in each of {processes} processes"
    raise SettingError(
        f"exact enumeration over M = {latents} binary latents sums 2^{latents} = {states:,} states: about "
        f"{table_gb:,.0f} GB for {'one batch' if processes == 1 else 'its share of a batch'}'s log-likelihood table "
        f"and {seconds / 3600:,.1f} hours per step {where}; use `latents={MAX_EXACT_LATENTS}` or fewer, or a sampled "
        "guide (`guide='bernoulli'` or relaxed)"
    )
