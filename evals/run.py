"""The evaluation runner: score trained checkpoints on a task under missing-modality settings.

``mllm-missing eval --task mmimdb --data-root DIR --checkpoint runs/x --missing both:0.7`` (or
``python -m evals.run ...``) loads the task's labelled split, evaluates every (checkpoint, test
setting) pair through the training code's own evaluation path (`evaluate_missing`: seeded mask
table, frozen features, the model, the metrics and a bootstrap interval), and writes
``results.json``, ``results.md`` and a plot. Each pair is saved as soon as it is done, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evals.config import (
    SWEEP_RATES,
    EvalConfig,
    Method,
    check_output,
    resolve_method,
    resolve_settings,
    run_identity,
)
from mllm_missing.atomic import atomic_write_text
from mllm_missing.errors import ConfigError, MllmMissingError

# EvalConfig, Method and resolve_settings live in evals.config; importing them from here works.
__all__ = [
    "SWEEP_RATES",
    "EvalConfig",
    "Method",
    "add_arguments",
    "main",
    "resolve_method",
    "resolve_settings",
    "run_eval",
]

logger = logging.getLogger(__name__)


def run_eval(
    config: EvalConfig,
    *,
    backbone_factory: Callable[[Method], Any] | None = None,
    scheduler_llm: Any = None,
) -> dict[str, Any]:
    """Evaluate every checkpoint at every test setting; write results.json, results.md, a plot.

    Args:
        config: the run's settings.
        backbone_factory: builds the frozen backbone of a checkpoint instead of its preset
            (tests pass tiny backbones built from configs).
        scheduler_llm: an already loaded LLM for the ``llm`` scheduler (tests pass a tiny one).

    Returns:
        The results written to ``output_dir/results.json``.
    """
    import torch
    from tqdm.auto import tqdm

    from evals.report import write_eval_results
    from evals.scheduling import PredictionKeeper, pattern_scores, scheduler_rows
    from evals.tasks import TASKS
    from mllm_missing.model import MissingModalityModel
    from mllm_missing.training.supervised import (
        feature_cache_tag,
        load_backbone,
        resolve_device,
    )

    started = time.perf_counter()
    settings = resolve_settings(config)
    task_class = TASKS.get(config.task)
    info = task_class.info
    methods = [resolve_method(spec, info) for spec in config.checkpoints]
    names = [m.name for m in methods]
    if len(set(names)) < len(names):
        raise ConfigError(f"checkpoint names must differ; got {names} (use NAME=DIR)")
    if config.text_mode is None:
        modes = {m.training.get("text_mode", "movie") for m in methods}
        config.text_mode = modes.pop() if len(modes) == 1 else "movie"
    options: dict[str, Any] = {"cache_dir": config.cache_dir}
    if config.task == "mmimdb":
        options["text_mode"] = config.text_mode
    task = task_class(config.data_root, **options)
    split = config.split or task.eval_split
    config.split = split
    dataset = _load_split(task, split, methods)
    task.references(dataset)  # a split without labels is refused before any work
    if config.limit:
        dataset = dataset.select(range(min(config.limit, len(dataset))))
    output = Path(config.output_dir)
    ident = check_output(config, run_identity(config, methods), output)
    atomic_write_text(output / "eval_config.json", json.dumps(ident, indent=2, sort_keys=True))
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)

    def row_path(method: Method, setting: Any) -> Path:
        return output / "rows" / method.name / f"{setting.slug}.json"

    def logits_path(method: Method, setting: Any) -> Path:
        return output / "logits" / method.name / f"{setting.slug}.pt"

    def done(method: Method, setting: Any) -> bool:
        return row_path(method, setting).is_file() and logits_path(method, setting).is_file()

    pending = [(m, s) for m in methods for s in settings if not done(m, s)]
    reused = len(methods) * len(settings) - len(pending)
    if reused:
        logger.info("resuming: %d of %d results already in %s", reused, reused + len(pending),
                    output)  # fmt: skip
    progress = tqdm(total=len(pending), desc=f"eval {config.task}", unit="setting")
    for method in methods:
        todo = [s for m, s in pending if m is method]
        if not todo:
            continue
        training = method.training
        image_size = int(training.get("image_size", 128))
        if backbone_factory is not None:
            backbone = backbone_factory(method)
        else:
            weights = config.backbone_weights or training.get("backbone_weights")
            # A QLoRA checkpoint was trained on a quantized LLM: evaluate it on the same one.
            backbone = load_backbone(
                method.spec["backbone"], weights=weights, image_size=image_size, device=device,
                quantization=str(training.get("quantization") or "none"),
            )  # fmt: skip
        model = MissingModalityModel.from_pretrained(method.path, backbone=backbone).to(device)
        for setting in todo:
            progress.set_postfix_str(f"{method.name} {setting.describe()}")
            keep = PredictionKeeper(info, logits_path(method, setting))
            row = evaluate_missing(
                model, dataset, split, info, setting,
                mask_root=output / "masks", cache_dir=config.cache_dir,
                cache_tag=feature_cache_tag(backbone, image_size), seed=config.seed,
                n_resamples=config.bootstrap, on_predictions=keep,
            )  # fmt: skip
            row = {"method": method.name, "train_missing": method.train_missing, **row,
                   "patterns": keep.patterns}  # fmt: skip
            text = json.dumps(row, indent=2, sort_keys=True)
            atomic_write_text(row_path(method, setting), text)
            progress.update(1)
        del model, backbone
    progress.close()
    rows = [
        json.loads(row_path(m, s).read_text(encoding="utf-8")) for m in methods for s in settings
    ]
    scores = pattern_scores(info, split, methods, rows)
    atomic_write_text(output / "pattern_scores.json", json.dumps(scores, indent=2, sort_keys=True))
    schedulers: dict[str, Any] = {}
    if config.schedulers:

        def load_logits(method: Method, setting: Any) -> dict[str, Any]:
            loaded: dict[str, Any] = torch.load(logits_path(method, setting))
            return loaded

        routed, schedulers = scheduler_rows(
            config, info, methods, settings, load_logits, llm=scheduler_llm
        )
        rows += routed
    return write_eval_results(
        config, info, methods, settings, rows, len(dataset),
        timing={"seconds": time.perf_counter() - started, "evaluated": len(pending),
                "reused": reused},
        schedulers=schedulers,
    )  # fmt: skip


def _load_split(task: Any, split: str, methods: Sequence[Method]) -> Any:
    """The split to score; ``val`` of a task without one is the share of train that training
    held out (`hold_out` with the checkpoints' training seed and val_fraction)."""
    from mllm_missing.training.config import DATASETS
    from mllm_missing.training.supervised import hold_out

    if split != "val" or "val" in task.splits:
        return task.load(split)
    own = DATASETS.get(task.info.name, (None, None, None))[1]
    if own is not None:
        raise ConfigError(f"split val: {task.info.name}'s validation split is {own!r}; pass "
                          f"--split {own}")  # fmt: skip
    held = {(m.training.get("seed"), m.training.get("val_fraction", 0.1)) for m in methods}
    seed, fraction = next(iter(held))
    if len(held) != 1 or seed is None:
        raise ConfigError(
            f"split val: {task.info.name} has no validation split; it is rebuilt from the "
            "checkpoints' training seed, which must be recorded and equal for all of them "
            f"(got seed, val_fraction {sorted(held, key=str)})"
        )
    return hold_out(task.load("train"), int(seed), float(fraction))[1]


def evaluate_missing(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """`mllm_missing.training.supervised.evaluate_missing` (the training code's evaluation)."""
    from mllm_missing.training.supervised import evaluate_missing as evaluate

    return evaluate(*args, **kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `mllm-missing eval` / `python -m evals.run`."""
    parser.add_argument("--task", required=True, choices=["easy_vqa", "hateful_memes", "mmimdb"])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR",
                        help="a training output_dir or its best/; repeat for several methods, "
                        "NAME= labels one")  # fmt: skip
    parser.add_argument("--data-root", help="folder of the official release (MM-IMDb, Hateful "
                        "Memes)")  # fmt: skip
    parser.add_argument("--split", help="split scored (default: test; test_seen for Hateful "
                        "Memes, whose test_unseen has no labels)")  # fmt: skip
    parser.add_argument("--missing", action="append", default=[], metavar="TYPE:RATE",
                        help="test setting, e.g. both:0.7 (repeatable; default both:0.7). Any "
                        "70%% setting also scores the all-present setting, for the robustness "
                        "ratio")  # fmt: skip
    parser.add_argument("--sweep", action="append", default=[], metavar="TYPE",
                        help="score TYPE at test rates 0, 0.1, ..., 1.0 (both at 1.0: every "
                        "sample loses one modality, half text, half image)")  # fmt: skip
    parser.add_argument("--compare", action="store_true",
                        help="print the published figures (MAP, DCP, SyP, MoRA; not re-run) "
                        "next to our rows for the same setting")  # fmt: skip
    parser.add_argument("--output-dir", default="runs/eval", help="default runs/eval")
    parser.add_argument("--seed", type=int, default=0, help="seed of masks and bootstrap")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--limit", type=int, help="score only the first N samples")
    parser.add_argument("--text-mode", choices=["movie", "plot"],
                        help="MM-IMDb: one sample per movie or per plot (default: the "
                        "checkpoint's)")  # fmt: skip
    parser.add_argument("--cache-dir", help="dataset/feature cache (default ~/.cache/mllm_missing)")
    parser.add_argument("--backbone-weights", help="local weights for hub backbones (CLIP)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard results in --output-dir made with other settings")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    parser.add_argument("--scheduler", action="append", default=[], metavar="KIND",
                        help="fixed, rule or llm (repeatable or a comma list): also score each "
                        "sample with the checkpoint the scheduler picks for its presence "
                        "pattern (give one checkpoint per imputation+fusion pair)")  # fmt: skip
    parser.add_argument(
        "--fixed",
        metavar="IMPUTATION+FUSION",
        help="the fixed scheduler's pair (default: the first checkpoint's)",
    )
    parser.add_argument("--validation-scores", metavar="JSON",
                        help="per-pattern validation scores: the pattern_scores.json of a "
                        "--split val run (rule needs them; llm shows them to its LLM)")  # fmt: skip
    parser.add_argument(
        "--scheduler-llm",
        default="smollm2-135m-instruct",
        help="the llm scheduler's model: smollm2-135m-instruct or a local path",
    )
    parser.add_argument("--scheduler-task", help="task description the LLM scheduler reads")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The `EvalConfig` of parsed flags."""
    return EvalConfig(
        task=args.task, checkpoints=tuple(args.checkpoint), data_root=args.data_root,
        split=args.split, missing=tuple(args.missing), sweep=tuple(args.sweep),
        compare=args.compare, output_dir=args.output_dir, seed=args.seed,
        bootstrap=args.bootstrap, device=args.device, limit=args.limit,
        text_mode=args.text_mode, cache_dir=args.cache_dir,
        backbone_weights=args.backbone_weights, overwrite=args.overwrite, threads=args.threads,
        schedulers=tuple(args.scheduler), fixed=args.fixed,
        validation_scores=args.validation_scores, scheduler_llm=args.scheduler_llm,
        scheduler_task=args.scheduler_task,
    )  # fmt: skip


def run_from_args(args: argparse.Namespace) -> int:
    """Run and print the tables (what the command line does)."""
    config = config_from_args(args)
    results = run_eval(config)
    print(results["markdown"])
    print(f"results in {config.output_dir}/ (results.json, results.md, plot)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m evals.run``: the same flags and output as ``mllm-missing eval``."""
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except MllmMissingError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
