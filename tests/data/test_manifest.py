"""Generic JSONL/CSV manifest loader: absent modalities, label kinds, paths, errors, cache."""

from __future__ import annotations

import json
import wave
from pathlib import Path
from types import ModuleType

import datasets
import pytest
from PIL import Image

from mllm_missing.data import DATASETS, manifest
from mllm_missing.data.base import TaskType, require_labels, skipped_records
from mllm_missing.data.manifest import load_manifest, manifest_task
from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.types import Modality


@pytest.fixture
def media(tmp_path: Path, fx: ModuleType) -> Path:
    """A folder with two images and a short real WAV file."""
    folder = tmp_path / "data"
    fx.write_image(folder / "img" / "cat.png", (200, 10, 10))
    fx.write_image(folder / "img" / "dog.jpeg", (10, 200, 10), size=(20, 10))
    with wave.open(str(folder / "a.wav"), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(b"\x00\x00" * 160)
    return folder


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_multiclass_with_absent_modalities(media: Path, cache: Path) -> None:
    path = write_jsonl(
        media / "train.jsonl",
        [
            {"id": "a", "image": "img/cat.png", "text": "a cat", "audio": "a.wav", "label": "cat"},
            {"id": "b", "image": "img/dog.jpeg", "text": "", "label": "dog"},
            {"id": "c", "image": None, "text": "only text", "audio": "", "label": "bird"},
        ],
    )
    ds = load_manifest(path, cache_dir=cache)
    assert ds.column_names == [
        "id", "image", "has_image", "text", "has_text", "audio", "has_audio", "label",
    ]  # fmt: skip
    assert ds["id"] == ["a", "b", "c"]
    assert ds["has_image"] == [True, True, False]
    assert ds["has_text"] == [True, False, True] and ds["text"] == ["a cat", "", "only text"]
    assert ds["has_audio"] == [True, False, False]
    assert ds["audio"] == [str(media / "a.wav"), None, None]
    assert isinstance(ds[1]["image"], Image.Image) and ds[1]["image"].size == (20, 10)
    assert ds[2]["image"] is None
    assert ds.features["label"].names == ["bird", "cat", "dog"]  # sorted
    assert ds["label"] == [1, 2, 0]
    task = manifest_task(ds, name="pets")
    assert task.name == "pets" and task.task_type is TaskType.MULTICLASS
    assert task.label_names == ("bird", "cat", "dog") and task.metric == "accuracy"
    assert task.modalities == (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)
    assert DATASETS.get("manifest") is load_manifest


def test_csv_multilabel_with_base_dir_and_given_names(
    media: Path, tmp_path: Path, cache: Path
) -> None:
    path = tmp_path / "elsewhere" / "rows.csv"
    path.parent.mkdir()
    absolute = media / "img" / "cat.png"
    path.write_text(
        "image,text,tags\n"
        "img/dog.jpeg,two dogs,dog|outdoor\n"
        f"{absolute},,cat\n"
        ',"a, quoted text",outdoor|dog|dog\n'
    )
    ds = load_manifest(
        path,
        label_column="tags",
        task_type="multilabel",
        label_names=["cat", "dog", "outdoor"],
        base_dir=media,
        cache_dir=cache,
    )
    assert ds["id"] == ["2", "3", "4"]  # line numbers when there is no id column
    assert ds["label"] == [[0, 1, 1], [1, 0, 0], [0, 1, 1]]
    assert ds["text"] == ["two dogs", "", "a, quoted text"]
    assert ds["has_image"] == [True, True, False] and "audio" not in ds.column_names
    raw = ds.cast_column("image", datasets.Image(decode=False))["image"]
    assert raw[0]["path"] == str(media / "img" / "dog.jpeg") and raw[1]["path"] == str(absolute)
    task = manifest_task(ds)
    assert task.label_names == ("cat", "dog", "outdoor") and task.metric == "f1_macro"
    assert task.modalities == (Modality.IMAGE, Modality.TEXT)


def test_binary_csv_and_numeric_multiclass(media: Path, cache: Path) -> None:
    path = media / "b.csv"
    path.write_text("text,label\nyes,1\nno,0\nsure,true\n")
    ds = load_manifest(path, task_type="binary", cache_dir=cache)
    assert ds["label"] == [1, 0, 1] and manifest_task(ds).label_names == ("label",)
    numbers = write_jsonl(
        media / "n.jsonl", [{"text": t, "label": n} for t, n in zip("abc", [10, 2, 1], strict=True)]
    )
    ds = load_manifest(numbers, cache_dir=cache)
    assert ds.features["label"].names == ["1", "2", "10"] and ds["label"] == [2, 1, 0]


def test_no_labels_is_prediction_only(media: Path, cache: Path) -> None:
    path = media / "p.csv"
    path.write_text("id,text,label\nx,hello,\ny,world,\n")
    ds = load_manifest(path, cache_dir=cache)
    assert ds.column_names == ["id", "text", "has_text"]
    with pytest.raises(DataFormatError, match="prediction"):
        require_labels(ds, "p.csv")


def test_folder_with_split_files_and_split_column(media: Path, cache: Path) -> None:
    write_jsonl(media / "dev.jsonl", [{"text": "dev row", "label": "x"}])
    (media / "test.csv").write_text("text,label,split\nkeep,a,test\ndrop,b,train\nkeep2,a,test\n")
    assert load_manifest(media, "dev", cache_dir=cache)["text"] == ["dev row"]
    assert load_manifest(media, "test", cache_dir=cache)["text"] == ["keep", "drop", "keep2"]
    ds = load_manifest(media / "test.csv", "test", cache_dir=cache)
    assert ds["text"] == ["keep", "keep2"] and ds["id"] == ["2", "4"]
    with pytest.raises(DataFormatError, match=r"'dev'.*'test', 'train'"):
        load_manifest(media / "test.csv", "dev", cache_dir=cache)
    with pytest.raises(DataFormatError, match=r"train\.jsonl or train\.csv"):
        load_manifest(media, "train", cache_dir=cache)
    with pytest.raises(ConfigError, match="split"):
        load_manifest(media, cache_dir=cache)


def test_no_modality_column(media: Path, cache: Path) -> None:
    path = media / "bad.csv"
    path.write_text("id,caption,label\n1,hello,a\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv.*caption"):
        load_manifest(path, cache_dir=cache)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"image": "", "text": " ", "label": "a"}, "every modality"),
        ({"image": "img/nope.png", "text": "t", "label": "a"}, r"nope\.png"),
        ({"image": "img/cat.png", "audio": "missing.wav", "label": "a"}, r"missing\.wav"),
        ({"text": "t", "label": "zebra"}, "zebra"),
        ({"text": "t", "label": ["a"]}, "label"),
    ],
)
def test_bad_row(media: Path, cache: Path, row: dict[str, object], reason: str) -> None:
    good: dict[str, object] = {"image": "img/cat.png", "text": "fine", "label": "a"}
    path = write_jsonl(media / "m.jsonl", [good, row, good])
    with pytest.raises(DataFormatError, match=rf"m\.jsonl:2.*{reason}"):
        load_manifest(path, label_names=["a", "b"], cache_dir=cache)
    ds = load_manifest(path, label_names=["a", "b"], on_error="skip", cache_dir=cache)
    assert ds["id"] == ["1", "3"] and len(skipped_records(ds)) == 1


def test_corrupt_image_and_bad_json_line(media: Path, cache: Path) -> None:
    (media / "img" / "broken.jpeg").write_bytes(b"not a jpeg")
    path = media / "m.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n{"image": "img/broken.jpeg"}\n')
    with pytest.raises(DataFormatError, match=r"m\.jsonl:2"):
        load_manifest(path, cache_dir=cache)
    ds = load_manifest(path, on_error="skip", cache_dir=cache)
    assert ds["id"] == ["1"] and len(skipped_records(ds)) == 2


def test_partly_labelled_is_an_error(media: Path, cache: Path) -> None:
    path = media / "m.csv"
    path.write_text("text,label\na,x\nb,\n")
    with pytest.raises(DataFormatError, match=r"m\.csv:3.*no label"):
        load_manifest(path, on_error="skip", cache_dir=cache)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"task_type": "regression"}, "task_type"),
        ({"on_error": "warn"}, "on_error"),
        ({"task_type": "binary", "label_names": ["no", "yes"]}, "label_names"),
        ({"label_names": ["a", "a"]}, "label_names"),
    ],
)
def test_bad_options(media: Path, cache: Path, options: dict[str, object], field: str) -> None:
    path = write_jsonl(media / "m.jsonl", [{"text": "t", "label": "a"}])
    with pytest.raises(ConfigError, match=field):
        load_manifest(path, cache_dir=cache, **options)  # type: ignore[arg-type]


def test_cache_hit_and_rebuild(media: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl(media / "m.jsonl", [{"text": "t", "label": "a"}])
    assert load_manifest(path, cache_dir=cache)["text"] == ["t"]
    calls: list[str] = []
    real_build = manifest._build

    def counting_build(*args: object, **kwargs: object) -> datasets.Dataset:
        calls.append("build")
        return real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(manifest, "_build", counting_build)
    assert load_manifest(path, cache_dir=cache)["text"] == ["t"] and calls == []
    write_jsonl(path, [{"text": "changed", "label": "a"}])
    assert load_manifest(path, cache_dir=cache)["text"] == ["changed"] and calls == ["build"]
    # another option is another cache entry
    assert load_manifest(path, task_type="multilabel", cache_dir=cache)["label"] == [[1]]
    assert calls == ["build", "build"]
