"""Task metrics as small pure functions of tensors (no model or dataset knowledge)."""

from __future__ import annotations

import torch

# the rank of a query none of whose positives has a finite score: larger than any k, so never a hit
NO_MATCH = torch.iinfo(torch.int64).max


def match_ranks(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per query (row of `similarity`, [queries, candidates]): how many negatives score at least as high as
    its best-scoring positive, i.e. its 0-based rank with ties broken against the query; `NO_MATCH` when
    none of its positives has a finite score.

    A non-finite score (NaN, +inf or -inf: the output of a model that overflowed) is never a match and
    never outranks a finite positive, so a broken model can only lose recall, never gain it (a NaN
    compared with `>=` is False, which would otherwise make a NaN query "beat" every negative).
    Queries without any positive are an error; shapes must agree.
    """
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ in shape")
    positives = positives.bool()
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive")
    finite = torch.isfinite(similarity)
    scores = similarity.float().masked_fill(~finite, -torch.inf)
    best_positive = scores.masked_fill(~positives, -torch.inf).max(dim=1).values
    negatives_at_or_above = ((scores >= best_positive[:, None]) & ~positives & finite).sum(dim=1)
    return torch.where(torch.isfinite(best_positive), negatives_at_or_above, torch.full_like(negatives_at_or_above, NO_MATCH))


def hits_at_k(ranks: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Boolean [queries, len(ks)]: whether each query's true match is within its top k, for each k."""
    return ranks[:, None] < torch.tensor(ks, dtype=torch.int64)[None, :]


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Share of queries (rows) with a true match among their top k candidates (columns).

    A query counts if *any* of its positives is in the top k (the CLIP convention). Ties are broken
    against the query: a positive's rank is the number of negatives scoring at least as high, so a
    result never depends on the order of candidates. Non-finite scores never match (`match_ranks`).
    Queries without any positive are an error.
    """
    hits = hits_at_k(match_ranks(similarity, positives), ks)
    queries = similarity.shape[0]
    return {k: int(hits[:, i].sum()) / queries for i, k in enumerate(ks)}  # exact share, not a float32 mean


def nonfinite_rows(values: torch.Tensor) -> int:
    """How many rows of a [rows, ...] tensor hold at least one NaN or infinite value."""
    return int((~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).sum()) if values.numel() else 0


def contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss: mean of image->text and text->image cross-entropy against the diagonal."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_loss = torch.nn.functional.cross_entropy(logits_per_image.float(), labels)
    text_loss = torch.nn.functional.cross_entropy(logits_per_text.float(), labels)
    return (image_loss + text_loss) / 2
