"""Decoding throughput and memory: `StaticDecoder` vs plain ``generate``, bf16 / int8 / NF4.

Random weights at a real size (default: the Llama-2-7B shape), greedy, side by side in one run:
for each precision the same model decodes the same prompts with plain ``generate`` (dynamic
cache), ``generate`` with a static cache, and our static-cache + CUDA-graph decoder. Prints a
markdown table of tokens/s, the ratio to plain ``generate``, peak memory, and how many rows came
out identical to plain ``generate``; ``--json`` writes every figure.

    python scripts/bench_inference.py                       # the 7B table (needs a CUDA GPU)
    python scripts/bench_inference.py --shape tiny --device cpu --modes bf16   # a smoke run

int8 / NF4 need bitsandbytes (``pip install 'mllm-missing[quant]'``) and CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch

from mllm_missing.atomic import atomic_write_text
from mllm_missing.inference.decoding import StaticDecoder

SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
GIB = 1024**3


def build_model(shape: str, mode: str, device: torch.device, seed: int) -> Any:
    """A random-weight Llama of `shape` in `mode` (bf16, int8 or nf4) on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, eos_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if mode != "bf16":
        from mllm_missing.inference.quantization import QuantizationConfig, quantize_model

        model = quantize_model(model, QuantizationConfig(mode=mode), device=device)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeats: int) -> tuple[float, Any, float]:
    """(best seconds over `repeats`, last output, peak GiB allocated during the calls)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    return best, out, peak


def bench_mode(
    args: argparse.Namespace, mode: str, device: torch.device, emit: Any = None
) -> list[dict[str, Any]]:
    """Every batch size of one precision; returns one row per (batch, method), handing each to
    `emit` as soon as it is measured (so a run cut short keeps what it measured)."""
    model = build_model(args.shape, mode, device, args.seed)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else 0.0
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    decoder = StaticDecoder(model, max_length=args.prompt + args.new - 1)  # as generate sizes it
    for batch in args.batches:
        generator = torch.Generator().manual_seed(args.seed + batch)
        ids = torch.randint(3, vocab, (batch, args.prompt), generator=generator).to(device)
        common = {"do_sample": False, "pad_token_id": 0}

        def plain(
            ids: Any = ids, common: Any = common, model: Any = model, new: int = args.new
        ) -> Any:
            return model.generate(input_ids=ids, **common, max_new_tokens=new)

        def static(
            ids: Any = ids, common: Any = common, model: Any = model, new: int = args.new
        ) -> Any:
            return model.generate(
                input_ids=ids,
                cache_implementation="static",
                disable_compile=True,
                max_new_tokens=new,
                **common,
            )

        def ours(ids: Any = ids, decoder: Any = decoder, new: int = args.new) -> Any:
            return decoder.generate(ids, max_new_tokens=new).sequences

        methods = [("plain generate", plain), ("ours (static + CUDA graph)", ours)]
        if args.static_generate:
            methods.insert(1, ("generate, static cache", static))
        references: dict[str, torch.Tensor] = {}
        for name, fn in methods:
            fn(new=min(4, args.new))  # warm-up (and, for ours, the graph capture)
            seconds, out, peak = timed(fn, device, args.repeats)
            new = out[:, args.prompt :]
            references.setdefault("plain", new)
            if name.startswith("generate, static"):
                references["static"] = new
            row_match = {
                f"rows_identical_to_{ref}": f"{int((new == old).all(1).sum())}/{batch}"
                for ref, old in references.items()
            }
            agree = float((new == references["plain"]).float().mean())
            rows.append(
                {
                    "mode": mode,
                    "batch": batch,
                    "method": name,
                    "seconds": seconds,
                    "tokens_per_s": batch * args.new / seconds,
                    "weights_gib": weights,
                    "cuda_graph": bool(decoder.cuda_graph) if name.startswith("ours") else None,
                    "peak_gib": peak,
                    "token_agreement_with_plain": agree,
                    **row_match,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if emit is not None:
                emit(rows[-1])
    del model, decoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: tokens/s with the ratio to plain generate of the same precision and batch."""
    base = {
        (r["mode"], r["batch"]): r["tokens_per_s"] for r in rows if r["method"] == "plain generate"
    }
    lines = [
        "| precision | batch | method | tokens/s | vs plain generate | weights GiB | peak GiB "
        "| rows identical to plain generate | token agreement with plain | rows identical to "
        "static-cache generate |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / base[(r["mode"], r["batch"])]
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['method']} | {r['tokens_per_s']:,.1f} | "
            f"{ratio:.2f}x | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | "
            f"{r['rows_identical_to_plain']} | {r['token_agreement_with_plain']:.3f} | "
            f"{r.get('rows_identical_to_static', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    parser.add_argument("--modes", nargs="+", default=["bf16", "int8", "nf4"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls (best kept)")
    parser.add_argument(
        "--static-generate", action="store_true", help="also time generate with a static cache"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every row to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu for a smoke run")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if args.json:  # rewritten after every row: a run cut by its time limit keeps its rows
            atomic_write_text(args.json, json.dumps({"device": name, "rows": rows}, indent=2))

    failed = []
    for mode in args.modes:
        try:
            bench_mode(args, mode, device, emit)
        except Exception as exc:  # one precision failing must not lose the others' figures
            failed.append(mode)
            print(f"{mode}: failed: {type(exc).__name__}: {exc}", flush=True)
    print(
        f"\ndevice: {name}; torch {torch.__version__}; shape {args.shape}; prompt {args.prompt}"
        f" + {args.new} new tokens, greedy\n"
    )
    print(markdown(rows))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
