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
# NIL: mentions whose entity is not in the KB
# ----------------------------------------------------------------------------------------------------------------

NIL_ANSWER = "nil"


def is_nil_answer(answer) -> bool:
    """Whether a gold answer means "not in the KB": `None`, an empty string or `"nil"` (any case; the MIMIC datasets'
    and `make_synthetic.py`'s spelling)."""
    return answer is None or (isinstance(answer, str) and answer.strip().lower() in ("", NIL_ANSWER))


def _nil_inputs(scores, is_nil, correct):
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    is_nil = torch.as_tensor(is_nil, dtype=torch.bool).flatten()
    if is_nil.numel() != scores.numel():
        raise ValueError(f"got {is_nil.numel()} NIL flags for {scores.numel()} scores")
    if correct is None:
        correct = ~is_nil
    correct = torch.as_tensor(correct, dtype=torch.bool).flatten()
    if correct.numel() != scores.numel():
        raise ValueError(f"got {correct.numel()} correctness flags for {scores.numel()} scores")
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, is_nil, correct & ~is_nil


def choose_nil_threshold(scores, is_nil, correct=None) -> float | None:
    """The NIL threshold that maximises NIL-aware accuracy on labelled mentions, or `None` (no NIL prediction).

    A mention is answered NIL when its top score is below the threshold. NIL-aware accuracy counts a mention as right
    when (its gold is NIL and it is answered NIL) or (its gold is in the KB, it is not answered NIL and its top-1
    entity is the gold one).

    Args:
        scores (`(B,)` floats): each mention's best score (S_O of the top-1 entity, as `OTMELLinker.link` returns).
        is_nil (`(B,)` bools): whether the mention's gold entity is absent from the KB.
        correct (`(B,)` bools, *optional*): whether the top-1 entity is the gold one (ignored for NIL mentions).
            Default: every in-KB mention counts as correctly linked, i.e. the threshold that best separates the
            NIL mentions' scores from the in-KB mentions' (all a user with a few labelled examples needs to know is
            which of them are NIL).

    Returns:
        The threshold (`float`), in the middle of the first (lowest) range of values that reach the best accuracy; or
        `None` when there is no NIL mention, or when predicting no NIL at all is among the best choices.
    """
    scores, is_nil, correct = _nil_inputs(scores, is_nil, correct)
    if not bool(is_nil.any()):
        return None
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    m = values.numel()
    nil_at = torch.zeros(m, dtype=torch.float64).index_add_(0, inverse, is_nil.double())
    good_at = torch.zeros(m, dtype=torch.float64).index_add_(0, inverse, correct.double())
    # Candidate k (0..m): every mention scored <= values[k-1] is answered NIL (k = 0: none is).
    nil_right = torch.cat([torch.zeros(1, dtype=torch.float64), nil_at.cumsum(0)])
    good_kept = good_at.sum() - torch.cat([torch.zeros(1, dtype=torch.float64), good_at.cumsum(0)])
    accuracy = nil_right + good_kept
    best = accuracy.max()
    if accuracy[0] == best:
        return None
    first = int((accuracy == best).nonzero()[0])
    last = first
    while last + 1 <= m and accuracy[last + 1] == best:
        last += 1
    # Candidates first..last are thresholds in (values[first-1], values[last]] (no upper bound when last == m).
    low = float(values[first - 1])
    high = float(values[last]) if last < m else None
    if high is None:
        return low + max(abs(low), 1.0) * 1e-6 if first == m else (low + float(values[m - 1])) / 2
    return (low + high) / 2


def nil_metrics(scores, is_nil, correct, threshold: float | None) -> dict:
    """Metrics of NIL prediction at `threshold` (`None`: nothing is answered NIL).

    Args:
        scores (`(B,)`): each mention's best score. is_nil (`(B,)`): gold is NIL. correct (`(B,)`): top-1 is the gold
            entity (ignored for NIL mentions). threshold: a mention is answered NIL when its best score is below it.

    Returns:
        `{"nil_precision", "nil_recall", "nil_f1"}`: of the NIL answers (precision 0 when nothing is answered NIL,
        recall 0 when there is no NIL mention); `"nil_accuracy"`: NIL-aware accuracy over all mentions (see
        [`choose_nil_threshold`]); `"inkb_hits@1"`: share of in-KB mentions linked to their gold entity and not
        answered NIL; `"n_nil"`, `"n_inkb"`, `"n_predicted_nil"`: counts.
    """
    scores, is_nil, correct = _nil_inputs(scores, is_nil, correct)
    predicted = scores < threshold if threshold is not None else torch.zeros_like(is_nil)
    true_positive = int((predicted & is_nil).sum())
    n_predicted, n_nil = int(predicted.sum()), int(is_nil.sum())
    n_inkb = int((~is_nil).sum())
    precision = true_positive / n_predicted if n_predicted else 0.0
    recall = true_positive / n_nil if n_nil else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    linked = int((correct & ~predicted).sum())
    return {
        "nil_precision": precision,
        "nil_recall": recall,
        "nil_f1": f1,
        "nil_accuracy": (true_positive + linked) / max(scores.numel(), 1),
        "inkb_hits@1": linked / n_inkb if n_inkb else 0.0,
        "n_nil": n_nil,
        "n_inkb": n_inkb,
        "n_predicted_nil": n_predicted,
    }


# ----------------------------------------------------------------------------------------------------------------


__all__ = [
    "NIL_ANSWER",
    "TIES",
    "check_ties",
    "choose_nil_threshold",
    "gold_ranks_exhaustive",
    "gold_ranks_two_stage",
    "is_nil_answer",
    "nil_metrics",
    "ranking_metrics",
    "stage1_recall",
]
