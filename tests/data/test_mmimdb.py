"""MM-IMDb loader on a tiny release written in the official raw format."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import datasets
import pytest
from PIL import Image

from mllm_missing.data import DATASETS, mmimdb
from mllm_missing.data.base import TaskType, skipped_records
from mllm_missing.data.mmimdb import TASK, load_mmimdb, prepare_mmimdb
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality

# Written out again here (not imported) so a reordered GENRES fails the test.
DESIGN_ORDER = (
    "Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
    "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
    "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir",
)  # fmt: skip


def hot(*indices: int) -> list[int]:
    return [int(i in indices) for i in range(23)]


def test_task_and_genre_order() -> None:
    assert mmimdb.GENRES == DESIGN_ORDER
    assert TASK.name == "mmimdb" and TASK.task_type is TaskType.MULTILABEL
    assert TASK.label_names == DESIGN_ORDER and TASK.num_labels == 23
    assert TASK.modalities == (Modality.IMAGE, Modality.TEXT) and TASK.metric == "f1_macro"
    assert DATASETS.get("mmimdb") is load_mmimdb


def test_movie_mode(mmimdb_root: Path, cache: Path) -> None:
    splits = prepare_mmimdb(mmimdb_root, cache_dir=cache)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 4, "dev": 2, "test": 3}
    train = splits["train"]
    assert train.column_names == ["id", "image", "text", "label"]
    assert train["id"] == ["0000008", "0000091", "0000417", "0004972"]
    assert train["label"] == [
        hot(8, 21),  # Documentary, Short
        hot(7, 21),  # Horror, Short
        hot(6, 11, 10, 21),  # Adventure, Fantasy, Sci-Fi, Short
        hot(0, 15, 2, 14),  # Drama, History, Romance, War (Reality-TV ignored)
    ]
    assert splits["dev"]["label"] == [hot(1, 12, 22), hot(4, 3, 9)]
    assert splits["test"]["label"][2] == hot(19, 20, 18, 16, 17, 13, 5)
    assert train["text"][1] == "A bat flies into a castle.\n\nThe devil appears and vanishes."
    # the blank middle plot is dropped
    assert (
        train["text"][3] == "Two families in the Civil War.\n\nA story of the Reconstruction era."
    )
    image = train[2]["image"]
    assert isinstance(image, Image.Image) and image.size == (12, 16)
    # stored as a path (decoded on access), not as bytes copied into the cache
    raw = train.cast_column("image", datasets.Image(decode=False))[2]["image"]
    assert raw["bytes"] is None
    assert Path(raw["path"]) == (mmimdb_root / "dataset" / "0000417.jpeg").resolve()
    assert skipped_records(train) == []


def test_plot_mode(mmimdb_root: Path, cache: Path) -> None:
    splits = prepare_mmimdb(mmimdb_root, text_mode="plot", cache_dir=cache)
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 6, "dev": 2, "test": 4}
    train = splits["train"]
    assert train["id"] == [
        "0000008_0", "0000091_0", "0000091_1", "0000417_0", "0004972_0", "0004972_2",
    ]  # fmt: skip
    assert train["text"][1:3] == ["A bat flies into a castle.", "The devil appears and vanishes."]
    assert train["label"][1] == train["label"][2] == hot(7, 21)
    assert train["text"][5] == "A story of the Reconstruction era."


def test_dev_aliases(mmimdb_root: Path, cache: Path) -> None:
    dev = load_mmimdb(mmimdb_root, "dev", cache_dir=cache)
    assert load_mmimdb(mmimdb_root, "val", cache_dir=cache)["id"] == dev["id"]
    assert load_mmimdb(mmimdb_root, "validation", cache_dir=cache)["id"] == dev["id"]


@pytest.mark.parametrize(
    ("options", "field"),
    [({"split": "valid"}, "split"), ({"text_mode": "plots"}, "text_mode"),
     ({"on_error": "ignore"}, "on_error")],
)  # fmt: skip
def test_bad_options(mmimdb_root: Path, cache: Path, options: dict[str, str], field: str) -> None:
    kwargs = {"split": "train", **options}
    with pytest.raises(ConfigError, match=field) as info:
        load_mmimdb(mmimdb_root, cache_dir=cache, **kwargs)
    assert "one of" in str(info.value)


def test_missing_split_json(mmimdb_root: Path, cache: Path) -> None:
    (mmimdb_root / "split.json").unlink()
    with pytest.raises(DataFormatError, match=r"split\.json"):
        load_mmimdb(mmimdb_root, "train", cache_dir=cache)


def test_split_json_without_the_split(mmimdb_root: Path, cache: Path) -> None:
    (mmimdb_root / "split.json").write_text(json.dumps({"train": ["0000008"]}))
    with pytest.raises(DataFormatError, match=r"split\.json.*'test'"):
        load_mmimdb(mmimdb_root, "test", cache_dir=cache)


def break_image(root: Path) -> str:
    (root / "dataset" / "0000091.jpeg").write_bytes(b"this is not a jpeg at all")
    return "0000091.jpeg"


def break_json(root: Path) -> str:
    (root / "dataset" / "0000417.json").write_text('{"genres": ["Drama"], "plot": [')
    return "0000417.json"


def no_known_genre(root: Path) -> str:
    record = json.loads((root / "dataset" / "0000417.json").read_text())
    record["genres"] = ["Reality-TV", "News"]
    (root / "dataset" / "0000417.json").write_text(json.dumps(record))
    return "0000417.json"


def blank_plots(root: Path) -> str:
    record = json.loads((root / "dataset" / "0000091.json").read_text())
    record["plot"] = ["", "   "]
    (root / "dataset" / "0000091.json").write_text(json.dumps(record))
    return "0000091.json"


def missing_record(root: Path) -> str:
    (root / "dataset" / "0004972.json").unlink()
    return "0004972.json"


@pytest.mark.parametrize(
    "damage", [break_image, break_json, no_known_genre, blank_plots, missing_record]
)
def test_bad_record_stops_or_is_skipped(
    mmimdb_root: Path, cache: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    name = damage(mmimdb_root)  # type: ignore[operator]
    with pytest.raises(DataFormatError, match=name.replace(".", r"\.")):
        load_mmimdb(mmimdb_root, "train", cache_dir=cache)
    with caplog.at_level(logging.WARNING):
        train = load_mmimdb(mmimdb_root, "train", on_error="skip", cache_dir=cache)
    assert len(train) == 3 and name.split(".")[0] not in train["id"]
    assert [Path(where).name for where, _ in skipped_records(train)] == [name]
    assert "1 sample(s) skipped" in caplog.text
    # the other splits are untouched
    assert len(load_mmimdb(mmimdb_root, "dev", cache_dir=cache)) == 2


def test_cache_hit_and_rebuild(
    mmimdb_root: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_mmimdb(mmimdb_root, "dev", cache_dir=cache)
    real_build = mmimdb._build
    calls: list[str] = []

    def counting_build(*args: object, **kwargs: object) -> datasets.Dataset:
        calls.append("build")
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mmimdb, "_build", counting_build)
    again = load_mmimdb(mmimdb_root, "dev", cache_dir=cache)
    assert calls == [] and again["id"] == first["id"] and again["label"] == first["label"]

    record_file = mmimdb_root / "dataset" / "0006333.json"
    record = json.loads(record_file.read_text())
    record["genres"] = ["Western"]
    record_file.write_text(json.dumps(record))
    changed = load_mmimdb(mmimdb_root, "dev", cache_dir=cache)
    assert calls == ["build"] and changed["label"][0] == hot(19)


def test_skip_cache_is_not_served_to_stop(mmimdb_root: Path, cache: Path) -> None:
    break_image(mmimdb_root)
    assert len(load_mmimdb(mmimdb_root, "train", on_error="skip", cache_dir=cache)) == 3
    with pytest.raises(DataFormatError, match=r"0000091\.jpeg"):
        load_mmimdb(mmimdb_root, "train", cache_dir=cache)
    # a cached skip build still reports what it skipped
    cached = load_mmimdb(mmimdb_root, "train", on_error="skip", cache_dir=cache)
    assert len(skipped_records(cached)) == 1


def start_script(repo_root: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "scripts/prepare_mmimdb.py", *args]
    return subprocess.Popen(
        command, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_prepare_script(
    repo_root: Path, mmimdb_root: Path, tmp_path: Path, cache: Path, fx: ModuleType
) -> None:
    broken = fx.write_mmimdb(tmp_path / "broken")
    break_json(broken)
    # both runs at once: each pays the interpreter start-up
    good = start_script(
        repo_root, str(mmimdb_root), "--text-mode", "plot", "--cache-dir", str(cache)
    )
    bad = start_script(repo_root, str(broken), "--cache-dir", str(cache))
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    assert "train: 6 samples (labelled), 0 bad records skipped" in out
    assert "dev: 2 samples" in out and "test: 4 samples" in out
    out, err = bad.communicate(timeout=120)
    assert bad.returncode != 0
    assert "0000417.json" in err and "Traceback" not in err
