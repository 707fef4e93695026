"""Tests of MissingConfig and the seeded mask tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mllm_missing.errors import ConfigError, DataFormatError
from mllm_missing.missing import (
    MissingConfig,
    get_mask_table,
    make_mask_table,
    read_mask_table,
    write_mask_table,
)
from mllm_missing.types import Modality

IT = (Modality.IMAGE, Modality.TEXT)
IDS = [str(i) for i in range(1000)]


def test_both_removes_exact_shares_and_never_both() -> None:
    table = make_mask_table(MissingConfig("both", 0.7, seed=3), IDS, IT)
    image, text = table.present[:, 0], table.present[:, 1]
    assert (~text).sum() == 350 and (~image).sum() == 350
    assert (image | text).all()
    assert table.missing_rate(Modality.TEXT) == pytest.approx(0.35)


def test_both_ratio_moves_the_split() -> None:
    table = make_mask_table(MissingConfig("both", 0.6, both_ratio=0.25), IDS, IT)
    assert (~table.present[:, 1]).sum() == 150 and (~table.present[:, 0]).sum() == 450


@pytest.mark.parametrize("kind,column", [("text", 1), ("image", 0)])
def test_single_modality_types(kind: str, column: int) -> None:
    table = make_mask_table(MissingConfig(kind, 0.3), IDS, IT)
    assert (~table.present[:, column]).sum() == 300
    assert table.present[:, 1 - column].all()


def test_any_is_independent_and_never_all_missing_unless_asked() -> None:
    mods = (Modality.IMAGE, Modality.TEXT, Modality.AUDIO)
    table = make_mask_table(MissingConfig("any", 0.6, seed=1), IDS, mods)
    assert table.present.any(axis=1).all()
    assert 0.45 < 1 - table.present.mean() < 0.65
    allowed = make_mask_table(MissingConfig("any", 0.6, seed=1, allow_all_missing=True), IDS, mods)
    assert (~allowed.present.any(axis=1)).sum() > 100


def test_same_seed_same_bytes_other_seed_other_table(tmp_path: Path) -> None:
    config = MissingConfig("both", 0.7, seed=11)
    a = write_mask_table(make_mask_table(config, IDS, IT), tmp_path / "a.csv")
    b = write_mask_table(make_mask_table(config, IDS, IT), tmp_path / "b.csv")
    assert a.read_bytes() == b.read_bytes()
    other = make_mask_table(MissingConfig("both", 0.7, seed=12), IDS, IT)
    assert not np.array_equal(read_mask_table(a).present, other.present)
    assert read_mask_table(a).ids == tuple(IDS)


def test_get_mask_table_writes_once_and_checks_ids(tmp_path: Path) -> None:
    config = MissingConfig("text", 0.5, seed=0)
    table = get_mask_table(config, "toy", "train", IDS, IT, tmp_path)
    path = tmp_path / "toy" / "train" / f"{config.slug}.csv"
    assert path.is_file()
    before = path.stat().st_mtime_ns
    again = get_mask_table(config, "toy", "train", IDS, IT, tmp_path)
    assert np.array_equal(table.present, again.present) and path.stat().st_mtime_ns == before
    with pytest.raises(DataFormatError, match="ids differ"):
        get_mask_table(config, "toy", "train", IDS[:10], IT, tmp_path)


def test_presence_rows_follow_modality_order() -> None:
    table = make_mask_table(
        MissingConfig("image", 1.0), ["a", "b"], (Modality.TEXT, Modality.IMAGE)
    )
    assert table.presence_tensor_rows(["b"]).tolist() == [[False, True, False]]
    with pytest.raises(KeyError, match="'zz'"):
        table.presence_tensor_rows(["zz"])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"type": "video"}, "missing.type"),
        ({"rate": 1.5}, "missing.rate"),
        ({"rate": "0.5"}, "missing.rate"),
        ({"both_ratio": -0.1}, "missing.both_ratio"),
        ({"seed": -1}, "missing.seed"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MissingConfig(**kwargs)


def test_parse_and_type_needing_absent_modality() -> None:
    assert MissingConfig.parse("image:0.25").rate == 0.25
    with pytest.raises(ConfigError, match="TYPE:RATE"):
        MissingConfig.parse("both")
    with pytest.raises(ConfigError, match="needs that modality"):
        make_mask_table(MissingConfig("audio", 0.5), IDS, IT)
    with pytest.raises(ConfigError, match="needs text"):
        make_mask_table(MissingConfig("both", 0.5), IDS, (Modality.IMAGE, Modality.AUDIO))
    with pytest.raises(ConfigError, match="nothing to predict from"):
        make_mask_table(MissingConfig("text", 0.5), IDS, (Modality.TEXT,))


def test_malformed_table_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("id,image,text\n1,1,0\n2,1,7\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:3"):
        read_mask_table(path)
    with pytest.raises(DataFormatError, match="not found"):
        read_mask_table(tmp_path / "none.csv")
