"""The `mllm-missing` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mllm_missing.errors import MllmMissingError

__all__ = ["build_parser", "main"]

# Flags of `quickstart`: (flag, QuickstartConfig field, type, help).
_QUICKSTART_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--output-dir", "output_dir", str, "where results go (default runs/quickstart)"),
    ("--cache-dir", "cache_dir", str, "dataset/feature cache (default ~/.cache/mllm_missing)"),
    ("--train-missing", "train_missing", str, "missing setting at train time, TYPE:RATE"),
    ("--epochs", "epochs", int, "training epochs per method"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--lr", "lr", float, "learning rate"),
    ("--image-size", "image_size", int, "image encoder resolution"),
    ("--seed", "seed", int, "seed of masks and training"),
    ("--limit-train", "limit_train", int, "use only the first N training questions"),
    ("--limit-test", "limit_test", int, "use only the first N test questions"),
    ("--threads", "threads", int, "torch CPU threads (0: torch's default)"),
]


def _add_quickstart(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "quickstart",
        help="train and evaluate on easy-VQA with the offline default encoders",
        description="Train small heads over frozen EfficientNet-Lite0 + MiniLM on easy-VQA with "
        "missing modalities, evaluate at several test missing rates, write results.json, "
        "results.md and a plot. Settings come from the defaults, then --config, then flags and "
        "key=value overrides.",
    )
    parser.add_argument("--config", default=None, help="YAML file of QuickstartConfig fields")
    for flag, _, kind, text in _QUICKSTART_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--methods", nargs="+", default=None, help="ways of handling absence")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any config field")


_PREPARE = {
    "mmimdb": ("mllm_missing.data.mmimdb:prepare_mmimdb", "folder holding split.json and dataset/"),
    "hateful_memes": (
        "mllm_missing.data.hateful_memes:prepare_hateful_memes",
        "folder holding the five split .jsonl files and img/",
    ),
}


def _add_prepare(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="validate and cache a raw MM-IMDb or Hateful Memes download",
        description="Build and cache every split of a dataset from its official files and print "
        "the sample and skipped-record counts per split.",
    )
    parser.add_argument("dataset", choices=sorted(_PREPARE))
    parser.add_argument("root", help="; ".join(f"{k}: {v[1]}" for k, v in _PREPARE.items()))
    parser.add_argument(
        "--text-mode",
        choices=("movie", "plot"),
        default=None,
        help="mmimdb only: one sample per movie (default) or per (movie, plot) pair",
    )
    parser.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="stop at the first bad record (default) or skip bad records and count them",
    )
    parser.add_argument("--cache-dir", default=None, help="default ~/.cache/mllm_missing")


def _run_prepare(args: argparse.Namespace) -> int:
    import importlib

    from mllm_missing.data.base import skipped_records
    from mllm_missing.errors import ConfigError

    target, _ = _PREPARE[args.dataset]
    module, _, name = target.partition(":")
    prepare = getattr(importlib.import_module(module), name)
    options: dict[str, Any] = {"on_error": args.on_error, "cache_dir": args.cache_dir}
    if args.text_mode is not None:
        if args.dataset != "mmimdb":
            raise ConfigError("--text-mode applies to mmimdb only")
        options["text_mode"] = args.text_mode
    for split, dataset in prepare(args.root, **options).items():
        labels = "labelled" if "label" in dataset.column_names else "no labels"
        skipped = len(skipped_records(dataset))
        print(f"{split}: {len(dataset)} samples ({labels}), {skipped} bad records skipped")
    return 0


def _add_backbones(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "backbones",
        help="list the backbone presets and whether each loads offline here",
        description="List the backbone presets (backbones/presets/*.json) with their modalities, "
        "hidden sizes and default LoRA targets, and whether each loads on this machine "
        "without a network.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_backbones(args: argparse.Namespace) -> int:
    import json

    from mllm_missing.backbones.presets import list_presets, preset_status

    rows: list[dict[str, Any]] = []
    for preset in list_presets():
        ok, reason = preset_status(preset)
        rows.append(
            {
                "name": preset.name,
                "family": preset.family,
                "modalities": [m.value for m in preset.modalities],
                "hidden_size": {m.value: h for m, h in preset.hidden_size.items()},
                "dtype": preset.dtype,
                "lora_targets": list(preset.lora_targets),
                "offline": ok,
                "why": reason,
                "description": preset.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        "| preset | family | modalities (hidden size) | dtype | LoRA targets | loads offline here |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        towers = ", ".join(f"{m} ({h})" for m, h in row["hidden_size"].items())
        status = ("yes: " if row["offline"] else "no: ") + row["why"]
        targets = ", ".join(row["lora_targets"])
        print(
            f"| {row['name']} | {row['family']} | {towers} | {row['dtype']} | {targets} | {status} |"
        )
    return 0


def _run_quickstart(args: argparse.Namespace) -> int:
    from mllm_missing.config import load_config, parse_overrides
    from mllm_missing.quickstart import QuickstartConfig, run_quickstart
    from mllm_missing.report import summary_table

    overrides: dict[str, Any] = {
        field: getattr(args, flag[2:].replace("-", "_"))
        for flag, field, _, _ in _QUICKSTART_FLAGS
        if getattr(args, flag[2:].replace("-", "_")) is not None
    }
    if args.methods is not None:
        overrides["methods"] = list(args.methods)
    overrides.update(parse_overrides(args.overrides))
    config = load_config(QuickstartConfig, args.config, overrides)
    results = run_quickstart(config)
    print(f"\neasy-VQA test accuracy, heads trained with {results['train_label']}:\n")
    print(summary_table(results))
    samples = results["samples"]
    print(f"\n{samples['train']} train / {samples['test']} test questions; ", end="")
    print(f"finished in {results['seconds']['total']:.0f} s; results in {config.output_dir}/")
    return 0


def _add_train(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a strategy + head with a recipe config",
        description="Train a strategy (missing-aware prompts, LoRA, ...) and a task head over a "
        "frozen backbone, keep the best validation checkpoint, score it on the test split. "
        "Settings: the YAML CONFIG, then key=value overrides (strategy.FIELD=value sets one "
        "strategy field); everything is checked before any work.",
    )
    parser.add_argument("config", help="recipe YAML, e.g. recipes/configs/easy_vqa/...yaml")
    parser.add_argument(
        "--resume", action="store_true", help="continue from output_dir's last checkpoint"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="any config field")


def _run_train(args: argparse.Namespace) -> int:
    from mllm_missing.training.config import load_train_config
    from mllm_missing.training.supervised import run_training

    config = load_train_config(args.config, args.overrides)
    results = run_training(config, resume=args.resume)
    trainable, frozen = results["trainable_parameters"], results["frozen_parameters"]
    print(
        f"\n{results['task']} / {results['strategy']['method']}: {trainable:,} trainable "
        f"parameters ({100 * trainable / max(frozen, 1):.3f} % of {frozen:,} frozen)"
    )
    print(
        f"best validation {results['metric']}: {results['best_val']:.4f} "
        f"(epoch {results['best_epoch']})"
    )
    for row in results["test"]:
        low, high = row["ci95"]
        value = row["metrics"][results["metric"]]
        print(f"test {row['missing']}: {results['metric']} {value:.4f} [{low:.4f}, {high:.4f}]")
    print(f"results in {config.output_dir}/results.json")
    return 0


def _add_chat(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a trained checkpoint or the projector VLM, giving any of text, an image "
        "and audio",
        description="Ask a checkpoint from `mllm-missing train` (--checkpoint) or the easy-VQA "
        "projector VLM (--vlm) questions with partial inputs: type text, attach /image PATH and "
        "/audio PATH (Whisper tiny.en transcribes speech). Each answer says which modalities "
        "were used and missing and which modules ran; with --vlm and the image absent, which "
        "prompt the scheduler chose (the learned missing-image tokens or the status line) and "
        "why. --web serves the same chat as a page on localhost.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="classifier: training output_dir or its best/")
    model.add_argument(
        "--vlm",
        metavar="DIR",
        help="projector VLM: recipes/easy_vqa_vlm.py's output_dir or its best/",
    )
    parser.add_argument(
        "--scheduler",
        choices=("fixed", "rule", "llm"),
        default=None,
        help="--vlm: who picks the prompt for an absent image (default fixed): fixed (--prompt), "
        "rule (best score per prompt: --scores, else the recipe's validation scores in its "
        "results.json) or llm "
        "(SmolLM2 ranks the prompts, offline)",
    )
    parser.add_argument(
        "--prompt",
        choices=("learned", "status_text"),
        default=None,
        help="--vlm with --scheduler fixed: the prompt (default learned)",
    )
    parser.add_argument(
        "--scores",
        metavar="FILE",
        default=None,
        help='--vlm: scores per prompt, {"scores": {"learned": {"text": S}, "status_text": '
        '{"text": S}}} (default: the recipe\'s results.json, validation scores; test ones, '
        "said so, only when it has none)",
    )
    parser.add_argument(
        "--scheduler-llm",
        default="smollm2-135m-instruct",
        help="--vlm --scheduler llm: smollm2-135m-instruct (the VLM's own LM, shared) or a path",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=16, help="--vlm: answer length limit (default 16)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), auto or cuda[:N]")
    parser.add_argument("--web", action="store_true", help="serve a web page instead")
    parser.add_argument("--host", default="127.0.0.1", help="web: address (default loopback)")
    parser.add_argument("--port", type=int, default=8765, help="web: port (default 8765)")
    parser.add_argument(
        "--max-file-mb", type=float, default=10.0, help="largest image / audio file (MB)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def _run_chat(args: argparse.Namespace) -> int:
    import torch

    from mllm_missing.chat import ChatLimits, ChatSession, ClassifierAnswerer, WhisperTranscriber
    from mllm_missing.errors import ConfigError

    if args.checkpoint is not None:
        used = [f for f in ("scheduler", "prompt", "scores") if getattr(args, f) is not None]
        if used:
            raise ConfigError(
                f"--{used[0]} applies to --vlm only (a classifier checkpoint runs its own modules)"
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = ChatLimits(max_file_bytes=int(args.max_file_mb * 1024 * 1024))
    if args.vlm is not None:
        session, banner = _vlm_session(args, limits)
    else:
        from mllm_missing.inference.predict import load_checkpoint

        model = load_checkpoint(args.checkpoint, device=args.device)
        device = str(next(model.parameters()).device)  # "auto" resolved by load_checkpoint
        session = ChatSession(
            ClassifierAnswerer(model), transcriber=WhisperTranscriber(device=device), limits=limits
        )
        labels = ", ".join(model.spec.get("label_names") or [])
        banner = (
            f"mllm-missing chat with {args.checkpoint} ({model.spec.get('task')}: {labels}); "
            "/help for commands"
        )
    if args.web:
        from mllm_missing.chat.web import serve

        if args.vlm is not None:  # what the scheduler reads, before the address
            print(banner.rsplit("\n", 1)[0], flush=True)
        serve(session, args.host, args.port)
        return 0
    from mllm_missing.chat.terminal import run_repl

    run_repl(session, sys.stdin, sys.stdout, banner=banner)
    return 0


def _vlm_session(args: argparse.Namespace, limits: Any) -> tuple[Any, str]:
    """The chat session over the projector VLM and its banner; every argument is checked
    before a model loads."""
    from mllm_missing.backbones.hf import SMOLLM2_NAME
    from mllm_missing.chat import ChatSession, VLMAnswerer, WhisperTranscriber
    from mllm_missing.chat.vlm import build_vlm_scheduler, find_vlm
    from mllm_missing.errors import ConfigError
    from mllm_missing.training.vlm import load_trained_vlm

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    kind = args.scheduler or "fixed"
    checkpoint = find_vlm(args.vlm)
    if not args.verbose:  # each answer prints the decision and its rationale already
        logging.getLogger("mllm_missing.scheduler").setLevel(logging.WARNING)
    # Built once before the models load, so a bad --prompt or missing scores fails at once.
    options = {"prompt": args.prompt, "scores_file": args.scores, "llm_name": args.scheduler_llm}
    scheduler, lines = build_vlm_scheduler(kind, checkpoint, **options)
    vlm = load_trained_vlm(checkpoint.directory, device=args.device)
    if kind == "llm" and args.scheduler_llm == SMOLLM2_NAME:
        # The scheduler's SmolLM2 is the VLM's own frozen LM: loaded once, not twice.
        scheduler, lines = build_vlm_scheduler(kind, checkpoint, llm=vlm.vlm.lm, **options)
        lines[0] += " (its LLM: the VLM's own SmolLM2)"
    answerer = VLMAnswerer(vlm, max_new_tokens=args.max_new_tokens)
    session = ChatSession(
        answerer, scheduler=scheduler, transcriber=WhisperTranscriber(device=args.device),
        limits=limits,
    )  # fmt: skip
    banner = "\n".join(
        [f"mllm-missing chat with the projector VLM {checkpoint.directory} (image + text)",
         *lines, "/help for commands"]
    )  # fmt: skip
    return session, banner


def _add_eval(subparsers: Any) -> None:
    # evals.run imports nothing heavy at module level; torch and the models load in _run_eval.
    from evals.run import add_arguments

    parser = subparsers.add_parser(
        "eval",
        help="evaluate trained checkpoints under missing modalities (tables, plots, anchors)",
        description="Score checkpoints from `mllm-missing train` on MM-IMDb, Hateful Memes or "
        "easy-VQA at test missing settings from seeded mask tables; write results.json, "
        "results.md and a plot. Resumable: each (checkpoint, setting) result is saved when done.",
    )
    add_arguments(parser)


def _run_eval(args: argparse.Namespace) -> int:
    from evals.run import run_from_args

    return run_from_args(args)


def _add_predict(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict with a trained checkpoint over a dataset split or a JSONL of requests",
        description="Run a checkpoint from `mllm-missing train` on requests with any modalities "
        "missing, batched by presence pattern; write one JSON line per request (id, presence, "
        "modules, prediction with label name(s) and scores). A request line holds an optional "
        "id and any of image (path), text, audio (path).",
    )
    parser.add_argument("--checkpoint", required=True, help="training output_dir or its best/")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=("easy_vqa", "mmimdb", "hateful_memes"))
    source.add_argument("--requests", metavar="FILE.jsonl", help="one JSON request per line")
    parser.add_argument("--output", required=True, metavar="preds.jsonl")
    parser.add_argument("--split", default="test", help="dataset split (default test)")
    parser.add_argument("--data-root", default=None, help="mmimdb / hateful_memes files")
    parser.add_argument("--missing", default=None, help="dataset only: TYPE:RATE (seeded mask)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --missing mask")
    parser.add_argument("--limit", type=int, default=None, help="first N dataset samples only")
    parser.add_argument("--on-error", choices=("stop", "skip"), default="stop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--quantization", default=None, choices=("none", "int8", "nf4", "fp4"))
    parser.add_argument("--cache-dir", default=None, help="default ~/.cache/mllm_missing")


def _run_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mllm_missing.inference.engine import InferenceEngine
    from mllm_missing.inference.predict import (
        dataset_samples,
        load_checkpoint,
        read_requests,
        run_predict,
    )

    model = load_checkpoint(args.checkpoint, device=args.device, quantization=args.quantization)
    engine = InferenceEngine(model, batch_size=args.batch_size)
    if args.requests:
        requests = read_requests(args.requests, args.on_error)
        samples, lines, errors = requests.samples, requests.lines, requests.errors
    else:
        samples = dataset_samples(
            args.dataset, args.split, data_root=args.data_root, missing=args.missing,
            seed=args.seed, mask_root=Path(args.output).parent / "masks", limit=args.limit,
            cache_dir=args.cache_dir,
        )  # fmt: skip
        lines, errors = [], []
    counts = run_predict(
        engine, samples, args.output, errors=errors, lines=lines, on_error=args.on_error
    )
    print(
        f"{counts['predicted']} predictions ({counts['skipped']} requests skipped) in "
        f"{args.output}; {engine.selector_calls} presence pattern(s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mllm-missing`."""
    from mllm_missing import __version__

    parser = argparse.ArgumentParser(prog="mllm-missing", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_backbones(subparsers)
    _add_chat(subparsers)
    _add_eval(subparsers)
    _add_predict(subparsers)
    _add_prepare(subparsers)
    _add_quickstart(subparsers)
    _add_train(subparsers)
    return parser


_COMMANDS = {
    "backbones": _run_backbones,
    "chat": _run_chat,
    "eval": _run_eval,
    "predict": _run_predict,
    "prepare": _run_prepare,
    "quickstart": _run_quickstart,
    "train": _run_train,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse `argv`, run the command, turn package errors into a message + exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except MllmMissingError as exc:
        print(f"mllm-missing {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
