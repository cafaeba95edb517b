"""Task metrics as small pure functions of tensors (no model or dataset knowledge)."""

from __future__ import annotations

import math

import torch


def recall_at_k(similarity: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """Share of queries (rows) with a true match among their top k candidates (columns).

    A query counts if *any* of its positives is in the top k (the CLIP convention). Ties are broken
    against the query: a positive's rank is the number of negatives scoring at least as high, so a
    result never depends on the order of candidates. Queries without any positive are an error.
    """
    if similarity.shape != positives.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} differ in shape")
    positives = positives.bool()
    if not positives.any(dim=1).all():
        raise ValueError("every query needs at least one positive")
    similarity = similarity.float()
    best_positive = similarity.masked_fill(~positives, -math.inf).max(dim=1).values
    negatives_at_or_above = ((similarity >= best_positive[:, None]) & ~positives).sum(dim=1)
    queries = similarity.shape[0]
    return {k: int((negatives_at_or_above < k).sum()) / queries for k in ks}  # exact share, not a float32 mean


def contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss: mean of image->text and text->image cross-entropy against the diagonal."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_loss = torch.nn.functional.cross_entropy(logits_per_image.float(), labels)
    text_loss = torch.nn.functional.cross_entropy(logits_per_text.float(), labels)
    return (image_loss + text_loss) / 2
