"""Tests of the evaluation runner on official-format fixtures with a tiny trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from evals.anchors import ANCHORS, anchors_for
from evals.run import EvalConfig, main, resolve_settings, run_eval
from mllm_missing.errors import ConfigError, DataFormatError

pytest.importorskip("open_clip")


def tiny_backbone(*_: Any, **__: Any) -> Any:
    """The same tiny CLIP (random weights from its config, seeded) every time it is built."""
    from mllm_missing.strategies.testing import tiny_clip

    return tiny_clip(seed=0)


def write_memes(root: Path, fx: ModuleType, per_split: int = 16) -> Path:
    """A Hateful Memes release in the official format with `per_split` memes per labelled split."""
    root.mkdir(parents=True, exist_ok=True)
    for n, split in enumerate(("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen")):
        records = []
        for k in range(per_split):
            meme_id = 1000 * (n + 1) + k
            label = None if split == "test_unseen" else k % 2
            text = f"{'hateful' if k % 2 else 'kind'} caption number {k}"
            records.append(fx.meme_record(meme_id, label, text))
            color = (200 if k % 2 else 20, 10 * k, 90)
            fx.write_image(root / "img" / f"{meme_id:05d}.png", color)
        fx.write_jsonl(root / f"{split}.jsonl", records)
    return root


def train_tiny(dataset: str, root: Path, output: Path, cache: Path) -> Path:
    """Train a tiny checkpoint through `run_training` (the real training path, tiny backbone)."""
    from mllm_missing.training.config import TrainConfig
    from mllm_missing.training.supervised import run_training

    config = TrainConfig(
        dataset=dataset, data_root=str(root), backbone="clip-vit-b-16", device="cpu",
        hidden_size=16, epochs=2, batch_size=4, lr=0.01, train_missing="both:0.7",
        test_missing=("both:0.7", "both:0.0"), output_dir=str(output), cache_dir=str(cache),
        log="none",
    )  # fmt: skip
    run_training(config, backbone=tiny_backbone())
    return output


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, fx: ModuleType) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("eval")
    cache = base / "cache"
    mmimdb = fx.write_mmimdb(base / "mmimdb")
    memes = write_memes(base / "memes", fx)
    return {
        "cache": cache,
        "mmimdb": mmimdb,
        "memes": memes,
        "mmimdb_run": train_tiny("mmimdb", mmimdb, base / "run_mmimdb", cache),
        "memes_run": train_tiny("hateful_memes", memes, base / "run_memes", cache),
    }


def config(data: dict[str, Path], out: Path, **changes: Any) -> EvalConfig:
    values: dict[str, Any] = {
        "task": "mmimdb",
        "checkpoints": (f"tiny={data['mmimdb_run']}",),
        "data_root": str(data["mmimdb"]),
        "missing": ("both:0.7", "text:0.7", "image:0.7"),
        "output_dir": str(out),
        "cache_dir": str(data["cache"]),
        "bootstrap": 50,
        "device": "cpu",
        "compare": True,
    }
    values.update(changes)
    return EvalConfig(**values)


def test_mmimdb_reproduces_training_scores_and_prints_anchors(
    data: dict[str, Path], tmp_path: Path
) -> None:
    results = run_eval(config(data, tmp_path), backbone_factory=tiny_backbone)
    rows = {(r["missing_type"], r["missing_rate"]): r for r in results["rows"]}
    assert list(rows) == [("both", 0.0), ("both", 0.7), ("text", 0.7), ("image", 0.7)]
    assert set(rows["both", 0.7]["metrics"]) == {"f1_macro", "f1_micro", "f1_samples",
                                                  "f1_weighted"}  # fmt: skip
    assert all(r["train_missing"] == "both:0.7" for r in rows.values())
    # One evaluation path: the eval runner scores exactly what training scored on the test split.
    trained = json.loads((data["mmimdb_run"] / "results.json").read_text())["test"]
    by_rate = {r["missing_rate"]: r for r in trained}
    for rate in (0.7, 0.0):
        assert rows["both", rate]["metrics"] == by_rate[rate]["metrics"]
    ratios = {r["missing_type"]: r for r in results["robustness"]}
    assert set(ratios) == {"both", "text", "image"}
    full = rows["both", 0.0]["value"]
    if full:
        assert ratios["text"]["ratio"] == pytest.approx(rows["text", 0.7]["value"] / full)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown == results["markdown"]
    assert "published, not re-run" in markdown and "| 42.66 |" in markdown
    assert "per (movie, plot) pair" in markdown  # the counting caveat of MAP/DCP
    assert (tmp_path / "f1_macro_vs_missing.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["seed"] == 0 and "torch" in saved["versions"]
    assert saved["methods"][0]["training"]["train_missing"] == "both:0.7"


def test_cli_on_hateful_memes_prints_the_table_with_anchors(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from mllm_missing import cli
    from mllm_missing.training import supervised

    monkeypatch.setattr(supervised, "load_backbone", tiny_backbone)
    args = ["eval", "--task", "hateful_memes", "--data-root", str(data["memes"]),
            "--checkpoint", str(data["memes_run"] / "best"), "--missing", "both:0.7",
            "--compare", "--output-dir", str(tmp_path), "--cache-dir", str(data["cache"]),
            "--bootstrap", "50", "--device", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Hateful Memes (test_seen, 16 samples)" in out
    assert "| auroc (%) | 95 % CI | accuracy (%) |" in out
    for anchor in anchors_for("hateful_memes"):
        assert f"| {anchor.value:.2f} |" in out
    assert "| this run | run_memes |" in out


def test_two_runs_give_identical_tables(data: dict[str, Path], tmp_path: Path) -> None:
    first = run_eval(config(data, tmp_path / "a", sweep=("both",)), backbone_factory=tiny_backbone)
    second = run_eval(config(data, tmp_path / "b", sweep=("both",)), backbone_factory=tiny_backbone)
    assert (tmp_path / "a" / "results.md").read_bytes() == (
        tmp_path / "b" / "results.md"
    ).read_bytes()
    assert first["rows"] == second["rows"] and first["robustness"] == second["robustness"]
    assert len(first["rows"]) == 1 + 10 + 2  # 0 %, both 10..100 %, text and image 70 %


def test_interrupted_run_resumes_where_it_stopped(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evals.run

    reference = run_eval(config(data, tmp_path / "full"), backbone_factory=tiny_backbone)
    real = evals.run.evaluate_missing
    calls: list[str] = []

    def flaky(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if len(calls) == 2:
            raise KeyboardInterrupt  # stopped after 2 of the 4 settings
        calls.append(args[4].slug)
        return real(*args, **kwargs)

    monkeypatch.setattr(evals.run, "evaluate_missing", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_eval(config(data, tmp_path / "cut"), backbone_factory=tiny_backbone)
    assert len(list((tmp_path / "cut" / "rows" / "tiny").glob("*.json"))) == 2
    done = list(calls)
    calls.clear()
    monkeypatch.setattr(evals.run, "evaluate_missing", lambda *a, **k: calls.append(a[4].slug)
                        or real(*a, **k))  # fmt: skip
    resumed = run_eval(config(data, tmp_path / "cut"), backbone_factory=tiny_backbone)
    assert len(calls) == 2 and not set(calls) & set(done)
    assert resumed["timing"]["reused"] == 2
    assert resumed["markdown"] == reference["markdown"]
    # A rerun with other settings is refused, naming them, unless --overwrite.
    with pytest.raises(ConfigError, match=r"bootstrap: 50 then, 60 now.*--overwrite"):
        run_eval(config(data, tmp_path / "cut", bootstrap=60), backbone_factory=tiny_backbone)
    calls.clear()
    run_eval(config(data, tmp_path / "cut", bootstrap=60, overwrite=True),
             backbone_factory=tiny_backbone)  # fmt: skip
    assert len(calls) == 4


def test_settings_sweep_and_the_added_full_setting() -> None:
    base: dict[str, Any] = {"task": "easy_vqa", "checkpoints": ("x",)}
    slugs = [s.slug for s in resolve_settings(EvalConfig(**base, missing=("text:0.7",)))]
    assert slugs == ["both-0.00-b0.50-s0", "text-0.70-s0"]
    sweep = resolve_settings(EvalConfig(**base, sweep=("both", "image"), missing=("both:0.7",)))
    assert [s.rate for s in sweep][:12] == [0.0, *(round(0.1 * i, 1) for i in range(1, 11)), 0.1]
    assert len(sweep) == 21  # 0 % once, then 10 rates per type
    assert resolve_settings(EvalConfig(**base, missing=("image:0.5",)))[0].rate == 0.5


def test_anchors_are_the_design_table() -> None:
    assert [a.value for a in anchors_for("mmimdb")] == [42.66, 51.42, 52.90, 52.97]
    assert [a.value for a in anchors_for("hateful_memes")] == [63.6, 66.08, 68.42, 70.15]
    assert {a.method for a in ANCHORS} == {"MAP", "DCP", "SyP", "MoRA"}
    assert anchors_for("easy_vqa") == []


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"task": "food101"}, ConfigError, "task must be one of easy_vqa, hateful_memes, mmimdb"),
        ({"missing": ("both=0.7",)}, ConfigError, "TYPE:RATE"),
        ({"missing": ("audio:0.5",)}, ConfigError, "'audio' is not a modality of mmimdb"),
        ({"missing": ("both:1.5",)}, ConfigError, "missing.rate must be in"),
        ({"checkpoints": ("/nonexistent/run",)}, ConfigError, "no such folder"),
        ({"data_root": None}, ConfigError, "data_root: mmimdb needs"),
        ({"split": "validation"}, ConfigError, "split must be one of train, dev, test"),
    ],
)
def test_bad_input_is_named(
    data: dict[str, Path], tmp_path: Path, changes: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        run_eval(config(data, tmp_path, **changes), backbone_factory=tiny_backbone)


def test_wrong_checkpoint_and_unlabelled_split(data: dict[str, Path], tmp_path: Path) -> None:
    memes = {"task": "hateful_memes", "data_root": str(data["memes"]), "missing": ("both:0.7",)}
    with pytest.raises(ConfigError, match="trained for mmimdb with 23 label"):
        run_eval(config(data, tmp_path, **memes), backbone_factory=tiny_backbone)
    own = {**memes, "checkpoints": (str(data["memes_run"]),), "split": "test_unseen"}
    with pytest.raises(DataFormatError, match="no labels"):
        run_eval(config(data, tmp_path, **own), backbone_factory=tiny_backbone)
    with pytest.raises(DataFormatError, match="no model_config.json"):
        run_eval(
            config(data, tmp_path, checkpoints=(str(tmp_path),)), backbone_factory=tiny_backbone
        )


def test_command_line_errors_without_traceback(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--task", "mmimdb", "--data-root", str(data["mmimdb"]), "--checkpoint",
            str(data["memes_run"]), "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: checkpoint" in err and "hateful_memes" in err and "Traceback" not in err
    assert main([*args[:4], "--checkpoint", str(data["mmimdb_run"]), "--missing", "0.7"]) == 2
    assert "TYPE:RATE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--task", "food101", "--checkpoint", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'food101'" in capsys.readouterr().err


@pytest.mark.slow
def test_easy_vqa_offline_default(tmp_path: Path) -> None:
    from mllm_missing.cli import main as cli_main

    run = tmp_path / "run"
    recipe = Path(__file__).parents[2] / "recipes/configs/easy_vqa/offline-default_zero.yaml"
    train = ["train", str(recipe), "limit_train=300",
             "limit_val=100", "limit_test=100", "epochs=1", f"output_dir={run}"]  # fmt: skip
    assert cli_main(train) == 0
    args = ["eval", "--task", "easy_vqa", "--checkpoint", f"zero={run}", "--missing",
            "both:0.7", "--limit", "100", "--compare", "--output-dir", str(tmp_path / "eval")]  # fmt: skip
    assert cli_main(args) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    trained = json.loads((run / "results.json").read_text())["test"]
    assert [r["metrics"] for r in results["rows"]] == [trained[1]["metrics"], trained[0]["metrics"]]
    assert "No published anchors cover easy-VQA" in (tmp_path / "eval" / "results.md").read_text()


def test_a_qlora_checkpoint_is_scored_on_its_quantized_backbone(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from mllm_missing.training import supervised

    checkpoint = tmp_path / "qlora"
    shutil.copytree(data["mmimdb_run"], checkpoint)
    for spec_file in checkpoint.rglob("model_config.json"):
        spec = json.loads(spec_file.read_text())
        spec["training"]["quantization"] = "nf4"
        spec_file.write_text(json.dumps(spec))
    asked: list[str] = []

    def load_backbone(*_: Any, quantization: str = "none", **__: Any) -> Any:
        asked.append(quantization)
        return tiny_backbone()

    monkeypatch.setattr(supervised, "load_backbone", load_backbone)
    changes = {"checkpoints": (f"q={checkpoint}",), "missing": ("both:0.7",), "compare": False}
    run_eval(config(data, tmp_path / "out", **changes))
    assert asked and set(asked) == {"nf4"}
