"""The device-map planner on declared budgets: blocks split contiguously, offload, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mllm_missing.backbones.testing import tiny_llama_config
from mllm_missing.errors import ConfigError
from mllm_missing.inference.device_map import plan_device_map

BLOCKS = 8


def config() -> Any:
    return tiny_llama_config(1000, hidden_size=64, intermediate_size=256, num_hidden_layers=BLOCKS)


def sizes() -> dict[str, int]:
    """Bytes (float32) of one block, the embedding, the head, and the whole model."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config())
    found = compute_module_sizes(model, dtype=torch.float32)
    return {
        "block": found["model.layers.0"],
        "embed": found["model.embed_tokens"],
        "head": found["lm_head"],
        "small": found["model.norm"] + found["model.rotary_emb"],
        "total": found[""],
        # accelerate keeps the largest part's size free on the first GPU (here the embedding)
        "reserve": max(found["model.layers.0"], found["model.embed_tokens"], found["lm_head"]),
    }


def test_two_gpus_each_take_half_the_blocks_in_order() -> None:
    s = sizes()
    # GPU 0: embedding + 4 blocks, plus the room accelerate keeps free on the first GPU
    gpu0 = s["embed"] + 4 * s["block"] + s["reserve"] + 1000
    gpu1 = 4 * s["block"] + s["small"] + s["head"] + 1000
    plan = plan_device_map(config(), {0: gpu0, 1: gpu1}, dtype=torch.float32, offload=None)
    assert plan.layers == {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert plan.device_map["model.embed_tokens"] == 0
    assert plan.device_map["lm_head"] == 1 and plan.device_map["model.norm"] == 1
    assert plan.bytes_per_device[0] == s["embed"] + 4 * s["block"]
    assert sum(plan.bytes_per_device.values()) == plan.total_bytes == s["total"]
    assert not plan.offloaded
    assert "0: " in plan.summary() and "blocks 0-3" in plan.summary()
    assert "blocks 4-7" in plan.summary()


def test_bfloat16_halves_the_sizes_so_one_gpu_holds_it() -> None:
    s = sizes()
    budget = s["embed"] + 4 * s["block"] + s["reserve"] + 1000  # about half the float32 model
    plan = plan_device_map(config(), {0: budget, 1: budget}, dtype="bfloat16", offload=None)
    assert plan.layers == {0: list(range(BLOCKS))}
    assert set(plan.device_map.values()) == {0}
    assert plan.total_bytes == s["total"] // 2


def test_small_budgets_offload_the_last_blocks_to_cpu() -> None:
    s = sizes()
    gpu = 3 * s["block"] + 1000
    gpu0 = s["embed"] + 2 * s["block"] + s["reserve"] + 1000
    plan = plan_device_map(config(), {0: gpu0, 1: gpu}, dtype=torch.float32)
    assert plan.layers[0] == [0, 1] and plan.layers[1] == [2, 3, 4]
    assert plan.layers["cpu"] == [5, 6, 7]
    assert plan.device_map["lm_head"] == "cpu" and "lm_head" in plan.offloaded
    assert plan.bytes_per_device["cpu"] == 3 * s["block"] + s["small"] + s["head"]


def test_budgets_too_small_without_offload_fail_with_sizes() -> None:
    s = sizes()
    with pytest.raises(ConfigError, match=r"does not fit .* offload=None.*allow offload='cpu'"):
        plan_device_map(config(), {0: s["total"] // 3, 1: s["total"] // 3}, offload=None,
                        dtype=torch.float32)  # fmt: skip
    # a CPU budget too small as well: disk is needed
    with pytest.raises(ConfigError, match="allow offload='disk'"):
        plan_device_map(config(), {0: s["total"] // 3, "cpu": s["block"]}, dtype=torch.float32)
    plan = plan_device_map(
        config(), {0: s["total"] // 3, "cpu": 2 * s["block"]}, dtype=torch.float32, offload="disk"
    )
    assert "disk" in plan.layers and plan.device_map["lm_head"] == "disk"


def test_bad_arguments_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="offload must be one of"):
        plan_device_map(config(), {0: "1GiB"}, offload="gpu")
    with pytest.raises(ConfigError, match=r"device 'cuda:0' must be a GPU index"):
        plan_device_map(config(), {"cuda:0": "1GiB"})
    with pytest.raises(ConfigError, match=r"max_memory\[0\]: 'lots' is not a size"):
        plan_device_map(config(), {0: "lots"})
    with pytest.raises(ConfigError, match="not a local model folder"):
        plan_device_map(str(tmp_path / "absent"), {0: "1GiB"})


def test_reads_a_model_folder_and_accepts_size_strings(tmp_path: Path) -> None:
    config().save_pretrained(str(tmp_path))
    plan = plan_device_map(tmp_path, {0: "1GiB", 1: "1GiB"}, offload=None)
    assert plan.layers == {0: list(range(BLOCKS))} and plan.budgets[1] == 2**30
