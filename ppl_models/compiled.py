"""Pyro programs run as compiled graphs: traced once, then fused by torch.compile.

Why not `torch.compile(elbo.loss_and_grads)`: Dynamo cannot trace Pyro's effect handlers (a message
is a TypedDict with optional keys, `pyro.param` recompiles for every name, `sys._getframe`): the
VAE's ELBO alone breaks into six graphs and hits the recompile limit, slower than eager.

What this module does instead is what `torch.jit.trace` does for Pyro's JIT ELBOs, with the tools
that replace it:

1. trace: run the function once under `make_fx` on real tensors. Every Python-level step of Pyro
   (messengers, traces, plates, the enumeration's contraction plan) runs once and leaves only its
   tensor operations: an FX graph whose inputs are the param store's params (tracked by identity,
   as torch.jit.trace tracks them) and the function's tensor arguments. Pyro is put on the code
   paths it takes for tracers (`pyro_tracing`), which never branch on a tensor's value. For a
   training step the graph holds the gradient too (`torch.autograd.grad` traced): no autograd
   engine at run time.
2. compile: `torch.compile` the graph (inductor: fused C++/Triton kernels), its random operations
   left to PyTorch's generators (`fallback_random`), so a compiled run draws the numbers an eager
   run draws, and a checkpoint's RNG state means the same in both.

Guards. A graph is specialised to the shapes, dtypes and devices of its tensor arguments and to the
values of the others: a new signature is traced again, up to MAX_SIGNATURES, then the function
runs eagerly with a warning. A program whose control flow reads a tensor's value (`if x.sum() > 0`)
cannot be traced (make_fx refuses to read a value where torch.jit.trace would silently bake it in):
it runs eagerly, with a warning that says where. Tracing draws from a forked RNG stream, so it
consumes none of the numbers the run draws.
"""

import logging
import time
import warnings
import weakref
from contextlib import contextmanager
from functools import partial

import pyro
import pyro.ops.jit
import torch
from pyro.infer import JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO
from torch.fx.experimental.proxy_tensor import make_fx

MAX_SIGNATURES = 8  # graphs traced for one function before it runs eagerly (each costs seconds to compile)

# Inductor's settings: PyTorch's own random kernels (the same numbers as eager; inductor's would
# differ), and no CUDA graphs (a graph's outputs are overwritten by its next replay, and the
# training step keeps its gradients until the optimizer's step).
INDUCTOR_OPTIONS = {"fallback_random": True}


@contextmanager
def pyro_tracing():
    """Pyro on the code paths it takes under a tracer. Where a branch would read a tensor's value (a
    mask's `.all()`, a padding of zero), Pyro asks `torch._C._get_tracing_state()` and, under
    torch.jit.trace, takes the branch that is right for every value. make_fx sets no such state:
    this says yes while a function is traced."""
    real = torch._C._get_tracing_state
    torch._C._get_tracing_state = lambda: True
    try:
        yield
    finally:
        torch._C._get_tracing_state = real


@contextmanager
def flushing_denormals():
    """Floats below 1.2e-38 read as zero (flush-to-zero, as XLA does on CPU), then not again. A
    mixture's posterior responsibilities reach such values, and on x86 one product with them costs
    ten times as much (bench/mixture_speed.py measures it)."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


@contextmanager
def quiet_compiler():
    """While torch compiles: no warnings of torch's own (notes on its internals, such as the optimizer's
    profiling hook that a compiled step leaves out), which say nothing a user could act on."""
    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="torch")
            yield
    finally:
        logger.setLevel(level)


def signature(args):
    """What a traced graph is specialised to: the shape, dtype and device of each tensor argument,
    the value of each other one."""
    return tuple((tuple(a.shape), a.dtype, a.device) if torch.is_tensor(a) else a for a in args)


KEPT = weakref.WeakKeyDictionary()  # owner -> {key: compiled function}


def kept(owner, key, build):
    """The compiled function `build()` makes, made once for `owner` (a family) and `key`, and kept for
    as long as the owner lives: later calls reuse its graphs."""
    functions = KEPT.setdefault(owner, {})
    if key not in functions:
        functions[key] = build()
    return functions[key]


def compiled_seconds(owner):
    """Seconds spent compiling the functions kept for `owner`."""
    return sum(function.seconds for function in KEPT.get(owner, {}).values())


class CannotTrace(RuntimeError):
    """The function's control flow reads a tensor's value, or its signature changes too often."""


class Compiled:
    """`fn(*args)` as compiled graphs, one per `signature(args)`. `fn` returns a tensor or a tuple
    of tensors; a graph's inputs are the param store's params (the tensors fn reads besides its
    arguments, tracked by identity; those in the store when the graph is traced) and the tensor
    arguments. Calls run under no_grad: a graph that needs gradients computes them itself
    (`gradients=True` traces with autograd on, for fn to call torch.autograd.grad: `ValueAndGrads`).
    `seconds`: spent tracing and compiling (each graph's first call, which runs it once too).
    `eager`: fn as it runs uncompiled, which takes over with a warning where fn cannot be traced
    (else CannotTrace is raised)."""

    def __init__(self, fn, what, gradients=False, eager=None):
        self.fn, self.what, self.gradients, self.eager = fn, what, gradients, eager
        self.graphs = {}  # signature -> (compiled graph, the names of the params it takes)
        self.seconds = 0.0
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except CannotTrace as reason:
            if self.eager is None:
                raise
            warnings.warn(f"{reason}: it runs eagerly from here on", stacklevel=2)
            self.failed = True
            return self.eager(*args)

    def compiled(self, *args):
        key = signature(args)
        tensors = [a for a in args if torch.is_tensor(a)]
        if key in self.graphs:
            graph, names = self.graphs[key]
            with torch.no_grad():
                return graph(*params_named(names), *tensors)
        if len(self.graphs) == MAX_SIGNATURES:
            raise CannotTrace(f"{self.what} was traced for {MAX_SIGNATURES} different argument shapes or values")
        started = time.perf_counter()
        names = list(store_params())
        graph = torch.compile(self.trace(args, params_named(names), tensors), dynamic=False, options=INDUCTOR_OPTIONS)
        with torch.no_grad(), quiet_compiler():
            out = graph(*params_named(names), *tensors)
        self.graphs[key] = graph, names
        self.seconds += time.perf_counter() - started
        return out

    def trace(self, args, params, tensors):
        """The FX graph of fn at these arguments, from one run on a forked RNG stream."""
        positions = [i for i, a in enumerate(args) if torch.is_tensor(a)]

        def graph(*inputs):
            given = list(args)
            for i, tensor in zip(positions, inputs[len(params):]):
                given[i] = tensor
            return self.fn(*given)

        devices = sorted({t.device for t in (*params, *tensors) if t.device.type == "cuda"}, key=str)
        try:
            with torch.random.fork_rng(devices=devices), pyro_tracing(), pyro.validation_enabled(False), \
                    torch.set_grad_enabled(self.gradients), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return make_fx(graph, tracing_mode="real")(*params, *tensors)
        except RuntimeError as error:
            if "value out of a tracing tensor" not in str(error) and "data-dependent" not in str(error):
                raise
            raise CannotTrace(f"{self.what} branches on the value of a tensor ({where_traced_code_read(error)}), "
                              "which a traced graph cannot record") from None


def where_traced_code_read(error):
    """The innermost frame outside torch in a tracing error's traceback: the line that read a value."""
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        path = frame.f_code.co_filename
        if "/torch/" not in path and "compiled.py" not in path:
            return f"{path}:{frame.f_lineno}"
    return "in torch"


def store_params():
    """{name: unconstrained tensor} of Pyro's param store: the tensors a traced program reads."""
    return dict(pyro.get_param_store().named_parameters())


def params_named(names):
    """The param store's tensors of these names, in this order: a graph's tracked inputs."""
    params = store_params()
    return [params[name] for name in names]


class ValueAndGrads:
    """(loss, gradients of the surrogate loss with respect to the param store's params): the training
    step's graph. When traced it records `names` (the params) and `used` (whether each reaches the
    surrogate): the graph returns the gradients of those that do, and the others keep none, as after
    backward()."""

    def __init__(self, loss_and_surrogate):
        self.loss_and_surrogate = loss_and_surrogate
        self.names, self.used = [], []

    def __call__(self, *args):
        loss, surrogate = self.loss_and_surrogate(*args)
        self.names = list(store_params())
        grads = torch.autograd.grad(surrogate, params_named(self.names), allow_unused=True)
        self.used = [grad is not None for grad in grads]
        return loss.detach(), *(grad for grad in grads if grad is not None)


# What the function each of Pyro's JIT ELBOs hands its tracer returns, as (loss, surrogate loss).
JIT_OUTPUTS = {
    JitTrace_ELBO: lambda out: out,
    JitTraceMeanField_ELBO: lambda loss: (loss, loss),
    JitTraceGraph_ELBO: lambda out: (-out[0], out[1]),  # (ELBO, surrogate loss)
    JitTraceEnum_ELBO: lambda loss: (loss, loss),
}


class Taken(Exception):
    """Raised to stop a JIT ELBO once it has handed over the function it would trace."""


def jit_elbo_function(elbo, model, guide, args):
    """The trace-friendly function of (*args) -> (loss, surrogate loss) that Pyro's JIT ELBO `elbo`
    builds for `pyro.ops.jit.trace` (its ELBO written without reading any value: the code --jit runs),
    taken from it on its first call, before anything runs."""
    taken = []

    def take(fn=None, **options):
        def keep(fn):
            def stop(*args, **kwargs):
                taken.append(partial(fn, **kwargs))  # kwargs: the ids of model and guide, which fn pops
                raise Taken

            return stop

        return keep(fn) if fn is not None else keep

    real, pyro.ops.jit.trace = pyro.ops.jit.trace, take
    try:
        elbo.loss_and_grads(model, guide, *args)
    except Taken:
        pass
    finally:
        pyro.ops.jit.trace = real
    output = JIT_OUTPUTS[type(elbo)]
    return lambda *args: output(taken[0](*args))


class CompiledObjective:
    """A training objective whose `loss_and_grads` runs as one compiled graph (loss and gradients),
    with the interface of a Pyro ELBO (`loss`, `loss_and_grads(model, guide, *args)`).

    `eager`: the objective as it runs without compiling (its `loss` creates the params; it takes
    over, with a warning, where the program cannot be traced). `traceable`: one of Pyro's JIT ELBOs
    with the same settings, or an objective with a pure `loss_and_surrogate(model, guide, *args)`."""

    def __init__(self, eager, traceable):
        self.eager, self.traceable = eager, traceable
        self.compiled = {}  # (model, guide) -> Compiled
        self.fallback = False

    @property
    def seconds(self):
        """Seconds spent tracing and compiling."""
        return sum(compiled.seconds for compiled in self.compiled.values())

    def loss(self, model, guide, *args):
        return self.eager.loss(model, guide, *args)

    def loss_and_grads(self, model, guide, *args):
        if self.fallback:
            return self.eager.loss_and_grads(model, guide, *args)
        compiled = self.compiled.get((model, guide)) or self.compile(model, guide, args)
        try:
            loss, *grads = compiled(*args)
        except CannotTrace as reason:
            warnings.warn(f"{reason}: it runs eagerly from here on", stacklevel=2)
            self.fallback = True
            return self.eager.loss_and_grads(model, guide, *args)
        step = compiled.fn
        params = store_params()
        for name, grad in zip((name for name, used in zip(step.names, step.used) if used), grads):
            param = params[name]
            param.grad = grad if param.grad is None else param.grad + grad  # as backward() accumulates
        return loss.item()

    def compile(self, model, guide, args):
        if hasattr(self.traceable, "loss_and_surrogate"):
            function = partial(self.traceable.loss_and_surrogate, model, guide)
        else:
            function = jit_elbo_function(self.traceable, model, guide, args)
        compiled = Compiled(ValueAndGrads(function), "the training step", gradients=True)
        self.compiled[(model, guide)] = compiled
        return compiled


class CompiledOptimizer:
    """`optimizer_class(params, lr=lr)` with a fast update of every param at once: PyTorch's fused
    implementation where the class has one for the params' device (Adam, AdamW, SGD and Adagrad; on
    the CPU since torch 2.4), else its `step` compiled by torch.compile (RMSprop: one fused kernel,
    as PyTorch documents for its optimizers). Measured on the VAE's step (z-dim 40, MLP 300-300): the
    update 1.23 ms one param at a time, 0.60 compiled, 0.36 fused. `seconds`: spent compiling (the
    first step in this process, which steps once too)."""

    def __init__(self, optimizer_class, params, lr):
        try:
            self.optimizer, self.update = optimizer_class(params, lr=lr, fused=True), None
        except (TypeError, RuntimeError):  # no fused version, or none on this device or torch
            self.optimizer = optimizer_class(params, lr=lr)
            self.update = torch.compile(self.optimizer.step, options=INDUCTOR_OPTIONS)
        self.seconds = 0.0

    def step(self):
        if self.update is None:
            return self.optimizer.step()
        if self.seconds:
            return self.update()
        started = time.perf_counter()
        with quiet_compiler():
            self.update()
        self.seconds = time.perf_counter() - started
