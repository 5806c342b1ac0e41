"""Variational autoencoder, seed equations 11-12 and 23::

    z ~ N(0, I)                                   (z-dim latents)
    x_d | z ~ Bernoulli(logits = decoder(z)_d)    d = 1..784

Guides (all amortized and reparameterized):

- ``normal``: q(z | x) = N(mu(x), diag sigma(x)^2): one encoder, two heads, sigma = exp(last layer).
- ``iaf``: the same Normal pushed through inverse-autoregressive flows (Kingma et al. 2016).
- ``lowrank``: q(z | x) = N(mu(x), F(x) F(x)^T + diag d(x)): correlated latents, rank ``--rank``.

ELBOs (``--elbo``):

- ``trace``: Trace_ELBO, one reparameterized sample of log p(x, z) - log q(z | x).
- ``meanfield``: TraceMeanField_ELBO, the KL(q || p) term in closed form (seed problems 14, 19)
  where one exists (normal, lowrank), a sampled KL otherwise.
- ``iwae``: the importance-weighted bound of Burda et al. over ``--particles`` k samples
  (`ppl_models.objectives.IWAE`: RenyiELBO(alpha=0)'s objective, written as one pure function).

Encoder and decoder are MLPs with `--hidden` layers of `--activation` relu, tanh or gated units.

KL warm-up (`--kl-warmup E`): during the first E epochs the z site of model and guide is scaled by
a weight growing linearly from 0 to 1 (poutine.scale), so the objective is E_q[log p(x | z)] - beta
KL(q || p) (Bowman et al. 2016, Sonderby et al. 2016). Evaluation always uses beta = 1.
"""

import argparse
from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import AutoRegressiveNN
from torch import nn

from ..compiled import CompiledObjective
from ..config import SettingError, positive
from ..distributions import LinearBernoulli
from ..family import Family, Hyperparameter, pyro_elbo
from ..objectives import IWAE
from . import vae_report

LOG_SCALE_RANGE = (-12.0, 8.0)  # sigma = exp(.) within [6e-6, 3e3]: no overflow, no zero variance


class GatedLinear(nn.Module):
    """A gated hidden layer, h = (W x + b) * sigmoid(V x + c) (Dauphin et al. 2017): the layer of the
    VampPrior paper's VAEs (Tomczak & Welling 2018), whose published static-MNIST NLLs use it."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.value = nn.Linear(fan_in, fan_out)
        self.gate = nn.Linear(fan_in, fan_out)

    def forward(self, x):
        return self.value(x) * torch.sigmoid(self.gate(x))


ACTIVATIONS = ("relu", "tanh", "gated")


def layer_sizes(text):
    """'300,300' -> (300, 300): the hidden layer sizes as written on the command line."""
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers, e.g. 200,200") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: layer sizes must be positive, e.g. 200,200")
    return sizes


def hidden_layers(sizes, activation):
    """Fully connected layers of the given sizes, each followed by the nonlinearity (a gated layer
    is its own nonlinearity)."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        if activation == "gated":
            layers.append(GatedLinear(fan_in, fan_out))
        else:
            layers += [nn.Linear(fan_in, fan_out), {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x -> hidden layers -> heads. `heads` gives each head's output size."""

    def __init__(self, num_pixels, hidden, heads, activation):
        super().__init__()
        self.body = hidden_layers([num_pixels, *hidden], activation)
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], size) for size in heads)

    def forward(self, x):
        h = self.body(x)
        return [head(h) for head in self.heads]


def iaf_layer(z_dim, reverse):
    """One inverse-autoregressive flow layer over z in the natural order of its coordinates, or the
    reverse order (alternated between layers, as Kingma et al. 2016 do). Pyro would draw a random
    order from the global RNG when the layer is built, which no run seed controls."""
    order = torch.arange(z_dim)
    return AffineAutoregressive(AutoRegressiveNN(z_dim, [max(2 * z_dim, 40)], permutation=order.flip(0) if reverse
                                                 else order))


def kl_weighted(kl_weight):
    """Scale the z site by the KL weight (the log p(z) and log q(z | x) terms); beta = 1 if None."""
    return nullcontext() if kl_weight is None else poutine.scale(scale=kl_weight)


# The networks each guide trains (its pyro.module calls), counted in its parameters beside the decoder.
GUIDE_NETWORKS = {"normal": ("encoder",), "iaf": ("encoder", "flows"), "lowrank": ("lowrank_encoder",)}


class VAE(Family):
    """The VAE (``--model vae``): a decoder network and, per guide, an encoder; the module's
    docstring gives its equations, guides and ELBOs. No exact log-likelihood: it is estimated by
    importance sampling with the trained guide (iwae-k).

    Args:
        z_dim: latent dimensions (``--z-dim``; 2 gives the manifold plot).
        hidden: hidden layer sizes of encoder and decoder (``--hidden 300,300``).
        activation: ``"relu"``, ``"tanh"`` or ``"gated"``.
        flows: inverse-autoregressive flow layers of guide ``iaf``.
        rank: the covariance factor's rank for guide ``lowrank``.
        kl_warmup: epochs over which the KL term's weight grows from 0 to 1 (0: none).
        num_pixels: D.

    Raises:
        SettingError: sizes that are not positive, no hidden layer, an unknown activation, a
            negative ``kl_warmup``.
    """

    name = "vae"
    title = "variational autoencoder"
    guides = {
        "normal": "amortized diagonal Normal, sigma = exp(last layer); the default",
        "iaf": "the Normal followed by inverse-autoregressive flows",
        "lowrank": "Normal with a low-rank-plus-diagonal covariance",
    }
    default_guide = "normal"
    continuous_latents = True
    elbos = {
        "trace": "Trace_ELBO, one reparameterized sample; the default",
        "meanfield": "TraceMeanField_ELBO: KL(q||p) in closed form where one exists",
        "iwae": "the importance-weighted bound over `particles` samples (RenyiELBO(alpha=0)'s objective)",
    }
    importance_weighted_elbos = ("iwae",)
    hyperparameters = {
        "z_dim": Hyperparameter("latent dimensions (2, the seed's, gives the manifold plot)"),
        "hidden": Hyperparameter("hidden layer sizes of encoder and decoder, comma-separated", layer_sizes),
        "activation": Hyperparameter("nonlinearity of the hidden layers: relu, tanh (the IWAE paper's), gated: "
                                     "(W x) * sigmoid(V x), twice the weights (the VampPrior paper's)",
                                     str, ACTIVATIONS),
        "flows": Hyperparameter("inverse-autoregressive flow layers of `guide='iaf'`", guides=("iaf",)),
        "rank": Hyperparameter("rank of the covariance factor of `guide='lowrank'`", guides=("lowrank",)),
        "kl_warmup": Hyperparameter("KL warm-up: weight the KL term by a factor growing linearly from 0 to 1 over this "
                                    "many epochs, with `elbo='trace'` or meanfield; reported numbers always use the "
                                    "full ELBO; 0: none", float),
    }
    training_defaults = dict(optimizer="adam", lr=1e-3, batch_size=100, epochs=5)  # seed template's
    experiments = {"prior-vs-importance": vae_report.PRIOR_VS_IMPORTANCE}
    state_files = (vae_report.HISTORY_FILE,)

    def __init__(self, z_dim=2, hidden=(200, 200), activation="relu", flows=2, rank=2, kl_warmup=0, num_pixels=784):
        for value, setting in ((z_dim, "z_dim"), (flows, "flows"), (rank, "rank"), *((h, "hidden") for h in hidden)):
            if value < 1:
                raise SettingError(f"`{setting}` must be positive, got {value}")
        if not hidden:
            raise SettingError("`hidden` needs at least one layer size, e.g. (200, 200)")
        if activation not in ACTIVATIONS:
            raise SettingError(f"`activation` must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if not (kl_warmup == 0 or positive(kl_warmup)):
            raise SettingError(f"`kl_warmup` must be 0 (none) or a positive number of epochs, got {kl_warmup}")
        super().__init__(num_pixels)
        self.kl_warmup = kl_warmup
        self.z_dim, self.hidden, self.activation = z_dim, tuple(hidden), activation
        self.decoder = nn.Sequential(  # z -> pixel logits
            hidden_layers([z_dim, *self.hidden[::-1]], activation), nn.Linear(self.hidden[0], num_pixels)
        )
        self.encoder = Encoder(num_pixels, self.hidden, [z_dim, z_dim], activation)  # -> mu, log sigma
        self.flows = nn.ModuleList(iaf_layer(z_dim, reverse=i % 2 == 1) for i in range(flows))
        self.lowrank_encoder = Encoder(num_pixels, self.hidden, [z_dim, z_dim * rank, z_dim], activation)
        self.rank = rank

    @classmethod
    def memory_parts(cls, model_args, batch_size, particles):
        """Weights with their gradients and Adam's two moments (4 copies), and a batch's activations
        forward and backward, for every network the VAE builds."""
        z, hidden = model_args["z_dim"], list(model_args["hidden"])
        rank, flows = model_args["rank"], model_args["flows"]
        width = 2 if model_args["activation"] == "gated" else 1

        def mlp(sizes):
            return sum(width * (a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))

        flow_hidden = max(2 * z, 40)
        networks = (mlp([z, *hidden[::-1]]) + (hidden[0] + 1) * 784 + mlp([784, *hidden]) * 2
                    + (hidden[-1] + 1) * (2 * z + z * rank + 2 * z))
        return {"encoders and decoder (`hidden`, `z_dim`)": 16 * networks,
                "inverse-autoregressive flows (`z_dim`, `flows`)": 16 * flows * (z + 1) * flow_hidden * 3,
                "a batch's activations (`batch_size`, `particles`, `hidden`)":
                    16 * batch_size * particles * (2 * width * sum(hidden) + 784 + 4 * z)}

    # ---- model and guides -------------------------------------------------------------
    def model(self, x, kl_weight=None, observed=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            with kl_weighted(kl_weight):
                z = pyro.sample("z", prior)
            # Bernoulli(logits = decoder(z)) with the decoder's last layer, a linear one, left to the
            # distribution: it folds x into that layer, so scoring costs one pass over the logits
            features, to_logits = self.decoder
            pyro.sample("x", LinearBernoulli(features(z), to_logits.weight.T, to_logits.bias, observed), obs=x)

    def posterior_normal(self, x):
        """N(mu(x), diag sigma(x)^2), sigma from an exponential at the last layer (seed equation 23)."""
        loc, log_scale = self.encoder(x)
        return dist.Normal(loc, log_scale.clamp(*LOG_SCALE_RANGE).exp()).to_event(1)

    def guide_normal(self, x, kl_weight=None, observed=None):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]), kl_weighted(kl_weight):
            pyro.sample("z", self.posterior_normal(x))

    def guide_iaf(self, x, kl_weight=None, observed=None):
        pyro.module("encoder", self.encoder)
        pyro.module("flows", self.flows)
        with pyro.plate("data", x.shape[0]), kl_weighted(kl_weight):
            pyro.sample("z", dist.TransformedDistribution(self.posterior_normal(x), list(self.flows)))

    def guide_lowrank(self, x, kl_weight=None, observed=None):
        pyro.module("lowrank_encoder", self.lowrank_encoder)
        loc, factor, log_diag = self.lowrank_encoder(x)
        factor = factor.reshape(*factor.shape[:-1], self.z_dim, self.rank)
        with pyro.plate("data", x.shape[0]), kl_weighted(kl_weight):
            pyro.sample("z", dist.LowRankMultivariateNormal(loc, factor, log_diag.clamp(*LOG_SCALE_RANGE).exp()))

    def step_args(self, epochs_done, device):
        """The extra arguments of model and guide at this point of training: (KL weight,) under
        --kl-warmup, growing linearly to 1 over its epochs and 1 after (a tensor, so --jit traces
        it as an input); () without warm-up."""
        if not self.kl_warmup:
            return ()
        return (torch.tensor(min(1.0, epochs_done / self.kl_warmup), device=device),)

    def elbo(self, guide, elbo=None, jit=False, particles=1, compile=False):
        if elbo == "iwae":
            if self.kl_warmup:
                raise SettingError("`kl_warmup` weights the KL term of a one-sample ELBO, which `elbo='iwae'` does not "
                                   "have; use `elbo='trace'` or meanfield, or drop `kl_warmup`")
            if jit:
                raise SettingError("`jit=True` is not available with `elbo='iwae'` (its loss is not a Pyro ELBO); "
                                   "use `compile=True`, or drop `jit`")
            iwae = IWAE(particles)
            return CompiledObjective(iwae, iwae) if compile else iwae
        return pyro_elbo("TraceMeanField_ELBO" if elbo == "meanfield" else "Trace_ELBO", jit, particles,
                         compile=compile)

    def loss_name(self, guide, elbo=None):
        if self.kl_warmup:
            return f"-ELBO (KL warm-up: its weight rises to 1 over epochs 0-{self.kl_warmup:g})"
        return "-IWAE bound" if elbo == "iwae" else "-ELBO"

    # ---- what a generative model is for -----------------------------------------------
    def pixel_logits(self, z):
        """The decoder's logits of p(x_d = 1 | z) for z of any leading shape."""
        return self.decoder(z)

    @torch.no_grad()
    def decode(self, z):
        """The decoder's mean image p(x_d = 1 | z) for each z: (..., 784)."""
        return torch.sigmoid(self.decoder(z))

    def epoch_hook(self, out, cfg):
        return vae_report.sample_recorder(self, out, cfg)

    def report(self, run):
        return vae_report.report(self, run)

    def summary(self, guide=None):
        networks = ("decoder", *GUIDE_NETWORKS.get(guide, ()))
        size = sum(p.numel() for name in networks for p in getattr(self, name).parameters())
        layers = f"{'-'.join(map(str, self.hidden))} {self.activation}"
        return f"VAE, z-dim {self.z_dim}, MLP {layers} ({size:,} parameters in {', '.join(networks)})"
