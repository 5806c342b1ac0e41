"""The main job of `run.py`: train a model (or run one of its family's experiments), then let the
family report what the trained model does, and write metrics.json and report.html."""

import os
from contextlib import ExitStack
from dataclasses import asdict

import torch

from .config import SettingError
from .data import binarize_applies, load_dataset
from .distributed import current
from .family import RunContext
from .files import write_json
from .models import family_of
from .report import describe, provenance, write_experiment_report, write_report
from .rundir import TrainingError
from .train import check_compile, check_data_parallel, claim_run_dir, train


def run(cfg, out, experiment=None, resume=False, progress=True, download=True, log=print, overwrite=False,
        command=None, world=None):
    """The main job of ``ppl-models train``: one training run (or an experiment), the family's report
    (figures, report.html) and a printed summary.

    The run directory is this process's until the report is written (a lock on its ``lock`` file),
    and is checked before any data is loaded.

    Args:
        cfg: the run's `ppl_models.config.Config`.
        out: the run directory.
        experiment: the name of one of the family's experiments to run instead of a training run.
        resume: go on from the checkpoint in ``out``.
        progress: show progress bars.
        download: fetch missing data files (else a missing file is a `ppl_models.data.DataError`).
        log: where the run's lines go.
        overwrite: replace what ``out`` holds.
        command: the command line that asked for it, for the report (None: the Python API).
        world: as for `ppl_models.train.train`; rank 0 alone holds the directory, logs and draws
            the report.

    Returns:
        dict: `ppl_models.train.train`'s summary with the family's findings added (what
        metrics.json holds), or an experiment's findings.

    Raises:
        ppl_models.config.SettingError: a setting that cannot work.
        ppl_models.rundir.TrainingError: as for `ppl_models.train.train`.
        ppl_models.data.DataError: data that is missing (with ``download=False``) or damaged.
        ppl_models.files.WriteError: a file that cannot be written (disk full, read-only).
    """
    world = world or current()
    if not world.main:
        progress, log = False, lambda line: None
    family = family_of(cfg.model)
    family.check_choices(cfg.guide, cfg.elbo, cfg.particles)
    if experiment is not None and experiment not in family.experiments:
        raise SettingError(f"unknown `experiment={experiment}` for model {cfg.model}; choose from: "
                           f"{', '.join(family.experiments) or 'none'}")
    if experiment and world.size > 1:
        raise SettingError(f"experiments run in one process, and this is one of {world.size}: run "
                           f"`experiment={experiment}` without torchrun")
    world.on_main(lambda: family.check_memory(cfg.model_args, cfg.batch_size, cfg.particles,
                                              available_memory(cfg.device)))
    model = family(**cfg.model_args).to(cfg.device)
    check_data_parallel(model, cfg, world)  # (train checks these two again, for the library's callers)
    about = family.experiments[experiment] if experiment else None
    for run_cfg in about.trains(family, cfg) if about and about.trains else [cfg]:  # before any of them trains
        check_compile(model if run_cfg.model_args == cfg.model_args else family(**run_cfg.model_args), run_cfg)
    with ExitStack() as held:
        out = world.on_main(lambda: claim(held, out, experiment, resume, overwrite, log))
        data = world.main_first(lambda: load_dataset(cfg.dataset, binarize=cfg.binarize, data_dir=cfg.data_dir,
                                                     device=cfg.device, seed=cfg.seed, download=download,
                                                     progress=progress))
        splits = [f"{split} {data.images[split].shape[0]:,} digits from {data.sources[split]}" for split in data.splits]
        log(f"{model.summary(cfg.guide)}, guide '{cfg.guide}'; {cfg.dataset} ({data.binarize} binarization): "
            + ", ".join(splits))
        sets = about.sets if about else {}  # the settings an experiment decides itself
        unused = unused_settings(family, None if "guide" in sets else cfg.guide, cfg.dataset)
        unused |= {name: f"set by the experiment: {why}" for name, why in sets.items()}
        if experiment:
            write_json({"experiment": experiment, "config": asdict(cfg)}, out / "experiment.json")  # (its data loaded)
            report = about.run(family, cfg, data, out, progress, log)
            write_experiment_report(out, experiment, about.help, asdict(cfg), report, provenance([command], cfg.device),
                                    unused)
            log(f"report: {out / 'report.html'}")
            return report.findings
        summary = train(model, data, cfg, out, resume=resume, progress=progress, log=log, overwrite=overwrite,
                        after_epoch=model.epoch_hook(out, cfg), command=command, world=world)
        if not world.main:
            return summary
        report = model.report(RunContext(data, cfg, out, summary, download, log))
        summary.update(report.findings, provenance=provenance(summary.pop("commands"), cfg.device, world),
                       figures=[name for name, _ in report.figures])  # (what `overwrite` removes with the run)
        write_json(summary, out / "metrics.json")
        write_report(out, asdict(cfg), summary, report.figures, unused)
    log(describe(summary, out))
    return summary


def claim(held, out, experiment, resume, overwrite, log):
    """The run (or experiment) directory, made, locked while `held` is, and checked (see `train.claim_run_dir`)."""
    if not experiment:
        return claim_run_dir(held, out, resume, overwrite, log)
    out = claim_run_dir(held, out, resume=True, log=log)  # an experiment's folder is checked by its marker instead
    check_new_experiment(out, overwrite)
    return out


def unused_settings(family, guide, dataset):
    """{setting: why} for the settings a run (guide None: an experiment of every guide) is given but does not use: the
    family says which of its own apply to the guide, the data set whether `binarize` applies."""
    unused = family.unused_settings(guide)
    if not binarize_applies(dataset):
        unused["binarize"] = f"{dataset} comes binarized: one fixed (static) draw by its authors"
    return unused


def available_memory(device):
    """Bytes of memory on the device that would hold the model: the GPU's, or the machine's."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_new_experiment(out, overwrite):
    """Refuse a folder that holds an earlier experiment (experiment.json) unless `overwrite`:
    experiments are run whole, not resumed. The marker is written once the data have loaded."""
    if (out / "experiment.json").exists() and not overwrite:
        raise TrainingError(f"{out} holds an earlier experiment (experiment.json); run it again with "
                            "`overwrite=True`, or write to another directory")
