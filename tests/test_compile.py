"""`compile`: a compiled step is the eager step (the same draws, the same loss and gradients up to
rounding), a compiled run resumes bit for bit, what cannot be compiled is refused with its reason
(or, under 'auto', trained eagerly), and a program that reads a tensor's value runs eagerly with a
warning that says where."""

import json
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import run_cli

import ppl_models.compiled as compiled
from ppl_models.config import Config, SettingError
from ppl_models.evaluate import per_digit_estimate
from ppl_models.models import build_model
from ppl_models.models.mixture import BernoulliMixture
from ppl_models.report import describe
from ppl_models.train import AUTO_COMPILE_STEPS, compile_decision, reproducible, train

QUIET = dict(progress=False, log=lambda *args: None)
VAE = {"z_dim": 3, "hidden": (16,)}

# family, its settings, guide, elbo, particles, and how far apart eager's and the compiled gradients may be
# (relative to each param's largest gradient): about ten times the difference measured. Both are float32 sums
# in different orders; where log weights of -540 nats are exponentiated (responsibilities of enumerated states,
# VIMCO's and IWAE's normalised weights), rounding is larger: eager's own gradient of the mixture's b is 3e-4
# (relative) from the float64 one, the compiled one 6e-4.
CASES = {
    "mixture, enum (JitTraceEnum_ELBO)": ("mixture", {"components": 4}, "enum", None, 1, 7e-3),
    "mixture, sampled (JitTraceGraph_ELBO, neural baseline)": ("mixture", {"components": 4}, "sampled", None, 1, 1e-5),
    "sbn, enum over 2^5 codes": ("sbn", {"latents": 5}, "enum", None, 1, 3e-3),
    "sbn, relaxed (JitTrace_ELBO, straight-through)": ("sbn", {"latents": 6}, "relaxed", None, 1, 5e-6),
    "sbn, vimco (objectives.VIMCO)": ("sbn", {"latents": 6}, "bernoulli", "vimco", 3, 2e-3),
    "vae, normal, KL warm-up (a step argument)": ("vae", {**VAE, "kl_warmup": 2}, "normal", "trace", 1, 5e-6),
    "vae, lowrank (JitTraceMeanField_ELBO)": ("vae", VAE, "lowrank", "meanfield", 1, 5e-6),
    "vae, iaf, iwae (objectives.IWAE)": ("vae", VAE, "iaf", "iwae", 3, 3e-4),
}


def one_step(name, model_args, guide, elbo_name, particles, x, compile):
    """(loss, {param: gradient}, the RNG state after) of one loss_and_grads from the same seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    family = build_model(name, model_args, torch.device("cpu"))
    objective = family.elbo(guide, elbo_name, particles=particles, compile=compile)
    args = (x, *family.step_args(0.5, torch.device("cpu")))
    with reproducible(torch.device("cpu")):
        objective.loss(family.model, family.guide(guide), *args)  # creates the params, as SVI does
        pyro.set_rng_seed(1)
        loss = objective.loss_and_grads(family.model, family.guide(guide), *args)
    grads = {name: p.grad.clone() for name, p in pyro.get_param_store().named_parameters() if p.grad is not None}
    return loss, grads, torch.get_rng_state()


@pytest.mark.parametrize("case", CASES)
def test_a_compiled_step_draws_what_eager_draws_and_takes_its_gradients(case):
    *settings, tolerance = CASES[case]
    x = torch.bernoulli(torch.full((32, 784), 0.3), generator=torch.Generator().manual_seed(0))
    eager_loss, eager_grads, eager_rng = one_step(*settings, x, compile=False)
    loss, grads, rng = one_step(*settings, x, compile=True)
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert grads.keys() == eager_grads.keys()  # the same params get a gradient, and no others
    for name, grad in grads.items():
        assert (grad - eager_grads[name]).abs().max() <= tolerance * eager_grads[name].abs().max(), name
    assert torch.equal(rng, eager_rng)  # the same numbers drawn, and no more (tracing draws from a forked stream)


def test_a_compiled_run_reports_its_compile_time_apart_and_ends_as_the_eager_run(tiny_dataset, tmp_path, monkeypatch):
    """With SGD, whose steps do not magnify rounding (RMSprop and Adam divide by each gradient's running size, so
    the 1e-4 rounding differences of a near-zero gradient become steps of the learning rate's size): 24 steps end
    1.6e-5 apart (relative), from the mixture's gradients 7e-4 apart. Compiling is made to take a second at least
    (a graph this process compiled before comes from memory in milliseconds, as fast as a loaded epoch)."""
    build = compiled.Compiled.build

    def slow_build(self, *args):
        time.sleep(1)
        return build(self, *args)

    monkeypatch.setattr(compiled.Compiled, "build", slow_build)
    cfg = dict(model="mixture", guide="enum", epochs=2, batch_size=50, eval_every=5, eval_digits=100,
               optimizer="sgd", lr=1e-3)
    eager = train(BernoulliMixture(4), tiny_dataset, Config(**cfg, compile=False), tmp_path / "eager", **QUIET)
    lines = []
    run = train(BernoulliMixture(4), tiny_dataset, Config(**cfg, compile=True), tmp_path / "compiled",
                progress=False, log=lines.append)
    assert run["final"]["test"]["exact"] == pytest.approx(eager["final"]["test"]["exact"], rel=1e-4)
    saved = json.loads((tmp_path / "compiled" / "metrics.json").read_text())["compile"]
    assert saved["compiled"] and saved["why"] == "`compile=True`" and saved["training_step_seconds"] > 0
    assert not eager["compile"]["compiled"] and eager["compile"]["training_step_seconds"] == 0
    assert any(line.startswith("compiled the training step in ") for line in lines)
    assert run["seconds_per_epoch"] < saved["training_step_seconds"]  # a step's seconds, not the compile's


def test_auto_compiles_long_runs_that_can_be_compiled_and_a_resumed_run_as_it_started():
    mixture = BernoulliMixture(4)
    auto = Config(model="mixture", guide="enum")
    assert compile_decision(mixture, auto, AUTO_COMPILE_STEPS) == (True, f"'auto': {AUTO_COMPILE_STEPS:,} steps")
    compiles, why = compile_decision(mixture, auto, 30)
    assert not compiles and "30 steps being too few to repay compiling" in why
    assert compile_decision(mixture, auto, 30, started_compiled=True)[0]  # as the run started
    compiles, why = compile_decision(build_model("sbn", {"latents": 4, "baseline": "average"}, "cpu"),
                                     Config(model="sbn", guide="bernoulli"), 10**6)
    assert not compiles and why.startswith("'auto': not compiled, since `compile=True` cannot trace Pyro's decaying")
    assert not compile_decision(mixture, Config(model="mixture", guide="enum", jit=True), 10**6)[0]


@pytest.mark.parametrize("settings, message", [
    (dict(jit=True), r"`compile=True`: `jit=True` compiles the step with TorchScript instead; drop `jit`"),
    (dict(detect_anomaly=True), r"`detect_anomaly=True` watches eager autograd, which a compiled step does not run"),
    (dict(model="sbn", guide="enum", model_args={"latents": 13}),
     r"`compile=True` with `guide='enum'` and `latents=13`: its graph would keep the logits of all 2\^13 states"),
    (dict(model="sbn", guide="bernoulli", model_args={"latents": 4, "baseline": "both"}),
     r"`compile=True` cannot trace Pyro's decaying-average baseline \(`baseline='both'`\), a running average kept"),
])
def test_what_cannot_be_compiled_is_refused_with_its_reason(settings, message):
    cfg = Config(**{"model": "mixture", "guide": "enum", "compile": True, **settings})
    with pytest.raises(SettingError, match=message):
        compile_decision(build_model(cfg.model, cfg.model_args, "cpu"), cfg, 10**6)


def test_the_cli_takes_compile_and_may_change_it_on_resume(offline, tiny_binarized, tmp_path, capsys):
    args = ["--model", "mixture", "--components", "3", "--dataset", "binarized-mnist", "--data-dir",
            str(tiny_binarized), "--epochs", "1", "--batch-size", "50", "--eval-every", "100", "--out",
            str(tmp_path / "run")]
    assert run_cli(*args, "--compile", "--jit") == 2
    assert "error: --compile: --jit compiles the step with TorchScript instead; drop --jit" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    with pytest.raises(SystemExit, match="2"):
        run_cli(*args, "--compile", "maybe")
    assert "argument --compile: invalid choice: 'maybe' (choose from 'auto', 'on', 'off')" in capsys.readouterr().err
    assert run_cli(*args, "--compile", "off") == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["compile"]["why"] == "`compile=False`"
    assert run_cli("--resume", str(tmp_path / "run"), "--epochs", "2", "--compile") == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["compile"]["compiled"] and summary["epochs"] == 2


def test_an_experiment_is_refused_before_it_trains_when_one_of_its_runs_cannot_be_compiled(offline, tiny_binarized,
                                                                                          tmp_path, capsys):
    """enum-vs-sampled trains every guide: the decaying-average baseline of `bernoulli` is refused before `enum`
    trains."""
    out = tmp_path / "experiment"
    assert run_cli("--model", "sbn", "--experiment", "enum-vs-sampled", "--latents", "4", "--baseline", "average",
                   "--compile", "--dataset", "binarized-mnist", "--data-dir", str(tiny_binarized), "--out",
                   str(out)) == 2
    assert "error: --compile cannot trace Pyro's decaying-average baseline" in capsys.readouterr().err
    assert not out.exists()


class BranchingPixels(BernoulliMixture):
    """A mixture whose model reads a tensor's value: no graph can record that branch."""

    def model(self, x, observed=None):
        if x.sum() > 0:  # read here
            return super().model(x, observed)
        return super().model(1 - x, observed)


def test_a_program_that_reads_a_value_runs_eagerly_with_a_warning_saying_where():
    x = torch.bernoulli(torch.full((16, 784), 0.3), generator=torch.Generator().manual_seed(0))
    family = BranchingPixels(3)
    objective = family.elbo("enum", compile=True)
    objective.loss(family.model, family.guide_enum, x)
    with pytest.warns(UserWarning, match=r"the training step branches on the value of a tensor \(.*test_compile.py:"
                                         r"\d+\), which a traced graph cannot record: it runs eagerly"):
        compiled_loss = objective.loss_and_grads(family.model, family.guide_enum, x)
    assert compiled_loss == pytest.approx(objective.eager.loss(family.model, family.guide_enum, x))


def test_past_its_signatures_a_call_runs_eagerly_and_the_traced_ones_stay_compiled(monkeypatch):
    monkeypatch.setattr(compiled, "MAX_SIGNATURES", 1)
    x = torch.bernoulli(torch.full((16, 784), 0.3), generator=torch.Generator().manual_seed(0))
    family = BernoulliMixture(3)
    model, guide = family.model, family.guide_enum  # (the same objects every step, as SVI passes them)
    objective = family.elbo("enum", compile=True)
    objective.loss(model, guide, x)
    objective.loss_and_grads(model, guide, x)
    with pytest.warns(UserWarning, match=r"the training step was traced for 1 different argument shapes or values, "
                                         r"and this call has another: it runs eagerly$"):
        assert objective.loss_and_grads(model, guide, x[:8]) == pytest.approx(objective.eager.loss(model, guide, x[:8]))
    objective.loss_and_grads(model, guide, x)  # compiled still: no warning (they are errors)
    assert objective.fallback is None and len(objective.compiled[(model, guide)].graphs) == 1


def test_a_run_whose_step_torch_compile_cannot_build_runs_eagerly_and_says_so(monkeypatch, tiny_dataset, tmp_path):
    """No C++ compiler, a Python torch.compile does not support: the step and the optimizer's compiled update
    (RMSprop's) run eagerly from their first call, with a warning, and metrics.json and the run's last line say so."""
    def fail(*args, **kwargs):
        def build_fails(*args, **kwargs):
            raise RuntimeError("Compiler: cc is not found.\nmore")
        return build_fails

    monkeypatch.setattr(torch, "compile", fail)
    cfg = Config(model="mixture", guide="enum", epochs=1, batch_size=100, eval_every=100, eval_digits=50,
                 optimizer="rmsprop", compile=True)
    with pytest.warns(UserWarning, match=r"torch.compile could not build the training step \(RuntimeError: Compiler: "
                                         r"cc is not found.\): it runs eagerly from here on") as caught:
        summary = train(BernoulliMixture(3), tiny_dataset, cfg, tmp_path, **QUIET)
    assert len([w for w in caught if "could not build" in str(w.message)]) == 2  # once each, not every step
    why = json.loads((tmp_path / "metrics.json").read_text())["compile"]["ran_eagerly"]
    assert why.startswith("torch.compile could not build the training step") and "the optimizer's update" in why
    assert summary["compile"]["ran_eagerly"] == why
    assert f"but run eagerly: {why}" in describe(summary, tmp_path)


def test_a_program_that_creates_params_while_traced_runs_eagerly_then_compiles():
    """A param made during the trace would be a constant of the graph: that call runs eagerly, the next one,
    the store then holding the param, is traced again and follows the param's later values."""
    pyro.clear_param_store()

    def scaled(x):
        return x * pyro.param("scale", torch.tensor(2.0))

    function = compiled.Compiled(scaled, "scaled", eager=scaled)
    x = torch.ones(3)
    with pytest.warns(UserWarning, match="created params of Pyro's param store while it was traced: it runs "
                                         "eagerly$"):
        assert torch.equal(function(x), 2 * x)
    pyro.get_param_store()["scale"] = torch.tensor(3.0)
    assert torch.equal(function(x), 3 * x)
    pyro.get_param_store()["scale"] = torch.tensor(5.0)
    assert torch.equal(function(x), 5 * x) and len(function.graphs) == 1


def test_one_objective_compiles_each_model_and_guide_for_itself():
    """A JIT ELBO keeps the model and guide of its first call: each pair takes a fresh one."""
    x = torch.bernoulli(torch.full((8, 784), 0.3), generator=torch.Generator().manual_seed(0))
    objective, eager = (build_model("vae", VAE, "cpu").elbo("normal", "trace", compile=compile) for compile in (1, 0))
    for family in (build_model("vae", VAE, "cpu"), build_model("vae", {**VAE, "z_dim": 2}, "cpu")):
        for guide in (family.guide_normal, family.guide_lowrank):
            objective.loss(family.model, guide, x)
            torch.manual_seed(1)
            compiled_loss = objective.loss_and_grads(family.model, guide, x)
            torch.manual_seed(1)
            assert compiled_loss == pytest.approx(eager.loss(family.model, guide, x), rel=1e-6)
    assert len(objective.compiled) == 4


def test_compiled_graphs_go_with_their_family(tiny_dataset):
    import gc
    import weakref

    family = build_model("vae", VAE, torch.device("cpu"))
    for compile in (False, True):  # (eagerly first: that creates the params a graph reads)
        per_digit_estimate(family, "normal", tiny_dataset.images["test"][:4], "iwae-5", compile=compile)
    assert compiled.compiled_seconds(family) > 0
    gone = weakref.ref(family)
    del family
    gc.collect()
    assert gone() is None


def test_denormals_are_flushed_until_the_outermost_context_ends():
    tiny = torch.tensor([1e-39])
    with compiled.flushing_denormals():
        with compiled.flushing_denormals():
            assert (tiny * 1).item() == 0
        assert (tiny * 1).item() == 0
    assert (tiny * 1).item() == pytest.approx(1e-39)


def test_denormals_are_flushed_per_thread_and_the_last_to_end_restores_them():
    """The CPU's flush-to-zero flag is each thread's own: two threads' overlapping contexts neither miss
    flushing nor leave it on."""
    import threading

    tiny, seen, entered, release = torch.tensor([1e-39]), {}, threading.Event(), threading.Event()  # (one number:
    # computed by the calling thread, never by an intra-op worker, whose flag is its own)

    def other():
        with compiled.flushing_denormals():
            entered.set()
            release.wait()
            seen["inside"] = (tiny * 1).item()
        seen["after"] = (tiny * 1).item()

    thread = threading.Thread(target=other)
    with compiled.flushing_denormals():
        thread.start()
        entered.wait()
    assert (tiny * 1).item() == pytest.approx(1e-39)  # ended here while the other thread's is open
    release.set()
    thread.join()
    assert seen["inside"] == 0 and seen["after"] == pytest.approx(1e-39)


def test_a_resume_that_changes_compile_updates_as_the_new_setting_does(tiny_dataset, tmp_path):
    """The saved optimizer state carries the old run's implementation (fused or not): the resume's is used."""
    cfg = dict(model="vae", guide="normal", optimizer="adam", lr=3e-3, batch_size=50, eval_every=100, eval_digits=50,
               eval_samples=0, model_args=VAE)
    train(build_model("vae", VAE, "cpu"), tiny_dataset, Config(**cfg, epochs=1, compile=False), tmp_path, **QUIET)
    train(build_model("vae", VAE, "cpu"), tiny_dataset, Config(**cfg, epochs=2, compile=True), tmp_path, resume=True,
          **QUIET)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"][0]["fused"]


def test_compiled_importance_estimates_are_the_eager_ones(tiny_dataset):
    """The same seeded draws per batch, compiled or not: elbo and iwae-k, with a mask and without."""
    x = tiny_dataset.images["test"][:30]
    observed = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    family = build_model("vae", VAE, torch.device("cpu"))
    for name in ("elbo", "iwae-20"):
        for mask in (None, observed):
            values = []
            for compile in (False, True):
                torch.manual_seed(2)
                values.append(per_digit_estimate(family, "normal", x, name, observed=mask, compile=compile))
            assert torch.allclose(values[0], values[1], rtol=0, atol=1e-3), (name, mask is not None)
    assert compiled.compiled_seconds(family) > 0  # kept with the family


def test_tracing_leaves_the_family_and_the_rng_as_they_were():
    family = build_model("vae", VAE, torch.device("cpu"))
    x = torch.zeros(4, 784)
    state = torch.get_rng_state()
    graph = compiled.Compiled(lambda x: family.model(x) or dist.Normal(x.new_zeros(()), 1).sample(), "a draw").trace(
        (x,), [], [x])
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch._C._get_tracing_state()  # Pyro's tracer paths are off again
    assert sum("normal" in str(node.target) for node in graph.graph.nodes) == 2  # z, and the last draw


def test_compiled_inference_answers_as_eager_inference(tiny_dataset):
    """Importance sampling compiled draws what eager draws: the same fill-in; NUTS's compiled potential has the
    eager potential's value and gradient (its chain is eager's until rounding tips one of its choices)."""
    from ppl_models.inference import CompiledPotential
    from ppl_models.masks import observe
    from ppl_models.trained import TrainedModel, register_networks

    family = build_model("vae", VAE, torch.device("cpu"))
    register_networks(family, "normal")
    params = pyro.get_param_store().get_state()
    cfg = Config(model="vae", guide="normal", model_args=VAE)
    x = tiny_dataset.images["test"][:12]
    filled = [TrainedModel(family, cfg, params, "here", compile).fill_in(x, observe("top"), draws=50, seed=3)
              for compile in (False, True)]
    assert torch.allclose(filled[0].log_prob_missing, filled[1].log_prob_missing, atol=1e-3)
    assert torch.allclose(filled[0].probabilities, filled[1].probabilities, atol=1e-3)  # weights of log weights ~ -500

    chain = TrainedModel(family, cfg, params, "here", True).posterior(x[:3], observe("top"), method="nuts", draws=8,
                                                                       warmup=4, seed=3)
    assert chain.summary["posterior mean"].shape == (3, 3) and torch.isfinite(chain.summary["posterior mean"]).all()

    def potential(params):
        z = params["z"]
        return (z**2).sum() / 2 - family.decoder(z).sigmoid().sum()

    z = torch.randn(5, 3)
    compiled_potential = CompiledPotential(potential)
    energy = compiled_potential({"z": z.requires_grad_()})
    assert energy.item() == pytest.approx(potential({"z": z}).item(), rel=1e-6)
    expected = torch.autograd.grad(potential({"z": z}), z)[0]
    assert torch.allclose(torch.autograd.grad(energy, z)[0], expected, atol=1e-5)


def test_the_run_line_says_why_auto_left_the_step_eager():
    from ppl_models.report import compiling

    left = {"compiled": False, "why": "'auto': not compiled, 50 steps being too few to repay compiling",
            "ran_eagerly": None, "training_step_seconds": 0.0, "evaluation_seconds": 0.0}
    assert compiling({"compile": left}) == f" (the step eager, {left['why']})"
    assert compiling({"compile": {**left, "why": "`compile=False`"}}) == ""  # asked for: nothing to explain
