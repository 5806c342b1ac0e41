"""A trained run as a model to use: `load(run_dir)`, then the four things a generative model is for.

    model = ppl_models.load("figures/vae")
    digits = model.sample(64, seed=0).digits                   # x ~ p(x)
    scores = model.log_prob(x)                                 # log p(x): exact, or iwae-k
    filled = model.fill_in(x, observe("top"))                  # p(x_missing | x_observed)
    posterior = model.posterior(x)                             # p(z | x), or p(z | x_observed)

Digits are (N, D) or one (D,) digit (28 x 28 images are flattened) of 0/1 values of any dtype
(uint8 as the data files hold, bool, float). Masks say which pixels are observed (True), one (D,)
mask for all digits or one per digit (`ppl_models.masks.observe` makes the usual ones). Every
query is seeded (`seed=`) and leaves the global RNG as it was.
"""

import json
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import pyro
import torch
from pyro import poutine

from .config import MAX_IWAE_SAMPLES, Config, SettingError, check_compile_setting, resolve_device
from .data import check_binary
from .evaluate import compile_pays, per_digit_estimate
from .inference import fill_in, join_fill_ins, join_posteriors
from .masks import check_mask
from .models import family_of
from .rundir import TrainingError, buffers, load_checkpoint, read_snapshot, restore_snapshot
from .train import evaluation_rng

NUTS_DIGITS = 100  # digits per NUTS chain: their latents are sampled jointly, one step size for all
# digits x (warmup + draws) of a NUTS chain whose potential 'auto' compiles: eager, a digit-step costs
# about 1.4 ms on one core, compiled 0.9 (bench/inference_speed.py), and compiling 1.5-5 s
COMPILE_NUTS_STEPS = 10_000
MEMORY_FLOATS = 2**25  # importance draws x digits x pixels held at once: 128 MB


@dataclass
class Scores:
    """What `TrainedModel.log_prob` returns: log p(x) (or log p(x_observed)) per digit, in nats.

    Attributes:
        log_prob: (N,) float tensor, one value per digit, in nats (natural log).
        estimator: how it was computed: ``"exact"`` (every latent state summed), ``"elbo"`` (a one-draw
            lower bound) or ``"iwae-<k>"`` (importance-weighted with k draws from the trained guide; a
            lower bound in expectation that tightens as k grows).
        mean: the mean over the N digits, in nats per digit.
        stderr: the standard error of that mean over digits (a spread over digits, not the estimator's
            own Monte Carlo error); NaN for a single digit.
    """

    log_prob: torch.Tensor
    estimator: str
    mean: float
    stderr: float


class TrainedModel:
    """A trained model, from `load`: the four queries a generative model answers.

    Its params live in their own Pyro param-store scope: several trained models can be used side by
    side, and loading one does not touch the global param store. Every query is seeded (``seed=``,
    the run's seed by default) and leaves the global random state as it was, so the same call gives
    the same answer.

    Digits (``x``) are one (D,) digit, an (N, D) array or (N, 28, 28) images, of 0/1 values of any
    dtype (uint8, bool, float), on any device. Masks (``observed``) say which pixels are observed
    (True): a name `ppl_models.masks.observe` knows (``"top"``, ``"random:0.5"``), one (D,) mask
    for all digits, or an (N, D) mask per digit.

    Attributes:
        family: the `ppl_models.family.Family` (an ``nn.Module`` on the device it was loaded to).
        cfg: the run's `ppl_models.config.Config` (model, guide, data set, ...).
        source: which saved file the params came from, in words.
        compile: whether importance sampling and NUTS run as compiled graphs: True, False, or
            ``"auto"`` (see `compiles`), where they repay the seconds compiling takes (docs: Compiling).

    Every query raises `ppl_models.config.SettingError` with a sentence saying what to change for
    digits of the wrong shape, a mask of the wrong shape or one that observes nothing, a method or
    estimator the model cannot use, and counts that are not positive integers; and
    `ppl_models.data.DataError` for digits with values other than 0 and 1 (binarize them first:
    `ppl_models.read_digits` does it for images and grayscale arrays).
    """

    def __init__(self, family, cfg, params, source, compile="auto"):
        check_compile_setting(compile)
        self.family, self.cfg, self._params, self.source, self.compile = family, cfg, params, source, compile

    @contextmanager
    def active(self, seed=None):
        """Its params in Pyro's param store, and the RNG seeded by `seed` (the run's if None) in a
        stream that leaves the caller's untouched: the context in which to call `family`'s methods."""
        with pyro.get_param_store().scope(self._params), \
                evaluation_rng(self.cfg.seed if seed is None else seed, self.family.device):
            yield

    def __repr__(self):
        return f"<trained {self.family.summary(self.cfg.guide)}, guide {self.cfg.guide!r}, from {self.source}>"

    @property
    def inference_methods(self):
        """The inference methods this model offers to `posterior` and `fill_in`, as a dict of each
        method's name and what it is; the first is the default."""
        return self.family.inference_methods(self.cfg.guide)

    # ---- the four queries ----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n, seed=None):
        """Draw n digits x ~ p(x) by ancestral sampling from the Pyro model (z first, then x given z).

        Args:
            n: how many digits, a positive integer.
            seed: seed of the draws (default: the run's).

        Returns:
            `ppl_models.family.Samples`: ``digits`` (n, D) 0/1 floats, ``probabilities`` (n, D) the
            Bernoulli means p(x_d = 1 | z) they were drawn from, ``latents`` {site name: value}.
        """
        check_counts(n=n)
        with self.active(seed):
            return self.family.sample(int(n))

    def log_prob(self, x, observed=None, estimator=None, draws=1000, seed=None, progress=False):
        """Score digits: log p(x) per digit, in nats (log p(x_observed) with a mask).

        With the run's seed (the default) on a whole split, this is the number metrics.json holds.

        Args:
            x: the digits.
            observed: a mask; the unobserved pixels are summed out (default: every pixel observed).
            estimator: ``"exact"`` (every latent state summed; the mixture, and the SBN up to M = 20),
                ``"elbo"`` or ``"iwae-<k>"`` (k draws from the trained guide; at most iwae-1,000,000).
                Default: exact where the model has it, else ``f"iwae-{draws}"``.
            draws: k of the default iwae-k estimator.
            seed: seed of the draws (default: the run's).
            progress: show a progress bar.

        Returns:
            `Scores`: the per-digit values, the estimator's name, their mean and standard error.

        Raises:
            SettingError: ``exact`` for a model without an exact log-likelihood, a sampled estimator for
                a model trained with an exact guide (it has no guide to sample from), an unknown name.
        """
        x = self.digits(x)
        observed = None if observed is None else self.observed_pixels(observed, x, seed, to_fill=False)
        check_counts(draws=draws)
        estimator = estimator or ("exact" if self.family.exact else f"iwae-{draws}")
        self.check_estimator(estimator)
        with self.active(seed), torch.no_grad():
            values = per_digit_estimate(self.family, self.cfg.guide, x, estimator, progress, observed=observed,
                                        compile=self.compile)
        spread = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else math.nan
        return Scores(values, estimator, values.mean().item(), spread)

    def posterior(self, x, observed=None, method=None, num_samples=100, draws=1000, warmup=200, seed=None,
                  progress=False):
        """Infer the latents that caused each digit: p(z | x), or p(z | x_observed) with a mask.

        Args:
            x: the digits.
            observed: a mask (default: every pixel observed).
            method: how the posterior is found, one of `inference_methods` (default: the first):
                ``"exact"`` (enumeration), ``"importance"`` (the trained guide as proposal),
                ``"prior"`` (the prior as proposal) or ``"nuts"`` (MCMC, continuous latents).
            num_samples: draws of z returned per digit.
            draws: importance samples per digit, or NUTS draws after warm-up (at least 4).
            warmup: NUTS warm-up steps.
            seed: seed of the draws (default: the run's).
            progress: show a progress bar.

        Returns:
            `ppl_models.inference.Posterior`: ``samples`` (num_samples, N, ...) of z, the family's
            ``summary`` (e.g. ``"p(z = k | x)"`` for the mixture, ``"p(z_m = 1 | x)"`` for the SBN,
            posterior means for the VAE), ``diagnostics`` (effective sample size, split R-hat) and
            ``warnings()`` naming the digits whose estimate is unreliable.
        """
        x = self.digits(x)
        observed = torch.ones_like(x, dtype=torch.bool) if observed is None else \
            self.observed_pixels(observed, x, seed, to_fill=False)
        return join_posteriors(self._per_chunk(x, observed, method, num_samples, draws, warmup, seed, progress,
                                               answer=lambda posterior, chunk, mask: posterior))

    def fill_in(self, x, observed, method=None, num_samples=16, draws=1000, warmup=200, seed=None,
                progress=False):
        """Fill in missing pixels: the posterior predictive p(x_missing | x_observed).

        Args:
            x: the digits; their missing pixels may hold any 0/1 values (the truth, where it is known,
                which ``log_prob_missing`` then scores).
            observed: a mask, e.g. ``"top"`` (the bottom half is filled in); required. It must
                observe some pixel, and leave some pixel to fill in, of every digit.
            method: as for `posterior`.
            num_samples: completed digits returned per digit.
            draws: as for `posterior`.
            warmup: as for `posterior`.
            seed: seed of the draws (default: the run's).
            progress: show a progress bar.

        Returns:
            `ppl_models.inference.FillIn`: ``probabilities`` (N, D) p(x_d = 1 | x_observed) (observed
            pixels keep their values), ``samples`` (num_samples, N, D) completed digits,
            ``log_prob_missing`` (N,) log p(x_missing | x_observed) of the values x holds at the
            missing pixels, in nats, ``estimator`` (``"exact"`` or the estimate's name) and the
            ``posterior`` it came from.
        """
        x = self.digits(x)
        observed = self.observed_pixels(observed, x, seed)

        def answer(posterior, chunk, mask):
            return fill_in(self.family.pixel_logits, chunk, mask, posterior, num_samples)

        return join_fill_ins(self._per_chunk(x, observed, method, num_samples, draws, warmup, seed, progress,
                                             answer))

    def _per_chunk(self, x, observed, method, num_samples, draws, warmup, seed, progress, answer):
        """[answer(posterior, digits, mask)] for chunks of digits sized so the method's draws fit in memory."""
        method = method or next(iter(self.inference_methods))
        if method not in self.inference_methods:
            raise SettingError(f"`method={method}` cannot answer this model trained with guide {self.cfg.guide!r}; "
                               f"choose one of: {', '.join(self.inference_methods)}")
        check_counts(num_samples=num_samples, draws=draws)
        if method == "nuts" and draws < 4:
            raise SettingError("`draws` must be at least 4 for `method=nuts`: split R-hat needs two halves of two")
        check_counts(least=0, warmup=warmup)
        fits = max(1, MEMORY_FLOATS // (draws * x.shape[1]))  # the draws' pixel logits of a batch of digits
        size = {"nuts": min(NUTS_DIGITS, fits), "exact": len(x)}.get(method, fits)
        answers = []
        with self.active(seed):
            for chunk, mask in zip(x.split(size), observed.split(size)):
                with torch.set_grad_enabled(method == "nuts"):  # NUTS needs gradients in z
                    posterior = self.family.infer(chunk, mask, self.cfg.guide, method, num_samples, draws, warmup,
                                                  progress, self.compiles(method, len(x), len(chunk), draws, warmup))
                with torch.no_grad():
                    answers.append(answer(posterior, chunk, mask))
        return answers

    def compiles(self, method, digits, chunk, draws, warmup):
        """Whether a query compiles its inference: under 'auto', importance sampling of evaluate.COMPILE_DRAWS
        draws or more in all; NUTS, whose potential is compiled for each chunk of digits (the
        digits are the graph's constants), for chunks of COMPILE_NUTS_STEPS digit-steps or more."""
        if method == "nuts":
            return compile_pays(self.compile, chunk * (warmup + draws), COMPILE_NUTS_STEPS)
        return method != "exact" and compile_pays(self.compile, digits * draws)

    # ---- inputs ------------------------------------------------------------------------------
    def digits(self, x):
        """(N, D) float digits on the model's device from any array of 0/1 values; one digit, or
        28 x 28 images, are reshaped."""
        x = torch.as_tensor(x)
        pixels = self.family.num_pixels
        if x.dim() >= 2 and x.shape[-2] == x.shape[-1] and x.shape[-1] ** 2 == pixels:
            x = x.flatten(-2)  # images
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[1] != pixels or len(x) == 0:
            raise SettingError(f"digits must be ({pixels},) or (N, {pixels}) arrays, or 28 x 28 images, got shape "
                               f"{tuple(x.shape)}")
        x = x.to(self.family.device, torch.float32)
        check_binary(x, "digits", pixels)
        return x

    def observed_pixels(self, observed, x, seed=None, to_fill=True):
        """The boolean (N, D) mask a query given ``observed`` uses for the (N, D) digits x
        (`ppl_models.masks.check_mask`): a random one (``"random:0.5"``) is drawn from the query's
        seed (the run's if None), so the same call gives the same mask and the global RNG is left
        alone."""
        generator = torch.Generator().manual_seed(self.cfg.seed if seed is None else seed)
        return check_mask(observed, len(x), x.shape[1], to_fill, generator).to(x.device)

    def check_estimator(self, name):
        sampled = name == "elbo" or (name.startswith("iwae-") and name[5:].isdigit() and int(name[5:]) > 0)
        if name == "exact" and not self.family.exact:
            raise SettingError(f"`estimator=exact`: {self.family.summary(self.cfg.guide)} has no exact log-likelihood; "
                               "use iwae-k")
        if sampled and name != "elbo" and int(name[5:]) > MAX_IWAE_SAMPLES:
            raise SettingError(f"`estimator={name}`: at most iwae-{MAX_IWAE_SAMPLES:,} (days of computing past that)")
        if sampled and self.cfg.guide in self.family.exact_guides:
            raise SettingError(f"`estimator={name}` needs a trained guide, and guide {self.cfg.guide!r} is exact; "
                               "use exact")
        if name != "exact" and not sampled:
            raise SettingError(f"unknown `estimator={name}`; use exact, elbo or iwae-k (e.g. iwae-1000)")


def load(run_dir, device="cpu", compile="auto"):
    """Load a trained run as a model to use.

    Example::

        model = ppl_models.load("figures/vae")
        model.fill_in(x, "top", method="nuts").probabilities   # the bottom half of each digit, filled in

    Args:
        run_dir: a training run's folder, as ``ppl-models train --out DIR`` (or ``python run.py``)
            wrote it, after at least one epoch; not an experiment's folder (load one of its runs).
        device: where the networks go: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        compile: whether inference runs compiled: True, False or ``"auto"`` (see `TrainedModel.compiles`).

    Returns:
        `TrainedModel`: the params of the run's best validation epoch under early stopping
        (``best.pt``, the model metrics.json reports), else of its last checkpoint.

    Raises:
        ppl_models.rundir.TrainingError: a folder that is not a training run, an experiment's
            folder, a damaged checkpoint, or one that lacks params the model needs.
        ppl_models.config.SettingError: an unknown ``compile`` setting.
    """
    run_dir, device = Path(run_dir), resolve_device(device)
    if (run_dir / "experiment.json").exists():
        raise TrainingError(f"{run_dir} holds an experiment, which trains several models; load one training run's "
                            "folder")
    if not (run_dir / "config.json").is_file() or not (run_dir / "checkpoint.pt").is_file():
        raise TrainingError(f"{run_dir} is not a training run (no config.json and checkpoint.pt): give the folder "
                            "`ppl-models train ... --out DIR` (or python run.py) wrote, after at least one epoch")
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = saved_config(checkpoint["config"], run_dir / "checkpoint.pt")
    saved, saved_at = checkpoint, run_dir / "checkpoint.pt"
    source = f"{saved_at} (epoch {checkpoint['progress']['epoch']})"
    if cfg.patience and (run_dir / "best.pt").is_file():
        saved, saved_at = read_snapshot(run_dir / "best.pt", checkpoint.get("run")), run_dir / "best.pt"
        source = f"{saved_at} (the best valid epoch, {best_epoch(run_dir)})"
    # Building the networks draws initial weights, registering them draws latents: the caller's RNG is left alone.
    with torch.random.fork_rng(), pyro.get_param_store().scope() as params:
        try:
            family = family_of(cfg.model)(**cfg.model_args).to(device)
            register_networks(family, cfg.guide)
        except (SettingError, TypeError, KeyError) as error:
            raise unbuildable(run_dir / "checkpoint.pt", error) from None
        check_fits(family, saved, saved_at, cfg)
        restore_snapshot(family, saved, device)
    return TrainedModel(family, cfg, params, source, compile)


def saved_config(saved, path):
    """The `Config` a checkpoint holds, checked: a model and a guide that exist."""
    try:
        cfg = Config(**{f.name: saved[f.name] for f in fields(Config) if f.name in saved})
        family_of(cfg.model).check_choices(cfg.guide, cfg.elbo, cfg.particles)
    except (SettingError, KeyError, TypeError) as error:
        raise unbuildable(path, error) from None
    return cfg


def unbuildable(path, error):
    """The refusal of a checkpoint whose settings build no model, quoting the first line of `error`."""
    said = (str(error).strip("'\"") or type(error).__name__).splitlines()[0]
    return TrainingError(f"{path} holds settings that build no model ({said}): was it edited? Train the run again")


def check_fits(family, saved, path, cfg):
    """Refuse saved params or buffers of other names or sizes than the run's settings build: a file
    edited, or copied from another run."""
    expected = {name: value.shape for name, value in pyro.get_param_store().named_parameters()}
    found = {name: value.shape for name, value in saved["params"].items() if torch.is_tensor(value)}
    if saved["buffers"] is not None:  # (None: a run of format 3, which `restore_snapshot` judges)
        expected.update({f"buffer {name}": value.shape for name, value in buffers(family).items()})
        found.update({f"buffer {name}": value.shape for name, value in saved["buffers"].items()
                      if torch.is_tensor(value)})
    missing = sorted(set(expected) - set(found))
    if missing:
        raise TrainingError(f"{path} lacks params this model needs ({', '.join(missing[:3])}): was it written by "
                            "another version of ppl_models, or for other settings?")
    for name, shape in expected.items():
        if found[name] != shape:
            raise TrainingError(f"{path} does not fit the run's settings ({family.summary(cfg.guide)}, guide "
                                f"{cfg.guide!r}): its {name} is {tuple(found[name])}, the model's {tuple(shape)}. "
                                "Was it edited, or copied from another run?")


def best_epoch(run_dir):
    """The best epoch metrics.json names under early stopping, or "?" where it says none."""
    try:
        return json.loads((run_dir / "metrics.json").read_text())["early_stopping"]["best_epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


MAX_COUNT = 10**6  # samples, draws, warm-up steps of a query: past it, days of computing or memory no machine has


def check_counts(least=1, **counts):
    """Refuse counts that are not integers from `least` to MAX_COUNT (numpy's integers are integers)."""
    for name, value in counts.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not least <= value <= MAX_COUNT:
            what = "a positive integer" if least == 1 else f"an integer from {least}"
            raise SettingError(f"`{name}` must be {what} up to {MAX_COUNT:,}, got {value!r}")


def register_networks(family, guide):
    """Run the model and the guide once, so that every pyro.param and pyro.module is in the param
    store: the saved values are then copied into the very tensors the networks use (restoring into
    an empty store would leave the networks untrained)."""
    blank = torch.zeros(2, family.num_pixels, device=family.device)
    guide_trace = poutine.trace(family.guide(guide)).get_trace(blank)
    poutine.trace(poutine.replay(family.model, trace=guide_trace)).get_trace(blank)
