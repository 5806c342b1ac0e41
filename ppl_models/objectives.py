"""Training objectives Pyro does not ship, each one pure function `loss_and_surrogate(model, guide,
*args)` -> (loss, surrogate loss): run eagerly by `loss_and_grads` (Pyro's ELBO interface), or
traced and compiled as it is (`compiled.CompiledObjective`). Both are importance-weighted bounds
over K samples z_k ~ q(z | x)::

    L = log (1/K) sum_k w_k,    w_k = p(x, z_k) / q(z_k | x).

IWAE (Burda et al. 2016), for reparameterized guides: the gradient of L itself, a family's
`elbo='iwae'`. Pyro's RenyiELBO(alpha=0) trains the same bound, but computes it with .item() and has
no JIT version, so it cannot be traced and compiled; written here as one pure function, it can.

VIMCO (Mnih & Rezende 2016), with score-function gradients for discrete z. Each sample's learning
signal is L - L_{-k}, where L_{-k} is the bound with w_k replaced by the geometric mean of the
other K - 1 weights: a baseline built from the other samples, so no baseline network is needed.
The gradient is::

    sum_k (L - L_{-k}) grad log q(z_k | x)  +  sum_k (w_k / sum_j w_j) grad log w_k.
"""

import math

import torch

from .config import SettingError
from .evaluate import iwae_bound, log_weight_terms


def leave_one_out_bounds(log_weights):
    """L_{-k} for each k: (K, N) from log weights (K, N), w_k replaced by the geometric mean of
    the others."""
    K = log_weights.shape[0]
    others_mean = (log_weights.sum(0, keepdim=True) - log_weights) / (K - 1)  # (K, N)
    replaced = log_weights.expand(K, *log_weights.shape).clone()  # [k] is a copy of all K weights
    index = torch.arange(K, device=log_weights.device)
    replaced[index, index] = others_mean
    return torch.logsumexp(replaced, 1) - math.log(K)


class ImportanceWeighted:
    """The K-sample bound L as a Pyro-style loss, for a model and guide whose data plate is dim -1
    (the K samples go in a plate at dim -2). A subclass says what to differentiate
    (`loss_and_surrogate`)."""

    def __init__(self, num_particles):
        self.num_particles = num_particles

    def bound_terms(self, model, guide, *args):
        """(L per digit, the log weights (K, N), the part of log q from non-reparameterized sites (K, N))."""
        log_weights, log_q_scored = log_weight_terms(model, guide, *args, num_samples=self.num_particles)
        return iwae_bound(log_weights), log_weights, log_q_scored

    def loss(self, model, guide, *args):
        """-L summed over the batch."""
        with torch.no_grad():
            return self.loss_and_surrogate(model, guide, *args)[0].item()

    def loss_and_grads(self, model, guide, *args):
        loss, surrogate = self.loss_and_surrogate(model, guide, *args)
        surrogate.backward()
        return loss.item()


class IWAE(ImportanceWeighted):
    """The importance-weighted bound, differentiated as it is (reparameterized z)."""

    def loss_and_surrogate(self, model, guide, *args):
        bound = self.bound_terms(model, guide, *args)[0].sum()
        return -bound.detach(), -bound


class VIMCO(ImportanceWeighted):
    """The VIMCO objective: the bound with leave-one-out score-function learning signals."""

    def __init__(self, num_particles):
        if num_particles < 2:
            raise SettingError(f"`elbo='vimco'` needs `particles` of at least 2 (its baseline is the other samples), "
                               f"got {num_particles}")
        super().__init__(num_particles)

    def loss_and_surrogate(self, model, guide, *args):
        bound, log_weights, log_q_scored = self.bound_terms(model, guide, *args)
        signal = (bound - leave_one_out_bounds(log_weights)).detach()
        surrogate = bound.sum() + (signal * log_q_scored).sum()
        return -bound.sum().detach(), -surrogate
