"""Distributions that let Pyro enumerate discrete latents at the cost of a matrix product.

When Pyro enumerates a discrete z in parallel, the generic path scores every (state, digit,
pixel) triple: an S x N x D tensor. For Bernoulli pixels with logits theta_s::

    log p(x | z = s) = x . theta_s - sum_d softplus(theta_sd)

so all S x N log-likelihoods cost one (N, D) x (D, S) product (`table_log_likelihood`).

- `IndexedBernoulli`: x | z ~ Bernoulli(logits = theta[z]) for a table theta: the mixture
  (theta = w + c).
- `IndependentBits`: the SBN prior, M independent bits, enumerable as one site over all 2^M codes.
- `LinearBernoulli`: x | z ~ Bernoulli(logits = z @ w + c): the SBN likelihood, scored over
  enumerated codes in chunks of states (`chunked_table_log_likelihood`), and the VAE's last layer,
  scored for many z per digit at one pass over the logits.
- `StraightThroughBernoulli`: hard Bernoulli samples with relaxed (Concrete) gradients.
"""

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints


def table_log_likelihood(x, logits_table, pixel_mask=None):
    """log p(x_n | z = s) for every digit n and every row s of the table: shape (..., N, S).

    ``pixel_mask`` (broadcastable to x, 1 = observed) drops unobserved pixels from the sum,
    which is how the models condition on part of an image.
    """
    logits_table = logits_table.to(x.dtype)
    log_normaliser = F.softplus(logits_table)  # -log(1 - sigm(theta)), per state and pixel
    if pixel_mask is None:
        return x @ logits_table.T - log_normaliser.sum(-1)
    mask = pixel_mask.to(x.dtype)
    return (x * mask) @ logits_table.T - mask @ log_normaliser.T


def bernoulli_log_likelihood(x, logits, pixel_mask=None):
    """log p(x | logits) summed over the pixels (the last dim), only where `pixel_mask` is 1."""
    terms = x * logits - F.softplus(logits)
    return (terms if pixel_mask is None else terms * pixel_mask.to(x.dtype)).sum(-1)


def linear_bernoulli_log_likelihood(x, z, w, c, pixel_mask=None):
    """log p(x | z) for x | z ~ Bernoulli(logits = z @ w + c), summed over the (observed) pixels,
    for z of any leading shape that broadcasts against x's digits, e.g. (samples, N, M).

    Since x . logits = z . (w x) + c . x, the data term costs one (N, D) x (D, M) product per
    batch of digits; only the log-normaliser sum_d softplus(logits_d) passes over the (..., N, D)
    logits. Scoring many samples per digit (iwae-k) is then one GEMM and one softplus per sample."""
    observed = x if pixel_mask is None else x * pixel_mask.to(x.dtype)
    data_term = (z * (observed @ w.T)).sum(-1) + observed @ c
    log_normaliser = F.softplus(z @ w + c)
    if pixel_mask is not None:
        log_normaliser = log_normaliser * pixel_mask.to(x.dtype)
    return data_term - log_normaliser.sum(-1)


class IndexedBernoulli(TorchDistribution):
    """``Bernoulli(logits=logits_table[index]).to_event(1)``, scored by a matrix product.

    :param logits_table: (S, D) pixel logits, one row per latent state.
    :param index: integer tensor of states; its shape is the batch shape.
    :param pixel_mask: optional (D,) or (..., D) mask of observed pixels (1 = observed).
    """

    arg_constraints = {"logits_table": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = False

    def __init__(self, logits_table, index, pixel_mask=None, validate_args=None, enumerated=None):
        if logits_table.dim() != 2:
            raise ValueError(f"logits_table must be (states, pixels), got shape {tuple(logits_table.shape)}")
        self.logits_table = logits_table
        self.index = index
        self.pixel_mask = pixel_mask
        # Pyro marks the values it enumerates in parallel: a reshaped arange(S) of shape (S, 1, ..., 1).
        # Scoring those needs no indexing at all, only the table with its state axis moved.
        if enumerated is None:
            enumerated = getattr(index, "_pyro_categorical_support", None) is not None
        self.enumerated = enumerated
        super().__init__(index.shape, logits_table.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        # Expand the index only: a view, so the table is never broadcast to the batch. The table was
        # validated when this distribution was made.
        return IndexedBernoulli(
            self.logits_table, self.index.expand(batch_shape), self.pixel_mask, validate_args=False,
            enumerated=self.enumerated,
        )

    @property
    def logits(self):
        return self.logits_table[self.index]

    @property
    def mean(self):
        return torch.sigmoid(self.logits)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            probs = self.mean.expand(self.shape(sample_shape))
            return torch.bernoulli(probs)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        num_states = self.logits_table.shape[0]
        digit_shape = value.shape[:-1]
        index = self.index.expand(torch.broadcast_shapes(self.batch_shape, digit_shape))
        num_digits = math.prod(digit_shape)
        if self.enumerated and index.dim() > len(digit_shape):
            table = table_log_likelihood(value, self.logits_table, self.pixel_mask)  # (..., N, S)
            padding = (1,) * (index.dim() - 1 - len(digit_shape))
            return table.movedim(-1, 0).reshape((num_states,) + padding + digit_shape).expand(index.shape)
        if math.prod(index.shape) < num_states * num_digits:
            # Few (state, digit) pairs, e.g. z sampled by a guide: score only the chosen rows.
            return bernoulli_log_likelihood(value, self.logits_table[index], self.pixel_mask)
        # Enumerated z: every (digit, state) pair is needed, so compute them all with one product,
        # then pick entries by advanced indexing (its backward scatters into (N, S), never (S, N, S)).
        table = table_log_likelihood(value, self.logits_table, self.pixel_mask).reshape(num_digits, num_states)
        digit = torch.arange(num_digits, device=value.device).reshape(value.shape[:-1])
        return table[digit, index]


STATE_CHUNK = 4096  # latent states scored at once: 4096 x 784 logits, 13 MB


def chunked_table_log_likelihood(x, states, w, c, pixel_mask=None):
    """log p(x_n | z = states_s) for x | z ~ Bernoulli(logits = z @ w + c): shape (N, S), computed
    STATE_CHUNK states at a time. Under autograd each chunk is checkpointed (recomputed in the
    backward pass), so memory holds one chunk's logits, never the whole (S, D) table."""
    def chunk_table(chunk):
        return table_log_likelihood(x, chunk @ w + c, pixel_mask)

    parts = []
    for chunk in states.split(STATE_CHUNK):
        if torch.is_grad_enabled() and len(states) > STATE_CHUNK:
            parts.append(torch.utils.checkpoint.checkpoint(chunk_table, chunk, use_reentrant=False))
        else:
            parts.append(chunk_table(chunk))
    return torch.cat(parts, -1)


def all_codes(num_bits, device=None, states=None):
    """Every z in {0, 1}^M as the rows of a (2^M, M) tensor; or the codes of the integers in `states`
    (a range), in order."""
    states = range(2**num_bits) if states is None else states
    integers = torch.arange(states.start, states.stop, device=device)
    return ((integers[:, None] >> torch.arange(num_bits - 1, -1, -1, device=device)) & 1).float()


class IndependentBits(TorchDistribution):
    """z in {0, 1}^M with z_m ~ Bernoulli(sigm(logits_m)) independently, enumerable as a whole:
    its support is all 2^M codes, so Pyro can enumerate the joint z in one tensor dimension
    instead of M (which would broadcast an N x 2 x ... x 2 x D tensor)."""

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)
    has_enumerate_support = True

    def __init__(self, logits, batch_shape=None, validate_args=None):
        self.logits = logits
        super().__init__(torch.Size(batch_shape or logits.shape[:-1]), logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        # The logits keep their shape: broadcast against the 2^M codes they would make a
        # (2^M, N, M) tensor where (2^M, 1, M) is all there is.
        return IndependentBits(self.logits, batch_shape, validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.logits).expand(self.shape(sample_shape)))

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        log_prob = (value * F.logsigmoid(self.logits) + (1 - value) * F.logsigmoid(-self.logits)).sum(-1)
        return log_prob.expand(torch.broadcast_shapes(self.batch_shape, value.shape[:-1]))

    def enumerate_support(self, expand=True):
        codes = all_codes(self.event_shape[0], self.logits.device)
        codes = codes.reshape((len(codes),) + (1,) * len(self.batch_shape) + self.event_shape)
        return codes.expand((len(codes),) + self.batch_shape + self.event_shape) if expand else codes


class LinearBernoulli(TorchDistribution):
    """x | z ~ Bernoulli(logits = z @ w + c).to_event(1): the sigmoid belief net's likelihood, and
    the VAE's, with z the decoder's last hidden features and (w, c) its last layer.

    When z is the same for every digit of the batch (Pyro enumerating z: shape (S, 1, M)), all
    S x N log-likelihoods come from `chunked_table_log_likelihood`; a z drawn per digit is scored
    directly. ``pixel_mask`` (broadcastable to x, 1 = observed) drops unobserved pixels from the sum.
    """

    arg_constraints = {"w": constraints.real, "c": constraints.real}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, z, w, c, pixel_mask=None, batch_shape=None, validate_args=None):
        self.z, self.w, self.c, self.pixel_mask = z, w, c, pixel_mask
        super().__init__(torch.Size(batch_shape or z.shape[:-1]), c.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        # z keeps its own shape: expanding it along the data dim would hide that it is shared.
        return LinearBernoulli(self.z, self.w, self.c, self.pixel_mask, batch_shape, validate_args=False)

    @property
    def mean(self):
        return torch.sigmoid(self.z @ self.w + self.c).expand(self.batch_shape + self.event_shape)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return torch.bernoulli(self.mean.expand(self.shape(sample_shape)))

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        shape = torch.broadcast_shapes(self.batch_shape, value.shape[:-1])
        if value.dim() == 2 and self.z.dim() >= 3 and self.z.shape[-2] == 1 and value.shape[0] > 1:
            states = self.z.reshape(-1, self.z.shape[-1])  # the same states for every digit
            table = chunked_table_log_likelihood(value, states, self.w, self.c, self.pixel_mask)  # (N, S)
            return table.T.reshape(self.z.shape[:-2] + value.shape[:1]).expand(shape)
        return linear_bernoulli_log_likelihood(value, self.z, self.w, self.c, self.pixel_mask).expand(shape)


class StraightThroughBernoulli(dist.RelaxedBernoulliStraightThrough):
    """Hard Bernoulli samples whose gradient flows through a Concrete relaxation (the
    straight-through estimator, Jang et al. 2017), scored as the discrete Bernoulli they are:
    the relaxed density is infinite where a float32 sample saturates at exactly 0 or 1."""

    def log_prob(self, value):
        return dist.Bernoulli(logits=self.logits).log_prob(value)
