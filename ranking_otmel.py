"""Ranking mentions against a whole KB with OT-MEL: two-stage or exhaustive, with gold ranks for evaluation.

    index = encode_kb(model, processor, kb)                                   # index_otmel
    result = rank_mentions(model, processor, index, mentions, RankOptions(candidates=50), gold_qids=answers)
    metrics = evaluation_metrics(result)                                      # hits@k, MRR, stage-1 recall

[`rank_mentions`] is the one loop "encode mentions, then rank them against the KB" behind evaluation (`run_mel.py`),
prediction and linking ([`~linking_otmel.OTMELLinker`]); it shards the mentions across processes under
torch.distributed. [`rank`] ranks already encoded mentions.

Scores (`modeling_otmel.OTMELModel.score`):
- S_R (stage 1, "retrieval") is one inner product between the model's stage-1 mention and entity vectors
  (`OTMELModel.mention_stage1` / `entity_stage1`), so a whole KB is scored with one matrix product.
- S_O (stage 2, "overall") adds the pairwise unimodal matching of every (mention, entity) pair; it is computed only for
  the top-`candidates` entities of stage 1 (`strategy="two_stage"`), or for every entity (`strategy="exhaustive"`).

Ranking protocol (`metrics_otmel`): rank of the gold entity = 1 + number of entities scored strictly higher (+ ties,
pessimistically). In two-stage mode the returned list is the re-ranked top-k followed by every other entity in stage-1
order; a gold outside the top-k has rank k + 1 + (number of non-top-k entities with strictly higher S_R).

Assignment at inference (`assignment="ot"|"attention"`): it switches the *pairwise unimodal* matching (S_T, S_V) only.
Fusion features (S_F) are computed once per side by `encode_*` with the model's configured mode, and the entity side is
cached in the index: an index built with one fusion mode keeps it. A distilled (KD) model saved with
`inference_assignment="attention"` therefore runs attention everywhere by default; `assignment="attention"` on an OT
model gives the fast path for the pairwise part only.

Ordering: results are sorted by S_O, ties broken by S_R, then by KB row, in both strategies (so two-stage ranking with
`candidates` = KB size equals exhaustive ranking). Stage-2 scores of a pair do not depend on the other pairs of its
batch beyond float rounding (Sinkhorn stops per problem).
"""

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .index_otmel import ANN_MIN_ROWS, EntityIndex, import_faiss, inference_mode
    from .metrics_otmel import check_ties, gold_ranks_exhaustive, gold_ranks_two_stage, ranking_metrics, stage1_recall
    from .modeling_otmel import OTMELMentionFeatures
except ImportError:
    from index_otmel import ANN_MIN_ROWS, EntityIndex, import_faiss, inference_mode
    from metrics_otmel import check_ties, gold_ranks_exhaustive, gold_ranks_two_stage, ranking_metrics, stage1_recall
    from modeling_otmel import OTMELMentionFeatures


STRATEGIES = ("two_stage", "exhaustive")
STAGE1_SEARCH = ("auto", "exact", "ann", "torch", "faiss")  # "exact" is "torch"


@dataclass(frozen=True)
class RankOptions:
    """How [`rank`] ranks a KB.

    Args:
        strategy (`str`): `"two_stage"` (S_R over the KB by matrix product, then S_O for the top `candidates` only) or
            `"exhaustive"` (S_O for every pair: the paper's protocol, slow on a large KB).
        candidates (`int`): stage-1 shortlist size (clipped to the KB size; raised to `top_k` if smaller).
        top_k (`int`, *optional*): entities returned per mention (default: `candidates`, clipped to the KB size).
        assignment (`str`, *optional*): `"ot"` / `"attention"` for the pairwise unimodal matching (default: the model's
            inference setting); fusion features keep the mode they were encoded with (module docstring).
        chunk_size (`int`): (mention, entity) pairs scored pairwise per step; bounds memory (about
            chunk_size x L_e x L_m floats per Sinkhorn buffer). 512 was fastest on CPU (256-8192 tried; larger chunks
            leave the cache).
        ties (`str`): `"pessimistic"` (default) or `"optimistic"` (`metrics_otmel`).
        stage1 (`str`): how the stage-1 shortlist is found:
            - `"exact"` / `"torch"`: exact, a matrix product over the KB block by block with a running top-k (int8 stage-1 vectors
              are dequantized block by block);
            - `"faiss"`: exact FAISS `IndexFlatIP` (a float32 copy of the stage-1 vectors; on this project's CPU
              machine torch was 5-6x faster at 30K and 100K entities, benchmarks/bench_linking.py);
            - `"ann"`: approximate, the index's ANN structure (`EntityIndex.build_ann`, built on first use if absent)
              proposes `ann_refine` rows whose exact S_R picks the top `candidates`;
            - `"auto"`: `"ann"` for KBs of `index_otmel.ANN_MIN_ROWS` entities or more (where the measured ANN
              search was faster than exact search on CPU), else `"torch"`.
            With gold ranks (evaluation) every S_R is computed exactly anyway; `"ann"` still picks the shortlist.
        stage1_budget (`int`): most S_R (or S_O) scores held at once (mentions per chunk = budget // KB size when
            every S_R is needed: gold ranks or exhaustive ranking).
        ann_nprobe (`int`, *optional*): IVF lists searched per mention (default: the ANN structure's own).
        ann_refine (`int`, *optional*): rows the ANN search proposes per mention before exact re-scoring (default:
            the structure's, `index_otmel.AnnIndex.default_refine`: `max(20 x candidates, 1000)` for the scan,
            `max(4 x candidates, 200)` for IVF and HNSW).
    """

    strategy: str = "two_stage"
    candidates: int = 50
    top_k: int | None = None
    assignment: str | None = None
    chunk_size: int = 512
    ties: str = "pessimistic"
    stage1: str = "torch"
    stage1_budget: int = 1 << 23
    ann_nprobe: int | None = None
    ann_refine: int | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.stage1 not in STAGE1_SEARCH:
            raise ValueError(f"stage1 must be one of {', '.join(STAGE1_SEARCH)}, got {self.stage1!r}")
        if self.stage1 == "exact":
            object.__setattr__(self, "stage1", "torch")
        if self.assignment not in (None, "ot", "attention"):
            raise ValueError(f"assignment must be 'ot', 'attention' or None, got {self.assignment!r}")
        check_ties(self.ties)
        for name in ("candidates", "chunk_size", "stage1_budget", "top_k", "ann_nprobe", "ann_refine"):
            value = getattr(self, name)
            optional = name in ("top_k", "ann_nprobe", "ann_refine")
            if optional and value is None:
                continue
            # bool is an int to Python but never a count here; numpy / torch integers are accepted as plain ints.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                allowed = " or None" if optional else ""
                raise ValueError(f"{name} must be a positive integer{allowed}, got {value!r}")
            object.__setattr__(self, name, int(value))


class RankResult(NamedTuple):
    """Output of [`rank`] / [`rank_mentions`]: `scores, indices, gold_ranks, stage1_gold_ranks`.

    scores (`(B, top_k)` float32): best first (S_O; in two-stage mode for the re-ranked candidates).
    indices (`(B, top_k)` int64): KB rows, best first.
    gold_ranks (`(B,)` int64 or None): rank of the gold entity (see module docstring; -1 if the gold is not in the KB).
    stage1_gold_ranks (`(B,)` int64 or None): rank of the gold entity by S_R alone over the whole KB (stage-1 recall@k
        is the fraction with rank <= k).
    """

    scores: torch.Tensor
    indices: torch.Tensor
    gold_ranks: torch.Tensor | None = None
    stage1_gold_ranks: torch.Tensor | None = None

    @staticmethod
    def concatenate(parts: list) -> "RankResult":
        """The rows of several results, in order (gold ranks kept when every part has them)."""
        fields = []
        for i in range(4):
            values = [p[i] for p in parts]
            fields.append(torch.cat(values) if values and all(v is not None for v in values) else None)
        if not parts:
            fields[:2] = [torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.long)]
        return RankResult(*fields)


# ----------------------------------------------------------------------------------------------------------------
# Mentions
# ----------------------------------------------------------------------------------------------------------------


MENTION_HELP = (
    "a mention is a dict with a string 'mention' and optional 'sentence' (string or None) and 'image' (PIL image, "
    "path, bytes, datasets image dict or None)"
)


def mention_columns(mentions) -> tuple[list, list, list]:
    """`(surfaces, sentences, images)` of a list of mention dicts (`mention`, optional `sentence` and `image`) or of a
    `datasets` split with those columns (images left undecoded).

    Raises `TypeError` naming the first bad mention (by position) when `mentions` is not a list of mention dicts or
    split (a single dict or string is refused: pass a list), or a `mention` / `sentence` is not a string. Images are
    not checked here: an unreadable or unsupported one counts as "no image" with a warning
    (`processing_otmel.read_image`). An empty list gives three empty lists.
    """
    if hasattr(mentions, "column_names") and hasattr(mentions, "features"):
        from datasets import Image

        if "mention" not in mentions.column_names:
            raise TypeError(
                f"the mentions split has no 'mention' column (columns: {', '.join(mentions.column_names)})"
            )
        feature = mentions.features.get("image")
        if isinstance(feature, Image) and feature.decode:
            mentions = mentions.cast_column("image", Image(decode=False))
        surfaces = list(mentions["mention"])
        sentences = list(mentions["sentence"]) if "sentence" in mentions.column_names else [""] * len(surfaces)
        images = list(mentions["image"]) if "image" in mentions.column_names else [None] * len(surfaces)
    else:
        if hasattr(mentions, "to_dict") and hasattr(mentions, "columns"):
            raise TypeError("mentions is a pandas DataFrame: pass df.to_dict('records'), a list of mention dicts")
        if isinstance(mentions, (str, bytes, Mapping)) or not hasattr(mentions, "__iter__"):
            what = "a DatasetDict (pass one split)" if hasattr(mentions, "column_names") else type(mentions).__name__
            raise TypeError(
                f"mentions must be a list of mention dicts, got {what}: pass a list of mention dicts, "
                f"even for one ([{{'mention': ..., 'sentence': ...}}]); {MENTION_HELP}"
            )
        mentions = list(mentions)
        for i, m in enumerate(mentions):
            if not isinstance(m, Mapping):
                raise TypeError(
                    f"mention {i} is {type(m).__name__} {str(m)[:60]!r}: pass a list of mention dicts; {MENTION_HELP}"
                )
        surfaces = [m.get("mention") for m in mentions]
        sentences = [m.get("sentence") for m in mentions]
        images = [m.get("image") for m in mentions]
    for i, (surface, sentence) in enumerate(zip(surfaces, sentences)):
        if not isinstance(surface, str):
            got = "no 'mention'" if surface is None else f"'mention' of type {type(surface).__name__}"
            raise TypeError(f"mention {i} has {got}: {MENTION_HELP}")
        if sentence is not None and not isinstance(sentence, str):
            raise TypeError(f"mention {i} has a 'sentence' of type {type(sentence).__name__}: {MENTION_HELP}")
    return surfaces, [t or "" for t in sentences], images


def encode_mentions(model, processor, mentions, batch_size: int = 64, progress: bool = False) -> OTMELMentionFeatures:
    """[`OTMELMentionFeatures`] of a list of dicts / `mentions` split, on the model's device, batch-wise, in eval mode
    without gradients; text tensors are padded to the longest text of all the mentions."""
    from tqdm.auto import tqdm

    surfaces, sentences, images = mention_columns(mentions)
    out = []
    with inference_mode(model):
        for start in tqdm(range(0, len(surfaces), batch_size), desc="Encoding mentions", disable=not progress):
            end = start + batch_size
            batch = processor.process_mentions(surfaces[start:end], sentences[start:end], images[start:end])
            out.append(model.encode_mentions(**{k: v.to(model.device) for k, v in batch.items()}))
    return OTMELMentionFeatures.concatenate(out)


# ----------------------------------------------------------------------------------------------------------------
# Ranking encoded mentions
# ----------------------------------------------------------------------------------------------------------------


_faiss_cache = {}


def faiss_stage1(index: EntityIndex, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact stage-1 top-k by FAISS `IndexFlatIP` over `index.retrieval` (built once per index and `index.version`,
    so rebuilt after [`~index_otmel.EntityIndex.add`] / `remove`): `(scores, rows)`."""
    try:
        faiss = import_faiss()
    except ImportError as err:
        raise ImportError(
            "stage1='faiss' needs the faiss package (pip install faiss-cpu); stage1='torch' does not"
        ) from err

    key = id(index)
    cached = _faiss_cache.get(key)
    if cached is None or cached[0] is not index or cached[1] != index.version:
        flat = faiss.IndexFlatIP(index.retrieval.shape[1])
        for start in range(0, len(index), 65536):  # float32 vectors, dequantized block by block
            flat.add(index.stage1_vectors(torch.arange(start, min(len(index), start + 65536))).numpy())
        _faiss_cache.clear()
        _faiss_cache[key] = cached = (index, index.version, flat)
    faiss.omp_set_num_threads(torch.get_num_threads())
    scores, rows = cached[2].search(queries.cpu().float().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


def score_rows(model, mentions: OTMELMentionFeatures, index: EntityIndex, rows: torch.Tensor, options: RankOptions):
    """S_O `(B, k)` of each mention with the KB rows `rows (B, k)`, about `options.chunk_size` pairs at a time."""
    b, k = rows.shape
    chunk = options.chunk_size
    rows_per_step = max(1, chunk // max(k, 1))
    cols_per_step = k if k <= chunk else chunk
    out = []
    for start in range(0, b, rows_per_step):
        end = min(b, start + rows_per_step)
        m = mentions.rows(slice(start, end)).trimmed()
        parts = []
        for col in range(0, k, cols_per_step):
            c = index.gather(rows[start:end, col : col + cols_per_step], device=model.device)
            parts.append(model.score_candidates(m, c, assignment=options.assignment).overall)
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


def _order(rows: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor | None) -> torch.Tensor:
    """Permutation of each row of `rows (B, k)` sorting by `primary` descending, then `secondary` (the S_R of those
    rows, `(B, k)`) descending, then KB row."""
    order = rows.argsort(dim=1, stable=True)
    if secondary is not None:
        order = order.gather(1, secondary.gather(1, order).argsort(dim=1, descending=True, stable=True))
    return order.gather(1, primary.gather(1, order).argsort(dim=1, descending=True, stable=True))


def stage1_search(options: RankOptions, index: EntityIndex) -> str:
    """The stage-1 search `options.stage1` means for `index`: `"torch"`, `"faiss"` or `"ann"` (resolves `"auto"`)."""
    if options.stage1 != "auto":
        return options.stage1
    if len(index) >= ANN_MIN_ROWS:
        try:
            import_faiss()
        except ImportError:
            return "torch"
        return "ann"
    return "torch"


def _shortlist(index, queries, k, options, s_r) -> tuple:
    """Stage 1 of two-stage ranking: `(S_R (b, k), rows (b, k))` of each query's shortlist."""
    search = stage1_search(options, index)
    if search == "ann":
        scores, rows = index.ann_topk(queries, k, nprobe=options.ann_nprobe, refine=options.ann_refine)
        short = (rows < 0).any(dim=1)  # the searched lists held fewer than k rows: exact search for those
        if bool(short.any()):
            exact = s_r[short].topk(k, dim=1) if s_r is not None else index.stage1_topk(queries[short], k)
            scores[short], rows[short] = exact[0], exact[1]
        return scores, rows
    if s_r is not None:
        return s_r.topk(k, dim=1)
    if search == "faiss":
        scores, rows = faiss_stage1(index, queries, k)
        return scores.to(queries.device), rows.to(queries.device)
    return index.stage1_topk(queries, k)


def _rank_chunk(model, m, index, options, k, top_k, gold) -> RankResult:
    """[`rank`] of a chunk of mentions (whose S_R over the whole KB fits the budget when every S_R is needed)."""
    device = model.device
    n = len(index)
    queries = model.mention_stage1(m).float()
    s_r = None
    if gold is not None or options.strategy == "exhaustive":
        s_r = index.stage1_scores(queries)  # (b, N): gold ranks and exhaustive ranking need every S_R
    if options.strategy == "exhaustive":
        cand = torch.arange(n, device=device).expand(queries.shape[0], n)
        cand_s_r = s_r
    else:
        cand_s_r, cand = _shortlist(index, queries, k, options, s_r)
    s_o = score_rows(model, m, index, cand, options)
    order = _order(cand, s_o, cand_s_r)  # best first; ties in S_O broken by S_R, then by KB row
    gold_ranks = stage1_ranks = None
    if gold is not None:
        if options.strategy == "two_stage":
            gold_ranks = gold_ranks_two_stage(s_r, cand, s_o, gold, options.ties)
        else:
            gold_ranks = gold_ranks_exhaustive(s_o, gold, options.ties)
        stage1_ranks = gold_ranks_exhaustive(s_r, gold, options.ties)
    return RankResult(
        s_o.gather(1, order)[:, :top_k].cpu(), cand.gather(1, order)[:, :top_k].cpu(), gold_ranks, stage1_ranks
    )


def rank(
    model,
    mention_features: OTMELMentionFeatures,
    index: EntityIndex,
    options: RankOptions | None = None,
    gold=None,
    **overrides,
) -> RankResult:
    """Ranks the whole KB for each encoded mention.

    Args:
        model ([`OTMELModel`]): run in eval mode without gradients (training flag restored).
        mention_features ([`OTMELMentionFeatures`]): from [`encode_mentions`] (or `model.encode_mentions`), B rows.
        index ([`EntityIndex`]): from `index_otmel.encode_kb`.
        options ([`RankOptions`], *optional*): how to rank; `overrides` replace single settings
            (`rank(model, feats, index, candidates=20)`).
        gold (`(B,)` ints, *optional*): KB row of each mention's gold entity (-1: not in the KB); gives `gold_ranks` and
            `stage1_gold_ranks`.

    Returns:
        [`RankResult`] (CPU tensors).
    """
    options = replace(options or RankOptions(), **overrides)
    n = len(index)
    b = mention_features.text_global.shape[0]
    top_k = min(options.top_k or options.candidates, n)
    k = min(max(options.candidates, top_k), n)
    if gold is not None:
        gold = torch.as_tensor(gold).long().flatten()
        if gold.numel() != b:
            raise ValueError(f"gold has {gold.numel()} entries for {b} mentions")
    every_s_r = gold is not None or options.strategy == "exhaustive"
    per_chunk = max(1, options.stage1_budget // (n if every_s_r else max(k, 1)))
    parts = []
    with inference_mode(model):
        for start in range(0, b, per_chunk):
            end = min(b, start + per_chunk)
            m = mention_features.rows(slice(start, end)).trimmed().to(model.device)
            g = gold[start:end] if gold is not None else None
            parts.append(_rank_chunk(model, m, index, options, k, top_k, g))
    return RankResult.concatenate(parts)


# ----------------------------------------------------------------------------------------------------------------
# Encoding and ranking: the one loop of evaluation, prediction and linking
# ----------------------------------------------------------------------------------------------------------------


def _process_shard(n: int) -> tuple[int, int, int]:
    """`(start, end, world)`: this process's contiguous share of `n` items under torch.distributed (all of them
    otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, n, 1
    rank_id, world = dist.get_rank(), dist.get_world_size()
    return n * rank_id // world, n * (rank_id + 1) // world, world


def rank_mentions(
    model,
    processor,
    index: EntityIndex,
    mentions,
    options: RankOptions | None = None,
    gold_qids: list | None = None,
    batch_size: int = 64,
    progress: bool = False,
    distributed: bool = False,
) -> RankResult:
    """Encodes mentions batch by batch and ranks each batch against the whole KB.

    Args:
        model, processor: the OT-MEL model and its processor.
        index ([`EntityIndex`]): the KB.
        mentions: list of mention dicts or a `datasets` split (`mention`, `sentence`, `image`).
        options ([`RankOptions`], *optional*).
        gold_qids (`list[str]`, *optional*): each mention's gold qid (NIL or absent from the KB: rank -1); gives gold
            ranks.
        batch_size (`int`): mentions encoded and ranked together.
        progress (`bool`): a tqdm bar (on the first process only).
        distributed (`bool`): under torch.distributed, each process ranks a contiguous share of the mentions and the
            results are gathered on every process, in order (the same result as one process).

    Returns:
        [`RankResult`] of every mention, in input order.
    """
    from tqdm.auto import tqdm

    surfaces, sentences, images = mention_columns(mentions)
    if gold_qids is not None and len(gold_qids) != len(surfaces):
        raise ValueError(f"got {len(gold_qids)} gold qids for {len(surfaces)} mentions")
    start, end, world = _process_shard(len(surfaces)) if distributed else (0, len(surfaces), 1)
    parts = []
    bar = tqdm(range(start, end, batch_size), desc="Ranking mentions", disable=not progress or (world > 1 and start))
    for first in bar:
        last = min(end, first + batch_size)
        batch = [
            {"mention": s, "sentence": t, "image": i}
            for s, t, i in zip(surfaces[first:last], sentences[first:last], images[first:last])
        ]
        feats = encode_mentions(model, processor, batch, batch_size=batch_size)
        gold = None
        if gold_qids is not None:
            gold = torch.tensor([index.row_of(q) for q in gold_qids[first:last]], dtype=torch.long)
        parts.append(rank(model, feats, index, options, gold=gold))
    result = RankResult.concatenate(parts)
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        result = RankResult.concatenate(gathered)
    return result


def evaluation_metrics(result: RankResult, ks=(1, 3, 5, 10, 20), recall_ks=(10, 20, 50, 100)) -> dict:
    """[`~metrics_otmel.ranking_metrics`] of the gold ranks plus `stage1_recall@k` of the stage-1 ranks."""
    metrics = ranking_metrics(result.gold_ranks, ks)
    metrics.update({f"stage1_{k}": v for k, v in stage1_recall(result.stage1_gold_ranks, recall_ks).items()})
    return metrics


__all__ = [
    "RankOptions",
    "RankResult",
    "encode_mentions",
    "evaluation_metrics",
    "faiss_stage1",
    "mention_columns",
    "rank",
    "rank_mentions",
    "score_rows",
    "stage1_search",
]
