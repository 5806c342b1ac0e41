"""Pyro programs run as compiled graphs: traced once, then fused by torch.compile.

Why not `torch.compile(elbo.loss_and_grads)`: Dynamo cannot trace Pyro's effect handlers (a message
is a TypedDict with optional keys, `pyro.param` recompiles for every name, ``sys._getframe``): a
``Trace_ELBO`` of one encoder and one decoder breaks into six graphs and hits the recompile limit,
slower than eager.

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
values of the others: a new signature is traced again, up to MAX_SIGNATURES; past them a new one
runs eagerly, with a warning. A program whose control flow reads a tensor's value (`if x.sum() > 0`)
cannot be traced (make_fx refuses to read a value where torch.jit.trace would silently bake it in),
nor one that torch.compile cannot build (no C++ compiler, an unsupported Python): either runs
eagerly from then on, with a warning that says why. Tracing draws from a forked RNG stream, so it
consumes none of the numbers the run draws. Tracing changes process-wide state for its duration
(`pyro_tracing`, `jit_elbo_function`): one thread traces at a time, and no other thread should run
Pyro or torch.jit meanwhile (they would see that state too).
"""

import logging
import threading
import time
import warnings
from contextlib import contextmanager

import pyro
import pyro.ops.jit
import torch
from pyro.infer import JitTrace_ELBO, JitTraceEnum_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO
from torch.fx.experimental.proxy_tensor import make_fx

MAX_SIGNATURES = 8  # graphs traced for one function; a new signature past them runs eagerly (compiling costs seconds)

# Inductor's settings: PyTorch's own random kernels (the same numbers as eager; inductor's would
# differ). No CUDA graphs (torch.compile's mode="reduce-overhead"): a replay overwrites the outputs
# of the one before, and a training step's gradients are outputs read after the graph has run.
INDUCTOR_OPTIONS = {"fallback_random": True}
# On its tracer path, Pyro's enumeration keeps the terms of nonzero probability (masked_select), whose
# number depends on the data: Dynamo captures that into the graph, instead of splitting the graph
# there, with this (bench/compile_steps.py times an enumerated step both ways).
CAPTURE_DATA_DEPENDENT_SHAPES = True

TRACING = threading.RLock()  # the state `pyro_tracing` and `jit_elbo_function` change is the process's


@contextmanager
def pyro_tracing():
    """Pyro on the code paths it takes under a tracer. Where a branch would read a tensor's value (a
    mask's `.all()`, a padding of zero), Pyro asks `torch._C._get_tracing_state()` and, under
    torch.jit.trace, takes the branch that is right for every value. make_fx sets no such state:
    this says yes while a function is traced (torch itself only reads it as a truth value there)."""
    with TRACING:
        before, torch._C._get_tracing_state = torch._C._get_tracing_state, lambda: True
        try:
            yield
        finally:
            torch._C._get_tracing_state = before


FLUSHING = threading.local()  # .open: how many `flushing_denormals` this thread has open


@contextmanager
def flushing_denormals():
    """Floats below 1.2e-38 read as zero (flush-to-zero, as XLA does on CPU) in this thread until the
    outermost of these ends. Enumerated posterior responsibilities reach such values, and x86
    computes with them many times slower: bench/mixture_speed.py times a step with them and without.
    The setting is the calling thread's (the CPU's own): PyTorch's intra-op worker threads keep
    theirs, so with several threads the share of the work they take still sees denormals."""
    opened = getattr(FLUSHING, "open", 0)
    if not opened and not torch.set_flush_denormal(True):  # (False: the CPU cannot)
        yield
        return
    FLUSHING.open = opened + 1
    try:
        yield
    finally:
        FLUSHING.open -= 1
        if not FLUSHING.open:
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


def kept(family, key, build):
    """The compiled function `build()` makes, made once for `family` and `key` and kept in the
    family's `compiled_functions`, so later calls reuse its graphs and it goes with the family."""
    functions = family.compiled_functions
    if key not in functions:
        functions[key] = build()
    return functions[key]


def compiled_seconds(family):
    """Seconds spent compiling the functions kept for `family`."""
    return sum(function.seconds for function in family.compiled_functions.values())


class CannotCompile(RuntimeError):
    """Why a function runs eagerly: its control flow reads a tensor's value, torch.compile failed, or
    its signatures are too many. `for_good`: whether every later call would fail the same way."""

    def __init__(self, message, for_good=True):
        super().__init__(message)
        self.for_good = for_good

    def warned(self):
        """Say that this call runs eagerly (and every later one, if for good): the reason for good, or None."""
        warnings.warn(f"{self}: it runs eagerly{' from here on' if self.for_good else ''}", stacklevel=3)
        return str(self) if self.for_good else None


class Compiled:
    """`fn(*args)` as compiled graphs, one per `signature(args)`. `fn` returns a tensor or a tuple
    of tensors; a graph's inputs are the param store's params (the tensors fn reads besides its
    arguments, tracked by identity; those in the store when the graph is traced) and the tensor
    arguments. Calls run under no_grad: a graph that needs gradients computes them itself
    (`gradients=True` traces with autograd on, for fn to call torch.autograd.grad: `ValueAndGrads`).
    `seconds`: spent tracing and compiling (each graph's first call, which runs it once too).
    `eager`: fn as it runs uncompiled, which takes over with a warning where fn cannot be compiled
    (else CannotCompile is raised): for good, or for a signature past MAX_SIGNATURES."""

    def __init__(self, fn, what, gradients=False, eager=None):
        self.fn, self.what, self.gradients, self.eager = fn, what, gradients, eager
        self.graphs = {}  # signature -> (compiled graph, the names of the params it takes)
        self.seconds = 0.0
        self.fallback = None  # why every call runs eagerly, once one could not be compiled

    def __call__(self, *args):
        if self.fallback:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except CannotCompile as reason:
            if self.eager is None:
                raise
            self.fallback = reason.warned()
            return self.eager(*args)

    def compiled(self, *args):
        key = signature(args)
        tensors = [a for a in args if torch.is_tensor(a)]
        if key in self.graphs:
            graph, names = self.graphs[key]
            with torch.no_grad():
                return graph(*params_named(names), *tensors)
        if len(self.graphs) == MAX_SIGNATURES:
            raise CannotCompile(f"{self.what} was traced for {MAX_SIGNATURES} different argument shapes or values, "
                                "and this call has another", for_good=False)
        started = time.perf_counter()
        try:
            graph, names, out = self.build(args, tensors)
        finally:
            self.seconds += time.perf_counter() - started
        self.graphs[key] = graph, names
        return out

    def build(self, args, tensors):
        """(the compiled graph of fn at these arguments, the names of the params it takes, its output)."""
        names = list(store_params())
        traced = self.trace(args, params_named(names), tensors)
        if list(store_params()) != names:  # a param fn created would be a constant of the graph
            raise CannotCompile(f"{self.what} created params of Pyro's param store while it was traced",
                                for_good=False)
        try:
            graph = torch.compile(traced, dynamic=False, options=INDUCTOR_OPTIONS)
            with torch.no_grad(), quiet_compiler(), \
                    torch._dynamo.config.patch(capture_dynamic_output_shape_ops=CAPTURE_DATA_DEPENDENT_SHAPES):
                return graph, names, graph(*params_named(names), *tensors)
        except Exception as error:  # inductor's build, not the program: tracing ran it already
            raise CannotCompile(f"torch.compile could not build {self.what} ({described(error)})") from error

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
            raise CannotCompile(f"{self.what} branches on the value of a tensor ({where_traced_code_read(error)}), "
                                "which a traced graph cannot record") from None


def described(error):
    """'Type: first line of the message' of an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def where_traced_code_read(error):
    """The innermost frame outside torch and this module in a tracing error's traceback: the line
    that read a value."""
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        path = frame.f_code.co_filename
        if "/torch/" not in path and path != __file__:
            return f"{path}:{frame.f_lineno}"
    return "in torch"


def store_params():
    """{name: unconstrained tensor} of Pyro's param store: the tensors a traced program reads."""
    return dict(pyro.get_param_store().named_parameters())


def params_named(names):
    """The param store's tensors of these names, in this order: a graph's tracked inputs."""
    params = store_params()
    return [params[name] for name in names]


# ---- the training step -----------------------------------------------------------------------
class ValueAndGrads:
    """(loss, gradients of the surrogate loss with respect to the param store's params): the training
    step's graph. Each trace records, under its signature, the params' names and whether each reaches
    the surrogate (`traced`): the graph returns the gradients of those that do, and the others keep
    none, as after backward()."""

    def __init__(self, loss_and_surrogate):
        self.loss_and_surrogate = loss_and_surrogate
        self.traced = {}  # signature -> (names, used)

    def __call__(self, *args):
        loss, surrogate = self.loss_and_surrogate(*args)
        names = list(store_params())
        grads = torch.autograd.grad(surrogate, params_named(names), allow_unused=True)
        self.traced[signature(args)] = names, [grad is not None for grad in grads]
        return loss.detach(), *(grad for grad in grads if grad is not None)

    def gradients(self, args, grads):
        """{param name: gradient} of a graph's gradient outputs at these arguments."""
        names, used = self.traced[signature(args)]
        return dict(zip((name for name, got in zip(names, used) if got), grads))


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
    """The function of ``(*args) -> (loss, surrogate loss)`` that Pyro's JIT ELBO `elbo` builds for
    `pyro.ops.jit.trace` (its ELBO written without reading any value: the code --jit runs), taken
    from it on its first call, before anything runs. The ELBO keeps that function, bound to this
    model and guide: use a new one for another pair."""
    taken = []

    def take(fn=None, **options):
        def keep(fn):
            def stop(*args, **kwargs):
                taken.append(lambda *args: fn(*args, **kwargs))  # kwargs: the ids of model and guide, which fn pops
                raise Taken

            return stop

        return keep(fn) if fn is not None else keep

    with TRACING:
        real, pyro.ops.jit.trace = pyro.ops.jit.trace, take
        try:
            elbo.loss_and_grads(model, guide, *args)
        except Taken:
            pass
        finally:
            pyro.ops.jit.trace = real
    if not taken:
        raise RuntimeError(f"{type(elbo).__name__} no longer hands its function to pyro.ops.jit.trace, so `compile` "
                           "cannot take it; this ppl_models does not know this version of Pyro")
    output = JIT_OUTPUTS[type(elbo)]

    def function(*args, elbo=elbo):  # (the ELBO held here: its function reaches it by a weak reference)
        return output(taken[0](*args))

    return function


class PyroJitELBO:
    """One of Pyro's JIT ELBOs as a traceable objective, `loss_and_surrogate(model, guide, *args)`:
    the function it builds for its tracer (`jit_elbo_function`), taken from a new instance (`build()`)
    for each model and guide."""

    def __init__(self, build):
        self.build, self.functions = build, {}

    def loss_and_surrogate(self, model, guide, *args):
        if (model, guide) not in self.functions:
            self.functions[(model, guide)] = jit_elbo_function(self.build(), model, guide, args)
        return self.functions[(model, guide)](*args)


class CompiledObjective:
    """A training objective whose `loss_and_grads` runs as one compiled graph (loss and gradients),
    with the interface of a Pyro ELBO (`loss`, `loss_and_grads(model, guide, *args)`).

    `eager`: the objective as it runs without compiling (its `loss` creates the params, and it takes
    over, with a warning, where the step cannot be compiled: `fallback` then says why). `traceable`:
    the same objective as `loss_and_surrogate(model, guide, *args)` -> (loss, surrogate loss), written
    without reading any value (`PyroJitELBO`, objectives.IWAE, objectives.VIMCO). A step is compiled
    for each (model, guide): give it the same objects every step, as SVI does.

    The graph reads the param store's tensors without calling `pyro.param`, so an optimizer must be
    given the params (as `ppl_models.train.SVI` takes them from the store): `pyro.infer.SVI`, which
    finds them by tracing `pyro.param` calls, would update none."""

    def __init__(self, eager, traceable):
        self.eager, self.traceable = eager, traceable
        self.compiled = {}  # (model, guide) -> Compiled
        self.fallback = None

    @property
    def seconds(self):
        """Seconds spent tracing and compiling."""
        return sum(compiled.seconds for compiled in self.compiled.values())

    def loss(self, model, guide, *args):
        return self.eager.loss(model, guide, *args)

    def loss_and_grads(self, model, guide, *args):
        if self.fallback:
            return self.eager.loss_and_grads(model, guide, *args)
        if (model, guide) not in self.compiled:
            self.compiled[(model, guide)] = Compiled(
                ValueAndGrads(lambda *args: self.traceable.loss_and_surrogate(model, guide, *args)),
                "the training step", gradients=True)
        compiled = self.compiled[(model, guide)]
        try:
            loss, *grads = compiled(*args)
        except CannotCompile as reason:
            self.fallback = reason.warned()
            return self.eager.loss_and_grads(model, guide, *args)
        params, given = store_params(), set()
        for name, grad in compiled.fn.gradients(args, grads).items():
            if grad.data_ptr() in given:  # two params handed one buffer: each must own its gradient
                grad = grad.clone()
            given.add(grad.data_ptr())
            param = params[name]
            param.grad = grad if param.grad is None else param.grad + grad  # as backward() accumulates
        return loss.item()


class CompiledOptimizer:
    """`optimizer_class(params, lr=lr)` with a fast update of every param at once: PyTorch's fused
    implementation where the class has one (Adam, AdamW, SGD and Adagrad, on the CPU since torch
    2.4), else its `step` compiled by torch.compile (RMSprop). bench/compile_steps.py times the
    update one param at a time, compiled and fused (`fused=False`: compiled wherever). `seconds`:
    spent compiling (the first step in this process, which steps once too). Where torch.compile cannot
    build the step, it runs eagerly, with a warning: `fallback` says why."""

    def __init__(self, optimizer_class, params, lr, fused=True):
        try:  # (a device the fused kernel does not know is refused at the first step, by torch >= 2.4)
            if not fused:
                raise TypeError
            self.optimizer, self.update = optimizer_class(params, lr=lr, fused=True), None
        except (TypeError, RuntimeError):  # no fused version (TypeError), or none for the CPU in torch < 2.4
            self.optimizer = optimizer_class(params, lr=lr)
            self.update = torch.compile(self.optimizer.step, options=INDUCTOR_OPTIONS)
        self.seconds, self.stepped, self.fallback = 0.0, False, None

    def step(self):
        if self.update is None:
            return self.optimizer.step()
        if self.stepped:
            return self.update()
        started = time.perf_counter()
        try:
            with quiet_compiler(), torch._dynamo.config.patch(**UNLIMITED_RECOMPILES):
                self.update()
        except Exception as error:  # inductor's build: the compiled update fails before it changes a param
            reason = CannotCompile(f"torch.compile could not build the optimizer's update ({described(error)})")
            self.fallback, self.update = reason.warned(), None
            self.optimizer.step()
        self.seconds, self.stepped = time.perf_counter() - started, True


# Dynamo keeps the compiled step of every optimizer on the one code of Optimizer.step, and past its
# recompile limit (8) would step later optimizers eagerly: a process that trains several models (an
# experiment, a test session) lifts the limit while an optimizer's step compiles. (Its name by torch.)
UNLIMITED_RECOMPILES = {name: 10**6 for name in ("recompile_limit", "accumulated_recompile_limit",
                                                  "cache_size_limit", "accumulated_cache_size_limit")
                        if hasattr(torch._dynamo.config, name)}
