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


INDEX_WEIGHTS = "entity_index.safetensors"  # format <= 2; format 3 names its tensors file in the meta
INDEX_META = "entity_index.json"
# 2: per-row KB hashes (ROW_HASHES) and live edits. 3: checksums of the tensors file and of the qid / name lists,
# tensors file named per save (`entity_index-<id>.safetensors`, listed in the meta) so that saving is atomic.
INDEX_FORMAT = 3
ROW_HASHES = "row_hashes"  # the safetensors entry of EntityIndex.row_hashes

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


class IndexCorruptError(IndexMismatchError):
    """A saved entity index is damaged (missing, truncated or altered file, broken JSON, lists that do not match
    their checksums) or of an older format: the message names the file; rebuild the index."""


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


ROW_HASH_BYTES = 16


def kb_row_hashes(kb) -> torch.Tensor:
    """`(N, 16)` uint8: per KB row, the first 16 bytes of sha256 over `[qid, name, attributes, image byte length]`.

    What an [`EntityIndex`] keeps of each row's source, so that a KB can be checked against it row by row, also after
    [`~EntityIndex.add`] / [`~EntityIndex.remove`] changed the index.
    """
    view = kb if isinstance(kb, KBView) else KBView(kb)
    lengths = view.image_lengths()
    out = torch.empty(len(view), ROW_HASH_BYTES, dtype=torch.uint8)
    for i, row in enumerate(zip(view.qids, view.names, view.attributes, lengths)):
        digest = hashlib.sha256(json.dumps(list(row), ensure_ascii=False).encode()).digest()[:ROW_HASH_BYTES]
        out[i] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
    return out


def content_fingerprint(row_hashes: torch.Tensor) -> str:
    """sha256 over the row hashes ([`kb_row_hashes`]) in row order: the KB fingerprint of an index's rows."""
    return hashlib.sha256(_tensor_bytes(row_hashes.to(torch.uint8))).hexdigest()


def kb_fingerprint(kb) -> str:
    """sha256 over the KB's rows (qid, name, attributes, image byte length; [`kb_row_hashes`]), in row order."""
    return content_fingerprint(kb_row_hashes(kb))


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
            for i, r in enumerate(rows):
                if not isinstance(r, dict) or r.get("qid") is None or str(r["qid"]) == "":
                    raise ValueError(
                        f"KB row {i}: expected a dict with a non-empty 'qid' (and 'name', 'attributes', 'image'), "
                        f"got {str(r)[:80]!r}"
                    )
                for key in ("name", "attributes"):
                    if r.get(key) is not None and not isinstance(r[key], str):
                        raise ValueError(f"KB row {i} (qid {r['qid']!r}): {key} must be a string, got {type(r[key]).__name__}")
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
        meta (`dict`): fingerprints of the model, processor and KB, the layout of `retrieval`, the storage dtype;
            `meta["kb"]` is [`content_fingerprint`] of `row_hashes` (after [`~EntityIndex.add`] /
            [`~EntityIndex.remove`] it describes the edited rows, no longer the dataset the index was built from) and
            `meta["edits"]` counts the rows added, replaced and removed since [`encode_kb`].
        row_hashes (`(N, 16)` uint8, *optional*): [`kb_row_hashes`] of the KB rows (qid, name, attributes, image byte
            length), so [`~EntityIndex.check`] can compare a KB row by row.

    `version` grows with every change of the rows ([`~EntityIndex.add`], [`~EntityIndex.remove`]); caches built from
    the rows (`row_of`, device copies, `ranking_otmel`'s FAISS indexes) are keyed on it.
    """

    def __init__(
        self, retrieval: torch.Tensor, tensors: dict, qids: list, names: list, meta: dict, row_hashes=None
    ):
        self.retrieval = retrieval
        self.tensors = tensors
        self.qids = list(qids)
        self.names = list(names)
        self.meta = meta
        self.row_hashes = row_hashes
        self.version = 0
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

    # ---- live updates ---------------------------------------------------------------------------------------

    def _changed(self, **edits):
        """Bookkeeping after the rows changed: version, caches, size, KB content fingerprint, edit counts."""
        self.version += 1
        self._row_of = None
        self._device_cache = {}
        self.meta["size"] = len(self.qids)
        self.meta["kb"] = content_fingerprint(self.row_hashes) if self.row_hashes is not None else None
        counts = dict(self.meta.get("edits") or {"added": 0, "replaced": 0, "removed": 0})
        for key, value in edits.items():
            counts[key] = counts.get(key, 0) + value
        self.meta["edits"] = counts

    def _text_length(self) -> int:
        mask = self.tensors.get("text_mask")
        return mask.shape[1] if mask is not None else 0

    def add(self, other: "EntityIndex") -> dict:
        """Adds the rows of `other` (an index of the same model and processor, e.g. `encode_kb` of a few new
        entities): a qid already here is replaced in place (every row holding it), new qids are appended in `other`'s
        order.

        Text fields are zero-padded to the longer of the two texts (padding takes part in no score); `other`'s
        features are stored in this index's dtype.

        Returns:
            `{"added": int, "replaced": int}`: qids appended and qids replaced.

        Raises:
            [`IndexMismatchError`]: `other` was built with another model (weights or score settings) or processor, or
                stores other fields; nothing is changed.
            `ValueError`: `other` holds a qid twice.
        """
        if not isinstance(other, EntityIndex):
            raise TypeError(f"EntityIndex.add takes an EntityIndex, got {type(other).__name__}")
        problems = []
        mine, theirs = self.meta["model"], other.meta["model"]
        problems += _diff("model setting", mine["settings"], theirs["settings"])
        if mine["weights"] != theirs["weights"]:
            problems.append(f"model weights differ (this index {mine['weights'][:12]}..., added {theirs['weights'][:12]}...)")
        if self.meta.get("processor") != other.meta.get("processor"):
            problems += _diff("processor", self.meta.get("processor") or {}, other.meta.get("processor") or {})
        if self.splits != other.splits:
            problems.append(f"stage-1 layout differs (this index {self.splits}, added {other.splits})")
        if set(self.tensors) != set(other.tensors):
            problems.append(f"stored fields differ (this index {sorted(self.tensors)}, added {sorted(other.tensors)})")
        else:
            for name, t in self.tensors.items():
                skip = 2 if name in OTMELEntityFeatures.TEXT_TOKEN_FIELDS else 1
                if tuple(t.shape[skip:]) != tuple(other.tensors[name].shape[skip:]):
                    problems.append(f"field {name} has shape {tuple(other.tensors[name].shape[1:])}, expected {tuple(t.shape[1:])}")
        if problems:
            raise IndexMismatchError("cannot add an entity index built differently: " + "; ".join(problems) + ".")
        seen, repeated = set(), []
        for q in other.qids:
            if q in seen:
                repeated.append(q)
            seen.add(q)
        if repeated:
            raise ValueError(f"the added index holds qid(s) more than once: {sorted(set(repeated))[:20]}")

        source = {q: i for i, q in enumerate(other.qids)}
        replace_rows = [i for i, q in enumerate(self.qids) if q in source]
        replace_from = torch.tensor([source[self.qids[i]] for i in replace_rows], dtype=torch.long)
        present = set(self.qids)
        append_from = torch.tensor([i for i, q in enumerate(other.qids) if q not in present], dtype=torch.long)
        replace_rows = torch.tensor(replace_rows, dtype=torch.long)
        length = max(self._text_length(), other._text_length())
        mine_t, theirs_t = _fit_text(self.tensors, length), _fit_text(other.tensors, length)

        def merge(a, b):
            b = b.to(a.dtype)
            out = torch.cat([a, b.index_select(0, append_from)])
            if replace_rows.numel():
                out[replace_rows] = b.index_select(0, replace_from)
            return out

        retrieval = merge(self.retrieval, other.retrieval)
        tensors = {name: merge(t, theirs_t[name]) for name, t in mine_t.items()}
        row_hashes = None
        if self.row_hashes is not None and other.row_hashes is not None:
            row_hashes = merge(self.row_hashes, other.row_hashes)
        names = list(self.names)
        for i, j in zip(replace_rows.tolist(), replace_from.tolist()):
            names[i] = other.names[j]
        self.retrieval, self.tensors, self.row_hashes = retrieval, tensors, row_hashes
        self.qids = self.qids + [other.qids[j] for j in append_from.tolist()]
        self.names = names + [other.names[j] for j in append_from.tolist()]
        added, replaced = len(append_from), len(other) - len(append_from)
        self._changed(added=added, replaced=replaced)
        return {"added": added, "replaced": replaced}

    def remove(self, qids, missing_ok: bool = False) -> int:
        """Removes every row holding one of `qids` (a qid or a list); the other rows keep their order.

        Args:
            qids (`str` or iterable of `str`).
            missing_ok (`bool`): ignore qids not in the index; by default they raise `KeyError` naming them and
                nothing is removed.

        Returns:
            `int`: rows removed.

        Raises:
            `KeyError`: unknown qid(s) (without `missing_ok`). `ValueError`: the index would be left empty.
        """
        wanted = {str(qids)} if isinstance(qids, (str, int)) else {str(q) for q in qids}
        missing = sorted(wanted - set(self.qids))
        if missing and not missing_ok:
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise KeyError(f"{len(missing)} qid(s) not in the entity index: {missing[:20]}{more}; nothing removed")
        keep = [i for i, q in enumerate(self.qids) if q not in wanted]
        removed = len(self.qids) - len(keep)
        if removed == 0:
            return 0
        if not keep:
            raise ValueError(f"removing {removed} row(s) would leave the entity index empty; nothing removed")
        keep_t = torch.tensor(keep, dtype=torch.long)
        self.retrieval = self.retrieval.index_select(0, keep_t)
        self.tensors = {name: t.index_select(0, keep_t) for name, t in self.tensors.items()}
        if self.row_hashes is not None:
            self.row_hashes = self.row_hashes.index_select(0, keep_t)
        self.qids = [self.qids[i] for i in keep]
        self.names = [self.names[i] for i in keep]
        self._changed(removed=removed)
        return removed

    # ---- checks ---------------------------------------------------------------------------------------------

    def check(self, model=None, processor=None, kb=None, kb_hash: str | None = None):
        """Raises [`IndexMismatchError`] naming every difference between this index and the given model / processor / KB.

        A `kb` is compared with the index's rows: the same size, the same qids in the same order, then the same content
        row by row (name, attributes, image byte length; [`kb_row_hashes`]). After [`~EntityIndex.add`] /
        [`~EntityIndex.remove`] the KB that matches is the edited one in the index's row order (replaced rows in
        place, added qids at the end), not the dataset the index was first built from. `kb_hash` is compared with
        `meta["kb"]` ([`kb_fingerprint`] of that KB).
        """
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
                given = kb_row_hashes(view)
                if len(view) != len(self):
                    problems.append(f"KB size differs: index has {len(self)} entities, given KB {len(view)}")
                elif view.qids != self.qids:
                    first = next(i for i, (a, b) in enumerate(zip(self.qids, view.qids)) if a != b)
                    problems.append(f"KB qids differ (first at row {first}: index {self.qids[first]!r}, KB {view.qids[first]!r})")
                elif self.row_hashes is not None:
                    rows = (given != self.row_hashes).any(dim=1).nonzero().flatten().tolist()
                    if rows:
                        others = f" and {len(rows) - 1} other row(s)" if len(rows) > 1 else ""
                        problems.append(
                            f"KB content differs at row {rows[0]} (qid {self.qids[rows[0]]!r}){others}: name, "
                            "attributes or image changed; same qids in the same order"
                        )
                kb_hash = content_fingerprint(given)
            if (
                self.meta.get("kb") is not None
                and kb_hash != self.meta["kb"]
                and not any(p.startswith("KB") for p in problems)
            ):
                problems.append("KB content differs (names, attributes or images changed; same qids in the same order)")
        if problems:
            raise IndexMismatchError(
                "entity index does not match: " + "; ".join(problems) + ". Rebuild the index for this model and KB."
            )

    # ---- persistence ----------------------------------------------------------------------------------------

    def save(self, directory: str):
        """Writes the index into `directory`, atomically: `entity_index-<id>.safetensors` (tensors) and
        `entity_index.json` (fingerprints, qids, names, layout, the tensors file's name, and sha256 checksums of the
        tensors file and of the qid and name lists, which [`~EntityIndex.load`] verifies).

        The tensors file is written under a temporary name, flushed to disk and renamed; then the JSON is written the
        same way, and its rename is the commit: an interrupted save leaves the previous index (or none) loadable, never
        a half-written one. The previous index's tensors file is deleted after the commit; other files in `directory`
        are left alone. Two processes must not save into the same directory at once.
        """
        from safetensors.torch import save_file

        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        _remove_temporaries(directory)
        tensors = {}
        for name, (a, b) in self.splits.items():
            tensors[name] = self.retrieval[:, a:b].to(storage_dtype(self.meta["dtype"])).contiguous()
        tensors.update({k: v.contiguous() for k, v in self.tensors.items()})
        if self.row_hashes is not None:
            tensors[ROW_HASHES] = self.row_hashes.contiguous()
        weights_name = f"{WEIGHTS_PREFIX}{os.urandom(6).hex()}{WEIGHTS_SUFFIX}"
        weights_path = os.path.join(directory, weights_name)
        committed = False
        try:
            with _AtomicFile(weights_path) as tmp:
                save_file(tensors, tmp)
            meta = dict(self.meta)
            meta["files"] = {"weights": weights_name}
            meta["checksums"] = {
                "weights_sha256": _file_sha256(weights_path),
                "weights_bytes": os.path.getsize(weights_path),
                "qids_sha256": _list_sha256(self.qids),
                "names_sha256": _list_sha256(self.names),
            }
            meta.update(qids=self.qids, names=self.names)
            with _AtomicFile(os.path.join(directory, INDEX_META)) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(meta, f, ensure_ascii=False)
            committed = True
        finally:
            if not committed and os.path.exists(weights_path):
                os.remove(weights_path)
        # The commit is done: the tensors files of earlier saves are no longer referenced.
        for name in os.listdir(directory):
            if name != weights_name and (
                name == INDEX_WEIGHTS or (name.startswith(WEIGHTS_PREFIX) and name.endswith(WEIGHTS_SUFFIX))
            ):
                os.remove(os.path.join(directory, name))
        _fsync_dir(directory)

    @classmethod
    def load(cls, directory: str, model=None, processor=None, kb=None, verify: bool = True) -> "EntityIndex":
        """Reads an index written by [`~EntityIndex.save`].

        Args:
            directory (`str`): the index folder.
            model, processor, kb (*optional*): refuse ([`IndexMismatchError`]) an index built from anything else.
            verify (`bool`): check the sha256 of the tensors file (reads it once; the size, the layout and the
                checksums of the qid and name lists are always checked).

        Raises:
            `FileNotFoundError`: no `entity_index.json` in `directory`.
            [`IndexCorruptError`]: a damaged or older-format index (the message names the file; rebuild the index).
            [`IndexMismatchError`]: another model / processor / KB.
        """
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, INDEX_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no entity index in {directory} (missing {INDEX_META})")
        meta = _read_meta(meta_path)
        weights_path = os.path.join(directory, meta["files"]["weights"])
        checksums = meta.pop("checksums")
        meta.pop("files")
        qids, names = meta.pop("qids"), meta.pop("names")
        if not os.path.isfile(weights_path):
            raise IndexCorruptError(f"{weights_path} is missing (named by {meta_path}); {REBUILD}")
        size = os.path.getsize(weights_path)
        if size != checksums["weights_bytes"]:
            raise IndexCorruptError(
                f"{weights_path} has {size} bytes, {meta_path} says {checksums['weights_bytes']} (truncated or "
                f"replaced); {REBUILD}"
            )
        if verify and _file_sha256(weights_path) != checksums["weights_sha256"]:
            raise IndexCorruptError(f"{weights_path}: contents do not match the sha256 in {meta_path} (damaged); {REBUILD}")
        try:
            tensors = load_file(weights_path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types, without the file name
            raise IndexCorruptError(f"{weights_path}: unreadable tensors file ({type(err).__name__}: {err}); {REBUILD}") from err
        missing = [name for name in meta["splits"] if name not in tensors]
        rows = {name: t.shape[0] for name, t in tensors.items() if t.dim()}
        if missing or any(r != len(qids) for r in rows.values()):
            raise IndexCorruptError(
                f"{weights_path}: tensors {sorted(rows)} with rows {sorted(set(rows.values()))} do not fit the "
                f"{len(qids)} qids of {meta_path}{f' (missing {missing})' if missing else ''}; {REBUILD}"
            )
        parts = [tensors.pop(name).float() for name in meta["splits"]]
        row_hashes = tensors.pop(ROW_HASHES, None)
        index = cls(torch.cat(parts, dim=1), tensors, qids, names, meta, row_hashes=row_hashes)
        index.check(model=model, processor=processor, kb=kb)
        return index


WEIGHTS_PREFIX, WEIGHTS_SUFFIX = "entity_index-", ".safetensors"
TEMPORARY_MARK = ".tmp-"
REBUILD = "rebuild the index (e.g. `linking_otmel.py ... --rebuild_index`, or encode_kb + save)"


def _list_sha256(values: list) -> str:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(directory: str):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_temporaries(directory: str):
    """Deletes the temporary files an interrupted save left in `directory`."""
    for name in os.listdir(directory):
        if name.startswith(".") and TEMPORARY_MARK in name and (INDEX_META in name or WEIGHTS_PREFIX in name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


class _AtomicFile:
    """`with _AtomicFile(path) as tmp:` write `tmp`; on success it is flushed to disk and renamed to `path` (and the
    directory entry flushed); on an exception it is deleted and `path` is untouched."""

    def __init__(self, path: str):
        self.path = path
        folder, name = os.path.split(path)
        self.tmp = os.path.join(folder, f".{name}{TEMPORARY_MARK}{os.getpid()}-{os.urandom(4).hex()}")

    def __enter__(self) -> str:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            with contextlib.suppress(OSError):
                os.remove(self.tmp)
            return False
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        _fsync_dir(os.path.dirname(self.path))
        return False


def _read_meta(meta_path: str) -> dict:
    """The JSON of a saved index, checked: format, keys, qid / name lists against their checksums."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexCorruptError(f"{meta_path}: not valid JSON ({err}); {REBUILD}") from err
    if not isinstance(meta, dict):
        raise IndexCorruptError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}; {REBUILD}")
    if meta.get("format") != INDEX_FORMAT:
        raise IndexCorruptError(
            f"{meta_path}: entity index format {meta.get('format')!r}, this code reads format {INDEX_FORMAT} "
            f"(written by another version); {REBUILD}"
        )
    missing = [k for k in ("qids", "names", "splits", "dtype", "model", "files", "checksums") if k not in meta]
    checksums = meta.get("checksums")
    if not missing and isinstance(checksums, dict):
        missing = [
            f"checksums.{k}" for k in ("weights_sha256", "weights_bytes", "qids_sha256", "names_sha256") if k not in checksums
        ]
    if missing or not isinstance(meta["files"], dict) or not isinstance(meta["files"].get("weights"), str):
        raise IndexCorruptError(f"{meta_path}: lacks {missing or ['files.weights']}; {REBUILD}")
    weights = meta["files"]["weights"]
    if os.path.basename(weights) != weights or not weights.startswith(WEIGHTS_PREFIX):
        raise IndexCorruptError(f"{meta_path}: bad tensors file name {weights!r}; {REBUILD}")
    for key in ("qids", "names"):
        values = meta[key]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise IndexCorruptError(f"{meta_path}: {key} must be a list of strings; {REBUILD}")
        if _list_sha256(values) != checksums[f"{key}_sha256"]:
            raise IndexCorruptError(
                f"{meta_path}: the {key} list does not match its checksum (edited, reordered or cut: every returned "
                f"{key[:-1]} would be wrong); {REBUILD}"
            )
    if len(meta["qids"]) != len(meta["names"]):
        raise IndexCorruptError(f"{meta_path}: {len(meta['qids'])} qids but {len(meta['names'])} names; {REBUILD}")
    return meta


def _fit_text(tensors: dict, length: int) -> dict:
    """Index fields with their text axis (axis 1 of `TEXT_TOKEN_FIELDS`) cut or zero-padded to `length`."""
    out = {}
    for name, t in tensors.items():
        if name in OTMELEntityFeatures.TEXT_TOKEN_FIELDS and t.shape[1] != length:
            if t.shape[1] > length:
                t = t[:, :length]
            else:
                t = torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1], *t.shape[2:])], dim=1)
        out[name] = t
    return out


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
    row_hashes = kb_row_hashes(view)
    meta = {
        "format": INDEX_FORMAT,
        "dtype": str(dtype).replace("torch.", ""),
        "splits": splits,
        "model": model_fingerprint(model),
        "processor": processor_fingerprint(processor),
        "kb": content_fingerprint(row_hashes),
        "size": n,
        "edits": {"added": 0, "replaced": 0, "removed": 0},
    }
    return EntityIndex(retrieval, tensors, view.qids, view.names, meta, row_hashes=row_hashes)


__all__ = [
    "INDEX_FORMAT",
    "INDEX_META",
    "INDEX_WEIGHTS",
    "EntityIndex",
    "IndexCorruptError",
    "IndexMismatchError",
    "KBView",
    "content_fingerprint",
    "encode_kb",
    "inference_mode",
    "kb_fingerprint",
    "kb_row_hashes",
    "model_fingerprint",
    "processor_fingerprint",
    "storage_dtype",
]
