"""Cost of the LLM scheduler per 10,000 inputs, against running the modules alone.

The same easy-VQA test requests (70 % missing-both: 30 % complete, 35 % image only, 35 % text
only, seeded) go through `InferenceEngine` on the offline default twice: with the fixed module
(one checkpoint) and with the ``llm`` scheduler (SmolLM2) choosing among the candidate
checkpoints per presence pattern. Decisions are cached per (task, pattern), so 10,000 inputs cost
one LLM decision per distinct pattern. Also timed: loading the LLM, the first decision, and the
scheduler alone over the 10,000 presences. Prints JSON and the ratios.

    python scripts/bench_scheduler.py --checkpoint zero+concat=runs/a --checkpoint mean+gated=runs/b \\
        --validation-scores runs/val/pattern_scores.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mllm_missing.inference.engine import InferenceEngine, ModuleChoice, model_choice
from mllm_missing.types import Modality, Presence, Sample


def make_requests(count: int, seed: int) -> list[Sample]:
    """`count` easy-VQA test requests (cycling through the split), 30/35/35 % patterns."""
    from mllm_missing.data.easy_vqa import load_easy_vqa

    dataset = load_easy_vqa(split="test")
    rng = np.random.default_rng(seed)
    kinds = ["both"] * round(0.3 * count) + ["image"] * round(0.35 * count)
    kinds += ["text"] * (count - len(kinds))
    rng.shuffle(kinds)
    images: dict[int, Any] = {}  # one PIL object per image, so the engine encodes it once
    samples = []
    for i, kind in enumerate(kinds):
        row = dataset[i % len(dataset)]
        payloads: dict[Modality, Any] = {}
        if kind in ("both", "image"):
            payloads[Modality.IMAGE] = images.setdefault(row["image_id"], row["image"])
        if kind in ("both", "text"):
            payloads[Modality.TEXT] = row["text"]
        samples.append(Sample(Presence(frozenset(payloads)), payloads, id=f"{row['id']}-{i}"))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--validation-scores", help="pattern_scores.json of a --split val eval")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="engine runs per mode (min)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mllm_missing.model import MissingModalityModel
    from mllm_missing.scheduler import (
        LLMScheduler,
        SchedulerConfig,
        get_module_catalog,
        load_scheduler_llm,
        load_validation_scores,
    )
    from mllm_missing.training.supervised import load_backbone

    backbone = load_backbone(
        "offline-default", weights=None, image_size=128, device=torch.device("cpu")
    )
    models = []
    for spec in args.checkpoint:
        folder = Path(spec.partition("=")[2] or spec)
        if not (folder / "model_config.json").is_file():
            folder = folder / "best"  # a training output_dir
        models.append(MissingModalityModel.from_pretrained(folder, backbone=backbone))
    main_model = models[0]
    candidates = {model_choice(m): m for m in models[1:]}
    requests = make_requests(args.requests, args.seed)
    scores = load_validation_scores(args.validation_scores) if args.validation_scores else None
    options = tuple(str(model_choice(m)) for m in models)
    config = SchedulerConfig(
        kind="llm",
        task="easy-VQA: answer a question about a picture of one coloured shape",
        options=options,
    )

    catalog = get_module_catalog(scores)
    started = time.perf_counter()
    llm = load_scheduler_llm(config.llm)
    load_seconds = time.perf_counter() - started

    # The scheduler alone over the requests' presences: one LLM decision per pattern.
    scheduler = LLMScheduler(config, catalog, llm=llm)
    started = time.perf_counter()
    scheduler(requests[0].presence)
    first_decision = time.perf_counter() - started
    for sample in requests[1:]:
        scheduler(sample.presence)
    scheduler_alone = time.perf_counter() - started

    fixed_times: list[float] = []
    llm_times: list[float] = []
    for repeat in range(args.repeats):  # alternated, so drifting machine load hits both
        for kind in ("fixed", "llm") if repeat % 2 == 0 else ("llm", "fixed"):
            if kind == "fixed":
                engine = InferenceEngine(main_model, batch_size=args.batch_size)
            else:  # a fresh scheduler: every run pays its LLM decisions
                routed = LLMScheduler(config, catalog, llm=llm)
                engine = InferenceEngine(
                    main_model, selector=routed, candidates=candidates, batch_size=args.batch_size
                )
            started = time.perf_counter()
            engine.predict(requests)
            (fixed_times if kind == "fixed" else llm_times).append(time.perf_counter() - started)
            if kind == "llm":
                llm_engine, routed_scheduler = engine, routed
    fixed_seconds, llm_seconds = min(fixed_times), min(llm_times)
    chosen: dict[str, ModuleChoice] = {
        p: d.choice for (_, p), d in routed_scheduler.decisions().items()
    }

    result = {
        "requests": len(requests),
        "patterns": sorted(chosen),
        "llm_load_seconds": round(load_seconds, 2),
        "first_decision_seconds": round(first_decision, 2),
        "scheduler_alone_seconds": round(scheduler_alone, 2),
        "scheduler_llm_calls": scheduler.llm_calls,
        "scheduler_cache_hits": scheduler.cache_hits,
        "scheduler_llm_seconds": round(scheduler.llm_seconds, 2),
        "cache_hits_seconds": round(scheduler_alone - scheduler.llm_seconds, 3),
        "engine_fixed_runs": [round(x, 2) for x in fixed_times],
        "engine_llm_runs": [round(x, 2) for x in llm_times],
        "engine_fixed_seconds": round(fixed_seconds, 2),
        "engine_llm_seconds": round(llm_seconds, 2),
        "engine_selector_calls": llm_engine.selector_calls,
        "overhead_seconds": round(llm_seconds - fixed_seconds, 2),
        "overhead_ratio": round(llm_seconds / fixed_seconds, 3),
        "choices": {p: str(c) for p, c in sorted(chosen.items())},
        "threads": args.threads,
    }
    print(json.dumps(result, indent=2))
    print(
        f"{len(requests)} requests: fixed module {fixed_seconds:.1f} s, llm scheduler "
        f"{llm_seconds:.1f} s ({llm_seconds / fixed_seconds:.2f}x, "
        f"{llm_engine.selector_calls} LLM decisions per run); the scheduler alone "
        f"{scheduler_alone:.1f} s, "
        f"its first decision {first_decision:.1f} s after a {load_seconds:.1f} s LLM load"
    )


if __name__ == "__main__":
    main()
