"""The main job of `run.py`: train a model (or run one of its family's experiments), then let the
family report what the trained model does, and write metrics.json and report.html."""

from dataclasses import asdict
from pathlib import Path

from .config import SettingError
from .data import load_dataset
from .family import RunContext
from .files import write_json
from .models import family_of
from .report import describe, write_report
from .train import train


def run(cfg, out, experiment=None, resume=False, progress=True, download=True, log=print):
    """One training run (or an experiment), its report, and a printed summary; returns the summary."""
    out = Path(out)
    family = family_of(cfg.model)
    family.check_choices(cfg.guide, cfg.elbo)
    if experiment is not None and experiment not in family.experiments:
        raise SettingError(f"unknown `experiment={experiment}` for model {cfg.model}; choose from: "
                           f"{', '.join(family.experiments) or 'none'}")
    model = family(**cfg.model_args).to(cfg.device)
    data = load_dataset(cfg.dataset, binarize=cfg.binarize, data_dir=cfg.data_dir, device=cfg.device,
                        seed=cfg.seed, download=download, progress=progress)
    splits = [f"{split} {data.images[split].shape[0]:,} digits from {data.sources[split]}" for split in data.splits]
    log(f"{model.summary()}, guide '{cfg.guide}'; {cfg.dataset} ({data.binarize} binarization): " + ", ".join(splits))
    if experiment:
        out.mkdir(parents=True, exist_ok=True)
        return family.experiments[experiment].run(family, cfg, data, out, progress, log)
    summary = train(model, data, cfg, out, resume=resume, progress=progress, log=log,
                    after_epoch=model.epoch_hook(out, cfg))
    report = model.report(RunContext(data, cfg, out, summary, download, log))
    summary.update(report.findings)
    write_json(summary, out / "metrics.json")
    write_report(out, asdict(cfg), summary, report.figures)
    log(describe(summary, out))
    return summary
