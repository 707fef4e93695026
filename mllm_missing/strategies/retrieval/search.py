"""Exact chunked top-k cosine search with a running merge, never materialising all scores."""

from __future__ import annotations

import torch


def chunked_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    chunk_size: int,
    *,
    eligible: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ keys.T`` by row, scoring `chunk_size` keys at a time.

    Each chunk of keys is moved to the queries' device and dtype, scored, reduced to its own
    top-k, and merged with the running top-k; the largest intermediate is the
    (Q, chunk_size) score block of one chunk.

    Args:
        queries: (Q, D) float tensor; its device and dtype are the compute device and dtype.
        keys: (N, D) tensor on any device (a memory-mapped CPU tensor is read chunk by chunk).
        k: neighbours per query.
        chunk_size: keys scored per step.
        eligible: optional bool (N,); keys where it is False are never returned.
        exclude: optional long (Q,); key `exclude[q]` is never returned for query q
            (-1: exclude nothing). With `key_groups`, `exclude[q]` is a group code instead and
            every key of that group is left out for query q.
        key_groups: optional long (N,), each key's group code (keys that share an input, e.g.
            the questions about one image, share a code).

    Returns:
        ``(scores, indices)``, both (Q, k), best first. Slots beyond the number of eligible
        keys hold score ``-inf`` and index ``-1``.
    """
    num_queries, num_keys = queries.shape[0], keys.shape[0]
    device, dtype = queries.device, queries.dtype
    best_scores = torch.full((num_queries, k), float("-inf"), device=device, dtype=dtype)
    best_indices = torch.full((num_queries, k), -1, device=device, dtype=torch.long)
    if eligible is not None:
        eligible = eligible.to(device)
    if exclude is not None:
        exclude = exclude.to(device)
        excluding = exclude >= 0
        if not bool(excluding.any()):
            exclude = None
    for start in range(0, num_keys, chunk_size):
        stop = min(start + chunk_size, num_keys)
        if eligible is not None and not bool(eligible[start:stop].any()):
            continue
        chunk = keys[start:stop].to(device=device, dtype=dtype, non_blocking=True)
        scores = queries @ chunk.T
        if eligible is not None:
            scores.masked_fill_(~eligible[start:stop].unsqueeze(0), float("-inf"))
        if exclude is not None and key_groups is not None:
            groups = key_groups[start:stop].to(device)
            scores.masked_fill_(groups.unsqueeze(0) == exclude.unsqueeze(1), float("-inf"))
        elif exclude is not None:
            rows = torch.nonzero(excluding & (exclude >= start) & (exclude < stop)).squeeze(1)
            scores[rows, exclude[rows] - start] = float("-inf")
        chunk_scores, chunk_indices = scores.topk(min(k, stop - start), dim=1)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_indices = torch.cat([best_indices, chunk_indices + start], dim=1)
        best_scores, position = merged_scores.topk(k, dim=1)
        best_indices = merged_indices.gather(1, position)
    # A -inf score is an ineligible or excluded key picked only to fill the k slots.
    best_indices[best_scores == float("-inf")] = -1
    return best_scores, best_indices
