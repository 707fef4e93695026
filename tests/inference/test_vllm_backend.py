"""vLLM request building (no vLLM needed) and the backend's argument pass-through."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm_missing.errors import ConfigError, DataFormatError, MissingDependencyError
from mllm_missing.inference import vllm_backend
from mllm_missing.inference.vllm_backend import (
    AdapterRef,
    VLLMBackend,
    adapter_refs,
    build_requests,
)
from mllm_missing.types import Modality, Presence, Sample

IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
HIDDEN = 8


def sample(ident: str, *present: str, text: str = "what is shown?") -> Sample:
    payloads = {Modality.parse(m): (text if m == "text" else object()) for m in present}
    return Sample(Presence.of(*present), payloads, id=ident)


def adapter_dirs(root: Path, *cases: str) -> dict[str, Path]:
    folders = {}
    for case in cases:
        folder = root / case
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        folders[case] = folder
    return folders


def embed(text: str) -> torch.Tensor:
    """Fake token embeddings: one row per word, the row holding its word index."""
    words = text.split()
    return torch.arange(len(words), dtype=torch.float32)[:, None].repeat(1, HIDDEN)


def test_samples_route_to_their_case_adapter_with_stable_ids(tmp_path: Path) -> None:
    folders = adapter_dirs(tmp_path, "image+text", "text", "image")
    samples = [
        sample("a", "image", "text"),
        sample("b", "text"),
        sample("c", "image", "text"),
        sample("d", "image"),
    ]
    requests = build_requests(samples, adapters=folders, render=lambda s: f"q {s.id}")
    assert [r.case for r in requests] == ["image+text", "text", "image+text", "image"]
    assert [r.lora.lora_name for r in requests if r.lora] == [r.case for r in requests]
    # ids: the case's index among (image, text, image+text), plus one, whatever the dict order
    assert [r.lora.lora_int_id for r in requests if r.lora] == [3, 2, 3, 1]
    assert requests[1].lora == AdapterRef("text", 2, str(folders["text"]))
    reordered = dict(reversed(list(folders.items())))
    again = build_requests(samples, adapters=reordered, render=lambda s: f"q {s.id}")
    assert [r.lora for r in again] == [r.lora for r in requests]
    assert requests[0].to_vllm_prompt() == {"prompt": "q a"}


def test_a_shared_adapter_serves_cases_without_their_own(tmp_path: Path) -> None:
    folders = adapter_dirs(tmp_path, "default", "text")
    requests = build_requests([sample("a", "image", "text"), sample("b", "text")], adapters=folders)
    assert requests[0].lora == AdapterRef("default", 4, str(folders["default"]))
    assert requests[1].lora is not None and requests[1].lora.lora_int_id == 2
    assert build_requests([sample("a", "text")])[0].lora is None  # no adapters: the base model


def test_prompt_embeds_are_the_case_prompt_then_the_tokens() -> None:
    learned = {
        "image+text": torch.full((3, HIDDEN), 7.0),
        "text": torch.full((2, HIDDEN), -1.0),
    }
    samples = [sample("a", "image", "text", text="one two three four"), sample("b", "text")]
    requests = build_requests(samples, learned_prompts=learned, embed=embed)
    first = requests[0].to_vllm_prompt()["prompt_embeds"]
    assert first.shape == (3 + 4, HIDDEN)
    assert torch.equal(first[:3], learned["image+text"]) and torch.equal(
        first[3:], embed(samples[0].payloads[TEXT])
    )
    second = requests[1].to_vllm_prompt()["prompt_embeds"]
    assert second.shape == (2 + 3, HIDDEN) and torch.equal(second[:2], learned["text"])
    shared = build_requests(samples, learned_prompts=torch.ones(5, HIDDEN), embed=embed)
    assert [r.prompt_embeds.shape[0] for r in shared if r.prompt_embeds is not None] == [9, 8]


def test_request_building_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a missing case; allowed: image, text, image"):
        adapter_refs({"audio": tmp_path}, [IMAGE, TEXT])
    with pytest.raises(DataFormatError, match="has no adapter_config.json"):
        adapter_refs({"text": tmp_path}, [IMAGE, TEXT])
    with pytest.raises(ConfigError, match="need embed="):
        build_requests([sample("a", "text")], learned_prompts=torch.ones(2, HIDDEN))
    with pytest.raises(ConfigError, match="no prompt for case 'image\\+text'"):
        build_requests(
            [sample("a", "image", "text")],
            learned_prompts={"text": torch.ones(2, HIDDEN)},
            embed=embed,
        )
    with pytest.raises(ConfigError, match="same width"):
        build_requests(
            [sample("a", "text")], learned_prompts=torch.ones(2, HIDDEN + 1), embed=embed
        )
    with pytest.raises(ConfigError, match="has no text to prompt with"):
        build_requests([sample("a", "image")])
    with pytest.raises(ConfigError, match="has none of the modalities text"):
        build_requests([sample("a", "image")], modalities=["text"])


def test_backend_passes_parallelism_quantization_and_lora_through() -> None:
    backend = VLLMBackend(
        "/models/llama", tensor_parallel_size=4, quantization="nf4", enable_lora=True,
        max_loras=3, max_lora_rank=8, enable_prompt_embeds=True, gpu_memory_utilization=0.8,
    )  # fmt: skip
    assert backend.engine_args() == {
        "model": "/models/llama",
        "tensor_parallel_size": 4,
        "dtype": "auto",
        "quantization": "bitsandbytes",
        "enable_lora": True,
        "max_loras": 3,
        "max_lora_rank": 8,
        "enable_prompt_embeds": True,
        "gpu_memory_utilization": 0.8,
    }
    plain = VLLMBackend("/m", quantization="awq").engine_args()
    assert plain == {
        "model": "/m",
        "tensor_parallel_size": 1,
        "dtype": "auto",
        "quantization": "awq",
    }
    with pytest.raises(ConfigError, match="tensor_parallel_size must be an int >= 1"):
        VLLMBackend("/m", tensor_parallel_size=0)
    lora = build_requests([sample("a", "text")], adapters={})
    lora[0].lora = AdapterRef("text", 2, "/a")
    with pytest.raises(ConfigError, match="enable_lora"):
        VLLMBackend("/m").check(lora)


def test_without_vllm_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_backend, "is_vllm_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'mllm-missing\[vllm\]'"):
        _ = VLLMBackend("/m").llm
    with pytest.raises(MissingDependencyError, match="vllm"):
        AdapterRef("text", 2, "/a").to_vllm()


@pytest.mark.vllm
def test_requests_map_onto_vllm_types(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from vllm.lora.request import LoRARequest

    ref = AdapterRef("text", 2, str(tmp_path))
    assert ref.to_vllm() == LoRARequest("text", 2, str(tmp_path))
