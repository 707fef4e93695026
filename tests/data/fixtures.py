"""Write tiny MM-IMDb and Hateful Memes releases in exactly the official file formats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 16)) -> Path:
    """Write a small real image; the format follows the suffix (.jpeg or .png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write one JSON object per line, as the Hateful Memes release does."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def imdb_record(movie_id: str, title: str, genres: list[str], plots: list[str]) -> dict[str, Any]:
    """An IMDb movie record with the fields of the MM-IMDb release (only genres/plot are used)."""
    return {
        "title": title,
        "kind": "movie",
        "year": 1900 + int(movie_id) % 100,
        "rating": 6.4,
        "votes": 1234,
        "imdb id": movie_id,
        "director": [{"name": "A. Director", "person_id": "0000001"}],
        "countries": ["USA"],
        "languages": ["English"],
        "runtimes": ["90"],
        "cover url": f"http://ia.media-imdb.com/images/{movie_id}.jpg",
        "plot outline": plots[0] if plots else "",
        "genres": genres,
        "plot": plots,
    }


#: split -> [(movie id, title, genres, plots)]; "Reality-TV" / "Talk-Show" are outside the 23.
MMIMDB_MOVIES: dict[str, list[tuple[str, str, list[str], list[str]]]] = {
    "train": [
        ("0000008", "Fred Ott's Sneeze", ["Documentary", "Short"], ["A man sneezes."]),
        (
            "0000091",
            "The House of the Devil",
            ["Horror", "Short"],
            ["A bat flies into a castle.", "The devil appears and vanishes."],
        ),
        (
            "0000417",
            "A Trip to the Moon",
            ["Adventure", "Fantasy", "Sci-Fi", "Short"],
            ["Astronomers fly to the moon."],
        ),
        (
            "0004972",
            "The Birth of a Nation",
            ["Drama", "History", "Romance", "War", "Reality-TV"],
            ["Two families in the Civil War.", "  ", "A story of the Reconstruction era."],
        ),
    ],
    "dev": [
        ("0006333", "20,000 Leagues", ["Comedy", "Family", "Film-Noir"], ["A submarine tale."]),
        ("0010323", "Caligari", ["Crime", "Thriller", "Mystery", "Talk-Show"], ["A hypnotist."]),
    ],
    "test": [
        ("0012349", "The Kid", ["Comedy", "Drama", "Family"], ["A tramp raises a child."]),
        ("0013442", "Nosferatu", ["Horror", "Fantasy"], ["A vampire.", "A ship of death."]),
        (
            "0015864",
            "The Gold Rush",
            ["Western", "Sport", "Musical", "Music", "Animation", "Biography", "Action"],
            ["A prospector in the Klondike."],
        ),
    ],
}


def write_mmimdb(root: Path) -> Path:
    """Write ``split.json``, ``dataset/<id>.json`` and ``dataset/<id>.jpeg`` for `MMIMDB_MOVIES`."""
    folder = root / "dataset"
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    for n, (split, movies) in enumerate(MMIMDB_MOVIES.items()):
        splits[split] = [movie_id for movie_id, *_ in movies]
        for k, (movie_id, title, genres, plots) in enumerate(movies):
            record = imdb_record(movie_id, title, genres, plots)
            (folder / f"{movie_id}.json").write_text(json.dumps(record), encoding="utf-8")
            write_image(folder / f"{movie_id}.jpeg", (40 * n, 30 * k, 200))
    (root / "split.json").write_text(json.dumps(splits, indent=1), encoding="utf-8")
    return root


#: split -> [(id, label or None, text)]; test_unseen has no label field, as in the release.
MEMES: dict[str, list[tuple[int, int | None, str]]] = {
    "train": [
        (42953, 0, "its their character not their color that matters"),
        (23058, 0, "don't be afraid to love again everyone is not like your ex"),
        (1235, 1, "putting bows on your pet"),
        (13894, 1, "a meme with a hateful caption"),
    ],
    "dev_seen": [
        (8291, 1, "white people is this a shooting range"),
        (46971, 0, "bravery at its finest"),
    ],
    "dev_unseen": [(3745, 0, "a dog in a hat"), (83675, 1, "another hateful caption")],
    "test_seen": [(16395, 1, "hateful text here"), (37405, 0, "a kind caption")],
    "test_unseen": [(1, None, "first unseen"), (29, None, "second unseen"), (98765, None, "third")],
}


def meme_record(meme_id: int, label: int | None, text: str) -> dict[str, Any]:
    """One line of a Hateful Memes split file (no ``label`` key when `label` is None)."""
    record: dict[str, Any] = {"id": meme_id, "img": f"img/{meme_id:05d}.png"}
    if label is not None:
        record["label"] = label
    record["text"] = text
    return record


def write_hateful_memes(root: Path) -> Path:
    """Write the five ``<split>.jsonl`` files and ``img/<id>.png`` for `MEMES`."""
    root.mkdir(parents=True, exist_ok=True)
    for n, (split, memes) in enumerate(MEMES.items()):
        write_jsonl(root / f"{split}.jsonl", [meme_record(*meme) for meme in memes])
        for k, (meme_id, _, _) in enumerate(memes):
            write_image(root / "img" / f"{meme_id:05d}.png", (50 * n, 60 * k, 90))
    return root
