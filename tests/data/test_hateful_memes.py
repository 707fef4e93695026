"""Hateful Memes loader on a tiny release written in the official format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import datasets
import pytest
from PIL import Image

from mllm_missing.data import DATASETS, hateful_memes
from mllm_missing.data.base import TaskType, require_labels, skipped_records
from mllm_missing.data.hateful_memes import TASK, load_hateful_memes, prepare_hateful_memes
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality

SPLITS = ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rewrite_line(path: Path, number: int, text: str) -> None:
    content = path.read_text().splitlines()
    content[number - 1] = text
    path.write_text("\n".join(content) + "\n")


def test_task() -> None:
    assert TASK.name == "hateful_memes" and TASK.task_type is TaskType.BINARY
    assert TASK.label_names == ("hateful",) and TASK.num_labels == 1
    assert TASK.modalities == (Modality.IMAGE, Modality.TEXT) and TASK.metric == "auroc"
    assert hateful_memes.SPLITS == SPLITS
    assert DATASETS.get("hateful_memes") is load_hateful_memes


def test_all_splits(memes_root: Path, cache: Path, fx: ModuleType) -> None:
    splits = prepare_hateful_memes(memes_root, cache_dir=cache)
    assert list(splits) == list(SPLITS)
    assert {name: len(ds) for name, ds in splits.items()} == {
        "train": 4, "dev_seen": 2, "dev_unseen": 2, "test_seen": 2, "test_unseen": 3,
    }  # fmt: skip
    train = splits["train"]
    assert train.column_names == ["id", "image", "text", "label"]
    assert train["id"] == ["42953", "23058", "1235", "13894"]
    assert train["label"] == [0, 0, 1, 1]
    assert train["text"][0] == "its their character not their color that matters"
    assert splits["dev_seen"]["label"] == [1, 0] and splits["dev_unseen"]["label"] == [0, 1]
    assert splits["test_seen"]["label"] == [1, 0]
    for name, ds in splits.items():  # never confuse seen and unseen
        assert ds["id"] == [str(meme[0]) for meme in fx.MEMES[name]]
    image = train[2]["image"]  # img/01235.png: the file name is zero-padded, the id is not
    assert isinstance(image, Image.Image) and image.size == (12, 16)
    raw = train.cast_column("image", datasets.Image(decode=False))[2]["image"]
    assert raw["bytes"] is None and Path(raw["path"]).name == "01235.png"


def test_unlabelled_split_is_prediction_only(memes_root: Path, cache: Path) -> None:
    unseen = load_hateful_memes(memes_root, "test_unseen", cache_dir=cache)
    assert unseen.column_names == ["id", "image", "text"]
    assert unseen["id"] == ["1", "29", "98765"]
    with pytest.raises(DataFormatError, match="prediction"):
        require_labels(unseen, "hateful_memes test_unseen")
    require_labels(load_hateful_memes(memes_root, "test_seen", cache_dir=cache), "test_seen")


@pytest.mark.parametrize("split", ["dev", "test", "validation", "Train"])
def test_unknown_split(memes_root: Path, cache: Path, split: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_hateful_memes(memes_root, split, cache_dir=cache)
    message = str(info.value)
    assert "split" in message and all(name in message for name in SPLITS)


def test_missing_split_file(memes_root: Path, cache: Path) -> None:
    (memes_root / "dev_unseen.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"dev_unseen\.jsonl"):
        load_hateful_memes(memes_root, "dev_unseen", cache_dir=cache)
    with pytest.raises(DataFormatError, match=r"dev_unseen\.jsonl"):
        prepare_hateful_memes(memes_root, cache_dir=cache)


def bad_json(root: Path) -> str:
    rewrite_line(root / "train.jsonl", 3, '{"id": 1235, "img": "img/01235.png", "label": 1,')
    return "train.jsonl:3"


def label_out_of_range(root: Path) -> str:
    rewrite_line(
        root / "train.jsonl", 2, json.dumps({**lines(root / "train.jsonl")[1], "label": 2})
    )
    return "train.jsonl:2"


def corrupt_image(root: Path) -> str:
    (root / "img" / "13894.png").write_bytes(b"\x89PNG garbage")
    return "13894.png"


def missing_image(root: Path) -> str:
    (root / "img" / "42953.png").unlink()
    return "42953.png"


def empty_text(root: Path) -> str:
    rewrite_line(
        root / "train.jsonl", 4, json.dumps({**lines(root / "train.jsonl")[3], "text": " "})
    )
    return "train.jsonl:4"


def missing_field(root: Path) -> str:
    record = lines(root / "train.jsonl")[0]
    del record["img"]
    rewrite_line(root / "train.jsonl", 1, json.dumps(record))
    return "train.jsonl:1"


@pytest.mark.parametrize(
    "damage",
    [bad_json, label_out_of_range, corrupt_image, missing_image, empty_text, missing_field],
)
def test_bad_record_stops_or_is_skipped(memes_root: Path, cache: Path, damage: object) -> None:
    where = damage(memes_root)  # type: ignore[operator]
    with pytest.raises(DataFormatError, match=where.replace(".", r"\.")):
        load_hateful_memes(memes_root, "train", cache_dir=cache)
    train = load_hateful_memes(memes_root, "train", on_error="skip", cache_dir=cache)
    assert len(train) == 3 and set(train["label"]) <= {0, 1}
    assert len(skipped_records(train)) == 1 and where in " ".join(skipped_records(train)[0])


def test_partly_labelled_file_is_an_error(memes_root: Path, cache: Path) -> None:
    record = lines(memes_root / "dev_seen.jsonl")[1]
    del record["label"]
    rewrite_line(memes_root / "dev_seen.jsonl", 2, json.dumps(record))
    for on_error in ("stop", "skip"):  # not a bad record that skipping could hide
        with pytest.raises(DataFormatError, match=r"dev_seen\.jsonl:2.*no label"):
            load_hateful_memes(memes_root, "dev_seen", on_error=on_error, cache_dir=cache)


def test_cache_hit_and_rebuild(
    memes_root: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_hateful_memes(memes_root, "dev_seen", cache_dir=cache)
    real_build = hateful_memes._build
    calls: list[str] = []

    def counting_build(*args: object, **kwargs: object) -> datasets.Dataset:
        calls.append("build")
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hateful_memes, "_build", counting_build)
    assert load_hateful_memes(memes_root, "dev_seen", cache_dir=cache)["id"] == first["id"]
    assert calls == []
    rewrite_line(
        memes_root / "dev_seen.jsonl",
        1,
        json.dumps({**lines(memes_root / "dev_seen.jsonl")[0], "label": 0}),
    )
    assert load_hateful_memes(memes_root, "dev_seen", cache_dir=cache)["label"] == [0, 0]
    assert calls == ["build"]


def start_script(repo_root: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "scripts/prepare_hateful_memes.py", *args]
    return subprocess.Popen(
        command, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_prepare_script(
    repo_root: Path, memes_root: Path, tmp_path: Path, cache: Path, fx: ModuleType
) -> None:
    broken = fx.write_hateful_memes(tmp_path / "broken")
    label_out_of_range(broken)
    good = start_script(repo_root, str(memes_root), "--cache-dir", str(cache))
    bad = start_script(repo_root, str(broken), "--cache-dir", str(cache))
    out, err = good.communicate(timeout=120)
    assert good.returncode == 0, err
    assert "train: 4 samples (labelled), 0 bad records skipped" in out
    assert "test_unseen: 3 samples (no labels)" in out
    out, err = bad.communicate(timeout=120)
    assert bad.returncode != 0
    assert "train.jsonl:2" in err and "Traceback" not in err
