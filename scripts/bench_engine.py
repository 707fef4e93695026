"""Inference engine throughput with a per-pattern module selector vs a fixed module.

The engine asks its selector once per distinct presence pattern and caches the answer, so a
selector's cost is paid per pattern, not per request. This measures what that costs end to end:
the same requests (70 % missing-both: 30 % complete, 35 % image only, 35 % text only) through
`InferenceEngine` with `fixed_selector` and with a rule selector consulted per pattern, timed
alternately, best of `--repeats`. A fresh engine per timed call, so every call pays its
selector calls. Prints requests/s and the overhead.

    python scripts/bench_engine.py                                  # CLIP ViT-B/16 (CUDA)
    python scripts/bench_engine.py --model tiny --device cpu --requests 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mllm_missing.backbones.clip import load_clip
from mllm_missing.inference.engine import InferenceEngine, ModuleChoice, fixed_selector
from mllm_missing.model import build_model
from mllm_missing.strategies.testing import TINY_CLIP_CONFIG
from mllm_missing.types import Modality, Presence, Sample

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
WORDS = [
    "what",
    "shape",
    "colour",
    "is",
    "the",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "in",
    "image",
    "there",
    "a",
]


def make_requests(count: int, size: int, seed: int) -> list[Sample]:
    """`count` requests, 30 % complete, 35 % image only, 35 % text only, shuffled."""
    rng = np.random.default_rng(seed)
    kinds = ["both"] * round(0.3 * count) + ["image"] * round(0.35 * count)
    kinds += ["text"] * (count - len(kinds))
    rng.shuffle(kinds)
    samples = []
    for i, kind in enumerate(kinds):
        payloads: dict[Modality, Any] = {}
        if kind in ("both", "image"):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            payloads[IMAGE] = Image.fromarray(pixels)
        if kind in ("both", "text"):
            payloads[TEXT] = " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12))))
        samples.append(Sample(Presence(frozenset(payloads)), payloads, id=str(i)))
    return samples


class RuleSelector:
    """A per-pattern table lookup standing in for a scheduler (answers are cached by the engine)."""

    def __init__(self, table: dict[str, ModuleChoice]) -> None:
        self.table = table
        self.calls = 0

    def __call__(self, presence: Presence) -> ModuleChoice:
        self.calls += 1
        return self.table[presence.pattern]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip name or 'tiny'")
    parser.add_argument("--requests", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    if args.model == "tiny":
        backbone = load_clip("tiny", model_cfg=TINY_CLIP_CONFIG, device=device)
    else:
        backbone = load_clip(args.model, None, device=device, dtype=torch.bfloat16)
    spec = {
        "backbone": args.model,
        "strategy": {"method": "none"},
        "imputation": "zero",
        "fusion": "concat",
        "hidden_size": 256,
        "routed_head": False,
        "task": "bench",
        "task_type": "multiclass",
        "num_labels": 13,
        "label_names": [f"answer_{i}" for i in range(13)],
        "modalities": ["image", "text"],
    }
    torch.manual_seed(0)
    dims = {m: backbone.embed_dim(m) for m in (IMAGE, TEXT)}
    model = build_model(spec, backbone, dims).to(device).eval()
    size = backbone.model.visual.image_size  # type: ignore[union-attr]
    size = size[0] if isinstance(size, (tuple, list)) else size
    samples = make_requests(args.requests, int(size), seed=0)
    choice = ModuleChoice("zero", "concat")
    rule = RuleSelector({"image+text": choice, "image": choice, "text": choice})

    def run(selector: Any) -> float:
        engine = InferenceEngine(model, selector=selector, batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        engine.predict(samples)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    run(fixed_selector("zero", "concat"))  # warm-up
    fixed, ruled = [], []
    for _ in range(args.repeats):
        fixed.append(run(fixed_selector("zero", "concat")))
        ruled.append(run(rule))
    best_fixed, best_rule = min(fixed), min(ruled)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": name,
        "model": args.model,
        "requests": args.requests,
        "fixed_s": fixed,
        "rule_s": ruled,
        "fixed_requests_per_s": args.requests / best_fixed,
        "rule_requests_per_s": args.requests / best_rule,
        "overhead": best_rule / best_fixed - 1,
        "selector_calls_per_run": rule.calls // (args.repeats),
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n{name}: {args.model}, {args.requests} requests: fixed {result['fixed_requests_per_s']:,.0f}"
        f" req/s, per-pattern selector {result['rule_requests_per_s']:,.0f} req/s, overhead "
        f"{100 * result['overhead']:+.2f} % ({result['selector_calls_per_run']} selector calls a run)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
