"""Chat with the easy-VQA projector VLM (`mllm-missing chat --vlm DIR`): find its checkpoint,
read the scores its recipe recorded per condition, and build the scheduler that picks how the LM
is told that the image is absent (``learned`` missing-image tokens or the ``status_text`` line).

Scores per prompt, for the ``rule`` scheduler (and shown to the ``llm`` one): a ``--scores``
file in the layout of `mllm_missing.scheduler.load_validation_scores` with options ``learned``
and ``status_text``, else the recipe's ``results.json`` next to the checkpoint: condition
``absent`` is ``learned`` and ``absent_status`` is ``status_text`` on pattern ``text``. The
recipe scores these conditions on held-out validation questions (``val``, its
``choice_val_size`` train questions) and on its test questions (``test``); the validation
scores are used. Results written before the recipe scored validation (or with
``choice_val_size: 0``) have test scores only: those are used then, and the source line and every
rationale say ``test``, never ``validation`` (``--resume`` the recipe to add the validation
scores). A prompt with no score is reported as unscored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_missing.errors import ConfigError, DataFormatError

__all__ = ["CONDITION_PROMPTS", "VLM_TASK", "VLMCheckpoint", "build_vlm_scheduler", "find_vlm"]

#: The recipe's evaluation condition for each prompt choice (image absent).
CONDITION_PROMPTS = {"absent": "learned", "absent_status": "status_text"}
#: The task the ``llm`` scheduler reads.
VLM_TASK = "answer a question about a small image of one coloured shape (easy-VQA)"
_TOKENS_FILE = "missing_tokens.json"  # MissingAwareVLM's MISSING_CONFIG_FILE


@dataclass(frozen=True)
class VLMCheckpoint:
    """A projector VLM checkpoint found from what the user gave.

    Attributes:
        directory: the checkpoint folder (``projector/`` + missing tokens).
        results: the recipe's ``results.json`` for it, if there is one.
    """

    directory: Path
    results: Path | None


def find_vlm(path: str | Path) -> VLMCheckpoint:
    """The checkpoint in `path`: the projector recipe's ``output_dir`` (its ``best/`` is used)
    or a checkpoint folder itself (``best/``, whose parent holds ``results.json``).

    Raises:
        ConfigError: `path` does not exist or holds no projector VLM checkpoint (naming what
            was looked for, and `--checkpoint` when it is a classifier checkpoint).
    """
    given = Path(path).expanduser()
    if not given.is_dir():
        raise ConfigError(f"--vlm {path}: no such folder")
    for directory in (given / "best", given):
        if (directory / _TOKENS_FILE).is_file() and (directory / "projector").is_dir():
            results = next(
                (r for r in (directory / "results.json", directory.parent / "results.json")
                 if r.is_file()), None,
            )  # fmt: skip
            return VLMCheckpoint(directory, results)
    hint = ""
    if any((d / "model_config.json").is_file() for d in (given, given / "best")):
        hint = "; it looks like a classifier checkpoint: use --checkpoint"
    raise ConfigError(
        f"--vlm {path}: not a projector VLM checkpoint (no {_TOKENS_FILE} and projector/ in it "
        f"or in its best/; `recipes/easy_vqa_vlm.py` writes them){hint}"
    )


def prompt_scores(checkpoint: VLMCheckpoint, scores_file: str | None = None) -> tuple[Any, str]:
    """Scores per prompt on pattern ``text`` and one line saying where they come from.

    Returns:
        ``(ValidationScores or None, explanation)``.

    Raises:
        DataFormatError: `scores_file` or the results file is unreadable.
    """
    from mllm_missing.scheduler import ValidationScores, load_validation_scores

    if scores_file:
        scores = load_validation_scores(scores_file)
        return scores, f"scores per prompt: {scores_file} ({scores.split_name})"
    if checkpoint.results is None:
        return None, "scores per prompt: none (no results.json next to the checkpoint)"
    try:
        results = json.loads(checkpoint.results.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"{checkpoint.results}: cannot read ({exc})") from None
    metric = str(results.get("metric", "accuracy"))
    for split in ("val", "test"):  # validation when the recipe recorded it per condition
        table = results.get(split)
        if not isinstance(table, dict):
            continue
        found = {
            prompt: {"text": float(table[condition][metric])}
            for condition, prompt in CONDITION_PROMPTS.items()
            if isinstance(table.get(condition), dict) and metric in table[condition]
        }
        if not found:
            continue
        listed = ", ".join(f"{p} {s['text']:.3f}" for p, s in found.items())
        counts = {table[c].get("questions") for c, p in CONDITION_PROMPTS.items() if p in found}
        unscored = [p for p in CONDITION_PROMPTS.values() if p not in found]
        line = f"scores per prompt: {checkpoint.results} [{split}] {metric}: {listed}"
        if len(counts) == 1 and None not in counts:
            line += f" ({counts.pop()} questions)"
        if split == "test":
            line += (
                " (no validation scores of the image-absent conditions there: these test scores "
                "choose a chat prompt, they are not an evaluation; resuming the recipe with "
                "--resume adds the validation scores)"
            )
        if unscored:
            line += f"; not scored there: {', '.join(unscored)}"
        return ValidationScores(metric, found, split), line
    conditions = ", ".join(CONDITION_PROMPTS)
    return None, f"scores per prompt: none ({checkpoint.results} has no {conditions} condition)"


def build_vlm_scheduler(
    kind: str,
    checkpoint: VLMCheckpoint,
    *,
    prompt: str | None = None,
    scores_file: str | None = None,
    llm_name: str = "smollm2-135m-instruct",
    llm: Any = None,
) -> tuple[Any, list[str]]:
    """The scheduler of `kind` over the prompts ``learned`` and ``status_text``, and the lines
    that tell the user how it will choose.

    Args:
        kind: ``fixed``, ``rule`` or ``llm``.
        checkpoint: the VLM checkpoint (its results give the ``rule`` scores).
        prompt: the ``fixed`` kind's prompt (default ``learned``); only for ``fixed``.
        scores_file: scores per prompt instead of the results'.
        llm_name: the ``llm`` kind's model (preset or local path).
        llm: an already loaded LLM for the ``llm`` kind (the VLM's own SmolLM2 can serve).

    Raises:
        ConfigError: `prompt` with another kind than ``fixed``, or ``rule`` with no scores.
    """
    from mllm_missing.scheduler import PROMPT_CHOICES, SchedulerConfig, build_scheduler

    if prompt is not None and kind != "fixed":
        raise ConfigError(
            f"--prompt sets the fixed scheduler's choice; --scheduler {kind} chooses the prompt "
            "itself (drop --prompt, or use --scheduler fixed)"
        )
    scores, source = prompt_scores(checkpoint, scores_file)
    if kind == "rule" and scores is None:
        raise ConfigError(
            f"--scheduler rule needs a score per prompt and has none ({source}); pass --scores "
            'FILE ({"scores": {"learned": {"text": 0.43}, "status_text": {"text": 0.38}}}) or '
            "use --scheduler fixed or llm"
        )
    config = SchedulerConfig(
        kind=kind, task=VLM_TASK, options=PROMPT_CHOICES, fixed=prompt or "learned", llm=llm_name
    )
    scheduler = build_scheduler(config, scores=scores, llm=llm)
    lines = [f"scheduler: {kind}, choosing learned or status_text when the image is absent"]
    if kind == "fixed":
        lines[0] = f"scheduler: fixed, prompt {prompt or 'learned'} when the image is absent"
    else:
        lines.append(source)
    return scheduler, lines
