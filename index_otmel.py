"""The entity index: every KB row's entity features, computed once, stored, checked and reloaded.

- [`KBView`]: uniform access to a KB given as a `datasets.Dataset` or a list of dicts.
- [`encode_kb`]: encodes a KB with a model into an [`EntityIndex`].
- [`EntityIndex`]: the stage-1 vectors (`retrieval`) and the features stage 2 reads, with [`~EntityIndex.gather`],
  [`~EntityIndex.save`] and [`~EntityIndex.load`] (which refuses an index built from another model, processor or KB).
- Fingerprints of models, processors and KBs ([`model_fingerprint`], [`processor_fingerprint`], [`kb_fingerprint`]).

Which features are stored is the model's decision ([`~OTMELModel.stage1_weights`],
[`~OTMELModel.entity_index_fields`]); this module stores whatever the model names.
"""

import contextlib
import hashlib
import json
import os

import torch


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .modeling_otmel import OTMELEntityFeatures, real_text_length
except ImportError:
    from modeling_otmel import OTMELEntityFeatures, real_text_length


INDEX_WEIGHTS = "entity_index.safetensors"
INDEX_META = "entity_index.json"
INDEX_FORMAT = 1

# Config settings that change entity features or scores; part of the model fingerprint.
SCORE_SETTINGS = (
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


class IndexMismatchError(ValueError):
    """An entity index does not belong to the given model, processor or KB."""


@contextlib.contextmanager
def inference_mode(model):
    """Eval mode (the configured inference assignment applies) and no gradients; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


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
    settings = {k: getattr(model.config, k, None) for k in SCORE_SETTINGS}
    return {"weights": h.hexdigest(), "settings": settings}


def processor_fingerprint(processor) -> dict:
    """What the processor contributes to entity features: text budget, separator, tokenizer vocabulary, image settings."""
    tok = processor.tokenizer
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    image_settings = processor.image_processor.to_dict() if processor.image_processor is not None else {}
    image_settings = {k: v for k, v in image_settings.items() if k not in ("auto_map", "processor_class")}
    return {
        "max_text_length": int(processor.max_text_length),
        "separator": processor.text_separator(),
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
        "image_processor": hashlib.sha256(json.dumps(image_settings, sort_keys=True, default=str).encode()).hexdigest(),
    }


def kb_fingerprint(kb) -> str:
    """sha256 over the KB's qids, names, attributes and image byte lengths, in row order."""
    view = KBView(kb)
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


class KBView:
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
        tensors (`dict`): the other entity features stage 2 reads ([`~OTMELModel.entity_index_fields`]), floats in
            `dtype` (float16 or float32; scoring is always float32), masks as bool, text fields cut to the KB's
            longest real text.
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

    def retrieval_on(self, device) -> torch.Tensor:
        """`retrieval`, on `device` (a copy kept for the last non-CPU device asked for)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.retrieval
        if device not in self._device_cache:
            self._device_cache = {device: self.retrieval.to(device)}
        return self._device_cache[device]

    def gather(self, rows: torch.Tensor, device=None, trim_text: bool = True) -> OTMELEntityFeatures:
        """Float32 [`OTMELEntityFeatures`] of the KB rows `rows` (any shape S; features get shape `(*S, ...)`).

        With `trim_text`, text tensors are cut to the longest real text among the gathered rows (padding never takes
        part in any score, so this changes no score and saves work).
        """
        rows = rows.cpu()
        device = device or "cpu"
        shape, flat = tuple(rows.shape), rows.reshape(-1)

        def take(t):  # index_select is several times faster than advanced indexing here
            out = t.index_select(0, flat).view(*shape, *t.shape[1:])
            return out.to(device, torch.float32) if out.is_floating_point() else out.to(device)

        stage1 = take(self.retrieval)
        fields = {name: stage1[..., a:b] for name, (a, b) in self.splits.items()}
        length = None
        if trim_text and "text_mask" in self.tensors and flat.numel():
            length = real_text_length(self.tensors["text_mask"].index_select(0, flat))
        for name, tensor in self.tensors.items():
            if length is not None and name in OTMELEntityFeatures.TEXT_TOKEN_FIELDS:
                tensor = tensor[:, :length]
            fields[name] = take(tensor)
        return OTMELEntityFeatures(**fields)

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
                view = KBView(kb)
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
            tensors[name] = self.retrieval[:, a:b].to(storage_dtype(self.meta["dtype"])).contiguous()
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


def storage_dtype(name) -> torch.dtype:
    """`torch.float16` etc. from a name (`"float16"`, `"torch.float16"`) or a dtype."""
    if isinstance(name, torch.dtype):
        return name
    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[str(name).replace("torch.", "")]




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
        dtype (`"float32"` or `"float16"`): storage of the stage-2 features (float16 halves the memory of large KBs;
            scores are always computed in float32). Stage-1 vectors are always float32.
    """
    from tqdm.auto import tqdm

    dtype = storage_dtype(dtype)
    view = KBView(kb)
    n = len(view)
    if n == 0:
        raise ValueError("the KB is empty")
    max_len = 1
    for start in range(0, n, 8192):  # the longest tokenised text, in slices (token lists of a large KB are big)
        texts = processor.entity_texts(view.names[start : start + 8192], view.attributes[start : start + 8192])
        ids = processor.tokenizer(texts, truncation=True, max_length=processor.max_text_length)["input_ids"]
        max_len = max(max_len, max(len(x) for x in ids))
    device = model.device
    fields = model.entity_index_fields()
    retrieval, tensors, splits = None, {}, {}
    with inference_mode(model):
        for start in tqdm(range(0, n, batch_size), desc="Encoding KB", unit="batch", disable=not progress):
            end = min(n, start + batch_size)
            batch = processor.process_entities(view.names[start:end], view.attributes[start:end], view.image_batch(start, end))
            feats = model.encode_entities(**{k: v.to(device) for k, v in batch.items()})
            stage1 = model.entity_stage1(feats).float().cpu()
            rows = feats.with_text_length(max_len).row_fields()
            if retrieval is None:
                col = 0
                for name in model.stage1_weights():
                    width = getattr(feats, name).shape[-1]
                    splits[name] = (col, col + width)
                    col += width
                retrieval = torch.empty(n, col, dtype=torch.float32)
                for name in fields:
                    value = rows[name]
                    keep = value.dtype if not value.is_floating_point() else dtype
                    keep = torch.bool if name.endswith("_mask") else keep
                    tensors[name] = torch.zeros(n, *value.shape[1:], dtype=keep)
            retrieval[start:end] = stage1
            for name in fields:
                tensors[name][start:end] = rows[name].to("cpu", tensors[name].dtype)
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


__all__ = [
    "INDEX_FORMAT",
    "INDEX_META",
    "INDEX_WEIGHTS",
    "EntityIndex",
    "IndexMismatchError",
    "KBView",
    "encode_kb",
    "inference_mode",
    "kb_fingerprint",
    "model_fingerprint",
    "processor_fingerprint",
    "storage_dtype",
]
