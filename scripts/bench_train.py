"""Training throughput of MAP prompts on a frozen CLIP image tower vs the bare frozen backbone.

Side by side in one run, same batch of random images, bf16 weights:
  - bare frozen tower, forward only (no grad);
  - bare frozen tower, forward + backward to the input (what any prompt method must at least pay);
  - a full MAP training step (prompts picked per sample by its missing case, linear head,
    cross-entropy, backward, AdamW step) for input-level and attention-level prompts.
Prints images/s and each step's ratio to the bare forward + backward; ``--json`` writes them.

    python scripts/bench_train.py                              # ViT-L/14, batch 256 (CUDA GPU)
    python scripts/bench_train.py --model tiny --device cpu --batch 8   # a smoke run

Random weights (built from the open_clip config): throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mllm_missing.backbones.clip import load_clip
from mllm_missing.strategies.base import build_strategy, strategy_config_from_dict
from mllm_missing.types import Modality

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 4, "layers": 2},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Any, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of `step` (mean over `steps` after `warmup` calls)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14-quickgelu", help="open_clip name or 'tiny'")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument(
        "--prompt-layers",
        type=int,
        nargs="+",
        help="default: the first 6 blocks (fewer if the tower has fewer)",
    )
    parser.add_argument("--classes", type=int, default=23)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    dtype = torch.bfloat16
    if args.model == "tiny":
        backbone = load_clip("tiny", model_cfg=TINY, device=device, dtype=dtype)
    else:
        backbone = load_clip(args.model, None, device=device, dtype=dtype)
    if args.prompt_layers is None:
        args.prompt_layers = list(range(min(6, backbone.num_layers(Modality.IMAGE))))
    size = backbone.model.visual.image_size  # type: ignore[union-attr]
    size = size[0] if isinstance(size, (tuple, list)) else size
    torch.manual_seed(0)
    pixels = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
    inputs = {"pixel_values": pixels}
    presence = torch.zeros(args.batch, 3, dtype=torch.bool, device=device)
    presence[:, 0] = True  # every row has its image; 70 % missing-both over the text column
    presence[: int(0.3 * args.batch) + int(0.35 * args.batch), 1] = True
    presence[int(0.3 * args.batch) + int(0.35 * args.batch) :, 1] = False
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    image = Modality.IMAGE

    def forward_only() -> None:
        with torch.no_grad():
            backbone.encode(image, inputs).pooled.sum()

    def forward_backward() -> None:
        x = pixels.detach().requires_grad_(True)
        backbone.encode(image, {"pixel_values": x}).pooled.float().square().mean().backward()

    rows: list[dict[str, Any]] = []

    def record(name: str, seconds: float) -> None:
        rows.append({"step": name, "seconds": seconds, "images_per_s": args.batch / seconds})
        print(json.dumps(rows[-1]), flush=True)

    record(
        "bare frozen tower: forward only", measure(forward_only, device, args.warmup, args.steps)
    )
    record(
        "bare frozen tower: forward + backward to input",
        measure(forward_backward, device, args.warmup, args.steps),
    )
    for prompt_type in ("input", "attention"):
        config = strategy_config_from_dict(
            {
                "method": "map_prompts",
                "prompt_type": prompt_type,
                "prompt_length": args.prompt_length,
                "prompt_layers": args.prompt_layers,
                "modalities": ["image"],
            }
        )
        strategy = build_strategy(config, backbone, ["image", "text"]).to(device)
        head = torch.nn.Linear(backbone.embed_dim(image), args.classes).to(device)
        params = [*strategy.trainable_parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-3)

        def train_step(
            strategy: Any = strategy, head: Any = head, optimizer: Any = optimizer
        ) -> None:
            pooled = strategy.encode(backbone, image, inputs, presence).pooled
            loss = F.cross_entropy(head(pooled.float()), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        record(
            f"MAP prompts ({prompt_type}, {args.prompt_length} x {len(args.prompt_layers)} blocks): "
            "training step",
            measure(train_step, device, args.warmup, args.steps),
        )
    base = rows[1]["seconds"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\ndevice: {name}; torch {torch.__version__}; {args.model}, batch {args.batch}, bf16\n")
    print("| step | images/s | time vs bare forward + backward |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['images_per_s']:,.0f} | {row['seconds'] / base:.3f} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
