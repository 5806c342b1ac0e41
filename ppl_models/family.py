"""What a model family is: the one contract between a family and the shared code.

A family is a subclass of `Family` in its own module (or two: the model, and its report), plus one
line in `ppl_models.models.FAMILIES`. Shared code (the training loop, evaluation, the CLI, the report) asks a
family only what this class declares; it never probes for attributes or names a family or a guide.
"""

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
from pyro import poutine
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.poutine.util import site_is_subsample
from torch import nn

from .compiled import Compiled, CompiledObjective, PyroJitELBO, kept
from .config import SettingError
from .inference import (
    importance_posterior,
    importance_sampler,
    nuts_posterior,
    prior_proposal,
    proposal,
    proposal_summary,
)
from .report import draw_learning_curves


@dataclass(frozen=True)
class Hyperparameter:
    """A constructor argument of a family that users set (the CLI's --<name> flag). Its default is
    the constructor's."""

    help: str
    type: Callable = int
    choices: tuple | None = None
    guides: tuple | None = None  # the guides it shapes (a network only they train); None: every guide


@dataclass(frozen=True)
class Experiment:
    """An experiment run instead of one training run: `run(family, cfg, data, out, progress, log)`
    (family: the Family subclass) writes its files into `out` and returns a `Report`: its figures with
    captions and its results (findings), which report.html shows with `help`, saying what it is."""

    help: str
    run: Callable
    sets: dict = field(default_factory=dict)  # {setting: why}: those it decides itself, whatever was given
    trains: Callable = None  # (family, cfg) -> the Configs of the runs it trains, checked before it starts


@dataclass
class Samples:
    """Digits drawn from the model: `digits` (n, D) binary draws, `probabilities` (n, D) the Bernoulli
    means they were drawn from, `latents` {site: value} the latents that made them."""

    digits: torch.Tensor
    probabilities: torch.Tensor
    latents: dict


@dataclass
class RunContext:
    """What a family's report reads: the data, the settings, the run directory, the final summary
    (metrics.json, not to be changed: findings are returned), and whether data may be downloaded."""

    data: object
    cfg: object
    out: Path
    summary: dict
    download: bool = True
    log: Callable = print

    @property
    def reported_epoch(self):
        """The epoch whose model the report shows: the best one under early stopping, else the last."""
        return self.summary.get("early_stopping", {}).get("best_epoch", self.summary["epochs"])


@dataclass
class Report:
    """A family's report (or an experiment's): figures [(file in the run directory, one sentence on
    what it shows)] and findings {name: JSON-able value}, shown in report.html (and for a training
    run added to metrics.json)."""

    figures: list = field(default_factory=list)
    findings: dict = field(default_factory=dict)


# (eager, JIT) classes of each Pyro ELBO the families use.
PYRO_ELBOS = {eager.__name__: (eager, jitted) for eager, jitted in (
    (Trace_ELBO, JitTrace_ELBO),
    (TraceMeanField_ELBO, JitTraceMeanField_ELBO),
    (TraceGraph_ELBO, JitTraceGraph_ELBO),
    (TraceEnum_ELBO, JitTraceEnum_ELBO),
)}


def pyro_elbo(kind, jit=False, particles=1, compile=False, **options):
    """The one place a Pyro ELBO is built: `kind` names its class ("Trace_ELBO", ...), eager or JIT, over `particles`
    samples of the latents per digit (vectorized: a particle plate at dim -2, the data plate at -1). `compile=True`:
    the same objective as one compiled graph (`compiled.CompiledObjective`), traced from Pyro's JIT version."""
    eager, jitted = PYRO_ELBOS[kind]

    def build(elbo_class):
        return elbo_class(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1, **options)

    if compile:
        return CompiledObjective(build(eager), PyroJitELBO(lambda: build(jitted)))
    return build(jitted if jit else eager)


class Family(nn.Module):
    """A latent-variable model of binary digits x in {0, 1}^num_pixels, written as a Pyro program,
    with the guides that train it. An `nn.Module`: its networks are its submodules, so `.to(device)`
    moves them and `reset_parameters()` re-draws them.

    A subclass declares, as class attributes:

    - ``name``: its ``--model`` value.
    - ``title``: a few words saying what it is, for ``--help`` and reports.
    - ``guides``: {guide name: one line saying what it is}; guide ``g`` is the method ``guide_g``.
    - ``default_guide``: the guide used when none is given.
    - ``exact_guides``: guides whose objective is the exact log-likelihood (z enumerated): no ELBO is
      reported for them, nor an importance-sampled estimate.
    - ``elbos``: {name: one line}: the objectives users may choose (``elbo=``); empty when the guide
      decides the objective.
    - ``importance_weighted_elbos``: which of those train the k-particle bound: early stopping then
      selects on iwae-k, not on the one-sample ELBO.
    - ``hyperparameters``: {constructor argument: `Hyperparameter`}: what users set (CLI flags), and
      which guides each shapes (reports leave it out of the others' settings).
    - ``training_defaults``: optimizer, lr, batch_size and epochs when none are given (any it leaves
      out come from Family's).
    - ``experiments``: {name: `Experiment`} it offers besides a training run.
    - ``state_files``: files its `epoch_hook` keeps in the run directory between epochs (a run that
      replaces this one with ``overwrite`` removes them).

    It implements ``model(x, *step_args, observed=None)`` (observed site ``"x"`` in a plate
    ``"data"`` at dim -1, scoring only the pixels where the boolean mask ``observed`` is True; the
    latents at site `latent_site`), the guides (same arguments: they see x with missing pixels set
    to 0), `elbo`, `pixel_logits`, and where it has them the exact `log_likelihood` and
    `exact_posterior`. Everything else has a default here that a family may override: `step_args`
    (a schedule), `loss_name`, `sample`, `inference_methods`, `infer` (the posterior given observed
    pixels, `ppl_models.inference`), `weighted_summary`, `summary`, `memory_parts` (refuse what
    cannot fit, before building), `data_parallel_refusal` (what cannot train in several processes),
    `epoch_hook`, `report`. Errors name settings as parameters in backquotes (```z_dim```), which
    the CLI says as flags. Hyperparameter names may be shared between families (one CLI flag).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    guides: ClassVar[dict]
    default_guide: ClassVar[str]
    exact_guides: ClassVar[tuple] = ()
    elbos: ClassVar[dict] = {}
    importance_weighted_elbos: ClassVar[tuple] = ()
    hyperparameters: ClassVar[dict] = {}
    training_defaults: ClassVar[dict] = dict(optimizer="adam", lr=1e-3, batch_size=100, epochs=10)
    experiments: ClassVar[dict] = {}
    state_files: ClassVar[tuple] = ()

    #: the sample site of the latents, in the model and in every guide
    latent_site = "z"
    #: whether the latents are continuous (then MCMC with NUTS can sample their posterior)
    continuous_latents = False
    #: whether `log_likelihood` gives the exact log p(x) (may depend on the instance's size)
    exact = False
    #: whether an exact pass over a split takes minutes: then learning curves skip it where an ELBO exists
    exact_is_costly = False
    #: whether `log_likelihood(x, observed, share=(i, n))` sums share i of n of the latent states (a
    #: log-sum-exp over a part of the sum): processes then score every digit on their own share of
    #: the states, where otherwise each scores its share of the digits
    exact_sum_in_shares = False

    def __init__(self, num_pixels=784):
        super().__init__()
        self.num_pixels = num_pixels
        self.compiled_functions = {}  # compiled.kept: the family's compiled graphs, which go with it
        self.register_buffer("device_marker", torch.empty(0), persistent=False)  # follows .to(device)

    @property
    def device(self):
        """The torch.device its networks (and the params it creates) live on."""
        return self.device_marker.device

    # ---- settings ----------------------------------------------------------------------------
    @classmethod
    def hyperparameter_defaults(cls):
        """{hyperparameter: its default}, read from the constructor's signature."""
        signature = inspect.signature(cls.__init__).parameters
        return {name: signature[name].default for name in cls.hyperparameters}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.training_defaults = {**Family.training_defaults, **cls.training_defaults}  # a family may give some

    @classmethod
    def check_choices(cls, guide, elbo=None, particles=1):
        """Refuse a guide or an ELBO this family does not have, naming the ones it has, and particles
        for a guide whose objective is exact (there is nothing to sample)."""
        if guide not in cls.guides:
            raise SettingError(f"`guide='{guide}'` does not belong to model {cls.name!r}; its guides are: "
                               f"{', '.join(cls.guides)}")
        if particles > 1 and guide in cls.exact_guides:
            raise SettingError(f"`particles` does not apply to guide {guide!r}: its objective is the exact "
                               "log-likelihood, nothing is sampled; drop `particles`")
        if elbo is None:
            return
        if not cls.elbos:
            raise SettingError(f"`elbo` does not apply to model {cls.name!r}: its guide decides its objective; "
                               "drop `elbo`")
        if elbo not in cls.elbos:
            raise SettingError(f"unknown `elbo={elbo}` for model {cls.name!r}; choose one of: {', '.join(cls.elbos)}")

    @classmethod
    def unused_settings(cls, guide=None):
        """{setting: why it does not apply}: the settings a run with `guide` is given but does not use
        (with no guide, as an experiment that trains several, those no guide uses)."""
        unused = {name: f"used by guide {' and '.join(setting.guides)} only"
                  for name, setting in cls.hyperparameters.items()
                  if setting.guides and guide is not None and guide not in setting.guides}
        if not cls.elbos:
            unused["elbo"] = f"model {cls.name}'s guide decides its objective"
        if guide in cls.exact_guides:
            unused["particles"] = f"guide {guide}'s objective is the exact log-likelihood: nothing is sampled"
            unused["eval_samples"] = "the exact log-likelihood is reported, which iwae-k would only estimate"
        return unused

    @classmethod
    def memory_parts(cls, model_args, batch_size, particles):
        """{what (with the settings that size it, in backquotes): bytes} this family needs to train
        with these settings, estimated before anything is built; empty where it is never large."""
        return {}

    @classmethod
    def check_memory(cls, model_args, batch_size, particles, available):
        """Refuse, with the estimate, settings whose memory would exceed `available` bytes."""
        parts = cls.memory_parts({**cls.hyperparameter_defaults(), **model_args}, batch_size, particles)
        needed = sum(parts.values())
        if needed > available:
            largest = max(parts, key=parts.get)
            raise SettingError(f"model {cls.name!r} with these settings needs about {needed / 1e9:,.1f} GB to train, "
                               f"{parts[largest] / 1e9:,.1f} GB of it for {largest}, and this machine has "
                               f"{available / 1e9:,.1f} GB; choose smaller settings")

    # ---- training ----------------------------------------------------------------------------
    def model(self, x, *step_args):
        """The Pyro model, p(z) p(x | z): ``x`` (N, num_pixels) observed at site ``"x"`` in a plate
        ``"data"`` at dim -1, the latents at `latent_site`; with ``observed=`` (a boolean mask like x)
        only the observed pixels are scored. Returns nothing: what it defines is its trace."""
        raise NotImplementedError

    def guide(self, name):
        """The guide method of that name (the same bound method every call: JIT caches on it), or
        for "prior" the prior as a proposal (plain Monte Carlo; for evaluation, not for training)."""
        return prior_proposal(self.model) if name == "prior" else getattr(self, f"guide_{name}")

    def elbo(self, guide, elbo=None, jit=False, particles=1, compile=False):
        """The training objective of this guide (and chosen `elbo`): a Pyro ELBO, or any object with
        `loss` and `loss_and_grads(model, guide, *args)`; Pyro's JIT version with `jit`; with `compile`
        a `compiled.CompiledObjective` (`pyro_elbo(..., compile=True)` builds one), or a SettingError
        saying why this one cannot be compiled."""
        raise NotImplementedError

    def step_args(self, epochs_done, device):
        """Extra arguments of model and guide at this point of training (`epochs_done`, fractional),
        for a family with a schedule; none by default."""
        return ()

    def loss_name(self, guide, elbo=None):
        """What the training loss is, for progress bars and logs."""
        return "-log p(x)" if guide in self.exact_guides else "-ELBO"

    def reset_parameters(self):
        """Draw every network's initial weights afresh (from the global RNG, seeded by the run), so a
        run depends on nothing that happened before it, not even on when the family was built."""
        def reset(module):  # in registration order, each module once: not below one that resets itself
            for child in module.children():
                reset_own = getattr(child, "reset_parameters", None)
                reset_own() if reset_own else reset(child)

        reset(self)

    # ---- what a generative model is for ------------------------------------------------------
    def log_likelihood(self, x, observed=None, share=None):
        """Exact log p(x) per digit (nats), or log p(x_observed) where `observed` (a boolean mask like x)
        is given, for a family (instance) whose `exact` is true (see `exact_sum_in_shares`)."""
        raise NotImplementedError(f"model {self.name!r} has no exact log-likelihood")

    def pixel_logits(self, z):
        """The logits of p(x_d = 1 | z) for latent values z of any leading shape: (..., num_pixels)."""
        raise NotImplementedError

    def exact_posterior(self, x, observed, num_samples):
        """p(z | x_observed) by enumerating every latent state (an `inference.Posterior`), for a family
        (instance) whose `exact` is true."""
        raise NotImplementedError(f"model {self.name!r} has no exact posterior")

    @torch.no_grad()
    def sample(self, num_samples):
        """Ancestral samples from the Pyro model itself (`poutine.uncondition`), so they cannot drift
        from `model()`: `Samples` with the mean of the distribution site "x" was drawn from."""
        blank = torch.zeros(num_samples, self.num_pixels, device=self.device)
        trace = poutine.trace(poutine.uncondition(self.model)).get_trace(blank)
        latents = {name: site["value"] for name, site in trace.nodes.items()
                   if site["type"] == "sample" and name != "x" and not site_is_subsample(site)}
        pixels = trace.nodes["x"]
        return Samples(pixels["value"], pixels["fn"].mean, latents)

    def inference_methods(self, guide):
        """{method: what it is}: the algorithms that can find p(z | x_observed) for this model trained
        with `guide`; the first is the default."""
        methods = {}
        if self.exact:
            methods["exact"] = "enumeration of every latent state"
        if guide not in self.exact_guides:
            methods["importance"] = "importance sampling, the trained guide q(z | x) as proposal"
        methods["prior"] = "importance sampling, the prior p(z) as proposal"
        if self.continuous_latents:
            methods["nuts"] = "MCMC: Pyro's NUTS on the latents, the networks fixed"
        return methods

    def infer(self, x, observed, guide, method, num_samples=100, draws=1000, warmup=200, progress=False,
              compile=False):
        """p(z | x_observed) for a batch of digits by `method` (one of `inference_methods(guide)`):
        `draws` importance samples or NUTS draws per digit (after `warmup` steps), `num_samples` of
        them returned as posterior samples; the trained guide's q(z | x) beside it where the guide is
        not exact. `compile`: importance sampling's draws run as compiled graphs (kept with the family,
        so later batches of the same size reuse them), or NUTS's potential energy with its gradient
        (compiled for this batch: its digits are the graph's constants)."""
        if method == "exact":
            return self.exact_posterior(x, observed, num_samples)
        trained = None if guide in self.exact_guides else self.guide(guide)
        q = None if trained is None else proposal(trained, x, observed, self.latent_site)
        if method == "nuts":
            init = None if q is None else proposal_summary(q)["q(z | x) mean"]
            posterior = nuts_posterior(self.model, x, observed, draws, num_samples, warmup, init, self.latent_site,
                                       progress, compile)
        else:
            chosen = trained if method == "importance" else prior_proposal(self.model)
            draw = importance_sampler(self.model, chosen, self.latent_site)
            if compile:
                draw = kept(self, ("importance draws", guide, method), lambda: Compiled(
                    draw, f"importance sampling ({method})", eager=torch.no_grad()(draw)))
            posterior = importance_posterior(draw, x, observed, draws, num_samples,
                                             self.inference_methods(guide)[method], self.weighted_summary)
        if q is not None:
            posterior.summary.update(proposal_summary(q))
        return posterior

    def weighted_summary(self, values, weights):
        """{name: (N, ...)} summarising a posterior estimated by latent values (S, N, ...) with their
        normalised weights (S, N): the posterior mean by default."""
        return {"posterior mean": (weights.reshape(weights.shape + (1,) * (values.dim() - 2)) * values).sum(0)}

    def summary(self, guide=None):
        """One line saying what this model is, with its size: that of the networks `guide` trains
        too, where it is given."""
        return f"model {self.name}"

    # ---- after training ----------------------------------------------------------------------
    def data_parallel_refusal(self, guide, elbo=None):
        """Why `guide` (with `elbo`) cannot train in several processes (a message naming settings), or None."""
        return None

    def epoch_hook(self, out, cfg):
        """A callable `hook(epoch)` run before training (epoch 0) and after each epoch, or None."""
        return None

    def report(self, run: RunContext) -> Report:
        """The figures and findings of a trained run (seed-problem figures and more). By default the
        learning curves alone."""
        bound = draw_learning_curves(run, f"{self.summary(run.cfg.guide)}, guide {run.cfg.guide}: "
                                          f"{run.cfg.eval_digits} fixed random digits per split")
        return Report([("learning_curves.png", f"Log-likelihood figures of {run.cfg.eval_digits} fixed random digits "
                        f"of each split during training.{bound}")])

