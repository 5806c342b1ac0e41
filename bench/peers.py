"""The peers a Pyro user would pick instead, on the same models and batches: NumPyro's SVI under
jax.jit, and a hand-written JAX loop (jax.value_and_grad + optax, the whole step under jax.jit).

    pip install -e '.[bench]'      # jax (CPU), numpyro, funsor (NumPyro's enumeration), optax

Without them every row here is skipped with one line (`missing()`). The networks have the sizes and
nonlinearities of ppl_models' (stax layers, NumPyro's own examples' choice; jax's default
initialisation), the losses are the plain-PyTorch references' of bench/{vae,mixture,sbn}_speed.py,
and the optimizers are optax's versions of the same (Adam 1e-3, RMSprop 0.01). Each step blocks
until its loss is computed, as a Pyro step does when it reads its loss.
"""

import importlib.util
import math
import time

PACKAGES = ("jax", "numpyro", "funsor", "optax")


def missing(device="cpu"):
    """None, or one line saying why the peers' rows are skipped: packages of the `bench` extra are
    absent, or the device is not the CPU (the extra installs jax's CPU build)."""
    absent = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if absent:
        return f"skipped: {', '.join(absent)} not installed (pip install -e '.[bench]')"
    if str(device) != "cpu":
        return f"skipped on {device}: the bench extra installs jax for the CPU"
    return None


class Batches:
    """Each torch batch as a JAX array, converted once: a step is given the torch batch and looks up its
    copy, so conversion is not timed."""

    def __init__(self, batches):
        import jax.numpy as jnp

        self.arrays = {id(batch): jnp.asarray(batch.cpu().numpy()) for batch in batches}

    def __getitem__(self, batch):
        return self.arrays[id(batch)]


def mlp(sizes, final=True):
    """stax Dense layers of these sizes with ReLU between (and after the last, unless `final`)."""
    from jax.example_libraries import stax

    layers = []
    for size in sizes:
        layers += [stax.Dense(size), stax.Relu]
    return stax.serial(*(layers[:-1] if final else layers))


def vae_networks(z_dim, hidden):
    """(encoder: x -> (loc, log scale), decoder: z -> logits) as stax (init, apply) pairs."""
    from jax.example_libraries import stax

    encoder = stax.serial(mlp(hidden, final=False), stax.FanOut(2), stax.parallel(stax.Dense(z_dim), stax.Dense(z_dim)))
    decoder = mlp([*hidden[::-1], 784])
    return encoder, decoder


def blocking(update, state, batches):
    """step(torch batch): one jitted `update(state, x) -> (state, loss)`, waited for."""
    def step(batch):
        nonlocal state
        state, loss = update(state, batches[batch])
        return float(loss)

    return step


def vae_numpyro(z_dim, hidden, batches):
    """NumPyro's SVI with Trace_ELBO: the VAE as NumPyro's examples/vae.py writes it."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI, Trace_ELBO

    encoder, decoder = vae_networks(z_dim, hidden)

    def model(x):
        decode = numpyro.module("decoder", decoder, (x.shape[0], z_dim))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([z_dim]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=x)

    def guide(x):
        encode = numpyro.module("encoder", encoder, x.shape)
        loc, log_scale = encode(x)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("z", dist.Normal(loc, jnp.exp(jnp.clip(log_scale, -12, 8))).to_event(1))

    arrays = Batches(batches)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    return blocking(jax.jit(svi.update), svi.init(jax.random.PRNGKey(0), arrays[batches[0]]), arrays)


def vae_jax(z_dim, hidden, batches):
    """The VAE's one-sample ELBO as plain JAX, the whole step (loss, gradients, Adam) under jax.jit."""
    import jax
    import jax.numpy as jnp
    import optax

    (init_encoder, encode), (init_decoder, decode) = vae_networks(z_dim, hidden)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"encoder": init_encoder(keys[0], (-1, 784))[1], "decoder": init_decoder(keys[1], (-1, z_dim))[1]}
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def loss(params, x, key):
        loc, log_scale = encode(params["encoder"], x)
        log_scale = jnp.clip(log_scale, -12, 8)
        eps = jax.random.normal(key, loc.shape)
        z = loc + jnp.exp(log_scale) * eps
        log_q = jnp.sum(-0.5 * eps**2 - log_scale - half_log_2pi, -1)
        log_prior = jnp.sum(-0.5 * z**2 - half_log_2pi, -1)
        logits = decode(params["decoder"], z)
        return -jnp.sum(jnp.sum(x * logits - jax.nn.softplus(logits), -1) + log_prior - log_q)

    return jax_loop(loss, params, optax.adam(1e-3), keys[2], Batches(batches))


def jax_loop(loss, params, optimizer, key, arrays):
    """step(torch batch) for a loss(params, x, key): value_and_grad and the optimizer's update, jitted."""
    import jax
    import optax

    @jax.jit
    def update(state, x):
        params, opt_state, key = state
        key, draw = jax.random.split(key)
        value, grads = jax.value_and_grad(loss)(params, x, draw)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), value

    return blocking(update, (params, optimizer.init(params), key), arrays)


def mixture_params(K):
    import jax
    import jax.numpy as jnp

    return {"b": jnp.zeros(K), "w": 0.01 * jax.random.normal(jax.random.PRNGKey(0), (K, 784)), "c": jnp.zeros(784)}


def mixture_numpyro(K, batches):
    """NumPyro's SVI with TraceEnum_ELBO (funsor): z enumerated, Bernoulli(logits=theta[z]) as NumPyro
    writes a mixture (its enumeration scores every digit, component and pixel: N x K x D)."""
    import jax
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.contrib.funsor import config_enumerate
    from numpyro.infer import SVI, TraceEnum_ELBO

    init = mixture_params(K)

    @config_enumerate
    def model(x):
        b, w, c = (numpyro.param(name, init[name]) for name in "bwc")
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(logits=b))
            numpyro.sample("x", dist.Bernoulli(logits=(w + c)[z]).to_event(1), obs=x)

    def guide(x):
        pass

    arrays = Batches(batches)
    svi = SVI(model, guide, optax.rmsprop(0.01, decay=0.99, eps=1e-8), TraceEnum_ELBO(max_plate_nesting=1))
    return blocking(jax.jit(svi.update), svi.init(jax.random.PRNGKey(0), arrays[batches[0]]), arrays)


def mixture_jax(K, batches):
    """The mixture's exact log-likelihood as plain JAX: logsumexp(log softmax(b) + x theta^T - sum softplus(theta))."""
    import jax
    import optax

    def loss(params, x, key):
        theta = params["w"] + params["c"]
        log_joint = jax.nn.log_softmax(params["b"]) + x @ theta.T - jax.nn.softplus(theta).sum(-1)
        return -jax.scipy.special.logsumexp(log_joint, -1).sum()

    return jax_loop(loss, mixture_params(K), optax.rmsprop(0.01, decay=0.99, eps=1e-8), jax.random.PRNGKey(1),
                    Batches(batches))


def sbn_jax(M, batches):
    """The SBN's score-function ELBO with a neural baseline as plain JAX: the surrogate loss of
    bench/sbn_speed.py's plain-PyTorch step."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.nn import log_sigmoid, softplus

    (init_encoder, encode), (init_baseline, baseline) = mlp([200, M]), mlp([200, 1])
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"encoder": init_encoder(keys[0], (-1, 784))[1], "baseline": init_baseline(keys[1], (-1, 784))[1],
              "b": jnp.zeros(M), "w": 0.01 * jax.random.normal(keys[2], (M, 784)), "c": jnp.zeros(784)}

    def loss(params, x, key):
        logits = encode(params["encoder"], x)
        z = jax.lax.stop_gradient(jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(x.dtype))
        log_q = jnp.sum(z * log_sigmoid(logits) + (1 - z) * log_sigmoid(-logits), -1)
        theta = z @ params["w"] + params["c"]
        b = params["b"]
        log_p = jnp.sum(z * log_sigmoid(b) + (1 - z) * log_sigmoid(-b), -1) + jnp.sum(x * theta - softplus(theta), -1)
        signal = jax.lax.stop_gradient(log_p - log_q)
        predicted = baseline(params["baseline"], x)[:, 0]
        surrogate = log_p + log_q * (signal - jax.lax.stop_gradient(predicted))
        return -surrogate.sum() + ((signal - predicted) ** 2).sum()

    return jax_loop(loss, params, optax.adam(1e-3), keys[3], Batches(batches))


def gemm_gflops(sizes=((100, 784, 300), (5000, 300, 784), (2048, 2048, 2048)), repeats=5):
    """{(m, k, n): {backend: GFLOP/s}} of one float32 (m, k) x (k, n) product: torch eager, and JAX
    under jax.jit where it is installed, the best of `repeats` timings of enough products for 0.2 s."""
    import torch

    backends = {"torch": lambda a, b: torch.mm(a, b)}
    convert = {"torch": lambda array: torch.from_numpy(array)}
    if missing() is None:
        import jax
        import jax.numpy as jnp

        product = jax.jit(jnp.dot)
        backends["jax"] = lambda a, b: product(a, b).block_until_ready()
        convert["jax"] = jnp.asarray
    import numpy as np

    results = {}
    for m, k, n in sizes:
        a, b = np.random.rand(m, k).astype(np.float32), np.random.rand(k, n).astype(np.float32)
        results[(m, k, n)] = {}
        for name, multiply in backends.items():
            x, y = convert[name](a), convert[name](b)
            multiply(x, y)
            count = max(1, int(0.2 / max(1e-6, timed(lambda: multiply(x, y)))))
            best = min(timed(lambda: [multiply(x, y) for _ in range(count)]) for _ in range(repeats)) / count
            results[(m, k, n)][name] = 2 * m * k * n / best / 1e9
    return results


def timed(run):
    started = time.perf_counter()
    run()
    return time.perf_counter() - started
