"""A memory bank of training embeddings with exact, presence-aware nearest-neighbour search."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mllm_missing.strategies.retrieval import storage
from mllm_missing.strategies.retrieval.arrays import (
    check_ids,
    normalise_rows,
    parse_embeddings,
    presence_columns,
)
from mllm_missing.strategies.retrieval.config import MemoryBankConfig
from mllm_missing.strategies.retrieval.search import chunked_topk
from mllm_missing.types import MODALITY_ORDER, Modality


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory (a memory map stays a memory map); never written to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class MemoryBank:
    """Per-modality embeddings of N entries (e.g. training samples) with string ids.

    Every modality has an (N, D_m) matrix; an entry may lack a modality (the bool `presence`
    matrix says which; absent rows are stored as zeros and never returned). Vectors are
    L2-normalised once at build time for cosine search and stored with their norms, so the raw
    embedding of a neighbour is ``normalised * norm`` (exact up to float rounding; with
    ``dtype="float16"`` up to float16 rounding).

    Build one with `MemoryBank.build` (or `build_memory_bank`), or read one with
    `MemoryBank.load`; the constructor takes already normalised arrays.

    Args:
        ids: the N entry ids, unique.
        normalised: modality -> unit rows (N, D_m), zeros where absent.
        norms: modality -> the rows' L2 norms (N,).
        presence: bool (N, M), column i for the i-th modality of `normalised` in
            `MODALITY_ORDER` order.
        config: storage and search settings.
        groups: optional (N,) str: entries that share an input (the questions about one
            image) share a group, and leave-one-out leaves the whole group out (`search`).
        labels: optional float (N, L) targets of the entries (one-hot, multi-hot or a 0/1
            column), read back as the neighbours' label mean (`neighbour_labels`).
    """

    def __init__(
        self,
        ids: Sequence[str],
        normalised: Mapping[Modality, np.ndarray],
        norms: Mapping[Modality, np.ndarray],
        presence: np.ndarray,
        config: MemoryBankConfig,
        groups: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> None:
        self.config = config
        self.ids: list[str] = list(ids)
        self.modalities: tuple[Modality, ...] = tuple(m for m in MODALITY_ORDER if m in normalised)
        self.dims: dict[Modality, int] = {m: int(normalised[m].shape[1]) for m in self.modalities}
        #: The backing numpy arrays by file stem (``np.memmap`` after ``load(mmap=True)``).
        self.arrays: dict[str, np.ndarray] = {"presence": presence}
        for m in self.modalities:
            self.arrays[m.value] = normalised[m]
            self.arrays[f"{m.value}_norms"] = norms[m]
        self._normalised = {m: _readonly_tensor(normalised[m]) for m in self.modalities}
        self._norms = {m: _readonly_tensor(norms[m]) for m in self.modalities}
        self._presence = _readonly_tensor(presence)
        self._row_of: dict[str, int] | None = None
        self._group_codes: torch.Tensor | None = None
        self._code_of_group: dict[str, int] | None = None
        if groups is not None:
            self.arrays["groups"] = groups
            codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
            self._group_codes = torch.from_numpy(codes.astype(np.int64))
        self._labels: torch.Tensor | None = None
        if labels is not None:
            self.arrays["labels"] = labels
            self._labels = _readonly_tensor(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        dims = ", ".join(f"{m.value}={d}" for m, d in self.dims.items())
        return f"MemoryBank({len(self)} entries, {dims}, {self.config})"

    @property
    def presence(self) -> torch.Tensor:
        """Bool (N, M): which entries have which modality, columns in `modalities` order."""
        return self._presence

    @property
    def grouped(self) -> bool:
        """Whether the bank keeps a group per entry (`build(groups=...)`)."""
        return self._group_codes is not None

    @property
    def label_dim(self) -> int:
        """Width of the stored labels (0 when the bank holds none)."""
        return 0 if self._labels is None else int(self._labels.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the search matrices live (CPU unless moved with `to`)."""
        return self._presence.device

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        embeddings: Mapping[str | Modality, torch.Tensor | np.ndarray],
        presence: torch.Tensor | np.ndarray | None = None,
        config: MemoryBankConfig | None = None,
        *,
        groups: Sequence[str] | None = None,
        labels: torch.Tensor | np.ndarray | None = None,
    ) -> MemoryBank:
        """Build a bank from raw embeddings.

        Args:
            ids: N unique string ids, one per entry (the same for every modality).
            embeddings: modality -> (N, D_m) float embeddings. Rows of absent entries are
                ignored (they may hold anything, NaN included) and stored as zeros.
            presence: bool (N, M), columns in `MODALITY_ORDER` order restricted to the given
                modalities, or (N, 3) in full `MODALITY_ORDER`; default: every entry has every
                given modality.
            config: storage and search settings (default `MemoryBankConfig()`).
            groups: optional N group names (entries sharing an input share one); leave-one-out
                then leaves out the query's whole group. Default: each entry its own group.
            labels: optional (N,) or (N, L) finite targets kept beside the embeddings
                (a class index column is not accepted: pass it one-hot).

        Raises:
            ValueError: duplicate or non-string ids, no entries, a shape mismatch, an entry
                with every modality missing, a present row with NaN/inf or all zeros
                (the message names the modality, the first bad row and its id), groups or
                labels of another length, or labels with NaN/inf.
        """
        config = config or MemoryBankConfig()
        ids = check_ids(ids)
        parsed = parse_embeddings(embeddings, len(ids))
        modalities = tuple(m for m in MODALITY_ORDER if m in parsed)
        if presence is None:
            mask = torch.ones(len(ids), len(modalities), dtype=torch.bool)
        else:
            mask = presence_columns(presence, len(ids), modalities, "bank")
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            row = int(torch.nonzero(empty)[0])
            raise ValueError(f"entry {ids[row]!r} (row {row}): every modality is missing")
        normalised, norms = {}, {}
        for column, modality in enumerate(modalities):
            normalised[modality], norms[modality] = normalise_rows(
                modality, parsed[modality], mask[:, column], ids, config.dtype
            )
        group_array = None
        if groups is not None:
            if len(groups) != len(ids):
                raise ValueError(f"groups has {len(groups)} entries for {len(ids)} ids")
            group_array = np.array([str(g) for g in groups], dtype=str)
        label_array = None if labels is None else _label_matrix(labels, len(ids))
        return cls(ids, normalised, norms, mask.numpy().copy(), config, group_array, label_array)

    def save(self, directory: str | Path) -> Path:
        """Write the bank to `directory`, atomically (a temporary folder, then `os.replace`).

        Layout: ``config.json`` (the config, entry count, modalities, dims, format version),
        ``ids.npy``, ``presence.npy``, and per modality ``<modality>.npy`` (unit rows in
        ``config.dtype``) and ``<modality>_norms.npy`` (float32 norms).
        """
        meta = {
            "config": self.config.to_dict(),
            "num_entries": len(self),
            "modalities": [m.value for m in self.modalities],
            "dims": {m.value: d for m, d in self.dims.items()},
            "groups": self._group_codes is not None,
            "label_dim": self.label_dim,
        }
        arrays = {"ids": np.array(self.ids, dtype=str), **self.arrays}
        return storage.write_bank_files(directory, meta, arrays)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> MemoryBank:
        """Read a bank written by `save`.

        Args:
            directory: the bank folder.
            mmap: memory-map the embedding matrices and norms (``np.load(mmap_mode="r")``)
                so a large bank is paged in as searched instead of read into RAM. Ids and
                presence are always read. Values are trusted (they were checked at build).

        Raises:
            DataFormatError: naming the file that is missing, unreadable or inconsistent.
        """
        files = storage.read_bank_files(directory, mmap=mmap)
        return cls(
            files.ids, files.normalised, files.norms, files.presence, files.config,
            files.groups, files.labels,
        )  # fmt: skip

    def to(self, device: str | torch.device) -> MemoryBank:
        """A bank whose search matrices live on `device` (e.g. to search a GPU-resident bank
        repeatedly); the backing arrays, and thus `save`, are unchanged."""
        moved = copy.copy(self)
        moved._normalised = {m: t.to(device) for m, t in self._normalised.items()}
        moved._norms = {m: t.to(device) for m, t in self._norms.items()}
        moved._presence = self._presence.to(device)
        if self._labels is not None:
            moved._labels = self._labels.to(device)
        return moved

    def _column(self, modality: str | Modality) -> tuple[Modality, int]:
        parsed = Modality.parse(modality)
        if parsed not in self.dims:
            held = ", ".join(m.value for m in self.modalities)
            raise ValueError(f"the memory bank has no {parsed.value} embeddings (it has: {held})")
        return parsed, self.modalities.index(parsed)

    def _exclusions(
        self,
        exclude_ids: Sequence[str | None] | None,
        exclude_groups: Sequence[str | None] | None,
        queries: int,
    ) -> torch.Tensor | None:
        """Per query, the code `chunked_topk` leaves out: an entry's row in an ungrouped bank,
        a group code in a grouped one (-1: nothing)."""
        if exclude_ids is not None and exclude_groups is not None:
            raise ValueError("give exclude_ids or exclude_groups, not both")
        names = exclude_ids if exclude_ids is not None else exclude_groups
        if names is None:
            return None
        what = "exclude_ids" if exclude_ids is not None else "exclude_groups"
        if len(names) != queries:
            raise ValueError(f"{what} has {len(names)} entries for {queries} queries")
        if self._row_of is None:
            self._row_of = {entry: row for row, entry in enumerate(self.ids)}
        if exclude_groups is not None and self._group_codes is not None:
            if self._code_of_group is None:
                groups = self.arrays["groups"].tolist()
                self._code_of_group = dict(zip(groups, self._group_codes.tolist(), strict=True))
            code_of = self._code_of_group
            return torch.tensor([-1 if g is None else code_of.get(g, -1) for g in names])
        # An ungrouped bank's groups are its entries: a group name is an entry id.
        row_of = self._row_of
        rows = torch.tensor([-1 if e is None else row_of.get(e, -1) for e in names])
        if self._group_codes is None:
            return rows
        # The excluded entry's group: every entry sharing its input is left out with it.
        return torch.where(rows >= 0, self._group_codes[rows.clamp_min(0)], -1)

    def search(
        self,
        queries: torch.Tensor,
        by: str | Modality,
        k: int | None = None,
        *,
        target: str | Modality | None = None,
        exclude_ids: Sequence[str | None] | None = None,
        exclude_groups: Sequence[str | None] | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k cosine neighbours of `queries` among the bank's `by` embeddings.

        Scores ``config.chunk_size`` bank rows at a time with a running top-k merge, so the
        full (Q, N) score matrix is never held.

        Args:
            queries: (Q, D_by) embeddings of modality `by` (normalised here; NaN/inf and
                all-zero rows raise ValueError naming the row).
            by: the query modality; only entries that have it are candidates.
            k: neighbours per query (default ``config.k``).
            target: if given, only entries that also have this modality are candidates (use
                it when the neighbours' `target` embeddings will be read).
            exclude_ids: one id (or None) per query that the query must not retrieve, e.g.
                its own id for leave-one-out on the bank's own split; in a bank with groups,
                the entries of that id's whole group are left out. Ids not in the bank
                exclude nothing.
            exclude_groups: instead of `exclude_ids`, one group name (or None) per query whose
                entries the query must not retrieve (a query from the bank's own data that is
                not itself an entry, e.g. a held-out row about a training image); in a bank
                without groups a group name is an entry id.
            device: where to compute (default: the bank's device if it was moved with `to`,
                else the queries' device); bank chunks are moved there.

        Returns:
            ``(scores, indices)``, float32 and long (Q, k) on the compute device, best first.
            When fewer than k entries are candidates, the remaining slots hold score ``-inf``
            and index ``-1``.
        """
        by, _ = self._column(by)
        eligible = self._presence[:, self.modalities.index(by)]
        if target is not None:
            _, target_column = self._column(target)
            eligible = eligible & self._presence[:, target_column]
        k = self.config.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1; got {k!r}")
        queries = torch.as_tensor(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dims[by]:
            raise ValueError(
                f"queries have shape {tuple(queries.shape)}, expected (Q, {self.dims[by]}) "
                f"for {by.value}"
            )
        if device is None:
            device = self.device if self.device.type != "cpu" else queries.device
        queries = queries.to(device=device, dtype=torch.float32)
        bad = ~torch.isfinite(queries).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"query row {int(torch.nonzero(bad)[0])} has NaN or inf values")
        norm = torch.linalg.vector_norm(queries, dim=1)
        if bool((norm == 0).any()):
            row = int(torch.nonzero(norm == 0)[0])
            raise ValueError(
                f"query row {row} is a zero vector: is {by.value} missing for it? "
                "(split queries with `group_queries`)"
            )
        exclude = self._exclusions(exclude_ids, exclude_groups, len(queries))
        return chunked_topk(
            queries / norm.unsqueeze(1),
            self._normalised[by],
            k,
            self.config.chunk_size,
            eligible=None if bool(eligible.all()) else eligible,
            exclude=exclude,
            key_groups=self._group_codes,
        )

    def group_queries(
        self, presence: torch.Tensor | np.ndarray, target: str | Modality | None = None
    ) -> dict[Modality, torch.Tensor]:
        """Split query rows by the modality to search them by.

        Each row goes to its first present modality (in `modalities` order) that the bank
        holds, other than `target` (the modality to be imputed).

        Args:
            presence: bool (Q, M) in `modalities` order, or (Q, 3) in `MODALITY_ORDER`.
            target: a modality never searched by.

        Returns:
            modality -> long row indices of the queries to search by it.

        Raises:
            ValueError: naming the rows with no present modality to search by ("every
                modality is missing").
        """
        mask = presence_columns(presence, len(presence), self.modalities, "query").clone()
        target_modality = None
        if target is not None:
            target_modality, column = self._column(target)
            mask[:, column] = False
        empty = torch.nonzero(~mask.any(dim=1)).squeeze(1).tolist()
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
            among = ", ".join(m.value for m in self.modalities if m != target_modality)
            raise ValueError(
                f"query rows {shown}: every modality is missing (of {among or 'none'}, the "
                "ones the memory bank can search by); there is nothing to search by"
            )
        first = mask.to(torch.int8).argmax(dim=1)
        groups = {m: torch.nonzero(first == i).squeeze(1) for i, m in enumerate(self.modalities)}
        return {m: rows for m, rows in groups.items() if len(rows)}

    def neighbour_embeddings(self, indices: torch.Tensor, target: str | Modality) -> torch.Tensor:
        """Raw `target` embeddings of the entries at `indices`.

        Args:
            indices: long (Q, k) as returned by `search`; ``-1`` slots give zero vectors.
            target: the modality to read.

        Returns:
            float32 (Q, k, D_target) on the device of `indices`.

        Raises:
            ValueError: an index out of range, or a neighbour without `target` (search with
                ``target=`` to exclude those).
        """
        target, column = self._column(target)
        indices = torch.as_tensor(indices)
        if indices.ndim != 2 or indices.is_floating_point():
            raise ValueError(f"indices must be integer (Q, k); got {tuple(indices.shape)}")
        out_of_range = (indices < -1) | (indices >= len(self))
        if bool(out_of_range.any()):
            bad = int(indices[out_of_range][0])
            raise ValueError(f"indices must lie in [-1, {len(self)}); got {bad}")
        valid = indices >= 0
        rows = indices.clamp_min(0).reshape(-1).to(self.device)
        lacking = valid.reshape(-1).to(self.device) & ~self._presence[rows, column]
        if bool(lacking.any()):
            row = int(rows[torch.nonzero(lacking)[0]])
            raise ValueError(
                f"neighbour {self.ids[row]!r} (bank row {row}) has no {target.value} "
                f"embedding; search with target={target.value!r} to exclude such entries"
            )
        raw = self._normalised[target][rows].to(torch.float32) * self._norms[target][rows, None]
        raw = raw.to(indices.device).reshape(*indices.shape, -1)
        return raw * valid.unsqueeze(-1)

    def impute(
        self,
        target: str | Modality,
        embeddings: Mapping[Modality, torch.Tensor],
        presence: torch.Tensor,
        exclude_ids: Sequence[str | None] | None = None,
        exclude_groups: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """The mean of each row's k nearest entries' `target` embeddings (kNN imputation).

        Each row is searched by its first present modality other than `target`
        (`group_queries`); only entries that have `target` are candidates.

        Args:
            target: the modality to stand in for.
            embeddings: modality -> (Q, D) embeddings of the rows (rows it lacks: anything).
            presence: bool (Q, 3) in `MODALITY_ORDER` or (Q, M) in `modalities` order.
            exclude_ids: per row, an id it must not retrieve (leave-one-out).
            exclude_groups: instead, per row, a group it must not retrieve (see `search`).

        Returns:
            float32 (Q, D_target) on the CPU; a row with no candidate is all zeros.

        Raises:
            ValueError: a row with nothing to search by ("every modality is missing").
        """
        target, _ = self._column(target)
        out = torch.zeros(len(presence), self.dims[target])
        for by, rows in self.group_queries(presence, target=target).items():
            queries = embeddings[by][rows.to(embeddings[by].device)].detach().float().cpu()
            picked = rows.tolist()
            ids = None if exclude_ids is None else [exclude_ids[i] for i in picked]
            groups = None if exclude_groups is None else [exclude_groups[i] for i in picked]
            _, indices = self.search(
                queries, by, target=target, exclude_ids=ids, exclude_groups=groups
            )
            out[rows] = self.neighbour_mean(indices, target).cpu()
        return out

    def neighbour_labels(self, indices: torch.Tensor) -> torch.Tensor:
        """Mean stored label over each query's valid (non ``-1``) neighbours.

        Args:
            indices: long (Q, k) as returned by `search`.

        Returns:
            float32 (Q, `label_dim`) on the device of `indices`; a row with no valid neighbour
            is all zeros.

        Raises:
            ValueError: the bank holds no labels.
        """
        if self._labels is None:
            raise ValueError("this memory bank holds no labels (build it with labels=...)")
        indices = torch.as_tensor(indices)
        valid = (indices >= 0).to(self.device)
        rows = indices.clamp_min(0).to(self.device)
        picked = self._labels[rows].to(torch.float32) * valid.unsqueeze(-1)
        mean = picked.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)
        return mean.to(indices.device)

    def neighbour_mean(self, indices: torch.Tensor, target: str | Modality) -> torch.Tensor:
        """Mean raw `target` embedding over each query's valid (non ``-1``) neighbours.

        Returns:
            float32 (Q, D_target); a row with no valid neighbour is all zeros.
        """
        embeddings = self.neighbour_embeddings(indices, target)
        count = (torch.as_tensor(indices) >= 0).sum(dim=1, keepdim=True).to(embeddings.device)
        return embeddings.sum(dim=1) / count.clamp_min(1)


def index_rows(
    ids: Sequence[str],
    embeddings: Mapping[Modality, torch.Tensor],
    presence: torch.Tensor,
    config: MemoryBankConfig,
    *,
    groups: Sequence[str] | None = None,
    labels: torch.Tensor | None = None,
) -> MemoryBank:
    """A bank of a training split's rows: only the modalities a row has enter it (so a sample
    never lends an input hidden from it), and rows with none of `embeddings`' modalities are
    left out.

    Args:
        ids: one id per row.
        embeddings: modality -> (n, D) embeddings, absent rows anything.
        presence: bool (n, 3) in `MODALITY_ORDER`.
        config: the bank's settings.
        groups: optional per-row group names (see `MemoryBank.build`).
        labels: optional per-row targets, (n,) or (n, L) (see `MemoryBank.build`).

    Raises:
        ValueError: no row has any of the modalities, or a present row is NaN/inf or zero.
    """
    modalities = [m for m in MODALITY_ORDER if m in embeddings]
    columns = torch.stack([presence[:, MODALITY_ORDER.index(m)] for m in modalities], 1).cpu()
    rows = columns.any(dim=1)
    if not bool(rows.any()):
        names = ", ".join(m.value for m in modalities)
        raise ValueError(f"no row has any of {names} to put in a memory bank")
    kept = rows.nonzero().flatten().tolist()
    return MemoryBank.build(
        [str(ids[i]) for i in kept],
        {
            m: embeddings[m][rows.to(embeddings[m].device)].detach().float().cpu()
            for m in modalities
        },
        columns[rows],
        config,
        groups=None if groups is None else [str(groups[i]) for i in kept],
        labels=None if labels is None else torch.as_tensor(labels)[rows],
    )


def build_memory_bank(
    ids: Sequence[str],
    embeddings: Mapping[str | Modality, torch.Tensor | np.ndarray],
    presence: torch.Tensor | np.ndarray | None = None,
    config: MemoryBankConfig | None = None,
    *,
    groups: Sequence[str] | None = None,
    labels: torch.Tensor | np.ndarray | None = None,
) -> MemoryBank:
    """Build a `MemoryBank` from raw embeddings; the same as `MemoryBank.build`."""
    return MemoryBank.build(ids, embeddings, presence, config, groups=groups, labels=labels)


def _label_matrix(labels: torch.Tensor | np.ndarray, rows: int) -> np.ndarray:
    """`labels` as a finite float32 (rows, L) array (a 1-D column becomes (rows, 1))."""
    array = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] != rows:
        raise ValueError(f"labels have shape {array.shape}, expected ({rows},) or ({rows}, L)")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"labels row {int(np.argwhere(~np.isfinite(array))[0, 0])} has NaN or inf")
    return array
