"""Published results at 70 % missing-both (the reference table of DESIGN.md), for `--compare`.

These are figures quoted from the papers, **not re-runs**: the runner prints them under that
label next to our rows for the same dataset and setting.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANCHORS", "ANCHOR_SETTING", "Anchor", "anchors_for"]

#: The one setting every anchor is reported at: missing-both, rate 0.7 at train and at test
#: (35 % of samples lose text, 35 % lose image).
ANCHOR_SETTING = ("both", 0.7)


@dataclass(frozen=True)
class Anchor:
    """One published figure.

    Attributes:
        method: method name as the paper calls it.
        source: paper and venue.
        backbone: the frozen backbone it was reported on.
        dataset: ``mmimdb``, ``food101`` or ``hateful_memes``.
        metric: our metric name (``f1_macro``, ``accuracy``, ``auroc``).
        value: the figure, in percent.
        note: how the figure was obtained, where it matters.
    """

    method: str
    source: str
    backbone: str
    dataset: str
    metric: str
    value: float
    note: str = ""


_ROWS = [
    # method, source, backbone, (MM-IMDb F1-macro, Food-101 accuracy, Hateful Memes AUROC), note
    ("MAP", "Lee et al., CVPR'23", "ViLT", (42.66, 79.2, 63.6), ""),
    (
        "DCP",
        "NeurIPS'24",
        "CLIP ViT-B/16",
        (51.42, 81.87, 66.08),
        "as re-run by later papers",
    ),
    ("SyP", "ICCV'25", "CLIP ViT-B/16", (52.90, 82.45, 68.42), ""),
    ("MoRA", "ICLR'26", "CLIP ViT-B/16", (52.97, 83.77, 70.15), "LoRA, 0.11 % params"),
]
_COLUMNS = (("mmimdb", "f1_macro"), ("food101", "accuracy"), ("hateful_memes", "auroc"))

#: Every anchor, in the order of the DESIGN.md table.
ANCHORS: tuple[Anchor, ...] = tuple(
    Anchor(method, source, backbone, dataset, metric, value, note)
    for method, source, backbone, values, note in _ROWS
    for (dataset, metric), value in zip(_COLUMNS, values)
)


def anchors_for(dataset: str) -> list[Anchor]:
    """The anchors reported on `dataset` (empty when the papers do not cover it)."""
    return [a for a in ANCHORS if a.dataset == dataset]
