"""The shared training loop: reproducibility, resume, run-directory files, guards."""

import csv
import dataclasses
import json
import os
import re
import signal

import pyro
import pytest
import torch

import ppl_models.rundir as rundir
import ppl_models.train as train_module
from ppl_models.config import Config
from ppl_models.models.mixture import BernoulliMixture
from ppl_models.rundir import TrainingError, load_checkpoint
from ppl_models.train import train

QUIET = dict(progress=False, log=lambda *args: None)


def config(**overrides):
    settings = dict(model="mixture", guide="enum", epochs=3, batch_size=50, eval_every=5, eval_digits=100, lr=0.05)
    settings.update(overrides)
    return Config(**settings)


def final_params():
    return {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}


def metric_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


class StepCounter(train_module.SVI):
    """SVI whose step calls `on_step(n)` after the n-th step of this process."""

    on_step = None
    count = 0

    def step(self, *args, **kwargs):
        loss = super().step(*args, **kwargs)
        StepCounter.count += 1
        StepCounter.on_step(StepCounter.count)
        return loss


@pytest.fixture
def uninterrupted(tiny_dataset, tmp_path):
    summary = train(BernoulliMixture(4), tiny_dataset, config(guide="sampled"), tmp_path / "straight", **QUIET)
    return summary, final_params(), metric_rows(tmp_path / "straight")


def resume_and_compare(dataset, run_dir, uninterrupted):
    """Resume the run in run_dir; it must end exactly where the uninterrupted run did."""
    summary, params, rows = uninterrupted
    StepCounter.on_step = lambda n: None
    resumed = train(BernoulliMixture(4), dataset, config(guide="sampled"), run_dir, resume=True, **QUIET)
    assert resumed["final"] == summary["final"]
    assert all(torch.equal(params[n], p) for n, p in final_params().items())
    assert metric_rows(run_dir) == rows


def test_same_seed_same_result(tiny_dataset, tmp_path, uninterrupted):
    summary, params, rows = uninterrupted
    again = train(BernoulliMixture(4), tiny_dataset, config(guide="sampled"), tmp_path / "again", **QUIET)
    assert again["final"] == summary["final"]
    assert all(torch.equal(params[n], p) for n, p in final_params().items())
    assert metric_rows(tmp_path / "again") == rows


def test_ctrl_c_mid_epoch_checkpoints_and_resume_matches_uninterrupted(tiny_dataset, tmp_path, monkeypatch,
                                                                       uninterrupted):
    StepCounter.count = 0
    StepCounter.on_step = lambda n: n == 17 and os.kill(os.getpid(), signal.SIGINT)  # 12 steps an epoch
    monkeypatch.setattr(train_module, "SVI", StepCounter)
    run_dir = tmp_path / "interrupted"
    with pytest.raises(TrainingError,
                       match=re.escape(f"interrupted at step 17; checkpoint saved in {run_dir}; train it again "
                                       "with `resume=True` to go on")):
        train(BernoulliMixture(4), tiny_dataset, config(guide="sampled"), run_dir, **QUIET)
    assert load_checkpoint(run_dir / "checkpoint.pt")["progress"]["step"] == 17

    resume_and_compare(tiny_dataset, run_dir, uninterrupted)


def test_crash_loses_at_most_the_epoch_and_resume_matches_uninterrupted(tiny_dataset, tmp_path, monkeypatch,
                                                                        uninterrupted):
    def crash(n):
        if n == 30:  # mid third epoch: the epoch-2 checkpoint is the last one written
            raise RuntimeError("simulated crash")

    StepCounter.count, StepCounter.on_step = 0, crash
    monkeypatch.setattr(train_module, "SVI", StepCounter)
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(BernoulliMixture(4), tiny_dataset, config(guide="sampled"), run_dir, **QUIET)
    assert load_checkpoint(run_dir / "checkpoint.pt")["progress"]["step"] == 24

    resume_and_compare(tiny_dataset, run_dir, uninterrupted)


def test_run_directory_files_have_the_documented_keys(tiny_dataset, tmp_path):
    train(BernoulliMixture(4), tiny_dataset, config(epochs=1), tmp_path, **QUIET)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert {"model", "guide", "dataset", "epochs", "seconds_per_epoch", "final", "final_digits",
            "compile"} <= set(summary)
    assert set(summary["compile"]) == {"compiled", "why", "ran_eagerly", "training_step_seconds",
                                        "evaluation_seconds"}
    assert set(summary["final"]) == {"train", "test"} and set(summary["final"]["test"]) == {"exact"}
    assert summary["final_digits"] == {"train": 600, "test": 200}
    rows = metric_rows(tmp_path)
    assert {r["split"] for r in rows} == {"train", "test"} and {r["estimator"] for r in rows} == {"exact"}
    assert [int(r["step"]) for r in rows if r["split"] == "test"] == [0, 5, 10, 12]
    assert json.loads((tmp_path / "config.json").read_text())["model_args"] == {}
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["params"]) == {"b", "w", "c"}
    assert checkpoint["progress"] == {"epoch": 1, "step_in_epoch": 0, "step": 12,
                                      "seconds": checkpoint["progress"]["seconds"], "compile_seconds": 0.0}
    assert checkpoint["compiled"] is False  # (a run this short: 'auto' does not compile)


def test_corrupt_checkpoint_is_reported_as_such(tiny_dataset, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="checkpoint .* is corrupt or not a ppl_models checkpoint"):
        train(BernoulliMixture(4), tiny_dataset, config(), tmp_path, resume=True, **QUIET)


def test_resume_of_another_models_run_is_refused(tiny_dataset, tmp_path):
    train(BernoulliMixture(4), tiny_dataset, config(epochs=1, model_args={"components": 4}), tmp_path, **QUIET)
    with pytest.raises(TrainingError, match="is a run of model_args"):
        train(BernoulliMixture(5), tiny_dataset, config(epochs=2, model_args={"components": 5}), tmp_path,
              resume=True, **QUIET)


def test_checkpoint_from_a_newer_format_is_refused(tiny_dataset, tmp_path):
    train(BernoulliMixture(4), tiny_dataset, config(epochs=1), tmp_path, **QUIET)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    checkpoint["format"] = rundir.CHECKPOINT_FORMAT + 1
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingError, match="written by a newer ppl_models"):
        train(BernoulliMixture(4), tiny_dataset, config(epochs=2), tmp_path, resume=True, **QUIET)


def test_non_finite_loss_stops_with_the_site_named_and_the_last_checkpoint_kept(tiny_dataset, tmp_path, monkeypatch):
    def poison(n):
        if n == 14:  # second epoch: the epoch-1 checkpoint exists
            with torch.no_grad():
                pyro.param("c").unconstrained()[0] = float("nan")

    StepCounter.count, StepCounter.on_step = 0, poison
    monkeypatch.setattr(train_module, "SVI", StepCounter)
    with pytest.raises(TrainingError,
                       match=r"the loss became nan at step 15 .*not finite: "
                             r"param 'c', model site 'x'.*last good checkpoint"):
        train(BernoulliMixture(4), tiny_dataset, config(), tmp_path, **QUIET)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["progress"]["step"] == 12 and torch.isfinite(checkpoint["params"]["c"]).all()


@pytest.mark.parametrize(
    "field, value, message",
    [("lr", -1.0, "`lr` must be a positive number"), ("lr", float("nan"), "`lr` must be a positive number"),
     ("batch_size", 0, "`batch_size` must be a positive integer"),
     ("epochs", 0, "`epochs` must be a positive integer"), ("optimizer", "lbfgs", "`optimizer` must be one of"),
     ("batch_size", 10_000, "larger than the 600 training digits")],
)
def test_bad_settings_are_refused_with_the_flag_named(tiny_dataset, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train(BernoulliMixture(4), tiny_dataset, config(**{field: value}), tmp_path, **QUIET)


def test_restore_recreates_state_that_pyro_makes_lazily_during_a_step():
    pyro.param("w", torch.zeros(2))
    rundir.restore_params({"w": torch.ones(2), "__baseline_avg_downstream_cost_z": torch.full((3,), 7.0)},
                                torch.device("cpu"))
    assert torch.equal(pyro.param("w"), torch.ones(2))
    assert torch.equal(pyro.param("__baseline_avg_downstream_cost_z"), torch.full((3,), 7.0))


@pytest.mark.parametrize("guide", ["enum", "sampled"])
def test_jit_trains_as_eager_does_and_says_what_replaces_it(tiny_dataset, tmp_path, guide):
    finals = [train(BernoulliMixture(4), tiny_dataset, config(guide=guide, epochs=1), tmp_path / "eager",
                    **QUIET)["final"]["test"]["exact"]]
    with pytest.warns(FutureWarning, match=r"`jit=True` compiles with TorchScript \(torch.jit.trace\), which PyTorch "
                                           r"has deprecated; `compile=True` replaces it"):
        finals.append(train(BernoulliMixture(4), tiny_dataset, config(guide=guide, epochs=1, jit=True),
                            tmp_path / "jit", **QUIET)["final"]["test"]["exact"])
    if guide == "enum":  # nothing is sampled: the same numbers
        assert finals[1] == pytest.approx(finals[0], abs=1e-3)
    else:  # the traced sampler draws differently: as good, not identical
        assert abs(finals[1] - finals[0]) < 10 and min(finals) > -500  # untrained: -543


def test_detect_anomaly_is_on_during_training_only(tiny_dataset, tmp_path, monkeypatch):
    seen = []
    StepCounter.count, StepCounter.on_step = 0, lambda n: seen.append(torch.is_anomaly_enabled())
    monkeypatch.setattr(train_module, "SVI", StepCounter)
    train(BernoulliMixture(4), tiny_dataset, config(epochs=1, detect_anomaly=True), tmp_path, **QUIET)
    assert seen and all(seen) and not torch.is_anomaly_enabled()


def with_inverted_valid(dataset):
    """The tiny dataset plus a 'valid' split of its test digits with every pixel flipped: training on
    natural digits makes them less likely every epoch, so the first epoch scores best."""
    return dataclasses.replace(dataset, images={**dataset.images, "valid": 1 - dataset.images["test"]},
                               labels={**dataset.labels, "valid": None},
                               sources={**dataset.sources, "valid": "flipped"})


def test_early_stopping_reports_the_best_epochs_model(tiny_dataset, tmp_path):
    data = with_inverted_valid(tiny_dataset)
    summary = train(BernoulliMixture(4), data, config(epochs=10, patience=2), tmp_path / "stopped", **QUIET)
    stopped_params = final_params()
    scores = summary["early_stopping"].pop("valid_scores")
    assert [epoch for epoch, _ in scores] == [1, 2, 3]
    assert max(scores, key=lambda score: score[1]) == [1, summary["early_stopping"]["best_value"]]
    assert summary["early_stopping"] | {"best_value": 0} == dict(
        patience=2, epochs_trained=3, stopped_early=True, best_epoch=1, best_value=0, estimator="exact",
        selected_by="exact on 100 fixed random valid digits")
    assert summary["epochs"] == 3
    one_epoch = train(BernoulliMixture(4), data, config(epochs=1), tmp_path / "one", **QUIET)
    assert summary["final"] == one_epoch["final"]  # the reported model is epoch 1's, bit for bit
    assert all(torch.equal(stopped_params[n], p) for n, p in final_params().items())
    assert load_checkpoint(
        tmp_path / "stopped" / "checkpoint.pt")["progress"]["epoch"] == 3  # resumable state: the last


def test_resuming_an_early_stopped_run_trains_no_further(tiny_dataset, tmp_path):
    data = with_inverted_valid(tiny_dataset)
    first = train(BernoulliMixture(4), data, config(epochs=10, patience=2), tmp_path, **QUIET)
    again = train(BernoulliMixture(4), data, config(epochs=20, patience=2), tmp_path, resume=True, **QUIET)
    assert again["final"] == first["final"] and again["early_stopping"] == first["early_stopping"]


def test_a_larger_patience_on_resume_trains_on_after_early_stopping(tiny_dataset, tmp_path):
    data = with_inverted_valid(tiny_dataset)
    train(BernoulliMixture(4), data, config(epochs=10, patience=2), tmp_path, **QUIET)
    longer = train(BernoulliMixture(4), data, config(epochs=10, patience=5), tmp_path, resume=True, **QUIET)
    assert longer["early_stopping"]["epochs_trained"] == 6 and longer["early_stopping"]["best_epoch"] == 1
    assert [epoch for epoch, _ in longer["early_stopping"][
        "valid_scores"]] == [1, 2, 3, 4, 5, 6]  # kept across the resume


def test_resume_with_another_learning_rate_uses_it(tiny_dataset, tmp_path, monkeypatch):
    train(BernoulliMixture(4), tiny_dataset, config(epochs=1), tmp_path, **QUIET)
    seen = []
    StepCounter.count, StepCounter.on_step = 0, lambda n: None
    monkeypatch.setattr(StepCounter, "step",
                        lambda self, *args, **kwargs: seen.append(self.optimizer.param_groups[0]["lr"]) or 0.0)
    monkeypatch.setattr(train_module, "SVI", StepCounter)
    train(BernoulliMixture(4), tiny_dataset, config(epochs=2, lr=0.001), tmp_path, resume=True, **QUIET)
    assert seen and set(seen) == {0.001}


def test_a_saved_best_of_another_estimator_is_not_compared_with_this_ones(tiny_dataset, tmp_path):
    data = with_inverted_valid(tiny_dataset)
    train(BernoulliMixture(4), data, config(epochs=10, patience=2), tmp_path, **QUIET)  # best epoch 1, stopped at 3
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["best"]["estimator"] == "exact"
    checkpoint["best"]["estimator"] = "elbo"  # as if scored by another criterion
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    resumed = train(BernoulliMixture(4), data, config(epochs=10, patience=2), tmp_path, resume=True, **QUIET)
    assert resumed["early_stopping"]["best_epoch"] == 4 and resumed["early_stopping"]["epochs_trained"] == 6


def test_early_stopping_needs_a_validation_split(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="`patience` stops on the validation split, and tiny has none"):
        train(BernoulliMixture(4), tiny_dataset, config(patience=3), tmp_path, **QUIET)


def test_one_optimizer_svi_takes_the_steps_pyros_svi_takes(tiny_dataset):
    """Same ELBO gradients, same Adam: the params after five steps agree with pyro.infer.SVI's."""
    x = tiny_dataset.binary("train")[:50]
    results = []
    for stock in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = BernoulliMixture(4)
        guide, elbo = model.guide("enum"), model.elbo("enum")
        if stock:
            elbo.loss(model.model, guide, x)  # the first loss ours takes to create the params
            svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
        else:
            svi = train_module.SVI(model.model, guide, elbo, torch.optim.Adam, 0.05, (x,))
        losses = [svi.step(x) for _ in range(5)]
        results.append((losses, final_params()))
    (stock_losses, stock_params), (losses, params) = results
    assert losses == pytest.approx(stock_losses, rel=1e-6)
    assert all(torch.allclose(stock_params[n], p, atol=1e-6) for n, p in params.items())


def test_a_param_created_after_the_first_loss_is_refused():
    calls = []

    def model():
        pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))

    def guide():
        calls.append(1)
        loc = pyro.param("loc", torch.zeros(()))
        if len(calls) > 1:  # a param the first call did not make
            loc = loc + pyro.param("late", torch.zeros(()))
        pyro.sample("z", pyro.distributions.Normal(loc, 1.0))

    svi = train_module.SVI(model, guide, pyro.infer.Trace_ELBO(), torch.optim.Adam, 0.1, ())
    with pytest.raises(RuntimeError, match=r"params \['late'\] appeared after the first loss"):
        svi.step()


def test_checkpoint_from_an_older_format_is_refused(tiny_dataset, tmp_path):
    train(BernoulliMixture(4), tiny_dataset, config(epochs=1), tmp_path, **QUIET)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    checkpoint["format"] = 1
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingError, match=r"written by an older ppl_models \(format 1\).*start the run again"):
        train(BernoulliMixture(4), tiny_dataset, config(epochs=2), tmp_path, resume=True, **QUIET)


def test_iwae_k_is_reported_by_default_only_where_no_exact_log_likelihood_is(tiny_dataset, tmp_path):
    from ppl_models.models.sbn import SigmoidBeliefNet
    from ppl_models.models.vae import VAE

    def final_test_estimators(family, **settings):
        cfg = Config(**{"epochs": 1, "batch_size": 100, "eval_digits": 50, "eval_samples": None, **settings})
        return set(train(family, tiny_dataset, cfg, tmp_path / cfg.model, overwrite=True, **QUIET)["final"]["test"])

    assert final_test_estimators(SigmoidBeliefNet(latents=4), model="sbn", guide="bernoulli") == {"exact", "elbo"}
    assert final_test_estimators(VAE(z_dim=2, hidden=(8,)), model="vae", guide="normal") == {"elbo", "iwae-1000"}
    assert final_test_estimators(SigmoidBeliefNet(latents=4), model="sbn", guide="bernoulli", eval_samples=10) == \
        {"exact", "elbo", "iwae-10"}  # asked for: a check of the exact number


def test_a_long_final_estimate_is_announced_with_its_cost_and_how_to_skip_it(tiny_dataset, tmp_path, monkeypatch):
    from ppl_models.models.vae import VAE

    monkeypatch.setattr(train_module, "LONG_EVALUATION_SECONDS", 0.0)  # every estimate counts as long
    lines = []
    cfg = Config(model="vae", guide="normal", epochs=1, eval_digits=50, eval_samples=10)
    train(VAE(z_dim=2, hidden=(8,)), tiny_dataset, cfg, tmp_path / "run", progress=False, log=lines.append)
    announced = [line for line in lines if line.startswith("final iwae-10 on 200 test digits: about ")]
    assert len(announced) == 1 and announced[0].endswith("on this machine; `eval_samples=0` skips it"), lines
    assert any(re.fullmatch(r"final elbo on 600 train digits: about \d+ s on this machine", line) for line in lines)


@pytest.mark.parametrize("seconds, said", [(4.2, "4 s"), (89, "89 s"), (360, "6 min"), (5400, "1.5 h")])
def test_durations_are_said_as_a_person_says_them(seconds, said):
    from ppl_models.evaluate import duration

    assert duration(seconds) == said


def test_metrics_epoch_is_the_epochs_completed_at_that_step(tiny_dataset, tmp_path):
    # 600 digits in batches of 100: 6 steps an epoch; every 3rd step evaluated, so steps 6 and 12 end epochs
    train(BernoulliMixture(4), tiny_dataset, config(epochs=2, batch_size=100, eval_every=3), tmp_path, **QUIET)
    epochs = {int(r["step"]): int(r["epoch"]) for r in metric_rows(tmp_path)}
    assert epochs == {0: 0, 3: 0, 6: 1, 9: 1, 12: 2}


def test_a_train_subset_is_scored_on_the_digits_trained_on(tiny_dataset, tmp_path):
    summary = train(BernoulliMixture(4), tiny_dataset, config(epochs=1, train_subset=200), tmp_path, **QUIET)
    assert summary["final_digits"]["train"] == summary["train_digits"] == 200
    trained_on = tiny_dataset.binary("train")[:200]
    scored = BernoulliMixture(4).log_likelihood(trained_on)  # the trained params live in the param store
    assert summary["final"]["train"]["exact"] == pytest.approx(scored.mean().item())


@pytest.mark.parametrize("setting, message", [
    (dict(epochs=2.5), "`epochs` must be a positive integer, got 2.5"),
    (dict(epochs="3"), "`epochs` must be a positive integer, got '3'"),
    (dict(batch_size=True), "`batch_size` must be a positive integer, got True"),
    (dict(train_subset=0), "`train_subset` must be a positive integer, got 0"),
    (dict(lr="0.1"), "`lr` must be a positive number, got '0.1'"),
    (dict(lr=1e308), "`lr=1e+308` is past 1e+06"),
    (dict(eval_samples=-1), "`eval_samples` must be 0 (none) or a positive integer, got -1"),
    (dict(eval_samples=10**7), "`eval_samples=10000000`: at most 1,000,000"),
    (dict(seed=-1), "`seed` must be an integer from 0 to 2**63 - 1, got -1"),
    (dict(device="cuda:0" if not torch.cuda.is_available() else "cuda:99"), "`device='cuda:"),
])
def test_a_setting_of_the_wrong_kind_or_size_is_refused_before_anything_runs(setting, message):
    from ppl_models.config import SettingError

    with pytest.raises(SettingError) as refusal:
        config(**setting).validate()
    assert str(refusal.value).startswith(message), refusal.value
