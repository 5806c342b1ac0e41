"""Training objectives Pyro does not ship.

VIMCO (Mnih & Rezende 2016): the importance-weighted bound over K samples z_k ~ q(z | x),

    L = log (1/K) sum_k w_k,    w_k = p(x, z_k) / q(z_k | x),

trained with score-function gradients for discrete z. Each sample's learning signal is
L - L_{-k}, where L_{-k} is the bound with w_k replaced by the geometric mean of the other K - 1
weights: a baseline built from the other samples, so no baseline network is needed. The gradient is

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


class VIMCO:
    """The VIMCO objective as a Pyro-style loss: `loss` and `loss_and_grads(model, guide, *args)`,
    for a model and guide whose data plate is dim -1 (the K samples go in a plate at dim -2)."""

    def __init__(self, num_particles):
        if num_particles < 2:
            raise SettingError(f"`elbo='vimco'` needs `particles` of at least 2 (its baseline is the other samples), "
                             f"got {num_particles}")
        self.num_particles = num_particles

    def bound_terms(self, model, guide, *args):
        log_weights, log_q_scored = log_weight_terms(model, guide, *args, num_samples=self.num_particles)
        return iwae_bound(log_weights), log_weights, log_q_scored

    def loss(self, model, guide, *args):
        """-L summed over the batch."""
        with torch.no_grad():
            return -self.bound_terms(model, guide, *args)[0].sum().item()

    def loss_and_grads(self, model, guide, *args):
        bound, log_weights, log_q_scored = self.bound_terms(model, guide, *args)
        signal = (bound - leave_one_out_bounds(log_weights)).detach()
        surrogate = bound.sum() + (signal * log_q_scored).sum()
        (-surrogate).backward()
        return -bound.sum().item()
