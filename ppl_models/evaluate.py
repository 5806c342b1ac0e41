"""Log-likelihood figures, each named after what it is.

Estimator names (used in metrics.csv / metrics.json and on every plot):
  exact     log p(x), summed over every latent state (models with a tractable sum)
  elbo      E_q[log p(x, z) - log q(z | x)], one sample of z per digit: a lower bound
  iwae-<k>  log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q: a tighter bound, -> log p(x) as k grows
All are in nats per digit.
"""

import math
import time

import pyro
import torch
from pyro import poutine
from tqdm import tqdm  # not tqdm.auto: in a notebook without ipywidgets it warns on import

from . import compiled
from .data import check_binary
from .distributed import ONE_PROCESS


def importance_traces(model, guide, x, num_samples=1, **kwargs):
    """(guide trace, model trace) for z ~ q(z | x) drawn `num_samples` times per digit, in parallel
    under an outer ``particles`` plate (model and guide must broadcast: their data plate is dim -1),
    the model replayed on the guide's z. Both called with (x, **kwargs), e.g. `observed=`."""
    with pyro.plate("particles", num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()
    return guide_trace, model_trace


def log_densities(trace, x):
    """The sum of a trace's sample sites' log-probabilities, per draw and digit: (num_samples, N)."""
    total = torch.zeros(1, x.shape[0], device=x.device)
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + site["log_prob"]
    return total


def log_weight_terms(model, guide, x, num_samples=1, **kwargs):
    """For z ~ q(z | x), drawn `num_samples` times per digit: log p(x, z) - log q(z | x), and the
    part of log q(z | x) from sites without reparameterized samples (what a score-function
    gradient multiplies); both (num_samples, N) and differentiable."""
    guide_trace, model_trace = importance_traces(model, guide, x, num_samples, **kwargs)
    log_q_scored = torch.zeros(num_samples, x.shape[0], device=x.device)
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not site["fn"].has_rsample:
            log_q_scored = log_q_scored + site["log_prob"]
    log_weight = log_densities(model_trace, x) - log_densities(guide_trace, x)
    return log_weight.expand(num_samples, -1), log_q_scored


@torch.no_grad()
def importance_log_weights(model, guide, x, num_samples=1, **kwargs):
    """log p(x, z) - log q(z | x) for z ~ q(z | x): shape (num_samples, N)."""
    return log_weight_terms(model, guide, x, num_samples, **kwargs)[0]


def log_weights_of(model, guide_name, compile=False):
    """`log_weights(x, num_samples, observed)` -> (num_samples, N): `importance_log_weights` of the
    family `model` with its guide, eagerly, or as compiled graphs (`compiled.Compiled`, one per shape
    of x, number of samples and mask or none; kept with the family, so later estimates reuse them)."""
    guide = model.guide(guide_name)

    def log_weights(x, num_samples, observed):
        return importance_log_weights(model.model, guide, x, num_samples, **masked(observed))

    if not compile:
        return log_weights
    return compiled.kept(model, ("importance log weights", guide_name), lambda: compiled.Compiled(
        log_weights, f"guide {guide_name!r}'s importance weights", eager=log_weights))


def masked(observed):
    """The keyword arguments of model and guide for a pixel mask `observed`, or none."""
    return {} if observed is None else {"observed": observed}


def iwae_bound(log_weights):
    """log (1/k) sum_i w_i over the first dim: the importance-weighted estimate of log p(x)."""
    return torch.logsumexp(log_weights, 0) - math.log(log_weights.shape[0])


def estimators(model, guide_name, split="test"):
    """The estimator names this model/guide pair reports, in a fixed order: `exact` where the model
    has it, and for a guide that is not exact the ELBO (iwae-k is asked for apart). Where the exact sum is costly
    and the guide gives an ELBO, the exact value is reported on the test split only."""
    exact_guide = guide_name in model.exact_guides
    costly = model.exact_is_costly and not exact_guide and split != "test"
    names = ["exact"] if model.exact and not costly else []
    return names + ([] if exact_guide else ["elbo"])


# Samples x digits x pixels scored at once (4 MB of logits), small enough that a chunk's logits
# stay in cache between the decoder's last product and the softplus that reads them. Measured
# (bench/iwae_speed.py; iwae-1000 of z-dim 2 and 40 against its floor, one thread, one run on
# 2026-12-04): eager 1.40x and 1.39x with 2^20, 1.53x and 1.36x with 2^22; compiled 0.96x and 0.97x
# with 2^20, 1.11x and 1.07x with 2^22; eager 1.1-2.0x with 2^25 (2026-12-01). BENCHMARKS.md has
# the latest run (2^20: eager 1.47x and 1.53x, compiled 0.99x and 1.01x).
CHUNK_FLOATS = 2**20


# An importance-sampled estimate (elbo, iwae-k) or posterior with this many draws of z in all (digits x
# draws) or more is compiled where `compile='auto'`. Compiling a graph costs about 5 s the first time,
# 1-3 s from inductor's cache; a draw then costs 0.6-0.7 of what it did (BENCHMARKS.md, 2026-12-04:
# iwae-1000 at 0.99-1.01x its floor against 1.47-1.53x; importance sampling of digits with a missing
# half, 0.62x), about 4 us less a draw on one core: 2 million draws save about 8 s.
# The exact sums are never compiled: they are a few large products already.
COMPILE_DRAWS = 2_000_000


def compile_pays(compile, work, repaid_from=COMPILE_DRAWS):
    """Whether `work` (importance draws in all, by default) runs compiled under `compile` (True, False or
    'auto': from `repaid_from` on)."""
    return compile is True or compile == "auto" and work >= repaid_from


def per_digit_estimate(model, guide_name, x, name, progress=False, memory_floats=CHUNK_FLOATS, observed=None,
                       world=ONE_PROCESS, compile=False):
    """One estimator's (N,) per-digit values, in batches of digits sized so that the samples of a
    batch (samples x digits x pixels) stay under `memory_floats` numbers; past one digit's worth,
    the samples of a digit are drawn in chunks too, so any k fits in memory. With a boolean mask
    `observed` like x, of log p(x_observed) (the guide sees the missing pixels as 0). `compile`:
    whether the importance weights run as compiled graphs (the same numbers up to rounding), True,
    False or 'auto' (when the estimate takes COMPILE_DRAWS draws or more).

    Each batch draws from its own stream, seeded by a number drawn for it from the caller's stream,
    so the values do not depend on which process scores which batch: in a `world` of several
    processes each scores its share of the batches (or, for a model that sums its exact
    log-likelihood over latent states in shares, its share of the states for every digit), and
    every process gets every value, equal to one process's up to the order of sums."""
    check_binary(x, "digits to score", x.shape[-1])
    batch_size = max(1, memory_floats // (samples_of(name) * x.shape[1]))
    starts = range(0, len(x), batch_size)
    seeds = torch.randint(2**62, (len(starts),)).tolist()  # from the caller's stream, one per batch, in any world
    if name == "exact" and world.size > 1 and model.exact_sum_in_shares:  # every digit, this rank's share of z
        share = (world.rank, world.size)
        masks = [None] * len(starts) if observed is None else observed.split(batch_size)
        partial = [model.log_likelihood(batch, mask, share=share) for batch, mask in zip(x.split(batch_size), masks)]
        return world.logsumexp(torch.cat(partial) if partial else x.new_zeros(0))
    if observed is not None:
        x = torch.where(observed, x, torch.zeros_like(x))
    draws = len(x) * samples_of(name)
    compiling = name != "exact" and compile_pays(compile, draws)
    log_weights = None if name == "exact" else log_weights_of(model, guide_name, compiling)
    values = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for index in tqdm(world.share(len(starts)), desc=f"{name} on {len(x):,} digits", unit="batch", leave=False,
                          disable=not progress or not world.main or len(starts) < 2):
            torch.manual_seed(seeds[index])
            batch = slice(starts[index], starts[index] + batch_size)
            mask = None if observed is None else observed[batch]
            values.append(model.log_likelihood(x[batch], **masked(mask)) if name == "exact" else
                          estimate_batch(log_weights, x[batch], name, memory_floats, mask))
    return world.gather(torch.cat(values) if values else x.new_zeros(0))


def estimate_batch(log_weights, x, name, memory_floats, observed):
    """An importance-sampled estimate of log p(x) per digit of a batch, from `log_weights_of`'s function."""
    if name == "elbo":
        return log_weights(x, 1, observed)[0]
    return chunked_iwae_bound(log_weights, x, samples_of(name), memory_floats, observed)


def samples_of(name):
    """Draws of z per digit an estimator takes: k for iwae-k, one for the ELBO (and exact)."""
    return int(name.split("-")[1]) if name.startswith("iwae-") else 1


def seconds_to_estimate(model, guide_name, x, name, processes=1):
    """About how long `per_digit_estimate` takes on all of x, shared by `processes` (as far as its
    batches go round): its time on 1% of the digits (at least 20), scaled, after a call on one digit
    has paid the first call's one-off costs."""
    probe = min(len(x), max(20, len(x) // 100))
    with torch.no_grad():
        per_digit_estimate(model, guide_name, x[:1], name)
        started = time.perf_counter()
        per_digit_estimate(model, guide_name, x[:probe], name)
    batches = math.ceil(len(x) / max(1, CHUNK_FLOATS // (samples_of(name) * x.shape[1])))
    sharing = processes if name == "exact" and model.exact_sum_in_shares else min(processes, batches)
    return (time.perf_counter() - started) * len(x) / probe / sharing


def duration(seconds):
    """A duration as a person says it: '40 s', '6 min', '1.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def chunked_iwae_bound(log_weights, x, samples, memory_floats, observed=None):
    """The iwae-k bound with the k samples drawn at most `memory_floats / (digits x pixels)` at a
    time, their log-mean-exp accumulated (the same estimate, in bounded memory)."""
    chunk = max(1, memory_floats // (x.shape[0] * x.shape[1]))
    if chunk >= samples:
        return iwae_bound(log_weights(x, samples, observed))
    total = torch.full(x.shape[:1], -math.inf, device=x.device)
    for size in [chunk] * (samples // chunk) + ([samples % chunk] if samples % chunk else []):
        total = torch.logaddexp(total, torch.logsumexp(log_weights(x, size, observed), 0))
    return total - math.log(samples)


@torch.no_grad()
def per_digit_estimates(model, guide_name, x, names, world=ONE_PROCESS):
    """{estimator name: (N,) per-digit values}."""
    return {name: per_digit_estimate(model, guide_name, x, name, world=world) for name in names}


def mean_estimates(model, guide_name, x, names, world=ONE_PROCESS):
    """{estimator name: mean over digits} as plain floats."""
    return {name: v.mean().item() for name, v in per_digit_estimates(model, guide_name, x, names, world).items()}


# ---- using log p(x) as a detector ----------------------------------------------------------
def roc_auc(higher, lower):
    """P(a score from `higher` exceeds one from `lower`), ties counting half: the area under the
    ROC curve of the score as a detector (Mann-Whitney U / (n_a n_b))."""
    scores = torch.cat([higher, lower]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=scores.dtype, device=scores.device)
    for value in scores.unique():  # average the ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_a, n_b = len(higher), len(lower)
    return ((ranks[:n_a].sum() - n_a * (n_a + 1) / 2) / (n_a * n_b)).item()


def batch_means(scores, batch_size, trials, generator):
    """Means of `trials` random batches of `batch_size` scores (each drawn without replacement)."""
    keys = torch.rand(trials, len(scores), generator=generator)
    picks = keys.argsort(1)[:, :batch_size]
    return scores.cpu()[picks].mean(1)


def batch_test(calibration, natural, suspect, batch_sizes, false_alarm=0.05, trials=2000, seed=0):
    """A one-sided test 'this batch of n digits is not natural' on the batch's mean log p.

    The threshold is the `false_alarm` quantile of batch means of held-out natural digits
    (`calibration`); its false-alarm rate is then measured on other natural digits (`natural`),
    and its power on `suspect` digits. Returns {n: {threshold, false_alarm, power}}.
    """
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for n in batch_sizes:
        threshold = torch.quantile(batch_means(calibration, n, trials, generator), false_alarm).item()
        results[n] = {
            "threshold": threshold,
            "false_alarm": (batch_means(natural, n, trials, generator) < threshold).double().mean().item(),
            "power": (batch_means(suspect, n, trials, generator) < threshold).double().mean().item(),
        }
    return results


def cluster_purity(assignments, labels):
    """Fraction of digits whose class is the majority class of their assigned latent state."""
    assignments, labels = assignments.cpu(), labels.cpu()
    majority = 0
    for state in assignments.unique():
        majority += torch.bincount(labels[assignments == state]).max().item()
    return majority / len(labels)
