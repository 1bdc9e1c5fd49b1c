"""Linking mentions against a whole KB with OT-MEL: entity index, two-stage ranking, gold ranks, metrics, CLI.

Whole-KB ranking is what both inference (`OTMELLinker`, the CLI) and evaluation (`run_mel.py`) need, so the core is a
handful of plain functions:

    index = encode_kb(model, processor, kb)                      # entity features of every KB row -> EntityIndex
    for batch in mention batches:
        feats = encode_mentions(model, processor, batch)         # compact mention features
        result = rank(model, feats, index, strategy="two_stage", candidates=50, gold=gold_rows)
        ranks.append(result.gold_ranks); stage1.append(result.stage1_gold_ranks)
    metrics = ranking_metrics(cat(ranks)) | stage1_recall(cat(stage1))
    # or all of the above at once: evaluate_kb(model, processor, index, mentions_dataset)

Scores (`modeling_otmel.OTMELModel.score`):
- S_R (stage 1, "retrieval") does not depend on the mention beyond its global vectors: it is one inner product between a
  mention vector and an entity vector, so a whole KB is scored with one matrix product.
- S_O (stage 2, "overall") adds the pairwise unimodal matching of every (mention, entity) pair; it is computed only for
  the top-`candidates` entities of stage 1 (`strategy="two_stage"`), or for every entity (`strategy="exhaustive"`).

Ranking protocol (method.md): rank of the gold entity = 1 + number of entities scored strictly higher, plus, with
`ties="pessimistic"` (the default), the number of *other* entities with exactly the gold's score, so a tie never counts in
the gold entity's favour (`ties="optimistic"` gives the plain "1 + strictly higher"). In two-stage mode the returned list
is the re-ranked top-k followed by every other entity in stage-1 order; a gold outside the top-k has rank
k + 1 + (number of non-top-k entities with strictly higher S_R) (+ ties, pessimistically).

Assignment at inference (`assignment="ot"|"attention"`): it switches the *pairwise unimodal* matching (S_T, S_V) only.
Multimodal fusion features (S_F) are computed once per side by `encode_*` with the model's configured mode
(`config.fusion_assignment`, replaced by attention in eval mode when `config.inference_assignment="attention"`), and the
entity side is cached in the index: an index built with one fusion mode keeps it. A distilled (KD) model saved with
`inference_assignment="attention"` therefore runs attention everywhere by default; `assignment="attention"` on an OT model
gives the fast path for the pairwise part only.

Ordering: results are sorted by S_O, ties broken by S_R, then by KB row, in both strategies (so two-stage ranking with
`candidates` = KB size equals exhaustive ranking). Stage-2 scores of a pair do not depend on the other pairs of its batch
beyond float rounding (Sinkhorn stops per problem).

Command line:

    python linking_otmel.py --model DIR --kb DATASET_DIR_OR_INDEX --input mentions.jsonl --output results.jsonl \
        [--index_dir DIR] [--rebuild_index] [--index_dtype float32|float16] [--top_k 5] \
        [--strategy two_stage|exhaustive] [--candidates 50] [--assignment ot|attention] [--batch_size 64] [--threads N]

Input lines: `{"mention": ..., "sentence": ..., "image": "pics/a.jpg" (optional, relative to the JSONL file), "id": ...
(optional)}`. Output lines: `{"id", "line", "mention", "candidates": [{"qid", "name", "score"}, ...]}`. Bad lines
(invalid JSON, missing or non-string fields) are reported on stderr by line number and skipped; an unreadable picture
is reported and the mention linked without it; a summary line ends the run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .modeling_otmel import OTMELFeatures, OTMELModel
    from .processing_otmel import OTMELProcessor, read_image
except ImportError:
    from modeling_otmel import OTMELFeatures, OTMELModel
    from processing_otmel import OTMELProcessor, read_image


logger = logging.getLogger(__name__)

INDEX_WEIGHTS = "entity_index.safetensors"
INDEX_META = "entity_index.json"
INDEX_FORMAT = 1

# Config settings that change entity features or scores; part of the model fingerprint.
_SCORE_SETTINGS = (
    "hidden_size",
    "ot_epsilon",
    "sinkhorn_iterations",
    "sinkhorn_tolerance",
    "max_text_length",
    "fusion_assignment",
    "unimodal_assignment",
    "pooling",
    "inference_assignment",
)

# Entity tensors kept per KB row besides the stage-1 vectors (when the model has unimodal matching).
_PAIRWISE_FIELDS = ("text_queries", "text_mask", "visual_queries", "visual_mask", "text_global_small", "visual_global_small")
# Mention tensors that ranking needs (the CLIP token states are dropped).
_MENTION_FIELDS = (
    "fused", "text_global", "visual_global", "text_keys", "text_values", "text_mask", "visual_keys", "visual_values",
    "visual_mask", "has_image",
)  # fmt: skip


class IndexMismatchError(ValueError):
    """An entity index does not belong to the given model, processor or KB."""


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_fingerprint(model) -> dict:
    """`{"weights": sha256 of every state_dict tensor (name, dtype, shape, bytes), "settings": {score settings}}`.

    Two models give the same fingerprint iff their weights are bit-identical and their scoring settings agree (so a
    model reloaded with `from_pretrained` matches the one that built the index).
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
    settings = {k: getattr(model.config, k, None) for k in _SCORE_SETTINGS}
    return {"weights": h.hexdigest(), "settings": settings}


def processor_fingerprint(processor) -> dict:
    """What the processor contributes to entity features: text budget, separator, tokenizer vocabulary, image settings."""
    tok = processor.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    image_settings = processor.image_processor.to_dict() if processor.image_processor is not None else {}
    image_settings = {k: v for k, v in image_settings.items() if k not in ("auto_map", "processor_class")}
    return {
        "max_text_length": int(processor.max_text_length),
        "separator": processor._separator(),
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "image_processor": hashlib.sha256(json.dumps(image_settings, sort_keys=True, default=str).encode()).hexdigest(),
    }


def kb_fingerprint(kb) -> str:
    """sha256 over the KB's qids, names, attributes and image byte lengths, in row order."""
    view = _KBView(kb)
    payload = json.dumps([view.qids, view.names, view.attributes, view.image_lengths()], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _diff(kind: str, expected: dict, actual: dict) -> list[str]:
    out = []
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            out.append(f"{kind} {key}: index has {expected.get(key)!r}, given {actual.get(key)!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# KB access
# ----------------------------------------------------------------------------------------------------------------


class _KBView:
    """Uniform access to a KB given as a `datasets.Dataset` (columns qid, name, attributes, image) or a list of dicts.

    Images of a Dataset are read undecoded (`{"bytes", "path"}`), so a corrupt picture becomes "no image" in the
    processor instead of an exception inside the loop.
    """

    def __init__(self, kb):
        self.kb = kb
        self.is_dataset = hasattr(kb, "column_names") and hasattr(kb, "features")
        if self.is_dataset:
            missing = [c for c in ("qid", "name") if c not in kb.column_names]
            if missing:
                raise ValueError(f"KB dataset lacks column(s) {missing}; it has {kb.column_names}")
            self.qids = [str(q) for q in kb["qid"]]
            self.names = [n or "" for n in kb["name"]]
            self.attributes = [a or "" for a in kb["attributes"]] if "attributes" in kb.column_names else [""] * len(kb)
            self.images = None
            if "image" in kb.column_names:
                from datasets import Image

                feature = kb.features["image"]
                self.images = kb.cast_column("image", Image(decode=False)) if isinstance(feature, Image) else kb
        else:
            rows = list(kb)
            self.kb = rows
            self.qids = [str(r["qid"]) for r in rows]
            self.names = [r.get("name") or "" for r in rows]
            self.attributes = [r.get("attributes") or "" for r in rows]
            self.images = [r.get("image") for r in rows]

    def __len__(self):
        return len(self.qids)

    def image_batch(self, start: int, end: int) -> list:
        if self.images is None:
            return [None] * (end - start)
        if self.is_dataset:
            return list(self.images[start:end]["image"])
        return self.images[start:end]

    def image_lengths(self) -> list[int]:
        if self.images is None:
            return [-1] * len(self)
        if self.is_dataset:
            import pyarrow as pa
            import pyarrow.compute as pc

            column = self.images.with_format("arrow")[:]["image"]
            if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
                # Lengths from Arrow directly: the picture bytes are never copied into Python objects.
                lengths = pc.binary_length(pc.struct_field(column, "bytes")).to_pylist()
                paths = pc.struct_field(column, "path").to_pylist() if column.type.get_field_index("path") >= 0 else None
                return [
                    n if n is not None else _image_length(paths[i] if paths is not None else None)
                    for i, n in enumerate(lengths)
                ]
            values = column.to_pylist()
        else:
            values = self.images
        return [_image_length(v) for v in values]


def _image_length(value) -> int:
    if value is None:
        return -1
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return len(value["bytes"])
        value = value.get("path")
        if value is None:
            return -1
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (str, os.PathLike)):
        return os.path.getsize(value) if os.path.isfile(value) else -1
    if hasattr(value, "tobytes"):  # a PIL image
        return len(value.tobytes())
    return -1


# ----------------------------------------------------------------------------------------------------------------
# Entity index
# ----------------------------------------------------------------------------------------------------------------


class EntityIndex:
    """Entity-side features of every KB row, stored compactly for ranking.

    Attributes:
        retrieval (`(N, R)` float32): the stage-1 entity vectors `[fused | text_global | visual_global]` (unit-norm
            parts; `fused` absent when fusion is off). S_R(m, e) = <stage1 mention vector, retrieval[e]>.
        tensors (`dict`): pairwise entity features, in `dtype` (float16 or float32; scoring is always float32):
            `text_queries (N, L_t, D)` with `text_mask (N, L_t)` (text trimmed to the KB's longest real text),
            `visual_queries (N, L_v, D)` with `visual_mask (N, L_v)`, `text_global_small`, `visual_global_small (N, D)`,
            and `has_image (N,)`. Empty (but for `has_image`) when the model has no unimodal matching.
        qids, names (`list[str]`): KB row i is entity `qids[i]`.
        meta (`dict`): fingerprints of the model, processor and KB, the layout of `retrieval`, the storage dtype.
    """

    def __init__(self, retrieval: torch.Tensor, tensors: dict, qids: list, names: list, meta: dict):
        self.retrieval = retrieval
        self.tensors = tensors
        self.qids = list(qids)
        self.names = list(names)
        self.meta = meta
        self._row_of = None
        self._device_cache = {}

    def __len__(self):
        return len(self.qids)

    def __repr__(self):
        dims = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"EntityIndex(n={len(self)}, retrieval={tuple(self.retrieval.shape)}, dtype={self.meta['dtype']}, {dims})"

    @property
    def splits(self) -> dict:
        """Column ranges of `retrieval`: `{"fused": (a, b), "text_global": (b, c), "visual_global": (c, d)}`."""
        return {k: tuple(v) for k, v in self.meta["splits"].items()}

    def row_of(self, qid: str) -> int:
        """KB row of `qid`, or -1 when the qid is not in the KB (first row when a qid repeats)."""
        if self._row_of is None:
            self._row_of = {}
            for i, q in enumerate(self.qids):
                self._row_of.setdefault(q, i)
        return self._row_of.get(str(qid), -1)

    def nbytes(self) -> int:
        return self.retrieval.nbytes + sum(t.nbytes for t in self.tensors.values())

    def _retrieval_on(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device.type == "cpu":
            return self.retrieval
        if device not in self._device_cache:
            self._device_cache = {device: self.retrieval.to(device)}
        return self._device_cache[device]

    def gather(self, rows: torch.Tensor, device=None, trim_text: bool = True) -> OTMELFeatures:
        """Float32 [`OTMELFeatures`] of the KB rows `rows` (any shape S; features get shape `(*S, ...)`).

        With `trim_text`, text tensors are cut to the longest real text among the gathered rows (padding never takes
        part in any score, so this changes no score and saves work).
        """
        rows = rows.cpu()
        device = device or "cpu"
        shape, flat = tuple(rows.shape), rows.reshape(-1)

        def take(t, dtype=None):  # index_select is several times faster than advanced indexing here
            out = t.index_select(0, flat)
            out = out.view(*shape, *t.shape[1:])
            return out.to(device, dtype) if dtype is not None else out.to(device)

        out = {}
        r = take(self.retrieval)
        for name, (a, b) in self.splits.items():
            out[name] = r[..., a:b]
        if "text_mask" in self.tensors:
            text_mask = take(self.tensors["text_mask"])
            length = text_mask.shape[-1]
            if trim_text and flat.numel():
                real = text_mask.reshape(-1, length).any(0)
                length = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
            out["text_mask"] = text_mask[..., :length]
            out["text_queries"] = take(self.tensors["text_queries"][:, :length], torch.float32)
            for name in ("visual_queries", "text_global_small", "visual_global_small"):
                out[name] = take(self.tensors[name], torch.float32)
            out["visual_mask"] = take(self.tensors["visual_mask"])
        out["has_image"] = take(self.tensors["has_image"])
        return OTMELFeatures(**out)

    # ---- checks ---------------------------------------------------------------------------------------------

    def check(self, model=None, processor=None, kb=None, kb_hash: str | None = None):
        """Raises [`IndexMismatchError`] naming every difference between this index and the given model / processor / KB."""
        problems = []
        if model is not None:
            fp = model_fingerprint(model)
            problems += _diff("model setting", self.meta["model"]["settings"], fp["settings"])
            if fp["weights"] != self.meta["model"]["weights"]:
                problems.append(
                    f"model weights differ (index built with weights sha256 {self.meta['model']['weights'][:12]}..., "
                    f"given model {fp['weights'][:12]}...)"
                )
        if processor is not None and self.meta.get("processor") is not None:
            problems += _diff("processor", self.meta["processor"], processor_fingerprint(processor))
        if kb is not None or kb_hash is not None:
            if kb is not None:
                view = _KBView(kb)
                if len(view) != len(self):
                    problems.append(f"KB size differs: index has {len(self)} entities, given KB {len(view)}")
                elif view.qids != self.qids:
                    first = next(i for i, (a, b) in enumerate(zip(self.qids, view.qids)) if a != b)
                    problems.append(f"KB qids differ (first at row {first}: index {self.qids[first]!r}, KB {view.qids[first]!r})")
                kb_hash = kb_fingerprint(kb)
            if kb_hash != self.meta["kb"] and not any(p.startswith("KB") for p in problems):
                problems.append("KB content differs (names, attributes or images changed; same qids in the same order)")
        if problems:
            raise IndexMismatchError(
                "entity index does not match: " + "; ".join(problems) + ". Rebuild the index for this model and KB."
            )

    # ---- persistence ----------------------------------------------------------------------------------------

    def save(self, directory: str):
        """Writes `entity_index.safetensors` (tensors) and `entity_index.json` (fingerprints, qids, names, layout)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors = {}
        for name, (a, b) in self.splits.items():
            tensors[name] = self.retrieval[:, a:b].to(_dtype(self.meta["dtype"])).contiguous()
        tensors.update({k: v.contiguous() for k, v in self.tensors.items()})
        save_file(tensors, os.path.join(directory, INDEX_WEIGHTS))
        meta = dict(self.meta, qids=self.qids, names=self.names)
        with open(os.path.join(directory, INDEX_META), "w", encoding="utf-8") as f:
            json.dump(meta, f, ensure_ascii=False)

    @classmethod
    def load(cls, directory: str, model=None, processor=None, kb=None) -> "EntityIndex":
        """Reads an index written by [`~EntityIndex.save`]; with `model` / `processor` / `kb` given, refuses
        ([`IndexMismatchError`]) an index built from anything else."""
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, INDEX_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no entity index in {directory} (missing {INDEX_META})")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != INDEX_FORMAT:
            raise IndexMismatchError(f"entity index format {meta.get('format')!r} in {directory}; expected {INDEX_FORMAT}")
        tensors = load_file(os.path.join(directory, INDEX_WEIGHTS))
        qids, names = meta.pop("qids"), meta.pop("names")
        parts = [tensors.pop(name).float() for name in meta["splits"]]
        index = cls(torch.cat(parts, dim=1), tensors, qids, names, meta)
        index.check(model=model, processor=processor, kb=kb)
        return index


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[str(name).replace("torch.", "")]


@contextlib.contextmanager
def _inference(model):
    """Eval mode (the configured inference assignment applies) and no gradients; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_kb(
    model,
    processor,
    kb,
    batch_size: int = 64,
    progress: bool = True,
    dtype: str | torch.dtype = "float32",
) -> EntityIndex:
    """Encodes every KB row into an [`EntityIndex`].

    Args:
        model ([`OTMELModel`]): run in eval mode without gradients (its training flag is restored afterwards).
        processor ([`OTMELProcessor`]).
        kb: a `datasets.Dataset` with columns `qid`, `name`, `attributes`, `image` (datasets `Image` or None), or a list
            of such dicts. Unreadable pictures count as "no image".
        batch_size (`int`): entities per forward pass.
        progress (`bool`): tqdm bar.
        dtype (`"float32"` or `"float16"`): storage of the pairwise tensors (float16 halves the memory of large KBs;
            scores are always computed in float32). Stage-1 vectors are always float32.
    """
    from tqdm.auto import tqdm

    dtype = _dtype(dtype)
    view = _KBView(kb)
    n = len(view)
    if n == 0:
        raise ValueError("the KB is empty")
    max_len = 1
    for start in range(0, n, 8192):  # the longest tokenised text, in slices (token lists of a large KB are big)
        texts = processor.entity_texts(view.names[start : start + 8192], view.attributes[start : start + 8192])
        ids = processor.tokenizer(texts, truncation=True, max_length=processor.max_text_length)["input_ids"]
        max_len = max(max_len, max(len(x) for x in ids))
    device = model.device
    cfg = model.config
    pairwise = cfg.unimodal_assignment != "off"
    retrieval = tensors = None
    splits = {}
    with _inference(model):
        for start in tqdm(range(0, n, batch_size), desc="Encoding KB", unit="batch", disable=not progress):
            end = min(n, start + batch_size)
            batch = processor.process_entities(view.names[start:end], view.attributes[start:end], view.image_batch(start, end))
            batch = {k: v.to(device) for k, v in batch.items()}
            feats = model.encode_entities(**batch)
            parts = [("fused", feats.fused), ("text_global", feats.text_global), ("visual_global", feats.visual_global)]
            parts = [(k, v) for k, v in parts if v is not None]
            if retrieval is None:
                col = 0
                for k, v in parts:
                    splits[k] = (col, col + v.shape[-1])
                    col += v.shape[-1]
                retrieval = torch.empty(n, col, dtype=torch.float32)
                tensors = {"has_image": torch.zeros(n, dtype=torch.bool)}
                if pairwise:
                    d = feats.text_queries.shape[-1]
                    l_v = feats.visual_queries.shape[1]
                    tensors["text_queries"] = torch.zeros(n, max_len, d, dtype=dtype)
                    tensors["text_mask"] = torch.zeros(n, max_len, dtype=torch.bool)
                    tensors["visual_queries"] = torch.zeros(n, l_v, d, dtype=dtype)
                    tensors["visual_mask"] = torch.zeros(n, l_v, dtype=torch.bool)
                    tensors["text_global_small"] = torch.zeros(n, d, dtype=dtype)
                    tensors["visual_global_small"] = torch.zeros(n, d, dtype=dtype)
            retrieval[start:end] = torch.cat([v.float() for _, v in parts], dim=-1).cpu()
            tensors["has_image"][start:end] = feats.has_image.cpu()
            if pairwise:
                length = min(max_len, feats.text_mask.shape[1])
                tensors["text_queries"][start:end, :length] = feats.text_queries[:, :length].to("cpu", dtype)
                tensors["text_mask"][start:end, :length] = feats.text_mask[:, :length].bool().cpu()
                tensors["visual_queries"][start:end] = feats.visual_queries.to("cpu", dtype)
                tensors["visual_mask"][start:end] = feats.visual_mask.bool().cpu()
                tensors["text_global_small"][start:end] = feats.text_global_small.to("cpu", dtype)
                tensors["visual_global_small"][start:end] = feats.visual_global_small.to("cpu", dtype)
    meta = {
        "format": INDEX_FORMAT,
        "dtype": str(dtype).replace("torch.", ""),
        "splits": splits,
        "model": model_fingerprint(model),
        "processor": processor_fingerprint(processor),
        "kb": kb_fingerprint(kb),
        "size": n,
    }
    return EntityIndex(retrieval, tensors, view.qids, view.names, meta)


# ----------------------------------------------------------------------------------------------------------------
# Mentions
# ----------------------------------------------------------------------------------------------------------------


def _mention_rows(mentions):
    """`(surfaces, sentences, images)` of a list of dicts or a `mentions` datasets split (images undecoded)."""
    if hasattr(mentions, "column_names") and hasattr(mentions, "features"):
        from datasets import Image

        feature = mentions.features.get("image")
        if isinstance(feature, Image) and feature.decode:
            mentions = mentions.cast_column("image", Image(decode=False))
        surfaces = list(mentions["mention"])
        sentences = list(mentions["sentence"]) if "sentence" in mentions.column_names else [""] * len(surfaces)
        images = list(mentions["image"]) if "image" in mentions.column_names else [None] * len(surfaces)
        return surfaces, sentences, images
    mentions = list(mentions)
    return (
        [m["mention"] for m in mentions],
        [m.get("sentence") or "" for m in mentions],
        [m.get("image") for m in mentions],
    )


def compact_mention_features(feats: OTMELFeatures) -> OTMELFeatures:
    """Only what ranking needs (drops the CLIP token states and maps)."""
    return OTMELFeatures(**{k: getattr(feats, k) for k in _MENTION_FIELDS if getattr(feats, k) is not None})


def encode_mentions(model, processor, mentions, batch_size: int = 64, progress: bool = False) -> OTMELFeatures:
    """Compact mention features ([`compact_mention_features`]) of a list of dicts / `mentions` split, on the model's
    device, batch-wise; text tensors are padded to the longest text of all the mentions."""
    from tqdm.auto import tqdm

    surfaces, sentences, images = _mention_rows(mentions)
    out = []
    with _inference(model):
        for start in tqdm(range(0, len(surfaces), batch_size), desc="Encoding mentions", disable=not progress):
            end = start + batch_size
            batch = processor.process_mentions(surfaces[start:end], sentences[start:end], images[start:end])
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out.append(compact_mention_features(model.encode_mentions(**batch)))
    return _concat_features(out)


def _concat_features(parts: list) -> OTMELFeatures:
    if len(parts) == 1:
        return parts[0]
    length = max(p.text_mask.shape[1] for p in parts)
    merged = {}
    for key in parts[0].keys():
        values = [getattr(p, key) for p in parts]
        if key in ("text_mask", "text_keys", "text_values"):
            values = [_pad_dim1(v, length) for v in values]
        merged[key] = torch.cat(values, dim=0)
    return OTMELFeatures(**merged)


def _pad_dim1(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
    return F.pad(t, pad)


def _slice_features(feats: OTMELFeatures, start: int, end: int, trim_text: bool = True) -> OTMELFeatures:
    out = {k: v[start:end] for k, v in feats.items() if isinstance(v, torch.Tensor)}
    if trim_text and "text_mask" in out and out["text_mask"].numel():
        mask = out["text_mask"].bool()
        length = max(1, int(mask.any(0).nonzero().max()) + 1) if mask.any() else 1
        for key in ("text_mask", "text_keys", "text_values"):
            if key in out:
                out[key] = out[key][:, :length]
    return OTMELFeatures(**out)


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def stage1_weights(model) -> dict:
    """Weights w such that S_R(m, e) = sum_part w[part] * <m.part, e.part> (mirrors `OTMELModel.score`)."""
    cfg = model.config
    fusion = cfg.fusion_assignment != "off"
    n_terms = 3 if fusion else 2
    global_weight = (0.5 if cfg.unimodal_assignment != "off" else 1.0) / n_terms
    weights = {"text_global": global_weight, "visual_global": global_weight}
    if fusion:
        weights["fused"] = 1.0 / n_terms
    return weights


def stage1_queries(model, mentions: OTMELFeatures, index: EntityIndex) -> torch.Tensor:
    """`(B_m, R)` mention vectors with S_R = queries @ index.retrieval.T."""
    weights = stage1_weights(model)
    parts = [getattr(mentions, name).float() * weights[name] for name in index.splits]
    return torch.cat(parts, dim=-1)


def score_candidates(model, mentions: OTMELFeatures, candidates: OTMELFeatures, assignment: str | None = None) -> torch.Tensor:
    """S_O `(B, k)` of each mention with its own candidates (`candidates` has leading shape `(B, k)`): the model's
    [`OTMELModel.score_candidates`], the same values as `model.score(mentions, entities).overall` for those pairs."""
    return model.score_candidates(mentions, candidates, assignment=assignment).overall


# ----------------------------------------------------------------------------------------------------------------
# Gold ranks and metrics
# ----------------------------------------------------------------------------------------------------------------


def _check_ties(ties: str):
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")


def gold_ranks_exhaustive(scores: torch.Tensor, gold: torch.Tensor, ties: str = "pessimistic") -> torch.Tensor:
    """Rank of each row's gold column in `scores (B, N)`: 1 + #(strictly higher) (+ #(other entities tied with the
    gold) when `ties="pessimistic"`). Rows whose gold is < 0 (not in the KB) get -1."""
    _check_ties(ties)
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
    _check_ties(ties)
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
# Ranking
# ----------------------------------------------------------------------------------------------------------------


class RankResult(NamedTuple):
    """Output of [`rank`]: `scores, indices, gold_ranks, stage1_gold_ranks = rank(...)`.

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


_faiss_cache = {}


def _faiss_search(index: EntityIndex, queries: torch.Tensor, k: int):
    import faiss

    key = id(index)
    if key not in _faiss_cache or _faiss_cache[key][0] is not index:
        flat = faiss.IndexFlatIP(index.retrieval.shape[1])
        flat.add(index.retrieval.numpy())
        _faiss_cache.clear()
        _faiss_cache[key] = (index, flat)
    faiss.omp_set_num_threads(torch.get_num_threads())
    scores, rows = _faiss_cache[key][1].search(queries.cpu().float().numpy(), k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


def rank(
    model,
    mention_features: OTMELFeatures,
    index: EntityIndex,
    strategy: str = "two_stage",
    candidates: int = 50,
    top_k: int | None = None,
    assignment: str | None = None,
    chunk_size: int = 512,
    gold=None,
    ties: str = "pessimistic",
    stage1: str = "torch",
    stage1_budget: int = 1 << 23,
) -> RankResult:
    """Ranks the whole KB for each mention.

    Args:
        model ([`OTMELModel`]): run in eval mode without gradients (training flag restored).
        mention_features ([`OTMELFeatures`]): from [`encode_mentions`] (or `model.encode_mentions`), B rows.
        index ([`EntityIndex`]): from [`encode_kb`].
        strategy (`str`): `"two_stage"` (S_R over the KB by matrix product, then S_O for the top `candidates` only) or
            `"exhaustive"` (S_O for every pair).
        candidates (`int`): stage-1 shortlist size (clipped to the KB size; raised to `top_k` if smaller).
        top_k (`int`, *optional*): entities returned per mention (default: `candidates`, clipped to the KB size).
        assignment (`str`, *optional*): `"ot"` / `"attention"` for the pairwise unimodal matching (default: the model's
            inference setting); fusion features keep the mode they were encoded with (module docstring).
        chunk_size (`int`): (mention, entity) pairs scored pairwise per step; bounds memory (about
            chunk_size x L_e x L_m floats per Sinkhorn buffer). 512 was fastest on CPU (256-8192 tried; larger chunks
            leave the cache).
        gold (`(B,)` ints, *optional*): KB row of each mention's gold entity (-1: not in the KB); gives `gold_ranks` and
            `stage1_gold_ranks`.
        ties (`str`): `"pessimistic"` (default) or `"optimistic"`, see [`gold_ranks_exhaustive`].
        stage1 (`str`): `"torch"` (chunked matrix product + top-k; exact) or `"faiss"` (exact `IndexFlatIP`; only
            without `gold`, which needs every S_R). On this project's CPU machine torch was 5-6x faster than FAISS
            flat search at 30K and 100K entities (benchmarks/bench_linking.py), hence the default.
        stage1_budget (`int`): most S_R (or S_O) scores held at once (mentions per chunk = budget // KB size).

    Returns:
        [`RankResult`] (CPU tensors).
    """
    if strategy not in ("two_stage", "exhaustive"):
        raise ValueError(f"strategy must be 'two_stage' or 'exhaustive', got {strategy!r}")
    if stage1 not in ("torch", "faiss"):
        raise ValueError(f"stage1 must be 'torch' or 'faiss', got {stage1!r}")
    _check_ties(ties)
    n = len(index)
    b = mention_features.text_global.shape[0]
    top_k = min(top_k or candidates, n)
    k = min(max(candidates, top_k), n)
    if gold is not None:
        gold = torch.as_tensor(gold).long().flatten()
        if gold.numel() != b:
            raise ValueError(f"gold has {gold.numel()} entries for {b} mentions")
    device = model.device
    retrieval = index._retrieval_on(device)
    mentions_per_chunk = max(1, stage1_budget // n)
    out_scores, out_rows, out_gold, out_stage1 = [], [], [], []
    with _inference(model):
        for start in range(0, b, mentions_per_chunk):
            end = min(b, start + mentions_per_chunk)
            m = _slice_features(mention_features, start, end)
            m = OTMELFeatures(**{key: v.to(device) for key, v in m.items()})
            g = gold[start:end] if gold is not None else None
            queries = stage1_queries(model, m, index)
            s_r = None
            if stage1 == "faiss" and gold is None and strategy == "two_stage":
                _, cand = _faiss_search(index, queries, k)
                cand = cand.to(device)
            else:
                s_r = queries @ retrieval.T  # (b, N)
                cand = s_r.topk(k, dim=1).indices if strategy == "two_stage" else None
            if strategy == "exhaustive":
                cand = torch.arange(n, device=device).expand(end - start, n)
            s_o = _score_rows(model, m, index, cand, assignment, chunk_size)
            # Best first; ties in S_O are broken by S_R, then by KB row, in both strategies.
            order = _order(cand, s_o, s_r)
            out_scores.append(s_o.gather(1, order)[:, :top_k].cpu())
            out_rows.append(cand.gather(1, order)[:, :top_k].cpu())
            if g is not None:
                if strategy == "two_stage":
                    out_gold.append(gold_ranks_two_stage(s_r, cand, s_o, g, ties))
                else:
                    out_gold.append(gold_ranks_exhaustive(s_o, g, ties))
            if g is not None:
                out_stage1.append(gold_ranks_exhaustive(s_r, g, ties))
    return RankResult(
        torch.cat(out_scores),
        torch.cat(out_rows),
        torch.cat(out_gold) if gold is not None else None,
        torch.cat(out_stage1) if gold is not None else None,
    )


def _score_rows(model, mentions, index, rows, assignment, chunk_size) -> torch.Tensor:
    """S_O `(B, k)` of each mention with the KB rows `rows (B, k)`, about `chunk_size` pairs at a time."""
    b, k = rows.shape
    rows_per_step = max(1, chunk_size // max(k, 1))
    cols_per_step = k if k <= chunk_size else chunk_size
    out = []
    for start in range(0, b, rows_per_step):
        end = min(b, start + rows_per_step)
        m = _slice_features(mentions, start, end)
        parts = []
        for col in range(0, k, cols_per_step):
            c = index.gather(rows[start:end, col : col + cols_per_step], device=model.device)
            parts.append(score_candidates(model, m, c, assignment))
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


def _order(rows: torch.Tensor, primary: torch.Tensor, retrieval: torch.Tensor | None) -> torch.Tensor:
    """Permutation of each row of `rows (B, k)` sorting by `primary` descending, then S_R descending, then KB row."""
    order = rows.argsort(dim=1, stable=True)
    if retrieval is not None:
        secondary = retrieval.gather(1, rows.gather(1, order))
        order = order.gather(1, secondary.argsort(dim=1, descending=True, stable=True))
    return order.gather(1, primary.gather(1, order).argsort(dim=1, descending=True, stable=True))


def evaluate_kb(
    model,
    processor,
    index: EntityIndex,
    mentions,
    strategy: str = "two_stage",
    candidates: int = 50,
    assignment: str | None = None,
    batch_size: int = 64,
    chunk_size: int = 512,
    ties: str = "pessimistic",
    ks=(1, 3, 5, 10, 20),
    recall_ks=(10, 20, 50, 100),
    progress: bool = True,
) -> tuple[dict, torch.Tensor]:
    """Whole-KB evaluation of a `mentions` split (columns mention, sentence, image, answer): encodes mentions batch-wise,
    ranks, and returns `(metrics, gold_ranks)`, metrics = [`ranking_metrics`] plus `stage1_`[`stage1_recall`].
    Answers not in the index (NIL, out of KB) count as misses (`n_gold_missing`)."""
    from tqdm.auto import tqdm

    if hasattr(mentions, "column_names"):
        from datasets import Image

        feature = mentions.features.get("image")
        if isinstance(feature, Image) and feature.decode:  # cast once, not per batch
            mentions = mentions.cast_column("image", Image(decode=False))
        answers = list(mentions["answer"])
    else:
        mentions = list(mentions)
        answers = [m["answer"] for m in mentions]
    gold_all = torch.tensor([index.row_of(a) for a in answers], dtype=torch.long)
    ranks, stage1_ranks = [], []
    n = len(answers)
    for start in tqdm(range(0, n, batch_size), desc=f"Ranking ({strategy})", disable=not progress):
        end = min(n, start + batch_size)
        batch = mentions.select(range(start, end)) if hasattr(mentions, "select") else mentions[start:end]
        feats = encode_mentions(model, processor, batch, batch_size=batch_size)
        result = rank(
            model, feats, index, strategy=strategy, candidates=candidates, assignment=assignment,
            chunk_size=chunk_size, gold=gold_all[start:end], ties=ties,
        )  # fmt: skip
        ranks.append(result.gold_ranks)
        stage1_ranks.append(result.stage1_gold_ranks)
    ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    stage1_ranks = torch.cat(stage1_ranks) if stage1_ranks else torch.zeros(0, dtype=torch.long)
    metrics = ranking_metrics(ranks, ks)
    metrics.update({f"stage1_{k}": v for k, v in stage1_recall(stage1_ranks, recall_ks).items()})
    return metrics, ranks


# ----------------------------------------------------------------------------------------------------------------
# Linker
# ----------------------------------------------------------------------------------------------------------------


class OTMELLinker:
    """Links mentions against a KB with a trained OT-MEL.

    ```python
    linker = OTMELLinker.from_pretrained("outputs/demo")
    linker.build_index(load_dataset("data/synth", "kb")["train"])   # or linker.load_index("outputs/demo-index")
    linker.save_index("outputs/demo-index")
    linker.link([{"mention": "Ada Lovelace", "sentence": "...", "image": "photo.jpg"}], top_k=5)
    # -> [[{"qid": "Q7259", "name": "Ada Lovelace", "score": 0.71}, ...]]
    ```
    """

    def __init__(self, model, processor, index: EntityIndex | None = None, batch_size: int = 64):
        self.model = model.eval()
        self.processor = processor
        self.index = index
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, model_dir_or_hub_id: str, trust_remote_code: bool = True, device=None, **kwargs):
        """Loads the model and processor: the classes of this checkout when the folder holds an OT-MEL, else through
        `AutoModel` / `AutoProcessor` with `trust_remote_code`."""
        try:
            model = OTMELModel.from_pretrained(model_dir_or_hub_id, **kwargs)
            processor = OTMELProcessor.from_pretrained(model_dir_or_hub_id)
        except (OSError, ValueError, TypeError, KeyError) as err:
            logger.info("local OT-MEL classes could not load %s (%s); trying AutoModel", model_dir_or_hub_id, err)
            from transformers import AutoModel, AutoProcessor

            model = AutoModel.from_pretrained(model_dir_or_hub_id, trust_remote_code=trust_remote_code, **kwargs)
            processor = AutoProcessor.from_pretrained(model_dir_or_hub_id, trust_remote_code=trust_remote_code)
        if device is not None:
            model = model.to(device)
        return cls(model, processor)

    def build_index(self, kb, batch_size: int | None = None, dtype="float32", progress: bool = True) -> EntityIndex:
        """Encodes a KB (`datasets.Dataset` with the `kb` columns, or a list of dicts) into `self.index`."""
        self.index = encode_kb(self.model, self.processor, kb, batch_size or self.batch_size, progress, dtype)
        return self.index

    def save_index(self, directory: str):
        self._require_index().save(directory)

    def load_index(self, directory: str, kb=None) -> EntityIndex:
        """Loads an index; refuses one built with another model or processor (or another KB, when `kb` is given)."""
        self.index = EntityIndex.load(directory, model=self.model, processor=self.processor, kb=kb)
        return self.index

    def _require_index(self) -> EntityIndex:
        if self.index is None:
            raise RuntimeError("no entity index: call build_index(kb) or load_index(dir) first")
        return self.index

    def encode_mentions(self, mentions, progress: bool = False) -> OTMELFeatures:
        return encode_mentions(self.model, self.processor, mentions, self.batch_size, progress)

    def link(
        self,
        mentions,
        top_k: int = 5,
        strategy: str = "two_stage",
        candidates: int = 50,
        assignment: str | None = None,
        chunk_size: int = 512,
        progress: bool = False,
    ) -> list[list[dict]]:
        """Links each mention (dict or `mentions` split row with `mention`, `sentence`, `image` = PIL image, path, bytes
        or None; an unreadable picture counts as none) to the KB.

        Returns, per mention, `[{"qid", "name", "score"}, ...]` best first (`top_k` entries; S_O scores, cosine scale).
        `assignment="attention"` is the KD fast path for the pairwise matching (module docstring).
        """
        from tqdm.auto import tqdm

        index = self._require_index()
        surfaces, sentences, images = _mention_rows(mentions)
        results = []
        for start in tqdm(range(0, len(surfaces), self.batch_size), desc="Linking", disable=not progress):
            end = start + self.batch_size
            batch = [{"mention": s, "sentence": t, "image": i} for s, t, i in zip(surfaces[start:end], sentences[start:end], images[start:end])]
            feats = encode_mentions(self.model, self.processor, batch, self.batch_size)
            res = rank(
                self.model, feats, index, strategy=strategy, candidates=max(candidates, top_k), top_k=top_k,
                assignment=assignment, chunk_size=chunk_size,
            )  # fmt: skip
            for scores, rows in zip(res.scores.tolist(), res.indices.tolist()):
                results.append([{"qid": index.qids[r], "name": index.names[r], "score": s} for s, r in zip(scores, rows)])
        return results


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _load_kb_dataset(path: str):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    try:
        kb = load_dataset(path, "kb")
    except Exception as err:  # noqa: BLE001 - fall back to a saved Dataset
        try:
            kb = load_from_disk(path)
        except Exception:  # noqa: BLE001
            raise ValueError(f"--kb {path}: neither an entity index nor a dataset with a 'kb' config ({err})") from err
    if isinstance(kb, DatasetDict):
        if len(kb) != 1:
            raise ValueError(f"--kb {path}: expected one split in the 'kb' config, found {list(kb)}")
        kb = next(iter(kb.values()))
    if not isinstance(kb, Dataset):
        raise ValueError(f"--kb {path}: not a dataset")
    return kb


def _read_jsonl(path: str):
    """Yields `(line_number, record or None, error or None)`; blank lines are skipped silently."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(obj, dict):
                yield number, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            missing = [k for k in ("mention", "sentence") if not isinstance(obj.get(k), str)]
            if missing:
                yield number, None, f"missing or non-string field(s) {', '.join(missing)}"
                continue
            if not obj["mention"].strip():
                yield number, None, "empty mention"
                continue
            image = obj.get("image")
            if image is not None and not isinstance(image, str):
                yield number, None, f"field image must be a path string or null, got {type(image).__name__}"
                continue
            if image:
                image = image if os.path.isabs(image) else os.path.join(base, image)
            obj["image"] = image or None
            yield number, obj, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Link mentions (JSONL: mention, sentence, optional image path relative to the file) to a KB.",
    )
    parser.add_argument("--model", required=True, help="OT-MEL folder or Hub id (model and processor)")
    parser.add_argument("--kb", required=True, help="dataset folder with a 'kb' config, or an entity index folder")
    parser.add_argument("--input", required=True, help="mentions, one JSON object per line")
    parser.add_argument("--output", required=True, help="results, one JSON object per linked mention")
    parser.add_argument("--index_dir", help="load the entity index from here if present, else build and save it here")
    parser.add_argument("--rebuild_index", action="store_true", help="overwrite an existing --index_dir")
    parser.add_argument("--index_dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--strategy", default="two_stage", choices=("two_stage", "exhaustive"))
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--assignment", default=None, choices=("ot", "attention"))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a busy machine 1 can be much faster)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start_time = time.time()
    linker = OTMELLinker.from_pretrained(args.model, device=args.device)
    linker.batch_size = args.batch_size
    try:
        if os.path.isfile(os.path.join(args.kb, INDEX_META)):
            linker.load_index(args.kb)
        else:
            kb = _load_kb_dataset(args.kb)
            if args.index_dir and os.path.isfile(os.path.join(args.index_dir, INDEX_META)) and not args.rebuild_index:
                linker.load_index(args.index_dir, kb=kb)
                print(f"loaded entity index from {args.index_dir} ({len(linker.index)} entities)", file=sys.stderr)
            else:
                linker.build_index(kb, dtype=args.index_dtype)
                if args.index_dir:
                    linker.save_index(args.index_dir)
                    print(f"saved entity index to {args.index_dir}", file=sys.stderr)
    except IndexMismatchError as err:
        print(f"error: {err} (use --rebuild_index to overwrite {args.index_dir})", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    with open(args.input, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    bad, no_image, linked = [], 0, 0
    pending = []

    def flush(out):
        nonlocal linked
        if not pending:
            return
        results = linker.link([rec for _, rec in pending], top_k=args.top_k, strategy=args.strategy,
                              candidates=args.candidates, assignment=args.assignment)  # fmt: skip
        for (number, rec), cands in zip(pending, results):
            row = {"line": number, "mention": rec["mention"], "candidates": cands}
            if "id" in rec:
                row = {"id": rec["id"], **row}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        linked += len(pending)
        pending.clear()

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as out, tqdm(total=total, desc="Linking", unit="mention") as bar:
        for number, rec, error in _read_jsonl(args.input):
            bar.update(1)
            if error is not None:
                bad.append(number)
                tqdm.write(f"line {number}: {error}; skipped", file=sys.stderr)
                continue
            if rec["image"] is not None:
                image, reason = read_image(rec["image"])
                if image is None:
                    no_image += 1
                    tqdm.write(f"line {number}: {reason}; linked without image", file=sys.stderr)
                rec["image"] = image
            pending.append((number, rec))
            if len(pending) >= args.batch_size:
                flush(out)
        flush(out)
    summary = f"linked {linked} mention(s), skipped {len(bad)} bad line(s)"
    if bad:
        summary += f" (line {', '.join(map(str, bad[:20]))}{', ...' if len(bad) > 20 else ''})"
    summary += f", {no_image} unreadable image(s) linked without image; {time.time() - start_time:.1f} s -> {args.output}"
    print(summary, file=sys.stderr)
    return 0


__all__ = [
    "EntityIndex",
    "IndexMismatchError",
    "OTMELLinker",
    "RankResult",
    "encode_kb",
    "encode_mentions",
    "evaluate_kb",
    "gold_ranks_exhaustive",
    "gold_ranks_two_stage",
    "kb_fingerprint",
    "model_fingerprint",
    "processor_fingerprint",
    "rank",
    "ranking_metrics",
    "score_candidates",
    "stage1_queries",
    "stage1_recall",
]


if __name__ == "__main__":
    sys.exit(main())
