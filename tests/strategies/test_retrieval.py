"""Tests of the retrieval memory bank: exact search against brute force, presence, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.strategies.retrieval import MemoryBank, MemoryBankConfig, build_memory_bank
from mllm_missing.types import Modality


def _ids(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def _brute_force(
    bank_vectors: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    eligible: torch.Tensor | None = None,
    exclude: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full float64 cosine matrix, masked, argsorted; (-inf, -1) padding."""
    keys = bank_vectors.double()
    keys = keys / keys.norm(dim=1, keepdim=True)
    q = queries.double() / queries.double().norm(dim=1, keepdim=True)
    scores = q @ keys.T
    if eligible is not None:
        scores[:, ~eligible] = float("-inf")
    if exclude is not None:
        for row, col in enumerate(exclude):
            if col >= 0:
                scores[row, col] = float("-inf")
    order = scores.argsort(dim=1, descending=True)[:, :k]
    top = scores.gather(1, order)
    order[top == float("-inf")] = -1
    if order.shape[1] < k:  # fewer bank rows than k
        pad = k - order.shape[1]
        order = torch.cat([order, torch.full((len(q), pad), -1)], dim=1)
        top = torch.cat([top, torch.full((len(q), pad), float("-inf"), dtype=top.dtype)], dim=1)
    return top.float(), order


@pytest.mark.parametrize(
    ("n", "chunk_size"),
    [(50, 7), (64, 64), (64, 16), (300, 1000), (1000, 97), (5, 2)],
)
@pytest.mark.parametrize("k", [1, 5])
def test_search_matches_brute_force(n: int, chunk_size: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * 31 + chunk_size)
    vectors = torch.randn(n, 12, generator=gen) * 3
    queries = torch.randn(9, 12, generator=gen)
    bank = build_memory_bank(
        _ids(n), {"image": vectors}, config=MemoryBankConfig(chunk_size=chunk_size)
    )
    scores, indices = bank.search(queries, "image", k)
    ref_scores, ref_indices = _brute_force(vectors, queries, k)
    assert indices.shape == scores.shape == (9, k)
    assert torch.equal(indices, ref_indices)
    finite = ref_indices >= 0
    assert torch.allclose(scores[finite], ref_scores[finite], atol=1e-5)
    # Best first.
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


def test_leave_one_out_never_returns_self() -> None:
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(200, 8, generator=gen)
    ids = _ids(200)
    bank = build_memory_bank(ids, {"text": vectors}, config=MemoryBankConfig(chunk_size=33))
    # Querying the bank with its own vectors: without exclusion each finds itself first.
    _, plain = bank.search(vectors, "text", 3)
    assert torch.equal(plain[:, 0], torch.arange(200))
    scores, indices = bank.search(vectors, "text", 3, exclude_ids=ids)
    assert bool(torch.isfinite(scores).all())
    assert not bool((indices == torch.arange(200).unsqueeze(1)).any())
    _, ref_indices = _brute_force(vectors, vectors, 3, exclude=list(range(200)))
    assert torch.equal(indices, ref_indices)
    # Ids outside the bank (e.g. test queries) and None exclude nothing.
    _, others = bank.search(vectors[:2], "text", 1, exclude_ids=["unknown", None])
    assert others[:, 0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="exclude_ids has 1 entries for 2 queries"):
        bank.search(vectors[:2], "text", 1, exclude_ids=["s0"])


def test_fewer_eligible_entries_than_k_pads_with_minus_one() -> None:
    vectors = torch.randn(3, 4)
    bank = build_memory_bank(_ids(3), {"image": vectors}, config=MemoryBankConfig(chunk_size=2))
    scores, indices = bank.search(torch.randn(2, 4), "image", 5)
    assert indices.shape == (2, 5)
    assert bool((indices[:, 3:] == -1).all())
    assert bool(torch.isinf(scores[:, 3:]).all()) and bool((scores[:, 3:] < 0).all())
    assert sorted(indices[0, :3].tolist()) == [0, 1, 2]
    assert bool(torch.isfinite(scores[:, :3]).all())
    # Leave-one-out on a one-entry bank leaves nothing at all.
    single = build_memory_bank(["only"], {"image": vectors[:1]})
    scores, indices = single.search(vectors[:1], "image", 2, exclude_ids=["only"])
    assert indices.tolist() == [[-1, -1]]
    assert bool(torch.isneginf(scores).all())


def test_neighbours_must_have_both_by_and_target() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 120
    image, text = torch.randn(n, 6, generator=gen), torch.randn(n, 5, generator=gen)
    presence = torch.ones(n, 2, dtype=torch.bool)
    presence[::3, 1] = False  # every third entry lacks text
    presence[1::4, 0] = False  # every fourth (from 1) lacks image
    presence[:, 0] |= ~presence[:, 1]  # never both missing
    text[~presence[:, 1]] = float("nan")  # absent rows may hold anything
    bank = build_memory_bank(
        _ids(n), {"image": image, "text": text}, presence, MemoryBankConfig(chunk_size=16)
    )
    queries = torch.randn(7, 6, generator=gen)
    _, by_image = bank.search(queries, "image", 10)
    assert bool(presence[by_image.flatten(), 0].all())
    assert not bool(presence[by_image.flatten(), 1].all())  # some lack text: not asked for
    _, indices = bank.search(queries, Modality.IMAGE, 10, target="text")
    assert bool(presence[indices.flatten(), 0].all()) and bool(presence[indices.flatten(), 1].all())
    _, ref = _brute_force(image, queries, 10, eligible=presence.all(dim=1))
    assert torch.equal(indices, ref)
    # Reading text from neighbours found without target= is refused, naming the entry.
    with pytest.raises(ValueError, match=r"neighbour 's\d+' .* has no text embedding"):
        bank.neighbour_embeddings(by_image, "text")
    # The presence mask may also be given in full MODALITY_ORDER (image, text, audio).
    full = torch.cat([presence, torch.zeros(n, 1, dtype=torch.bool)], dim=1)
    again = build_memory_bank(_ids(n), {"text": text, "image": image}, full)
    assert torch.equal(again.presence, presence)


def test_neighbour_embeddings_and_mean_ignore_minus_one_slots() -> None:
    gen = torch.Generator().manual_seed(3)
    image, text = torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen) * 5
    bank = build_memory_bank(_ids(6), {"image": image, "text": text})
    indices = torch.tensor([[2, 4, -1], [-1, -1, -1], [5, -1, -1]])
    neighbours = bank.neighbour_embeddings(indices, "text")
    assert neighbours.shape == (3, 3, 3)
    assert torch.allclose(neighbours[0, 0], text[2], atol=1e-5)  # raw, not normalised
    assert torch.equal(neighbours[0, 2], torch.zeros(3))
    mean = bank.neighbour_mean(indices, "text")
    assert torch.allclose(mean[0], (text[2] + text[4]) / 2, atol=1e-5)
    assert torch.equal(mean[1], torch.zeros(3))
    assert torch.allclose(mean[2], text[5], atol=1e-5)
    with pytest.raises(ValueError, match="must lie in"):
        bank.neighbour_embeddings(torch.tensor([[6]]), "text")
    with pytest.raises(ValueError, match="no audio embeddings"):
        bank.neighbour_mean(indices, "audio")


def test_save_load_round_trip_memory_maps(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    image, text = torch.randn(40, 6, generator=gen), torch.randn(40, 3, generator=gen)
    presence = torch.ones(40, 2, dtype=torch.bool)
    presence[5, 0] = False
    config = MemoryBankConfig(k=3, chunk_size=9, source="encoder=x dataset=y split=train")
    bank = build_memory_bank(_ids(40), {"image": image, "text": text}, presence, config)
    target = bank.save(tmp_path / "bank")
    meta = json.loads((target / "config.json").read_text())
    assert meta["num_entries"] == 40 and meta["dims"] == {"image": 6, "text": 3}
    assert meta["modalities"] == ["image", "text"] and meta["config"]["source"] == config.source
    assert not [p for p in tmp_path.iterdir() if p.name != "bank"]  # no temporary left behind

    loaded = MemoryBank.load(target)
    assert isinstance(loaded.arrays["image"], np.memmap)
    assert isinstance(loaded.arrays["text_norms"], np.memmap)
    assert loaded.config == config and loaded.ids == bank.ids
    assert torch.equal(loaded.presence, presence)
    queries = torch.randn(5, 6, generator=gen)
    s1, i1 = bank.search(queries, "image", exclude_ids=["s0"] * 5)
    s2, i2 = loaded.search(queries, "image", exclude_ids=["s0"] * 5)
    assert torch.equal(i1, i2) and torch.equal(s1, s2) and i1.shape == (5, 3)
    assert torch.allclose(loaded.neighbour_mean(i2, "text"), bank.neighbour_mean(i1, "text"))
    assert not isinstance(MemoryBank.load(target, mmap=False).arrays["image"], np.memmap)

    # Saving over an existing bank replaces it.
    smaller = build_memory_bank(_ids(3), {"text": text[:3]})
    smaller.save(target)
    assert len(MemoryBank.load(target)) == 3
    assert not (target / "image.npy").exists()


def test_float16_storage_searches_like_float32() -> None:
    gen = torch.Generator().manual_seed(5)
    vectors = torch.randn(500, 16, generator=gen)
    queries = torch.randn(4, 16, generator=gen)
    half = build_memory_bank(
        _ids(500), {"image": vectors}, config=MemoryBankConfig(dtype="float16")
    )
    assert half.arrays["image"].dtype == np.float16
    scores, _ = half.search(queries, "image", 3)
    ref_scores, _ = _brute_force(vectors, queries, 3)
    assert torch.allclose(scores, ref_scores, atol=2e-3)


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        ("delete", "text.npy"),
        ("delete", "image_norms.npy"),
        ("delete", "config.json"),
        ("truncate", "image.npy"),
        ("garbage", "ids.npy"),
        ("garbage", "config.json"),
        ("reshape", "presence.npy"),
    ],
)
def test_missing_or_corrupt_file_names_the_file(tmp_path: Path, damage: str, file: str) -> None:
    bank = build_memory_bank(_ids(10), {"image": torch.randn(10, 4), "text": torch.randn(10, 2)})
    target = bank.save(tmp_path / "bank")
    path = target / file
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a file\xff")
    else:
        np.save(path, np.ones((10, 3), dtype=bool))
    with pytest.raises(DataFormatError, match=file.replace(".", r"\.")):
        MemoryBank.load(target)


def test_unsupported_format_version_is_refused(tmp_path: Path) -> None:
    target = build_memory_bank(["a"], {"image": torch.ones(1, 2)}).save(tmp_path / "bank")
    meta = json.loads((target / "config.json").read_text())
    meta["format_version"] = 99
    (target / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"config\.json: format_version 99"):
        MemoryBank.load(target)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_embeddings_are_rejected_naming_modality_and_row(bad: float) -> None:
    image, text = torch.randn(8, 3), torch.randn(8, 2)
    text[6, 1] = bad
    text[7, 0] = bad
    with pytest.raises(ValueError, match=r"text embeddings: row 6 \(id 's6'\)"):
        build_memory_bank(_ids(8), {"image": image, "text": text})
    # The same value in a row marked absent is ignored.
    presence = torch.ones(8, 2, dtype=torch.bool)
    presence[6:, 1] = False
    bank = build_memory_bank(_ids(8), {"image": image, "text": text}, presence)
    assert bool(torch.isfinite(torch.from_numpy(bank.arrays["text"])).all())


def test_bad_build_inputs_are_rejected() -> None:
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match="duplicate id 's1'"):
        build_memory_bank(["s0", "s1", "s1"], {"image": x})
    with pytest.raises(
        ValueError, match=r"image embeddings have shape \(3, 2\), expected \(4, D\)"
    ):
        build_memory_bank(_ids(4), {"image": x})
    with pytest.raises(ValueError, match="every modality is missing"):
        build_memory_bank(_ids(3), {"image": x}, torch.tensor([[True], [False], [True]]))
    zero = x.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match=r"image embeddings: row 1 .* zero vector"):
        build_memory_bank(_ids(3), {"image": zero})
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        build_memory_bank(_ids(3), {"video": x})


def test_bad_queries_are_rejected() -> None:
    bank = build_memory_bank(_ids(4), {"image": torch.randn(4, 3)})
    queries = torch.randn(3, 3)
    queries[2, 0] = float("nan")
    with pytest.raises(ValueError, match="query row 2 has NaN"):
        bank.search(queries, "image")
    with pytest.raises(ValueError, match="query row 0 is a zero vector"):
        bank.search(torch.zeros(1, 3), "image")
    with pytest.raises(ValueError, match=r"expected \(Q, 3\) for image"):
        bank.search(torch.randn(2, 4), "image")
    with pytest.raises(ValueError, match="no text embeddings"):
        bank.search(torch.randn(2, 3), "text")
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        bank.search(torch.randn(2, 3), "image", 0)


def test_group_queries_routes_rows_and_names_rows_with_nothing_to_search_by() -> None:
    bank = build_memory_bank(_ids(2), {"image": torch.randn(2, 3), "text": torch.randn(2, 2)})
    presence = torch.tensor(
        [[True, True, False], [False, True, False], [True, False, True], [False, True, True]]
    )
    groups = bank.group_queries(presence)
    assert groups[Modality.IMAGE].tolist() == [0, 2] and groups[Modality.TEXT].tolist() == [1, 3]
    # Imputing text: rows are searched by image only; rows 1 and 3 have nothing else.
    with pytest.raises(ValueError, match=r"query rows 1, 3: every modality is missing"):
        bank.group_queries(presence, target="text")
    assert bank.group_queries(presence[[0, 2]], target="text")[Modality.IMAGE].tolist() == [0, 1]
    only_audio = torch.tensor([[False, False, True]])
    with pytest.raises(ValueError, match="query rows 0: every modality is missing"):
        bank.group_queries(only_audio)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "memory_bank.k"),
        ({"k": True}, "memory_bank.k"),
        ({"chunk_size": 0}, "memory_bank.chunk_size"),
        ({"dtype": "bfloat16"}, "memory_bank.dtype must be one of float32, float16"),
        ({"metric": "l2"}, "memory_bank.metric must be one of cosine"),
        ({"source": 3}, "memory_bank.source"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MemoryBankConfig(**kwargs)  # type: ignore[arg-type]


def test_config_from_dict_rejects_unknown_keys() -> None:
    assert MemoryBankConfig.from_dict({"k": 2}).k == 2
    with pytest.raises(ConfigError, match="unknown memory_bank field.*topk"):
        MemoryBankConfig.from_dict({"topk": 2})


def test_device_argument_and_moved_bank_give_the_same_result() -> None:
    vectors, queries = torch.randn(30, 5), torch.randn(3, 5)
    bank = build_memory_bank(_ids(30), {"image": vectors}, config=MemoryBankConfig(chunk_size=4))
    expected = bank.search(queries, "image")
    assert torch.equal(bank.search(queries, "image", device="cpu")[1], expected[1])
    moved = bank.to("cpu")
    assert torch.equal(moved.search(queries, "image")[1], expected[1])


@pytest.mark.gpu
def test_search_on_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(6)
    vectors, queries = torch.randn(3000, 32, generator=gen), torch.randn(16, 32, generator=gen)
    bank = build_memory_bank(
        _ids(3000), {"image": vectors}, config=MemoryBankConfig(chunk_size=700)
    )
    cpu_scores, cpu_indices = bank.search(queries, "image", 5)
    scores, indices = bank.search(queries, "image", 5, device="cuda")
    assert indices.device.type == "cuda"
    assert torch.equal(indices.cpu(), cpu_indices)
    assert torch.allclose(scores.cpu(), cpu_scores, atol=1e-4)
    resident = bank.to("cuda")
    assert torch.equal(resident.search(queries.cuda(), "image", 5)[1].cpu(), cpu_indices)
    assert resident.neighbour_mean(indices, "image").device.type == "cuda"


@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_grouped_bank_leaves_the_whole_group_out(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(5)
    vectors = torch.randn(60, 8, generator=gen)
    ids, groups = _ids(60), [f"g{i // 4}" for i in range(60)]  # 15 groups of 4 entries
    bank = build_memory_bank(
        ids, {"image": vectors}, config=MemoryBankConfig(chunk_size=chunk_size), groups=groups
    )
    queries = vectors[[0, 9, 33]] + 0.01
    members = {row: set(range(row // 4 * 4, row // 4 * 4 + 4)) for row in (0, 9, 33)}
    # By an entry's id or by its group name, the same four entries are left out.
    by_id = bank.search(queries, "image", 6, exclude_ids=["s0", "s9", "s33"])
    by_group = bank.search(queries, "image", 6, exclude_groups=["g0", "g2", "g8"])
    for scores, indices in (by_id, by_group):
        for q, row in enumerate((0, 9, 33)):
            keep = torch.ones(60, dtype=torch.bool)
            keep[sorted(members[row])] = False
            ref_scores, ref_indices = _brute_force(vectors, queries[q : q + 1], 6, keep)
            assert torch.equal(indices[q : q + 1], ref_indices)
            assert torch.allclose(scores[q : q + 1], ref_scores, atol=1e-5)
    # An unknown group or None excludes nothing; an ungrouped bank reads a group as an id.
    _, free = bank.search(queries[:1], "image", 1, exclude_groups=["nope"])
    assert free.tolist() == [[0]]
    plain = build_memory_bank(ids, {"image": vectors})
    _, alone = plain.search(queries[:1], "image", 1, exclude_groups=["s0"])
    assert alone.tolist() != [[0]]
    with pytest.raises(ValueError, match="exclude_ids or exclude_groups, not both"):
        bank.search(queries[:1], "image", exclude_ids=["s0"], exclude_groups=["g0"])
    with pytest.raises(ValueError, match="groups has 2 entries for 60 ids"):
        build_memory_bank(ids, {"image": vectors}, groups=["a", "b"])


def test_labels_are_kept_averaged_over_neighbours_and_saved(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    vectors = torch.randn(10, 4, generator=gen)
    labels = torch.eye(3)[torch.arange(10) % 3]
    bank = build_memory_bank(_ids(10), {"text": vectors}, labels=labels, groups=["a"] * 10)
    indices = torch.tensor([[0, 1, -1], [-1, -1, -1], [2, 5, 8]])
    mean = bank.neighbour_labels(indices)
    torch.testing.assert_close(mean[0], torch.tensor([0.5, 0.5, 0.0]))
    assert not mean[1].any()  # no valid neighbour
    torch.testing.assert_close(mean[2], torch.tensor([0.0, 0.0, 1.0]))
    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded.label_dim == 3 and isinstance(loaded.arrays["labels"], np.memmap)
    torch.testing.assert_close(loaded.neighbour_labels(indices), mean)
    _, kept = loaded.search(vectors[:2], "text", 2, exclude_groups=["a", None])
    assert kept[0].tolist() == [-1, -1] and kept[1, 0].item() == 1  # one group: all left out
    with pytest.raises(ValueError, match="labels row 1 has NaN or inf"):
        build_memory_bank(_ids(2), {"text": vectors[:2]}, labels=[0.0, float("nan")])
    with pytest.raises(ValueError, match="holds no labels"):
        build_memory_bank(_ids(2), {"text": vectors[:2]}).neighbour_labels(indices)


def test_a_bank_saved_before_groups_and_labels_loads(tmp_path: Path) -> None:
    vectors = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    folder = build_memory_bank(_ids(5), {"image": vectors}).save(tmp_path / "old")
    meta = json.loads((folder / "config.json").read_text())
    del meta["groups"], meta["label_dim"]  # the keys an older bank's config.json lacks
    (folder / "config.json").write_text(json.dumps(meta))
    old = MemoryBank.load(folder)
    assert old.label_dim == 0 and "groups" not in old.arrays
    _, indices = old.search(vectors[:1], "image", 1, exclude_ids=["s0"])
    assert indices.item() != 0
