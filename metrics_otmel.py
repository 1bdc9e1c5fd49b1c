"""Ranking metrics as plain tensor functions: gold ranks from scores, hits@k, MRR, stage-1 recall.

Nothing here knows about models or indexes. Protocol: the rank of the gold entity is 1 + the number of entities scored
strictly higher, plus, with `ties="pessimistic"` (the default), the number of *other* entities with exactly the gold's
score, so a tie never counts in the gold entity's favour. A gold row < 0 (NIL: not in the KB) has rank -1.
"""

import torch


TIES = ("pessimistic", "optimistic")


def check_ties(ties: str):
    if ties not in TIES:
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")


def gold_ranks_exhaustive(scores: torch.Tensor, gold: torch.Tensor, ties: str = "pessimistic") -> torch.Tensor:
    """Rank of each row's gold column in `scores (B, N)`: 1 + #(strictly higher) (+ #(other entities tied with the
    gold) when `ties="pessimistic"`). Rows whose gold is < 0 (not in the KB) get -1."""
    check_ties(ties)
    gold = gold.to(scores.device).long()
    present = gold >= 0
    g = scores.gather(1, gold.clamp_min(0).unsqueeze(1))
    rank = 1 + (scores > g).sum(1)
    if ties == "pessimistic":
        rank = rank + (scores == g).sum(1) - 1
    return torch.where(present, rank, torch.full_like(rank, -1)).cpu()


def gold_ranks_two_stage(
    retrieval_scores: torch.Tensor,
    candidate_indices: torch.Tensor,
    candidate_scores: torch.Tensor,
    gold: torch.Tensor,
    ties: str = "pessimistic",
) -> torch.Tensor:
    """Rank of the gold entity in a two-stage list: the k candidates re-ranked by `candidate_scores` (S_O), then every
    other entity in the order of `retrieval_scores` (S_R, `(B, N)`).

    Gold among the candidates: 1 + #(candidates with strictly higher S_O) (+ tied other candidates, pessimistic).
    Gold outside: k + 1 + #(non-candidates with strictly higher S_R) (+ tied other non-candidates, pessimistic).
    Gold < 0 (not in the KB): -1.
    """
    check_ties(ties)
    device = retrieval_scores.device
    gold = gold.to(device).long()
    candidate_indices = candidate_indices.to(device)
    candidate_scores = candidate_scores.to(device)
    present = gold >= 0
    k = candidate_indices.shape[1]
    is_gold = candidate_indices == gold.unsqueeze(1)
    inside = is_gold.any(1)
    g_o = (candidate_scores * is_gold).sum(1, keepdim=True)  # gold's S_O when inside
    rank_in = 1 + (candidate_scores > g_o).sum(1)
    if ties == "pessimistic":
        rank_in = rank_in + ((candidate_scores == g_o) & ~is_gold).sum(1)
    g_r = retrieval_scores.gather(1, gold.clamp_min(0).unsqueeze(1))
    cand_r = retrieval_scores.gather(1, candidate_indices)
    higher = (retrieval_scores > g_r).sum(1) - (cand_r > g_r).sum(1)
    rank_out = k + 1 + higher
    if ties == "pessimistic":
        rank_out = rank_out + (retrieval_scores == g_r).sum(1) - 1 - (cand_r == g_r).sum(1)
    rank = torch.where(inside, rank_in, rank_out)
    return torch.where(present, rank, torch.full_like(rank, -1)).cpu()


def ranking_metrics(ranks, ks=(1, 3, 5, 10, 20)) -> dict:
    """`{"hits@k": fraction with rank <= k, "mrr": mean 1/rank, "n": count, "n_gold_missing": count}`.

    Ranks < 1 (gold entity not in the KB) count as misses (reciprocal rank 0); all fractions are in [0, 1].
    """
    ranks = torch.as_tensor(ranks).long().flatten()
    n = ranks.numel()
    valid = ranks >= 1
    out = {}
    for k in ks:
        out[f"hits@{k}"] = float(((ranks <= k) & valid).sum()) / max(n, 1)
    rr = torch.where(valid, 1.0 / ranks.clamp_min(1).double(), torch.zeros((), dtype=torch.double))
    out["mrr"] = float(rr.sum()) / max(n, 1)
    out["n"] = n
    out["n_gold_missing"] = int((~valid).sum())
    return out


def stage1_recall(stage1_ranks, ks=(10, 20, 50, 100)) -> dict:
    """`{"recall@k": fraction of mentions whose gold entity is in the stage-1 top k}` (gold not in KB = miss)."""
    ranks = torch.as_tensor(stage1_ranks).long().flatten()
    n = max(ranks.numel(), 1)
    return {f"recall@{k}": float(((ranks >= 1) & (ranks <= k)).sum()) / n for k in ks}


# ----------------------------------------------------------------------------------------------------------------


__all__ = ["TIES", "check_ties", "gold_ranks_exhaustive", "gold_ranks_two_stage", "ranking_metrics", "stage1_recall"]
