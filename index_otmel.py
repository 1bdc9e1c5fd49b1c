"""The entity index: every KB row's entity features, computed once, stored, checked and reloaded.

- [`KBView`]: uniform access to a KB given as a `datasets.Dataset` or a list of dicts.
- [`encode_kb`]: encodes a KB with a model into an [`EntityIndex`].
- [`EntityIndex`]: the stage-1 vectors (`retrieval`) and the features stage 2 reads, with [`~EntityIndex.gather`],
  [`~EntityIndex.save`] and [`~EntityIndex.load`] (which refuses an index built from another model, processor or KB).
- Fingerprints of models, processors and KBs ([`model_fingerprint`], [`processor_fingerprint`], [`kb_fingerprint`]);
  [`index_towers`]: the precision of the CLIP towers that encoded an index (`towers_otmel`).

Which features are stored is the model's decision ([`~OTMELModel.stage1_weights`],
[`~OTMELModel.entity_index_fields`]); this module stores whatever the model names.
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence

import torch


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .modeling_otmel import OTMELEntityFeatures, real_text_length
except ImportError:
    from modeling_otmel import OTMELEntityFeatures, real_text_length


logger = logging.getLogger(__name__)

INDEX_WEIGHTS = "entity_index.safetensors"  # format <= 2; later formats name their files in the meta
INDEX_META = "entity_index.json"
# 2: per-row KB hashes and live edits. 3: checksums of the tensors file and of the qid / name lists, tensors file
# named per save (`entity_index-<id>.safetensors`, listed in the meta) so that saving is atomic. 4: compressed
# storage (codecs), the stage-1 matrix as one memory-mappable tensor, qids and names in the tensors file, the ANN file.
INDEX_FORMAT = 4

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


def import_faiss():
    """The `faiss` module, or an ImportError saying how to get it. Imported inside `try`: transformers requires every
    import outside one of remote-code users (an index checkpoint loaded from the Hub), and faiss is optional."""
    # FAISS's loader reports at INFO level which of its builds it could not load (e.g. "No module named
    # 'faiss.swigfaiss_avx2'" with wheels that dispatch at run time): not news for a user, and it reads like an error.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as err:
        raise ImportError("this needs the faiss package: pip install faiss-cpu (or faiss-gpu)") from err
    return faiss


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

    A model whose CLIP towers were optimised for inference (`towers_otmel.optimize_towers`: int8 or bfloat16) gives
    the `weights` of the float32 model it came from, plus `"towers": <precision>` (a float32 model has no such key,
    so its fingerprint is unchanged): its features differ from the float32 model's within a measured tolerance, so it
    matches an index of that model, and the index records how its entities were encoded ([`index_towers`]).
    """
    towers = getattr(model, "otmel_towers", None)  # set by towers_otmel.optimize_towers
    if towers:
        settings = {k: getattr(model.config, k, None) for k in SCORE_SETTINGS}
        return {"weights": towers["weights"], "settings": settings, "towers": towers["precision"]}
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(_tensor_bytes(tensor))
    settings = {k: getattr(model.config, k, None) for k in SCORE_SETTINGS}
    return {"weights": h.hexdigest(), "settings": settings}


def index_towers(model_meta: dict) -> str:
    """The precision of the CLIP towers that encoded an index's entities, from its `meta["model"]`: `"float32"`,
    `"int8"`, `"bfloat16"`, or several joined by `+` (sorted) after [`~EntityIndex.add`] mixed them."""
    return model_meta.get("towers", "float32")


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
        "image_processor": hashlib.sha256(
            json.dumps(image_settings, sort_keys=True, default=str).encode()
        ).hexdigest(),
    }


ROW_HASH_BYTES = 16


def kb_row_hashes(kb, start: int = 0, end: int | None = None) -> torch.Tensor:
    """`(M, 16)` uint8: per KB row (of rows `start:end`), the first 16 bytes of sha256 over `[qid, name, attributes,
    image byte length]`.

    What an [`EntityIndex`] keeps of each row's source, so that a KB can be checked against it row by row, also after
    [`~EntityIndex.add`] / [`~EntityIndex.remove`] changed the index.
    """
    view = kb if isinstance(kb, KBView) else KBView(kb)
    end = len(view) if end is None else end
    lengths = view.image_lengths(start, end)
    digests = bytearray()
    for row in zip(view.qids[start:end], view.names[start:end], view.attributes[start:end], lengths):
        digests += hashlib.sha256(json.dumps(list(row), ensure_ascii=False).encode()).digest()[:ROW_HASH_BYTES]
    if not digests:
        return torch.zeros(0, ROW_HASH_BYTES, dtype=torch.uint8)
    return torch.frombuffer(digests, dtype=torch.uint8).view(-1, ROW_HASH_BYTES).clone()


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
            self.attributes = (
                [a or "" for a in kb["attributes"]] if "attributes" in kb.column_names else [""] * len(kb)
            )
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
                        raise ValueError(
                            f"KB row {i} (qid {r['qid']!r}): {key} must be a string, got {type(r[key]).__name__}"
                        )
            self.kb = rows
            self.qids = [str(r["qid"]) for r in rows]
            self.names = [r.get("name") or "" for r in rows]
            self.attributes = [r.get("attributes") or "" for r in rows]
            self.images = [r.get("image") for r in rows]
        self._check_rows()

    def _check_rows(self):
        """Raises `ValueError` for an empty or repeated qid (a qid names one entity: the index finds, replaces and
        removes entities by qid); warns, with a count, about entities without a name (kept: they are matched on their
        attributes and picture)."""
        first, repeated = {}, []
        for i, q in enumerate(self.qids):
            if not q.strip():
                raise ValueError(f"KB row {i}: empty qid")
            if q in first:
                repeated.append(f"{q!r} (rows {first[q]} and {i})")
            else:
                first[q] = i
        if repeated:
            raise ValueError(
                f"the KB holds {len(repeated)} repeated qid(s): {', '.join(repeated[:5])}"
                f"{', ...' if len(repeated) > 5 else ''}; a qid names one entity: deduplicate the KB (the KB file "
                "loaders, e.g. `otmel-link --kb file`, keep the first row with a warning)"
            )
        unnamed = [q for q, name in zip(self.qids, self.names) if not name.strip()]
        if unnamed:
            logger.warning(
                "%d of %d KB entities have an empty name (qid %s%s); indexed, matched on their attributes and picture",
                len(unnamed),
                len(self.qids),
                ", ".join(repr(q) for q in unnamed[:5]),
                ", ..." if len(unnamed) > 5 else "",
            )

    def __len__(self):
        return len(self.qids)

    def image_batch(self, start: int, end: int) -> list:
        if self.images is None:
            return [None] * (end - start)
        if self.is_dataset:
            return list(self.images[start:end]["image"])
        return self.images[start:end]

    def image_rows(self, rows: list) -> list:
        """The (undecoded) images of the KB rows `rows`."""
        if self.images is None:
            return [None] * len(rows)
        if self.is_dataset:
            return list(self.images.select(rows)["image"])
        return [self.images[i] for i in rows]

    def image_lengths(self, start: int = 0, end: int | None = None) -> list[int]:
        """Byte length of each picture of rows `start:end` (-1: none)."""
        end = len(self) if end is None else end
        if self.images is None:
            return [-1] * (end - start)
        if self.is_dataset:
            import pyarrow as pa
            import pyarrow.compute as pc

            column = self.images.with_format("arrow")[start:end]["image"]
            if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
                # Lengths from Arrow directly: the picture bytes are never copied into Python objects.
                lengths = pc.binary_length(pc.struct_field(column, "bytes")).to_pylist()
                paths = (
                    pc.struct_field(column, "path").to_pylist() if column.type.get_field_index("path") >= 0 else None
                )
                return [
                    n if n is not None else _image_length(paths[i] if paths is not None else None)
                    for i, n in enumerate(lengths)
                ]
            values = column.to_pylist()
        else:
            values = self.images[start:end]
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
# Storage: how the features are stored (codecs), strings, the tensors file
# ----------------------------------------------------------------------------------------------------------------

INDEX_DTYPES = ("float32", "float16", "int8", "res4", "res2", "res1")
# Fields with a token axis (stored with residual codes by the "res*" dtypes; the other float fields as int8).
TOKEN_FIELDS = ("text_queries", "visual_queries")
PART = "@"  # `field@part`: a stored part of a field (`text_queries@scale`, `text_queries@codes`, ...)


def storage_dtype(name) -> torch.dtype:
    """`torch.float16` etc. from a name (`"float16"`, `"torch.float16"`) or a dtype."""
    if isinstance(name, torch.dtype):
        return name
    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        str(name).replace("torch.", "")
    ]


def _require_positive(**values):
    """Raises `ValueError` naming the first argument that is not a positive integer."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_index_dtype(dtype) -> str:
    """The index storage name (`INDEX_DTYPES`) of `dtype` (a name or a torch float dtype); ValueError otherwise."""
    name = str(dtype).replace("torch.", "")
    if name not in INDEX_DTYPES:
        raise ValueError(f"index dtype must be one of {', '.join(INDEX_DTYPES)}, got {dtype!r}")
    return name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class FloatCodec:
    """Stores a float field as float32 or float16 (part `""`)."""

    kind = "float"

    def __init__(self, dtype="float32"):
        self.dtype = storage_dtype(dtype)

    def encode(self, x: torch.Tensor) -> dict:
        return {"": x.to(self.dtype)}

    def decode(self, parts: dict) -> torch.Tensor:
        return parts[""].float()

    def state(self) -> dict:
        return {}

    def config(self) -> dict:
        return {"kind": self.kind, "dtype": _dtype_name(self.dtype)}


class Int8Codec:
    """Symmetric int8 per vector (the last axis), one scale per vector: `x ~ q * scale`, `scale = max|x| / 127`
    (error at most `scale / 2` per value). Parts: `""` (int8, the shape of x) and `"scale"` (x's shape without the last
    axis)."""

    kind = "int8"

    def __init__(self, scale_dtype="float16"):
        self.scale_dtype = storage_dtype(scale_dtype)

    def encode(self, x: torch.Tensor) -> dict:
        x = x.float()
        exact = x.abs().amax(-1) / 127
        scale = exact.to(self.scale_dtype)
        low = scale.float() < exact  # rounded down: one step up, so no value needs more than 127 steps
        if bool(low.any()):
            scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
        divisor = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        return {"": torch.round(x / divisor).clamp_(-127, 127).to(torch.int8), "scale": scale}

    def decode(self, parts: dict) -> torch.Tensor:
        return parts[""].float() * parts["scale"].float().unsqueeze(-1)

    def state(self) -> dict:
        return {}

    def config(self) -> dict:
        return {"kind": self.kind, "scale_dtype": _dtype_name(self.scale_dtype)}


class ResidualCodec:
    """Centroid + residual codes (as ColBERTv2) for token vectors of size D: `x ~ centroids[c] + r`, where each value of
    the residual `r` is one of `2**bits` levels of its dimension (per-dimension quantiles of the training residuals).
    Parts: `"centroid"` (int16 / int32 id, x's shape without the last axis) and `"codes"` (uint8, `ceil(D * bits / 8)`
    bytes per vector). Decoding is one table look-up per byte.

    Train it with [`~ResidualCodec.train`] on a sample of token vectors; the same codec then encodes any row (added
    entities, other shards).
    """

    kind = "residual"

    def __init__(self, centroids: torch.Tensor, cutoffs: torch.Tensor, weights: torch.Tensor, bits: int):
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"residual bits must be 1, 2, 4 or 8, got {bits!r}")
        self.centroids = centroids.float().contiguous()  # (K, D)
        self.cutoffs = cutoffs.float().contiguous()  # (D, 2**bits - 1), ascending per dimension
        self.weights = weights.float().contiguous()  # (D, 2**bits)
        self.bits = int(bits)
        self.dim = self.centroids.shape[1]
        self.per_byte = 8 // self.bits
        self.nbytes = -(-self.dim // self.per_byte)
        levels = 2**self.bits
        padded = torch.cat([self.weights, self.weights.new_zeros(self.nbytes * self.per_byte - self.dim, levels)])
        padded = padded.view(self.nbytes, self.per_byte, levels)
        shifts = torch.arange(self.per_byte) * self.bits
        codes = (torch.arange(256).unsqueeze(-1) >> shifts) & (levels - 1)  # (256, per_byte): the codes in a byte
        # table[j * 256 + v] = the residual values of the dimensions held by byte j when it has value v
        table = padded[:, torch.arange(self.per_byte).unsqueeze(0), codes]  # (nbytes, 256, per_byte)
        self._table = table.reshape(self.nbytes * 256, self.per_byte).contiguous()
        self._offsets = torch.arange(self.nbytes) * 256
        self._shifts = shifts
        self._half_norms = 0.5 * (self.centroids**2).sum(-1)
        self.id_dtype = torch.int16 if len(self.centroids) <= 32767 else torch.int32

    @classmethod
    def train(
        cls, vectors: torch.Tensor, bits: int, num_centroids: int | None = None, iterations: int = 10, seed: int = 0
    ) -> "ResidualCodec":
        """k-means centroids (default: `clamp(2**floor(log2(n / 32)), 16, 1024)`) and per-dimension residual
        quantiles of `vectors (n, D)`."""
        vectors = vectors.float().reshape(-1, vectors.shape[-1])
        n = len(vectors)
        if n == 0:
            raise ValueError("cannot train a residual codec on no vectors")
        k = num_centroids or max(16, min(1024, 1 << max(0, (n // 32).bit_length() - 1)))
        k = min(k, n)
        centroids = _kmeans(vectors, k, iterations, seed)
        ids = _nearest(vectors, centroids, 0.5 * (centroids**2).sum(-1))
        residuals = vectors - centroids[ids]
        g = torch.Generator().manual_seed(seed)
        if residuals.numel() > (1 << 24):  # torch.quantile's limit
            residuals = residuals[torch.randperm(n, generator=g)[: (1 << 24) // residuals.shape[1]]]
        levels = 2**bits
        cutoffs = torch.quantile(residuals, torch.arange(1, levels) / levels, dim=0).T
        weights = torch.quantile(residuals, (torch.arange(levels) + 0.5) / levels, dim=0).T
        return cls(centroids, cutoffs.reshape(-1, levels - 1), weights.reshape(-1, levels), bits)

    def encode(self, x: torch.Tensor) -> dict:
        lead = x.shape[:-1]
        flat = x.float().reshape(-1, self.dim)
        ids = _nearest(flat, self.centroids, self._half_norms)
        residuals = flat - self.centroids.index_select(0, ids)
        codes = (residuals.unsqueeze(-1) > self.cutoffs).sum(-1)  # (n, D) in [0, 2**bits)
        pad = self.nbytes * self.per_byte - self.dim
        if pad:
            codes = torch.cat([codes, codes.new_zeros(len(codes), pad)], dim=1)
        packed = (codes.view(-1, self.nbytes, self.per_byte) << self._shifts).sum(-1).to(torch.uint8)
        return {"centroid": ids.to(self.id_dtype).view(lead), "codes": packed.view(*lead, self.nbytes)}

    def decode(self, parts: dict) -> torch.Tensor:
        ids = parts["centroid"]
        lead = ids.shape
        base = self.centroids.index_select(0, ids.reshape(-1).long())
        packed = parts["codes"].reshape(-1, self.nbytes).long() + self._offsets
        residual = self._table.index_select(0, packed.reshape(-1)).view(len(base), -1)[:, : self.dim]
        return (base + residual).view(*lead, self.dim)

    def state(self) -> dict:
        return {"centroids": self.centroids, "cutoffs": self.cutoffs, "weights": self.weights}

    def config(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "centroids": len(self.centroids), "dim": self.dim}


def _nearest(x: torch.Tensor, centroids: torch.Tensor, half_norms: torch.Tensor, block: int = 16384) -> torch.Tensor:
    """Nearest centroid (L2) of each row of `x`: argmax of `<x, c> - |c|^2 / 2`, in blocks of rows."""
    out = torch.empty(len(x), dtype=torch.long)
    for start in range(0, len(x), block):
        scores = x[start : start + block] @ centroids.T - half_norms
        out[start : start + block] = scores.argmax(dim=1)
    return out


def _kmeans(x: torch.Tensor, k: int, iterations: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means from k distinct random rows (seeded; an emptied cluster keeps its centroid)."""
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iterations):
        ids = _nearest(x, centroids, 0.5 * (centroids**2).sum(-1))
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=k).float()
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1)
    return centroids


def make_codec(config: dict, state: dict | None = None):
    """A codec from its [`config`] (and, for residual codes, its state tensors)."""
    kind = config.get("kind")
    if kind == "float":
        return FloatCodec(config["dtype"])
    if kind == "int8":
        return Int8Codec(config.get("scale_dtype", "float16"))
    if kind == "residual":
        state = state or {}
        missing = [k for k in ("centroids", "cutoffs", "weights") if k not in state]
        if missing:
            raise KeyError(f"residual codec state lacks {missing}")
        return ResidualCodec(state["centroids"], state["cutoffs"], state["weights"], config["bits"])
    raise ValueError(f"unknown codec kind {kind!r}")


def default_codecs(dtype: str, fields: dict, token_sample: dict | None = None, seed: int = 0) -> dict:
    """`{field: codec}` for the float fields `{name: example tensor (rows, ...)}` of an index of storage `dtype`.

    float32 / float16: every float field as is. int8: every float field int8 with per-vector scales. res{1,2,4}:
    token fields (`TOKEN_FIELDS`) as residual codes of that many bits, trained on `token_sample[field]` (vectors
    `(n, D)`), the others int8.
    """
    dtype = check_index_dtype(dtype)
    codecs = {}
    for name, value in fields.items():
        if not value.is_floating_point():
            continue
        kind, setting = codec_kind(dtype, name)
        if kind == "float":
            codecs[name] = FloatCodec(setting)
        elif kind == "int8":
            codecs[name] = Int8Codec()
        else:
            if token_sample is None or name not in token_sample:
                raise ValueError(f"a {dtype} index needs a token sample of {name} to train its residual codec")
            codecs[name] = ResidualCodec.train(token_sample[name], setting, seed=seed)
    return codecs


def codec_kind(dtype: str, field: str) -> tuple[str, str | int | None]:
    """How an index of storage `dtype` stores the float `field` ([`default_codecs`]): `("float", "float32" |
    "float16")`, `("int8", None)` or `("residual", bits)`."""
    if dtype in ("float32", "float16"):
        return "float", dtype
    if dtype == "int8" or field not in TOKEN_FIELDS:
        return "int8", None
    return "residual", int(dtype[3:])


class StringColumn(Sequence):
    """A read-only list of strings stored as one UTF-8 buffer and `N + 1` offsets (memory-mappable; a million qids
    cost two arrays instead of a million Python objects). Compares equal to any sequence of the same strings."""

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor):
        self.data = data  # (bytes,) uint8
        self.offsets = offsets  # (N + 1,) int64
        self._bytes = memoryview(data.numpy()) if data.numel() else memoryview(b"")
        self._offsets = offsets.tolist() if len(offsets) < 4096 else offsets.numpy()

    @classmethod
    def from_list(cls, values) -> "StringColumn":
        if isinstance(values, StringColumn):
            return values
        encoded = [str(v).encode("utf-8") for v in values]
        offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
        if encoded:
            offsets[1:] = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0)
        data = (
            torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8)
            if offsets[-1]
            else torch.zeros(0, dtype=torch.uint8)
        )
        return cls(data, offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"string column index {i} out of range for {n} strings")
        return bytes(self._bytes[int(self._offsets[i]) : int(self._offsets[i + 1])]).decode("utf-8")

    def __iter__(self):
        data, offsets = bytes(self._bytes), self.offsets.tolist()
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield data[a:b].decode("utf-8")

    def __eq__(self, other):
        if isinstance(other, StringColumn):
            return torch.equal(self.offsets, other.offsets) and torch.equal(self.data, other.data)
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None

    def __repr__(self):
        return f"StringColumn({len(self)} strings)"

    def tolist(self) -> list:
        return list(self)

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(_tensor_bytes(self.offsets))
        h.update(bytes(self._bytes))
        return h.hexdigest()


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TORCH = {v: k for k, v in _ST_DTYPES.items()}


class _Chunks:
    """A tensor written as the concatenation (along axis 0) of chunks produced on demand (so a merged index is never
    held in memory whole): `dtype`, `shape` and a function returning an iterator of CPU tensors."""

    def __init__(self, dtype: torch.dtype, shape: tuple, chunks):
        self.dtype, self.shape, self.chunks = dtype, tuple(shape), chunks


def _write_safetensors(path: str, tensors: dict, metadata: dict | None = None):
    """Writes a safetensors file (readable by `safetensors.safe_open`) tensor by tensor. Tensors are laid out by
    decreasing element size, so each starts at a multiple of its element size (memory-mappable as is)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        size = t.dtype.itemsize * _numel(t.shape)
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in order:
            t = tensors[name]
            pieces = t.chunks() if isinstance(t, _Chunks) else [t]
            written = 0
            for piece in pieces:
                piece = piece.detach().cpu().to(t.dtype).contiguous()
                if piece.numel():
                    f.write(memoryview(piece.reshape(-1).view(torch.uint8).numpy()))
                written += piece.numel() * t.dtype.itemsize
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != expected:
                raise RuntimeError(f"{path}: wrote {written} bytes of {name}, expected {expected}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _read_safetensors(path: str, mmap: bool = True) -> dict:
    """`{name: tensor}` of a safetensors file; with `mmap`, tensors are copy-on-write views of the memory-mapped file
    (pages are read when touched, and opening costs almost nothing). Raises [`IndexCorruptError`] naming the file on
    any inconsistency."""
    import numpy as np

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise IndexCorruptError(f"{path}: not a safetensors file (bad header length); {REBUILD}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IndexCorruptError(f"{path}: unreadable safetensors header ({err}); {REBUILD}") from err
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    raw = np.memmap(path, dtype=np.uint8, mode="c") if mmap else np.fromfile(path, dtype=np.uint8)
    out = {}
    for name, info in header.items():
        try:
            dtype = _ST_TORCH[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise IndexCorruptError(f"{path}: bad header entry for {name!r} ({err}); {REBUILD}") from err
        if not 0 <= begin <= end <= data_size or end - begin != _numel(shape) * dtype.itemsize:
            raise IndexCorruptError(f"{path}: tensor {name!r} lies outside the file or has the wrong size; {REBUILD}")
        if end == begin:
            out[name] = torch.zeros(shape, dtype=dtype)
            continue
        piece = raw[8 + n + begin : 8 + n + end]
        if (8 + n + begin) % dtype.itemsize:  # not aligned: a copy
            piece = np.array(piece)
        out[name] = torch.from_numpy(piece).view(dtype).view(shape)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Entity index
# ----------------------------------------------------------------------------------------------------------------

# Reserved names in the tensors file (feature parts are named `field` or `field@part`, never starting with "@").
_RETRIEVAL, _RETRIEVAL_SCALE, _ROW_HASHES = "@retrieval", "@retrieval_scale", "@row_hashes"
_CODEC = "@codec/"  # @codec/<field>/<state name>


class EntityIndex:
    """Entity-side features of every KB row, stored compactly for ranking.

    Attributes:
        retrieval (`(N, R)`): the stage-1 entity vectors `[fused | text_global | visual_global]` (unit-norm parts;
            `fused` absent when fusion is off): float32, or int8 with `retrieval_scale (N,)` for the int8 / res*
            dtypes (`vector = retrieval * retrieval_scale[:, None]`). S_R(m, e) = <stage1 mention vector, vector of e>;
            use [`~EntityIndex.stage1_vectors`] / [`~EntityIndex.stage1_scores`] / [`~EntityIndex.stage1_topk`] rather
            than `retrieval` directly.
        tensors (`dict`): the stored parts of the other entity features stage 2 reads
            ([`~OTMELModel.entity_index_fields`]): `field` or `field@part` (see `codecs`); masks as bool, text fields
            cut to the KB's longest real text.
        codecs (`dict`): how each float field is stored ([`FloatCodec`] float32 / float16, [`Int8Codec`] int8 with
            per-vector scales, [`ResidualCodec`] centroid + residual codes); scoring always decodes to float32.
        qids, names (`list[str]` or [`StringColumn`]): KB row i is entity `qids[i]`.
        meta (`dict`): fingerprints of the model, processor and KB, the layout of `retrieval`, the storage dtype;
            `meta["kb"]` is [`content_fingerprint`] of `row_hashes` (after [`~EntityIndex.add`] /
            [`~EntityIndex.remove`] it describes the edited rows, no longer the dataset the index was built from) and
            `meta["edits"]` counts the rows added, replaced and removed since [`encode_kb`].
        row_hashes (`(N, 16)` uint8, *optional*): [`kb_row_hashes`] of the KB rows (qid, name, attributes, image byte
            length), so [`~EntityIndex.check`] can compare a KB row by row.
        ann ([`AnnIndex`], *optional*): an approximate stage-1 search structure ([`~EntityIndex.build_ann`]), kept
            up to date by `add` / `remove` and saved with the index.

    `version` grows with every change of the rows ([`~EntityIndex.add`], [`~EntityIndex.remove`]); caches built from
    the rows (`row_of`, device copies, `ranking_otmel`'s FAISS indexes) are keyed on it. An index loaded with
    `mmap=True` keeps its tensors in the memory-mapped file (pages read when touched); an edit copies the edited
    tensors into memory.
    """

    def __init__(
        self,
        retrieval: torch.Tensor,
        tensors: dict,
        qids,
        names,
        meta: dict,
        row_hashes=None,
        retrieval_scale: torch.Tensor | None = None,
        codecs: dict | None = None,
        ann=None,
    ):
        self.retrieval = retrieval
        self.retrieval_scale = retrieval_scale
        self.tensors = tensors
        self.qids = qids if isinstance(qids, StringColumn) else list(qids)
        self.names = names if isinstance(names, StringColumn) else list(names)
        self.meta = meta
        self.row_hashes = row_hashes
        if codecs is None:
            codecs = {k: FloatCodec(v.dtype) for k, v in tensors.items() if PART not in k and v.is_floating_point()}
        self.codecs = codecs
        self.ann = ann
        self.version = 0
        self._row_of = None
        self._device_cache = {}
        self._saved = None  # (directory, file names, checksums, version) of the files this index is stored in

    def __len__(self):
        return len(self.qids)

    def __repr__(self):
        dims = {k: tuple(v.shape) for k, v in self.tensors.items()}
        ann = f", ann={self.ann.config['kind']}" if self.ann is not None else ""
        return (
            f"EntityIndex(n={len(self)}, retrieval={tuple(self.retrieval.shape)} {_dtype_name(self.retrieval.dtype)}, "
            f"dtype={self.meta['dtype']}{ann}, {dims})"
        )

    @property
    def splits(self) -> dict:
        """Column ranges of `retrieval`: `{"fused": (a, b), "text_global": (b, c), "visual_global": (c, d)}`."""
        return {k: tuple(v) for k, v in self.meta["splits"].items()}

    @property
    def fields(self) -> list:
        """The stage-2 features stored (each as one or more parts of `tensors`), in storage order."""
        out = []
        for key in self.tensors:
            name = key.split(PART, 1)[0]
            if name not in out:
                out.append(name)
        return out

    def _parts(self, field: str) -> dict:
        """`{part: tensors key}` of a field (`""` for the main part)."""
        return {(k.split(PART, 1)[1] if PART in k else ""): k for k in self.tensors if k.split(PART, 1)[0] == field}

    def row_of(self, qid: str) -> int:
        """KB row of `qid`, or -1 when the qid is not in the KB (first row when a qid repeats)."""
        if self._row_of is None:
            self._row_of = {}
            for i, q in enumerate(self.qids):
                self._row_of.setdefault(q, i)
        return self._row_of.get(str(qid), -1)

    def nbytes(self) -> int:
        """Bytes of the stored rows (stage-1 vectors, features, row hashes) plus the codecs' tables; without the
        qid / name strings and the ANN structure."""
        total = self.retrieval.nbytes + sum(t.nbytes for t in self.tensors.values())
        total += self.retrieval_scale.nbytes if self.retrieval_scale is not None else 0
        total += self.row_hashes.nbytes if self.row_hashes is not None else 0
        return total + sum(t.nbytes for c in self.codecs.values() for t in c.state().values())

    # ---- stage 1 --------------------------------------------------------------------------------------------

    def retrieval_on(self, device) -> tuple:
        """`(retrieval, retrieval_scale)` on `device` (a copy kept for the last non-CPU device asked for)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.retrieval, self.retrieval_scale
        if device not in self._device_cache:
            scale = self.retrieval_scale.to(device) if self.retrieval_scale is not None else None
            self._device_cache = {device: (self.retrieval.to(device), scale)}
        return self._device_cache[device]

    def stage1_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Float32 stage-1 vectors `(M, R)` of the KB rows `rows (M,)` (dequantized when stored as int8)."""
        rows = rows.cpu().reshape(-1)
        out = self.retrieval.index_select(0, rows).float()
        if self.retrieval_scale is not None:
            out = out * self.retrieval_scale.index_select(0, rows).float().unsqueeze(1)
        return out

    def stage1_scores(self, queries: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Exact S_R `(B, end - start)` of stage-1 mention vectors `queries (B, R)` with KB rows `start:end` (all by
        default), on the queries' device."""
        end = len(self) if end is None else end
        retrieval, scale = self.retrieval_on(queries.device)
        if retrieval.dtype == torch.float32:
            return queries @ retrieval[start:end].T
        out = queries.new_empty(queries.shape[0], end - start)
        for a in range(start, end, 65536):  # dequantized block by block: no float32 copy of the whole matrix
            b = min(end, a + 65536)
            torch.matmul(queries, retrieval[a:b].float().T, out=out[:, a - start : b - start])
            if scale is not None:
                out[:, a - start : b - start] *= scale[a:b].float()
        return out

    def stage1_topk(self, queries: torch.Tensor, k: int, block_rows: int | None = None) -> tuple:
        """Exact top-`k` S_R of each query over the whole KB: `(scores (B, k), rows (B, k))`, best first, computed
        block by block (`block_rows` KB rows at a time; default: about 4M scores per block), so no `(B, N)` matrix is
        held."""
        n = len(self)
        k = min(k, n)
        block = block_rows or max(k, min(n, (1 << 22) // max(1, queries.shape[0])))
        best_scores = best_rows = None
        for start in range(0, n, block):
            end = min(n, start + block)
            scores, rows = self.stage1_scores(queries, start, end).topk(min(k, end - start), dim=1)
            rows = rows + start
            if best_scores is not None:
                scores, pick = torch.cat([best_scores, scores], 1), torch.cat([best_rows, rows], 1)
                scores, order = scores.topk(k, dim=1)
                rows = pick.gather(1, order)
            best_scores, best_rows = scores, rows
        return best_scores, best_rows

    def build_ann(self, **kwargs) -> "AnnIndex":
        """Builds (replacing any) the approximate stage-1 structure `self.ann` ([`AnnIndex.build`] arguments)."""
        self.ann = AnnIndex.build(self, **kwargs)
        return self.ann

    def ann_topk(self, queries: torch.Tensor, k: int, nprobe: int | None = None, refine: int | None = None) -> tuple:
        """Approximate top-`k` S_R: the ANN structure proposes `refine` rows per query (default: the structure's
        [`~AnnIndex.default_refine`], `max(4 k, 200)` for IVF and HNSW), whose exact S_R picks the `k` best:
        `(scores (B, k), rows (B, k))`, best first; rows -1 (score -inf) when fewer than `k` were found. Builds
        `self.ann` first if there is none."""
        if self.ann is None:
            logger.info("building the approximate stage-1 index of %d entities", len(self))
            self.build_ann()
        n = len(self)
        k = min(k, n)
        width = min(n, max(refine or self.ann.default_refine(k), k))
        rows = self.ann.search(queries.cpu().float(), width, nprobe=nprobe)  # (B, width), -1 for none
        scores = torch.empty(rows.shape, device=queries.device)
        step = max(1, (1 << 24) // (width * self.retrieval.shape[1]))  # queries re-scored at a time: <= 16M floats
        for a in range(0, len(rows), step):
            part = rows[a : a + step]
            flat = part.clamp_min(0).reshape(-1)
            vectors = self.retrieval.index_select(0, flat).float().view(*part.shape, -1).to(queries.device)
            got = torch.bmm(vectors, queries[a : a + step].unsqueeze(2)).squeeze(2)  # exact S_R of the proposals
            if self.retrieval_scale is not None:
                got = got * self.retrieval_scale.index_select(0, flat).view(part.shape).to(queries.device)
            scores[a : a + step] = got.masked_fill((part < 0).to(queries.device), float("-inf"))
        top, order = scores.topk(k, dim=1)
        return top, rows.to(queries.device).gather(1, order).masked_fill(top == float("-inf"), -1)

    # ---- stage 2 --------------------------------------------------------------------------------------------

    def gather(self, rows: torch.Tensor, device=None, trim_text: bool = True) -> OTMELEntityFeatures:
        """Float32 [`OTMELEntityFeatures`] of the KB rows `rows` (any shape S; features get shape `(*S, ...)`),
        decoded from their storage.

        With `trim_text`, text tensors are cut to the longest real text among the gathered rows (padding never takes
        part in any score, so this changes no score and saves work).
        """
        rows = rows.cpu()
        device = device or "cpu"
        shape, flat = tuple(rows.shape), rows.reshape(-1)
        stage1 = self.stage1_vectors(flat).view(*shape, -1).to(device)
        fields = {name: stage1[..., a:b] for name, (a, b) in self.splits.items()}
        length = None
        if trim_text and "text_mask" in self.tensors and flat.numel():
            length = real_text_length(self.tensors["text_mask"].index_select(0, flat))
        for field in self.fields:
            parts = {}
            for part, key in self._parts(field).items():
                t = self.tensors[key]
                if length is not None and field in OTMELEntityFeatures.TEXT_TOKEN_FIELDS:
                    t = t[:, :length]
                parts[part] = t.index_select(0, flat)  # index_select is several times faster than indexing here
            codec = self.codecs.get(field)
            value = codec.decode(parts) if codec is not None else parts[""]
            value = value.view(*shape, *value.shape[1:])
            fields[field] = value.to(device, torch.float32) if value.is_floating_point() else value.to(device)
        return OTMELEntityFeatures(**fields)

    # ---- live updates ---------------------------------------------------------------------------------------

    def _row_tensors(self) -> dict:
        out = {_RETRIEVAL: self.retrieval, **self.tensors}
        if self.retrieval_scale is not None:
            out[_RETRIEVAL_SCALE] = self.retrieval_scale
        if self.row_hashes is not None:
            out[_ROW_HASHES] = self.row_hashes
        return out

    def _set_row_tensors(self, values: dict):
        self.retrieval = values.pop(_RETRIEVAL)
        self.retrieval_scale = values.pop(_RETRIEVAL_SCALE, None)
        self.row_hashes = values.pop(_ROW_HASHES, None)
        self.tensors = values

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

    def _rows_as_mine(self, other: "EntityIndex") -> dict:
        """`other`'s row tensors in this index's storage (re-encoded where the codecs differ), text at `other`'s
        length."""
        out = {}
        if self.retrieval_scale is None:
            out[_RETRIEVAL] = (
                other.stage1_vectors(torch.arange(len(other)))
                if other.retrieval_scale is not None
                else other.retrieval.float()
            )
        elif other.retrieval_scale is not None:
            out[_RETRIEVAL], out[_RETRIEVAL_SCALE] = other.retrieval, other.retrieval_scale
        else:
            parts = Int8Codec(self.retrieval_scale.dtype).encode(other.retrieval)
            out[_RETRIEVAL], out[_RETRIEVAL_SCALE] = parts[""], parts["scale"]
        for field in self.fields:
            mine, theirs = self.codecs.get(field), other.codecs.get(field)
            same = mine is None or (theirs is not None and _same_codec(mine, theirs))
            if same:
                out.update({key: other.tensors[key] for key in other._parts(field).values()})
                continue
            other_parts = {part: other.tensors[key] for part, key in other._parts(field).items()}
            value = theirs.decode(other_parts) if theirs is not None else other_parts[""].float()
            for part, tensor in mine.encode(value).items():
                out[field + (PART + part if part else "")] = tensor
        if other.row_hashes is not None:
            out[_ROW_HASHES] = other.row_hashes
        return out

    def add(self, other: "EntityIndex") -> dict:
        """Adds the rows of `other` (an index of the same model and processor, e.g. `encode_kb` of a few new
        entities): a qid already here is replaced in place (every row holding it), new qids are appended in `other`'s
        order.

        Text fields are zero-padded to the longer of the two texts (padding takes part in no score); `other`'s
        features are stored in this index's storage (re-encoded with this index's codecs when they differ), and the
        ANN structure, if any, is updated.

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
            problems.append(
                f"model weights differ (this index {mine['weights'][:12]}..., added {theirs['weights'][:12]}...)"
            )
        if self.meta.get("processor") != other.meta.get("processor"):
            problems += _diff("processor", self.meta.get("processor") or {}, other.meta.get("processor") or {})
        if self.splits != other.splits:
            problems.append(f"stage-1 layout differs (this index {self.splits}, added {other.splits})")
        if set(self.fields) != set(other.fields):
            problems.append(f"stored fields differ (this index {sorted(self.fields)}, added {sorted(other.fields)})")
        if problems:
            raise IndexMismatchError("cannot add an entity index built differently: " + "; ".join(problems) + ".")
        seen, repeated = set(), []
        for q in other.qids:
            if q in seen:
                repeated.append(q)
            seen.add(q)
        if repeated:
            raise ValueError(f"the added index holds qid(s) more than once: {sorted(set(repeated))[:20]}")

        incoming = self._rows_as_mine(other)
        current = self._row_tensors()
        for key, t in current.items():
            if key not in incoming:
                raise IndexMismatchError(f"cannot add an entity index built differently: it lacks stored part {key}.")
            skip = 2 if key.split(PART, 1)[0] in OTMELEntityFeatures.TEXT_TOKEN_FIELDS else 1
            if tuple(t.shape[skip:]) != tuple(incoming[key].shape[skip:]):
                raise IndexMismatchError(
                    f"cannot add an entity index built differently: {key} has shape {tuple(incoming[key].shape[1:])}, "
                    f"expected {tuple(t.shape[1:])}."
                )
        source = {q: i for i, q in enumerate(other.qids)}
        replace_rows = [i for i, q in enumerate(self.qids) if q in source]
        replace_from = torch.tensor([source[self.qids[i]] for i in replace_rows], dtype=torch.long)
        present = set(self.qids)
        append_from = torch.tensor([i for i, q in enumerate(other.qids) if q not in present], dtype=torch.long)
        replace_rows = torch.tensor(replace_rows, dtype=torch.long)
        length = max(self._text_length(), other._text_length())
        current, incoming = _fit_text(current, length), _fit_text(incoming, length)

        def merge(a, b):
            b = b.to(a.dtype)
            out = torch.cat([a, b.index_select(0, append_from)])
            if replace_rows.numel():
                out[replace_rows] = b.index_select(0, replace_from)
            return out

        merged = {key: merge(t, incoming[key]) for key, t in current.items()}
        names = list(self.names)
        for i, j in zip(replace_rows.tolist(), replace_from.tolist()):
            names[i] = other.names[j]
        old_n = len(self)
        self._set_row_tensors(merged)
        self.qids = list(self.qids) + [other.qids[j] for j in append_from.tolist()]
        self.names = names + [other.names[j] for j in append_from.tolist()]
        if self.ann is not None:
            changed = torch.cat([replace_rows, torch.arange(old_n, old_n + len(append_from))])
            self.ann.set_rows(changed, self.stage1_vectors(changed))
        added, replaced = len(append_from), len(other) - len(append_from)
        towers = set(index_towers(self.meta["model"]).split("+")) | set(index_towers(other.meta["model"]).split("+"))
        if towers != {"float32"}:  # rows encoded by other towers than the index's: recorded (a float32 index has none)
            self.meta = dict(self.meta, model=dict(self.meta["model"], towers="+".join(sorted(towers))))
        self._changed(added=added, replaced=replaced)
        return {"added": added, "replaced": replaced}

    def remove(self, qids, missing_ok: bool = False) -> int:
        """Removes every row holding one of `qids` (a qid or a list); the other rows keep their order (and the ANN
        structure, if any, is updated).

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
        gone = torch.tensor(sorted(set(range(len(self.qids))) - set(keep)), dtype=torch.long)
        self._set_row_tensors({k: t.index_select(0, keep_t) for k, t in self._row_tensors().items()})
        self.qids = [self.qids[i] for i in keep]
        self.names = [self.names[i] for i in keep]
        if self.ann is not None:
            self.ann.remove_rows(gone)
        self._changed(removed=removed)
        return removed

    @classmethod
    def concatenate(cls, parts: list) -> "EntityIndex":
        """The rows of several indexes of one model, processor and storage (e.g. shards), in order; texts padded to
        the longest. Duplicate qids are kept (use [`~EntityIndex.add`] to replace)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        length = max(p._text_length() for p in parts)
        rows = [_fit_text(first._rows_as_mine(p) if p is not first else first._row_tensors(), length) for p in parts]
        for p in parts[1:]:
            if p.meta["model"] != first.meta["model"] or p.splits != first.splits:
                raise IndexMismatchError("cannot concatenate entity indexes of different models")
        merged = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        hashes = merged.pop(_ROW_HASHES, None) if all(p.row_hashes is not None for p in parts) else None
        return cls.joined(parts, merged, hashes)

    @classmethod
    def joined(cls, parts: list, tensors: dict, row_hashes: torch.Tensor | None) -> "EntityIndex":
        """The index holding the rows of `parts` in order, given their joined stored `tensors` (stage-1 vectors and
        scales included, as the index stores them; consumed) and row hashes (None when a part has none)."""
        first = parts[0]
        tensors.pop(_ROW_HASHES, None)
        meta = dict(first.meta, size=sum(len(p) for p in parts))
        meta["kb"] = content_fingerprint(row_hashes) if row_hashes is not None else None
        return cls(
            tensors.pop(_RETRIEVAL),
            tensors,
            [q for p in parts for q in p.qids],
            [x for p in parts for x in p.names],
            meta,
            row_hashes=row_hashes,
            retrieval_scale=tensors.pop(_RETRIEVAL_SCALE, None),
            codecs=dict(first.codecs),
        )

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
                loaded_in = (getattr(model, "otmel_towers", None) or {}).get("loaded_in")  # towers_otmel.float32_heads
                problems.append(
                    f"model weights differ (index built with weights sha256 {self.meta['model']['weights'][:12]}..., "
                    f"given model {fp['weights'][:12]}...)"
                    + (
                        f"; the model was loaded in {loaded_in}, which rounds its weights: load it in float32 (with "
                        f"quantize='bfloat16' for bfloat16 towers) to use an index built with the float32 model"
                        if loaded_in
                        else ""
                    )
                )
            elif index_towers(fp) != index_towers(self.meta["model"]):
                # Not a mismatch: the same trained weights, features within the tolerance of towers_otmel.
                logger.info(
                    "entity index encoded with %s towers, mentions will be encoded with %s towers (same weights)",
                    index_towers(self.meta["model"]),
                    index_towers(fp),
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
                    problems.append(
                        f"KB qids differ (first at row {first}: index {self.qids[first]!r}, KB {view.qids[first]!r})"
                    )
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
                problems.append(
                    "KB content differs (names, attributes or images changed; same qids in the same order)"
                )
        if problems:
            raise IndexMismatchError(
                "entity index does not match: " + "; ".join(problems) + ". Rebuild the index for this model and KB."
            )

    # ---- persistence ----------------------------------------------------------------------------------------

    def _file_tensors(self) -> tuple:
        """`(tensors, qids column, names column)`: what the tensors file stores."""
        qids, names = StringColumn.from_list(self.qids), StringColumn.from_list(self.names)
        out = dict(self._row_tensors())
        out.update({"@qids/data": qids.data, "@qids/offsets": qids.offsets})
        out.update({"@names/data": names.data, "@names/offsets": names.offsets})
        for field, codec in self.codecs.items():
            for name, tensor in codec.state().items():
                out[f"{_CODEC}{field}/{name}"] = tensor
        return out, qids, names

    def _file_meta(self) -> dict:
        meta = dict(self.meta, format=INDEX_FORMAT, size=len(self))
        meta["fields"] = self.fields
        meta["codecs"] = {field: codec.config() for field, codec in self.codecs.items()}
        meta["retrieval"] = {"dtype": _dtype_name(self.retrieval.dtype), "scaled": self.retrieval_scale is not None}
        if self.ann is not None:
            meta["ann"] = dict(self.ann.config)
        else:
            meta.pop("ann", None)
        return meta

    def save(self, directory: str):
        """Writes the index into `directory`, atomically: `entity_index-<id>.safetensors` (every stored tensor, the
        qids and names, the codecs' tables), `entity_index-<id>-ann.safetensors` (the ANN structure, if any) and
        `entity_index.json` (fingerprints, layout, storage, the file names, and sha256 checksums of the files and of
        the qid and name lists, which [`~EntityIndex.load`] verifies).

        Each file is written under a temporary name, flushed to disk and renamed; the JSON comes last and its rename is
        the commit: an interrupted save leaves the previous index (or none) loadable, never a half-written one. Files
        of earlier saves are deleted after the commit; other files in `directory` are left alone. Saving an unchanged
        index back where it was loaded from rewrites only what changed (e.g. a new ANN structure). Two processes must
        not save into the same directory at once.
        """
        directory = os.path.abspath(directory)
        os.makedirs(directory, exist_ok=True)
        _remove_temporaries(directory)
        saved = self._saved if self._saved is not None and self._saved["directory"] == directory else None
        reuse_weights = (
            saved is not None
            and saved["version"] == self.version
            and os.path.isfile(os.path.join(directory, saved["files"]["weights"]))
        )
        reuse_ann = (
            reuse_weights
            and self.ann is not None
            and saved["files"].get("ann") is not None
            and saved.get("ann_version") == (id(self.ann), self.ann.version)
            and os.path.isfile(os.path.join(directory, saved["files"]["ann"]))
        )
        files, checksums, new_files = {}, {}, []
        try:
            if reuse_weights:
                files["weights"] = saved["files"]["weights"]
                keep = ("weights_sha256", "weights_bytes", "qids_sha256", "names_sha256")
                checksums.update({k: saved["checksums"][k] for k in keep})
            else:
                tensors, qids, names = self._file_tensors()
                files["weights"] = _new_name(WEIGHTS_SUFFIX)
                new_files.append(files["weights"])
                checksums.update(_write_checked(os.path.join(directory, files["weights"]), tensors, "weights"))
                checksums.update(qids_sha256=qids.sha256(), names_sha256=names.sha256())
            if reuse_ann:
                files["ann"] = saved["files"]["ann"]
                checksums.update({k: saved["checksums"][k] for k in ("ann_sha256", "ann_bytes")})
            elif self.ann is not None:
                files["ann"] = _new_name(ANN_SUFFIX)
                new_files.append(files["ann"])
                checksums.update(_write_checked(os.path.join(directory, files["ann"]), self.ann.to_tensors(), "ann"))
            meta = self._file_meta()
            meta.update(files=files, checksums=checksums)
            with _AtomicFile(os.path.join(directory, INDEX_META)) as tmp:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(meta, f, ensure_ascii=False)
            new_files.clear()  # committed
        finally:
            for name in new_files:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))
        _remove_unreferenced(directory, set(files.values()))
        self._saved = {"directory": directory, "files": files, "checksums": checksums, "version": self.version}
        if self.ann is not None:
            self._saved["ann_version"] = (id(self.ann), self.ann.version)

    @classmethod
    def load(
        cls, directory: str, model=None, processor=None, kb=None, verify: bool = True, mmap: bool = True
    ) -> "EntityIndex":
        """Reads an index written by [`~EntityIndex.save`].

        Args:
            directory (`str`): the index folder.
            model, processor, kb (*optional*): refuse ([`IndexMismatchError`]) an index built from anything else.
            verify (`bool`): check the sha256 of the files (reads them once; file sizes, the layout and the checksums
                of the qid and name lists are always checked).
            mmap (`bool`): memory-map the tensors and ANN files (opening costs almost nothing and pages are read when
                touched, so a serving process does not hold the whole index in memory; the ANN structure reads its
                graph and codes in place, [`AnnIndex.zero_copy`]); False reads them into memory.

        Raises:
            `FileNotFoundError`: no `entity_index.json` in `directory`.
            [`IndexCorruptError`]: a damaged or older-format index (the message names the file; rebuild the index).
            [`IndexMismatchError`]: another model / processor / KB.
        """
        directory = os.path.abspath(directory)
        meta_path = os.path.join(directory, INDEX_META)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no entity index in {directory} (missing {INDEX_META})")
        meta = _read_meta(meta_path)
        files, checksums = meta.pop("files"), meta.pop("checksums")
        weights_path = os.path.join(directory, files["weights"])
        _check_file(
            weights_path, meta_path, checksums["weights_bytes"], checksums["weights_sha256"] if verify else None
        )
        tensors = _read_safetensors(weights_path, mmap=mmap)
        try:
            retrieval = tensors.pop(_RETRIEVAL)
            scale, hashes = tensors.pop(_RETRIEVAL_SCALE, None), tensors.pop(_ROW_HASHES, None)
            qids = StringColumn(tensors.pop("@qids/data"), tensors.pop("@qids/offsets"))
            names = StringColumn(tensors.pop("@names/data"), tensors.pop("@names/offsets"))
        except KeyError as err:
            raise IndexCorruptError(f"{weights_path}: lacks tensor {err}; {REBUILD}") from None
        for key, column in (("qids", qids), ("names", names)):
            if column.sha256() != checksums[f"{key}_sha256"]:
                raise IndexCorruptError(
                    f"{weights_path}: the {key} list does not match its checksum in {meta_path} (edited, reordered or "
                    f"cut: every returned {key[:-1]} would be wrong); {REBUILD}"
                )
        states = {}
        for key in [k for k in tensors if k.startswith(_CODEC)]:
            field, name = key[len(_CODEC) :].rsplit("/", 1)
            states.setdefault(field, {})[name] = tensors.pop(key)
        n, width = len(qids), max((b for _, b in meta["splits"].values()), default=0)
        rows = {k: t.shape[0] if t.dim() else None for k, t in tensors.items()}
        bad = [k for k, r in rows.items() if r != n]
        if len(names) != n or retrieval.shape != (n, width) or bad or (scale is not None and scale.shape != (n,)):
            raise IndexCorruptError(
                f"{weights_path}: tensors do not fit the {n} qids and the stage-1 width {width} of {meta_path}"
                f"{f' ({bad})' if bad else ''}; {REBUILD}"
            )
        try:
            codecs = {field: make_codec(cfg, states.get(field)) for field, cfg in meta["codecs"].items()}
        except (KeyError, ValueError) as err:
            raise IndexCorruptError(f"{weights_path}: bad codec ({err}); {REBUILD}") from err
        problem = _layout_problem(meta, n, codecs)
        if problem:
            raise IndexCorruptError(f"{meta_path}: {problem}; {REBUILD}")
        ann = None
        if files.get("ann"):
            ann_path = os.path.join(directory, files["ann"])
            _check_file(
                ann_path, meta_path, checksums.get("ann_bytes"), checksums.get("ann_sha256") if verify else None
            )
            ann = AnnIndex.from_tensors(
                _read_safetensors(ann_path, mmap=mmap), meta.get("ann") or {}, ann_path, zero_copy=mmap
            )
            if ann.index.d != width:
                raise IndexCorruptError(
                    f"{ann_path}: an ANN structure over {ann.index.d}-dim vectors, the stage-1 vectors have {width}; "
                    f"{REBUILD}"
                )
        index = cls(
            retrieval, tensors, qids, names, meta, row_hashes=hashes, retrieval_scale=scale, codecs=codecs, ann=ann
        )
        index._saved = {"directory": directory, "files": files, "checksums": checksums, "version": index.version}
        if ann is not None:
            index._saved["ann_version"] = (id(ann), ann.version)
        index.check(model=model, processor=processor, kb=kb)
        return index


def _layout_problem(meta: dict, rows: int, codecs: dict) -> str | None:
    """What in an index's JSON contradicts its tensors (the JSON is not under a checksum): its `size` against the
    rows, its storage `dtype` against the codecs the rows were stored with ([`default_codecs`]); None if nothing."""
    if meta.get("size", rows) != rows:
        return f"says {meta['size']} entities, the tensors hold {rows}"
    dtype = meta.get("dtype")
    if dtype not in INDEX_DTYPES:
        return f"unknown storage dtype {dtype!r} (one of {', '.join(INDEX_DTYPES)})"
    for field, codec in codecs.items():
        config = codec.config()
        stored = (config["kind"], config.get({"float": "dtype", "residual": "bits"}.get(config["kind"], "")))
        if stored != codec_kind(dtype, field):
            return f"says storage dtype {dtype!r}, but {field} is stored as {config}"
    return None


def _same_codec(a, b) -> bool:
    if a.config() != b.config():
        return False
    sa, sb = a.state(), b.state()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


WEIGHTS_PREFIX, WEIGHTS_SUFFIX, ANN_SUFFIX = "entity_index-", ".safetensors", "-ann.safetensors"
TEMPORARY_MARK = ".tmp-"
REBUILD = "rebuild the index (e.g. `linking_otmel.py ... --rebuild_index`, or encode_kb + save)"


def _new_name(suffix: str) -> str:
    return f"{WEIGHTS_PREFIX}{os.urandom(6).hex()}{suffix}"


def _write_checked(path: str, tensors: dict, key: str) -> dict:
    """Writes a tensors file atomically; `{key_sha256, key_bytes}` of it."""
    with _AtomicFile(path) as tmp:
        _write_safetensors(tmp, tensors)
    return {f"{key}_sha256": _file_sha256(path), f"{key}_bytes": os.path.getsize(path)}


def _check_file(path: str, meta_path: str, size, sha256):
    if not os.path.isfile(path):
        raise IndexCorruptError(f"{path} is missing (named by {meta_path}); {REBUILD}")
    actual = os.path.getsize(path)
    if actual != size:
        raise IndexCorruptError(
            f"{path} has {actual} bytes, {meta_path} says {size} (truncated or replaced); {REBUILD}"
        )
    if sha256 is not None and _file_sha256(path) != sha256:
        raise IndexCorruptError(f"{path}: contents do not match the sha256 in {meta_path} (damaged); {REBUILD}")


def _remove_unreferenced(directory: str, keep: set):
    """After a commit: deletes the index files of earlier saves (and a format <= 2 tensors file)."""
    for name in os.listdir(directory):
        ours = name == INDEX_WEIGHTS or (name.startswith(WEIGHTS_PREFIX) and name.endswith(WEIGHTS_SUFFIX))
        if ours and name not in keep:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))
    _fsync_dir(directory)


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
    """The JSON of a saved index, checked: format and keys."""
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
    missing = [k for k in ("splits", "dtype", "model", "files", "checksums", "codecs", "size") if k not in meta]
    checksums, files = meta.get("checksums"), meta.get("files")
    if not missing and isinstance(checksums, dict):
        needed = ("weights_sha256", "weights_bytes", "qids_sha256", "names_sha256")
        if isinstance(files, dict) and files.get("ann"):
            needed += ("ann_sha256", "ann_bytes")
        missing = [f"checksums.{k}" for k in needed if k not in checksums]
    if missing or not isinstance(files, dict) or not isinstance(files.get("weights"), str):
        raise IndexCorruptError(f"{meta_path}: lacks {missing or ['files.weights']}; {REBUILD}")
    for key in ("weights", "ann"):
        name = files.get(key)
        if name is not None and (os.path.basename(name) != name or not name.startswith(WEIGHTS_PREFIX)):
            raise IndexCorruptError(f"{meta_path}: bad file name {name!r}; {REBUILD}")
    return meta


def _fit_text(tensors: dict, length: int) -> dict:
    """Index parts with a text axis (axis 1 of the parts of `TEXT_TOKEN_FIELDS`) cut or zero-padded to `length`."""
    out = {}
    for name, t in tensors.items():
        if name.split(PART, 1)[0] in OTMELEntityFeatures.TEXT_TOKEN_FIELDS and t.shape[1] != length:
            if t.shape[1] > length:
                t = t[:, :length]
            else:
                t = torch.cat([t, t.new_zeros(t.shape[0], length - t.shape[1], *t.shape[2:])], dim=1)
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------------------------
# Approximate stage 1
# ----------------------------------------------------------------------------------------------------------------

# Below this many entities `stage1="auto"` searches exactly, and `ann="auto"` builds no ANN structure. At 100,000
# entities the default scan linked 1.22-1.35x the mentions/s of exact search (bench_scale.py --_child serve on the
# random world's 100K res2 index, two alternating runs of each: OT 187 / 152 against 138 / 124), finding 99.6% of the
# exact top 50 (the trained model at 103,000 entities: the same shortlist as exact); with IVF or HNSW the two were about
# as fast at that size (the limit was 200,000 then).
ANN_MIN_ROWS = 100_000
# Default share of the IVF lists searched per query (1 / 8). On a random model at 1M entities (4,096 lists, PQ80,
# benchmarks/bench_scale.py --nprobe) 256 lists lost no recall against 512 and searched 1.65x faster, but a trained
# model's mention queries fall in other lists than their gold entity far more often (bench_scale.py --accuracy_model,
# 3,000 entities, 76 lists: gold recall@50 96.6 exact, 92.1 with 1/4 of the lists, 89.8 with 16 lists), so the default
# stays on the side of recall; `RankOptions.ann_nprobe` sets it per query.
ANN_PROBE_DIVISOR = 8
# The structure `AnnIndex.build(kind="auto")` builds: the exhaustive 4-bit scan. A trained model's mention vectors lie
# away from the entity vectors, so structures that search near the query lose its gold entity at scale, while a scan
# scores every entity (bench_scale.py --accuracy_reference res2 --accuracy_distractors 1000000: the hard world's model
# against 1,003,000 entities, gold entity in the top 50 / H@1: exact 90.0 / 69.33, scan 90.0 / 69.33 (the same top 1
# for every mention), IVF with SQ8 codes and 1/8 of the lists 85.7 / 67.00, HNSW 60.6 / 46.78). On the random 1M
# world (bench_scale.py --ann_kind scan --serve_only) it linked 152 mentions/s with OT (IVF 86, HNSW 185), found 95.0%
# of the exact top 50 (IVF 99.9, HNSW 99.3) and kept the gold entity as often within 0.3 point; 16 bytes per entity
# (IVF about 340), built in 8 s (IVF 88 s).
ANN_DEFAULT_KIND = "scan"
ANN_KINDS = ("ivf", "hnsw", "scan")
# "scan": the share of the entity vectors' second moment kept by the projection its codes are made of (the smallest
# multiple of 16 dimensions that keeps it; an S_R term a projection drops is at most |q| |e_dropped|), and the rows it
# proposes per row asked for (at least `ANN_SCAN_REFINE_MIN`) for exact re-scoring: its 4-bit codes rank coarsely.
ANN_SCAN_ENERGY = 0.99
ANN_SCAN_REFINE = 20
ANN_SCAN_REFINE_MIN = 1000
# HNSW: links per node, candidates kept while building and (at least) while searching. The search breadth is what
# keeps a trained model's shortlist (bench_scale.py --accuracy_distractors 100000: the hard world's model, 103,000
# entities, SQ8 vectors; gold entity in the top 50: exact 95.6, ef 128: 94.0, 256: 94.1, 512: 95.2, the same with
# float32 vectors), at about twice the search time of ef 128.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 512


# Below this many entities an ANN structure stores its vectors in float32 ("flat"); from it on, 8-bit scalar codes
# ("sq8"). IVF's product codes (a quarter of a byte per dimension, "pq<R/4>", the default before) lost the trained
# hard-world model 3.4 points of shortlist recall against 1,003,000 entities where SQ8 and float32 lost nothing
# (gold entity in the IVF top 50 with 512 of 4,096 lists: PQ 82.3, SQ8 85.7, flat 85.7, exact 90.0), at the same
# search speed.
ANN_FLAT_BELOW = 50_000


def ann_default_code(rows: int) -> str:
    """The vector codes `AnnIndex.build(code="auto")` picks for a KB of `rows` entities (IVF and HNSW; a scan
    stores 4-bit codes)."""
    return "flat" if rows < ANN_FLAT_BELOW else "sq8"


def ann_build_args(ann, rows: int) -> dict | None:
    """The [`AnnIndex.build`] arguments an `ann` setting asks for a KB of `rows` entities, or None for no ANN structure:
    `"auto"` -> `{}` from `ANN_MIN_ROWS` entities on, True -> `{}`, False / None -> None, a dict -> itself, where an
    optional `"min_rows"` key builds only from that many entities on (`{"kind": "hnsw", "min_rows": ANN_MIN_ROWS}`
    is "auto" with an HNSW graph)."""
    if ann is None or ann is False:
        return None
    if ann is True or ann == "auto":
        args, min_rows = {}, (ANN_MIN_ROWS if ann == "auto" else 0)
    elif isinstance(ann, dict):
        args = dict(ann)
        min_rows = args.pop("min_rows", 0)
    else:
        raise ValueError(f"ann must be 'auto', True, False or a dict of AnnIndex.build arguments, got {ann!r}")
    return args if rows >= min_rows else None


class _VectorRows:
    """Stage-1 vectors `(N, R)` seen as what [`AnnIndex.build`] reads of an [`EntityIndex`]."""

    def __init__(self, vectors: torch.Tensor):
        self.retrieval = vectors.float()

    def __len__(self):
        return len(self.retrieval)

    def stage1_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self.retrieval.index_select(0, rows.reshape(-1))


class AnnIndex:
    """Approximate stage-1 search over the stage-1 vectors (inner product), one of three FAISS structures:

    - `"ivf"`: an inverted-file index (k-means lists, `nprobe` of them searched per query) with "flat", "sq8" (8-bit
      scalar codes) or "pq<m>" (product codes, m bytes) vectors in its lists;
    - `"hnsw"`: a hierarchical navigable small-world graph (`hnsw_m` links per node, `ef_search` candidates kept while
      walking it) over "flat" or "sq8" vectors. It needs no query to fall in the lists its gold entity was filed in,
      which a trained model's mention queries often do not (see `ANN_PROBE_DIVISOR`);
    - `"scan"`: every vector scored, from 4-bit codes (FAISS's SIMD "fast-scan" product codes, one dimension per
      code) of its projection onto the principal directions that keep `ANN_SCAN_ENERGY` of the vectors' second moment.
      Exhaustive: no query can miss the region its gold entity lies in, whatever the distance between mention and
      entity vectors; its coarse scores are made up for by re-scoring more rows exactly (`ANN_SCAN_REFINE`).

    Its ids are slots: `slot_rows[s]` is the KB row of slot s (-1 once removed or replaced), so rows can be added,
    replaced and removed ([`~AnnIndex.set_rows`], [`~AnnIndex.remove_rows`]) without retraining (a scan's slots are
    positions: removing one moves the later ones up; an HNSW graph keeps a removed slot as a tombstone that searches
    skip; a search asks for up to twice as many rows more, and a query left with fewer than it needs is searched
    exactly by `ranking_otmel`, so rebuild a graph after many removals). The scan, IVF and HNSW codes are trained once:
    rows added later are coded with what was learnt from the rows at build time.
    Its scores are approximate; [`EntityIndex.ann_topk`] re-scores its shortlist exactly.

    Loaded from a memory-mapped file ([`~AnnIndex.from_tensors`] with `zero_copy=True`, what [`EntityIndex.load`]
    does), the FAISS structure reads its vectors, codes and graph links in place in the file's pages rather than copies
    in the process's own memory; the first edit makes it a copy of its own ([`~AnnIndex.copy`] makes one at once).
    """

    def __init__(self, faiss_index, slot_rows: torch.Tensor, config: dict, buffer: torch.Tensor | None = None):
        self.index = faiss_index
        self.slot_rows = slot_rows.long()
        self.config = dict(config)
        self.version = 0
        self._buffer = buffer  # the serialised bytes `index` reads in place (zero-copy), None when it owns its data

    @property
    def zero_copy(self) -> bool:
        """Whether the FAISS structure reads its data in place in a buffer (a memory-mapped file) it does not own."""
        return self._buffer is not None

    def _cloned(self):
        """A FAISS structure equal to `self.index` that owns its data."""
        faiss = import_faiss()

        return faiss.deserialize_index(faiss.serialize_index(self.index))

    def _own(self):
        """Makes the FAISS structure own its data before an edit (FAISS aborts the process on resizing a view)."""
        if self._buffer is not None:
            self.index, self._buffer = self._cloned(), None

    def copy(self) -> "AnnIndex":
        """An independent copy: edits to either leave the other as it is. A zero-copy structure is shared until the
        copy's first edit (which makes its own); one that owns its data is copied at once."""
        index = self.index if self._buffer is not None else self._cloned()
        new = AnnIndex(index, self.slot_rows.clone(), self.config, buffer=self._buffer)
        new.version = self.version
        return new

    @classmethod
    def build(
        cls,
        entity_index: "EntityIndex | torch.Tensor",
        nlist: int | None = None,
        code: str = "auto",
        nprobe: int | None = None,
        train_size: int | None = None,
        seed: int = 0,
        block: int = 65536,
        kind: str = "auto",
        hnsw_m: int = HNSW_M,
        ef_search: int = HNSW_EF_SEARCH,
    ) -> "AnnIndex":
        """Trains and fills an ANN structure on the stage-1 vectors of `entity_index` (an [`EntityIndex`], or the
        vectors themselves, `(N, R)`: slot s is row s).

        Args:
            kind (`str`): `"ivf"`, `"hnsw"`, `"scan"` or `"auto"` (`ANN_DEFAULT_KIND`).
            hnsw_m, ef_search (`int`): HNSW only: links per node, and the least number of candidates a search keeps
                (raised to the number of rows asked for).
            nlist (`int`, *optional*): inverted lists (default: the power of two nearest `4 sqrt(N)`, at most N / 39).
            code (`str`): `"flat"`, `"sq8"`, `"pq<m>"` (IVF only) or `"auto"` ([`ann_default_code`]: `"flat"` below
                `ANN_FLAT_BELOW` entities, else `"sq8"`); a scan stores `"pq4"` codes only (`"auto"` or `"pq4"`).
            nprobe (`int`, *optional*): lists searched per query by default (default: `max(16, nlist /
                ANN_PROBE_DIVISOR)`).
            train_size (`int`, *optional*): vectors the quantisers are trained on (default: `min(N, 40 nlist)`, at
                least 10,000), a seeded random sample.
        """
        faiss = import_faiss()

        if isinstance(entity_index, torch.Tensor):
            entity_index = _VectorRows(entity_index)
        n, dim = len(entity_index), entity_index.retrieval.shape[1]
        kind = ANN_DEFAULT_KIND if kind == "auto" else kind
        if kind == "hnsw":
            return cls._build_hnsw(entity_index, code, hnsw_m, ef_search, train_size, seed, block)
        if kind == "scan":
            return cls._build_scan(entity_index, code, train_size, seed, block)
        if kind != "ivf":
            raise ValueError(f"ANN kind must be 'ivf', 'hnsw', 'scan' or 'auto', got {kind!r}")
        if nlist is None:
            nlist = 1 << max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
            nlist = max(1, min(nlist, n // 39 or 1, 65536))
        if code == "auto":
            code = ann_default_code(n)
        train_size = min(n, train_size or max(10_000, 40 * nlist))
        storage = {"flat": "Flat", "sq8": "SQ8"}.get(code)
        if code.startswith("pq") and code[2:].isdigit() and dim % int(code[2:]) == 0:
            bits = 8 if train_size >= 256 else max(1, train_size.bit_length() - 1)  # PQ training needs 2**bits rows
            storage = f"PQ{int(code[2:])}" + ("" if bits == 8 else f"x{bits}")
        if storage is None:
            raise ValueError(f"ANN code must be 'flat', 'sq8', 'pq<m>' (m dividing {dim}) or 'auto', got {code!r}")
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.index_factory(dim, f"IVF{nlist},{storage}", faiss.METRIC_INNER_PRODUCT)
        if hasattr(index, "do_polysemous_training"):
            index.do_polysemous_training = (
                False  # minutes of training for a re-ordering the exact re-scoring makes moot
            )
        g = torch.Generator().manual_seed(seed)
        sample = torch.randperm(n, generator=g)[:train_size].sort().values
        index.cp.seed = seed
        index.train(entity_index.stage1_vectors(sample).numpy())
        for start in range(0, n, block):
            rows = torch.arange(start, min(n, start + block))
            index.add_with_ids(entity_index.stage1_vectors(rows).numpy(), rows.numpy())
        config = {
            "kind": "ivf",
            "nlist": nlist,
            "code": code,
            "nprobe": nprobe or max(16, nlist // ANN_PROBE_DIVISOR),
            "train_size": train_size,
        }
        return cls(index, torch.arange(n), config)

    @classmethod
    def _build_hnsw(cls, entity_index, code, m, ef_search, train_size, seed, block) -> "AnnIndex":
        faiss = import_faiss()

        n, dim = len(entity_index), entity_index.retrieval.shape[1]
        if code == "auto":
            code = ann_default_code(n)
        storage = {"flat": "Flat", "sq8": "SQ8"}.get(code)
        if storage is None:  # FAISS's HNSW over product codes measures L2 only
            raise ValueError(f"an HNSW ANN stores 'flat' or 'sq8' vectors (or 'auto'), got {code!r}")
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.index_factory(dim, f"HNSW{int(m)},{storage}", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(HNSW_EF_CONSTRUCTION, int(m))
        train_size = min(n, train_size or 100_000)
        if not index.is_trained:
            sample = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:train_size].sort().values
            index.train(entity_index.stage1_vectors(sample).numpy())
        for start in range(0, n, block):  # slot s = the s-th vector added = KB row s
            index.add(entity_index.stage1_vectors(torch.arange(start, min(n, start + block))).numpy())
        config = {"kind": "hnsw", "code": code, "hnsw_m": int(m), "ef_search": int(ef_search)}
        if storage != "Flat":
            config["train_size"] = train_size
        return cls(index, torch.arange(n), config)

    @classmethod
    def _build_scan(cls, entity_index, code, train_size, seed, block) -> "AnnIndex":
        faiss = import_faiss()

        if code not in ("auto", "pq4"):
            raise ValueError(f"a scan ANN stores 'pq4' codes (or 'auto'), got {code!r}")
        n, dim = len(entity_index), entity_index.retrieval.shape[1]
        train_size = min(n, train_size or 100_000)
        sample = entity_index.stage1_vectors(
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:train_size].sort().values
        )
        # Principal directions of the uncentred second moment (inner products, not distances, are what is kept).
        energy, directions = torch.linalg.eigh(sample.double().T @ sample.double())
        energy, directions = energy.flip(0).clamp_min(0), directions.flip(1)
        kept = (energy.cumsum(0) / energy.sum().clamp_min(1e-30)).tolist()
        width = next((d for d in range(16, dim, 16) if kept[d - 1] >= ANN_SCAN_ENERGY), dim)
        projection = faiss.LinearTransform(dim, width, False)
        faiss.copy_array_to_vector(directions[:, :width].T.contiguous().float().numpy().reshape(-1), projection.A)
        projection.is_trained = True
        codes = faiss.IndexPQFastScan(width, width, 4, faiss.METRIC_INNER_PRODUCT)
        codes.pq.cp.min_points_per_centroid = 1  # a small KB's few vectors are all there is: no warning per dimension
        index = faiss.IndexPreTransform(projection, codes)
        faiss.omp_set_num_threads(torch.get_num_threads())
        # 16 codes per dimension need 16 training vectors: a smaller KB repeats its own (its codes are then exact)
        index.train(sample.repeat(-(-16 // len(sample)), 1).numpy() if len(sample) < 16 else sample.numpy())
        for start in range(0, n, block):  # slot s = the s-th vector added (removals close the gaps, in order)
            index.add(entity_index.stage1_vectors(torch.arange(start, min(n, start + block))).numpy())
        config = {
            "kind": "scan",
            "code": "pq4",
            "dims": width,
            "energy": kept[width - 1],
            "train_size": train_size,
            "refine": [ANN_SCAN_REFINE, ANN_SCAN_REFINE_MIN],
        }
        return cls(index, torch.arange(n), config)

    @property
    def kind(self) -> str:
        return self.config.get("kind", "ivf")

    def default_refine(self, k: int) -> int:
        """Rows a search proposes for exact re-scoring when `k` are asked for: `max(f k, least)`, `(f, least)` the
        config's `"refine"` (a scan's `(ANN_SCAN_REFINE, ANN_SCAN_REFINE_MIN)`), `(4, 200)` otherwise."""
        factor, least = self.config.get("refine", (4, 200))
        return max(int(factor) * k, int(least))

    def search(self, queries: torch.Tensor, k: int, nprobe: int | None = None) -> torch.Tensor:
        """KB rows `(B, k)` of the approximate top-k of each query (-1 where fewer were found). `nprobe`: IVF lists
        searched (IVF only; an HNSW search keeps `max(ef_search, k)` candidates; a scan scores every row)."""
        faiss = import_faiss()

        faiss.omp_set_num_threads(torch.get_num_threads())
        width = k
        if self.kind == "hnsw":  # asks for as many more as there are tombstones (up to 2 k more), then drops them
            width = min(self.index.ntotal, k + min(int((self.slot_rows < 0).sum()), 2 * k))
            self.index.hnsw.efSearch = max(int(self.config.get("ef_search", HNSW_EF_SEARCH)), width)
        elif self.kind == "ivf":
            self.index.nprobe = int(nprobe or self.config["nprobe"])
        _, slots = self.index.search(queries.detach().cpu().float().contiguous().numpy(), width)
        slots = torch.from_numpy(slots).long()
        rows = self.slot_rows.index_select(0, slots.clamp_min(0).reshape(-1)).view(slots.shape)
        rows = rows.masked_fill(slots < 0, -1)
        if width > k:  # live rows first, in the order found
            rows = rows.gather(1, (rows < 0).to(torch.int8).argsort(dim=1, stable=True))[:, :k]
        return rows

    def _drop_slots(self, slots: torch.Tensor):
        faiss = import_faiss()

        if not slots.numel():
            return
        if self.kind != "hnsw":  # an HNSW graph cannot drop nodes: the slot stays, a tombstone
            self._own()
            self.index.remove_ids(faiss.IDSelectorBatch(slots.numpy().astype("int64")))
        if self.kind == "scan":  # its ids are positions: the later slots move up, in order
            keep = torch.ones(len(self.slot_rows), dtype=torch.bool)
            keep[slots] = False
            self.slot_rows = self.slot_rows[keep]
        else:
            self.slot_rows[slots] = -1

    def set_rows(self, rows: torch.Tensor, vectors: torch.Tensor):
        """Rows `rows (M,)` now hold the stage-1 vectors `vectors (M, R)` (replaced rows or new rows at the end)."""
        rows = rows.long()
        if not rows.numel():
            return
        alive = self.slot_rows >= 0
        old = torch.isin(self.slot_rows, rows) & alive
        self._drop_slots(old.nonzero().flatten())
        slots = torch.arange(len(self.slot_rows), len(self.slot_rows) + len(rows))
        self._own()
        if self.kind in ("hnsw", "scan"):  # slots are the structure's own consecutive ids
            assert self.index.ntotal == len(self.slot_rows), (self.index.ntotal, len(self.slot_rows))
            self.index.add(vectors.float().contiguous().numpy())
        else:
            self.index.add_with_ids(vectors.float().contiguous().numpy(), slots.numpy())
        self.slot_rows = torch.cat([self.slot_rows, rows])
        self.version += 1

    def remove_rows(self, rows: torch.Tensor):
        """Rows `rows` were deleted from the KB (the later rows moved up)."""
        rows = rows.long().sort().values
        if not rows.numel():
            return
        self._drop_slots((torch.isin(self.slot_rows, rows) & (self.slot_rows >= 0)).nonzero().flatten())
        alive = self.slot_rows >= 0
        shift = torch.searchsorted(rows, self.slot_rows[alive])
        self.slot_rows[alive] = self.slot_rows[alive] - shift
        self.version += 1

    def to_tensors(self) -> dict:
        faiss = import_faiss()

        return {"faiss": torch.from_numpy(faiss.serialize_index(self.index)), "slot_rows": self.slot_rows}

    @classmethod
    def from_tensors(cls, tensors: dict, config: dict, path: str = "", zero_copy: bool = False) -> "AnnIndex":
        """The structure [`~AnnIndex.to_tensors`] wrote. With `zero_copy`, FAISS reads its data in place in
        `tensors["faiss"]` (kept alive with it: pass the tensors of a memory-mapped file) instead of copying it; a
        scan's fast-scan codes are always copied by FAISS (its reader fills their aligned table), so it owns them."""
        faiss = import_faiss()

        zero_copy = zero_copy and config.get("kind", "ivf") != "scan"
        try:
            raw = tensors["faiss"].contiguous().numpy()
            slot_rows = tensors["slot_rows"]
            if zero_copy:
                index = faiss.read_index(faiss.ZeroCopyIOReader(faiss.swig_ptr(raw), raw.size), 0)
            else:
                index = faiss.deserialize_index(raw)
        except Exception as err:  # noqa: BLE001 - FAISS raises RuntimeError with its own text
            raise IndexCorruptError(
                f"{path}: unreadable ANN structure ({type(err).__name__}: {err}); {REBUILD}"
            ) from err
        kind = config.get("kind", "ivf")
        expected = {"ivf": faiss.IndexIVF, "hnsw": faiss.IndexHNSW, "scan": faiss.IndexPreTransform}.get(kind)
        if expected is None or not isinstance(index, expected):
            raise IndexCorruptError(
                f"{path}: the index's JSON says an ANN structure of kind {kind!r}, the file holds a FAISS "
                f"{type(index).__name__}; {REBUILD}"
            )
        return cls(index, slot_rows, config, buffer=tensors["faiss"] if zero_copy else None)


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """`(rank, world size)` under torch.distributed, `(0, 1)` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _longest_text(processor, view: "KBView", start: int = 0, end: int | None = None) -> int:
    """Tokens of the longest entity text of rows `start:end` (in slices: token lists of a large KB are big)."""
    end = len(view) if end is None else end
    longest = 1
    for a in range(start, end, 8192):
        b = min(end, a + 8192)
        texts = processor.entity_texts(view.names[a:b], view.attributes[a:b])
        ids = processor.tokenizer(texts, truncation=True, max_length=processor.max_text_length)["input_ids"]
        longest = max(longest, max(len(x) for x in ids))
    return longest


def train_codecs(model, processor, kb, dtype: str, sample: int = 2048, batch_size: int = 64, seed: int = 0) -> dict:
    """The codecs of an index of storage `dtype` for `model`'s entity features; residual codecs (`res*`) are trained
    on the real tokens of a seeded random sample of `sample` KB rows (encoded once more for this)."""
    dtype = check_index_dtype(dtype)
    view = kb if isinstance(kb, KBView) else KBView(kb)
    n = len(view)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, sample)].sort().values.tolist()
    tokens, example = {}, None
    with inference_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batch = processor.process_entities(
                [view.names[i] for i in chunk], [view.attributes[i] for i in chunk], view.image_rows(chunk)
            )
            feats = model.encode_entities(**{k: v.to(model.device) for k, v in batch.items()})
            fields = {k: v.cpu() for k, v in feats.row_fields().items() if k in model.entity_index_fields()}
            example = example or fields
            for name in TOKEN_FIELDS:
                mask = fields.get(name.replace("_queries", "_mask"))
                if name in fields and mask is not None:
                    tokens.setdefault(name, []).append(fields[name][mask.bool()].float())
            if not dtype.startswith("res"):
                break  # only the field shapes are needed
    return default_codecs(dtype, example, {k: torch.cat(v) for k, v in tokens.items()}, seed=seed)


def stage1_codec(dtype: str, stage1_dtype: str | None = None):
    """The codec of the stage-1 vectors: `stage1_dtype` ("float32", "float16" or "int8"), by default float32 for the
    float storages and int8 (one float32 scale per row) for the compressed ones."""
    stage1_dtype = stage1_dtype or ("float32" if dtype in ("float32", "float16") else "int8")
    if stage1_dtype == "int8":
        return Int8Codec("float32")
    if stage1_dtype in ("float32", "float16"):
        return FloatCodec(stage1_dtype)
    raise ValueError(f"stage1_dtype must be 'float32', 'float16' or 'int8', got {stage1_dtype!r}")


def _stored_parts(stage1: torch.Tensor, rows: dict, fields, codecs: dict, retrieval_codec) -> dict:
    """What an index stores of some rows: the stage-1 parts (`@retrieval`, `@retrieval@scale`) and each field's parts
    (`field` / `field@part`) from float32 `stage1 (n, R)` and features `rows {field: (n, ...)}`."""
    parts = {_RETRIEVAL + (PART + p if p else ""): t for p, t in retrieval_codec.encode(stage1).items()}
    for name in fields:
        value = rows[name]
        if name in codecs:
            parts.update({name + (PART + p if p else ""): t for p, t in codecs[name].encode(value).items()})
        else:
            parts[name] = value.bool() if name.endswith("_mask") else value
    return parts


def _index_of_parts(parts: dict, qids, names, meta: dict, row_hashes, codecs: dict) -> EntityIndex:
    """The [`EntityIndex`] of rows stored as `parts` ([`_stored_parts`]; consumed)."""
    retrieval, scale = parts.pop(_RETRIEVAL), parts.pop(_RETRIEVAL + PART + "scale", None)
    return EntityIndex(
        retrieval, parts, qids, names, meta, row_hashes=row_hashes, retrieval_scale=scale, codecs=codecs
    )


def _encode_rows(
    model, processor, view, start, end, dtype, codecs, max_len, batch_size, progress, stage1_dtype=None
) -> EntityIndex:
    """[`EntityIndex`] of KB rows `start:end` (text fields padded to `max_len`, default: their longest)."""
    from tqdm.auto import tqdm

    n = end - start
    max_len = max_len or _longest_text(processor, view, start, end)
    device = model.device
    fields = model.entity_index_fields()
    retrieval_codec = stage1_codec(dtype, stage1_dtype)
    stored, splits = None, {}
    with inference_mode(model):
        for a in tqdm(range(start, end, batch_size), desc="Encoding KB", unit="batch", disable=not progress):
            b = min(end, a + batch_size)
            batch = processor.process_entities(view.names[a:b], view.attributes[a:b], view.image_batch(a, b))
            feats = model.encode_entities(**{k: v.to(device) for k, v in batch.items()})
            stage1 = model.entity_stage1(feats).float().cpu()
            rows = {k: v.cpu() for k, v in feats.with_text_length(max_len).row_fields().items() if k in fields}
            if stored is None:
                col = 0
                for name in model.stage1_weights():
                    width = getattr(feats, name).shape[-1]
                    splits[name] = (col, col + width)
                    col += width
                if codecs is None:
                    codecs = default_codecs(dtype, rows)
                codecs = {k: c for k, c in codecs.items() if k in rows}
            parts = _stored_parts(stage1, rows, fields, codecs, retrieval_codec)
            if stored is None:
                stored = {k: torch.zeros(n, *t.shape[1:], dtype=t.dtype) for k, t in parts.items()}
            for k, t in parts.items():
                stored[k][a - start : b - start] = t
    row_hashes = kb_row_hashes(view, start, end)
    meta = {
        "format": INDEX_FORMAT,
        "dtype": dtype,
        "splits": splits,
        "model": model_fingerprint(model),
        "processor": processor_fingerprint(processor),
        "kb": content_fingerprint(row_hashes),
        "size": n,
        "edits": {"added": 0, "replaced": 0, "removed": 0},
    }
    return _index_of_parts(stored, view.qids[start:end], view.names[start:end], meta, row_hashes, codecs)


def encode_kb(
    model,
    processor,
    kb,
    batch_size: int = 64,
    progress: bool = True,
    dtype: str | torch.dtype = "float32",
    codecs: dict | None = None,
    distributed: bool = False,
    seed: int = 0,
    stage1_dtype: str | None = None,
) -> EntityIndex:
    """Encodes every KB row into an [`EntityIndex`] (in memory; [`build_index`] writes large KBs shard by shard).

    Args:
        model ([`OTMELModel`]): run in eval mode without gradients (its training flag is restored afterwards).
        processor ([`OTMELProcessor`]).
        kb: a `datasets.Dataset` with columns `qid`, `name`, `attributes`, `image` (datasets `Image` or None), or a list
            of such dicts. Unreadable pictures count as "no image".
        batch_size (`int`): entities per forward pass.
        progress (`bool`): tqdm bar.
        dtype (`str`): storage (`INDEX_DTYPES`; scores are always computed in float32):
            - `"float32"`: exact; `"float16"`: stage-2 features in float16 (stage-1 vectors float32);
            - `"int8"`: every feature and the stage-1 vectors int8 with one scale per vector (about 1/2 of float16);
            - `"res4"` / `"res2"` / `"res1"`: token features as centroid + residual codes of 4 / 2 / 1 bits per value
              (ColBERTv2), the other features and the stage-1 vectors int8 (`res2`: about 1/5 of float16).
        codecs (`dict`, *optional*): the codecs to store with (e.g. an existing index's `codecs`, so new rows need no
            re-encoding when added to it); default: [`train_codecs`] (residual codecs trained on a sample of the KB).
        distributed (`bool`): under torch.distributed, each process encodes a contiguous share of the rows and the
            shares are gathered on every process (each entity is encoded once; the result equals one process's).
        seed (`int`): seeds the codec training sample.
        stage1_dtype (`str`, *optional*): storage of the stage-1 vectors ([`stage1_codec`]).
    """
    dtype = check_index_dtype(dtype)
    _require_positive(batch_size=batch_size)
    view = kb if isinstance(kb, KBView) else KBView(kb)
    n = len(view)
    if n == 0:
        raise ValueError("the KB is empty")
    rank, world = _world() if distributed else (0, 1)
    if codecs is None and dtype.startswith("res"):
        codecs = train_codecs(model, processor, view, dtype, batch_size=batch_size, seed=seed) if rank == 0 else None
        if world > 1:
            import torch.distributed as dist

            box = [codecs]
            dist.broadcast_object_list(box, src=0)
            codecs = box[0]
    if world == 1:
        return _encode_rows(model, processor, view, 0, n, dtype, codecs, None, batch_size, progress, stage1_dtype)
    import torch.distributed as dist

    max_len = _longest_text(processor, view)
    start, end = n * rank // world, n * (rank + 1) // world
    part = _encode_rows(
        model, processor, view, start, end, dtype, codecs, max_len, batch_size, progress and rank == 0, stage1_dtype
    )
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return EntityIndex.concatenate(parts)


# ----------------------------------------------------------------------------------------------------------------
# Large KBs: sharded, resumable building
# ----------------------------------------------------------------------------------------------------------------

SHARDS_DIR = "shards"
_PLAN, _CODECS = "plan.json", "codecs.safetensors"


@contextlib.contextmanager
def _locked(directory: str):
    """An exclusive lock on `directory/.lock` (processes building the same index take turns)."""
    import fcntl

    with open(os.path.join(directory, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shard_dir(shards_dir: str, shard: int, num_shards: int) -> str:
    return os.path.join(shards_dir, f"shard-{shard:05d}-of-{num_shards:05d}")


def _shared_codecs(shards_dir, model, processor, view, dtype, batch_size, seed) -> dict | None:
    """The codecs every shard uses: trained once and stored in `shards_dir` (residual dtypes only)."""
    if not dtype.startswith("res"):
        return None
    path = os.path.join(shards_dir, _CODECS)
    meta_path = path + ".json"
    if not os.path.isfile(meta_path):
        codecs = train_codecs(model, processor, view, dtype, batch_size=batch_size, seed=seed)
        tensors = {f"{field}/{name}": t for field, c in codecs.items() for name, t in c.state().items()}
        with _AtomicFile(path) as tmp:
            _write_safetensors(tmp, tensors)
        with _AtomicFile(meta_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump({field: c.config() for field, c in codecs.items()}, f)
        return codecs
    with open(meta_path, encoding="utf-8") as f:
        configs = json.load(f)
    tensors = _read_safetensors(path, mmap=False)
    states = {}
    for key, t in tensors.items():
        field, name = key.rsplit("/", 1)
        states.setdefault(field, {})[name] = t
    return {field: make_codec(cfg, states.get(field)) for field, cfg in configs.items()}


def build_index(
    model,
    processor,
    kb,
    out_dir: str,
    dtype: str = "float32",
    batch_size: int = 64,
    shard_size: int = 50_000,
    num_shards: int | None = None,
    shard_index: int | None = None,
    ann="auto",
    progress: bool = True,
    seed: int = 0,
    keep_shards: bool = False,
    stage1_dtype: str | None = None,
) -> EntityIndex | None:
    """Encodes a (large) KB shard by shard into `out_dir/shards/`, then merges the shards into the index saved in
    `out_dir` and returns it (memory-mapped).

    Resumable: a shard is written atomically once encoded, and a new call (same KB, model, processor, dtype and number
    of shards) skips the shards already written, so a killed build loses at most the shards in progress.

    Several processes: under `torchrun --nproc_per_node N` (torch.distributed initialised) process r encodes shards
    r, r + N, ...; process 0 merges and the others then load the result. Without torch.distributed, `shard_index`
    encodes that one shard only (run one process per shard, then [`merge_shards`]); the residual codecs are trained
    once, by the first process to get the lock, and shared.

    Args:
        out_dir (`str`): the index folder (shards in `out_dir/shards/`, deleted after the merge unless `keep_shards`).
        dtype (`str`): storage (see [`encode_kb`]).
        shard_size (`int`): entities per shard when `num_shards` is not given.
        num_shards (`int`, *optional*): shards to split the KB into.
        shard_index (`int`, *optional*): encode only this shard and return None.
        ann: build the approximate stage-1 structure after merging: `"auto"` (KBs of `ANN_MIN_ROWS` entities or
            more), True, False, or a dict of [`AnnIndex.build`] arguments (see [`ann_build_args`]).
        stage1_dtype (`str`, *optional*): storage of the stage-1 vectors ([`stage1_codec`]).
    """
    dtype = check_index_dtype(dtype)
    _require_positive(batch_size=batch_size, shard_size=shard_size)
    view = kb if isinstance(kb, KBView) else KBView(kb)
    n = len(view)
    if n == 0:
        raise ValueError("the KB is empty")
    num_shards = int(num_shards or max(1, math.ceil(n / shard_size)))
    if not 1 <= num_shards <= n:
        raise ValueError(f"num_shards must be between 1 and the KB size {n}, got {num_shards}")
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    bounds = [n * i // num_shards for i in range(num_shards + 1)]
    shards_dir = os.path.join(os.path.abspath(out_dir), SHARDS_DIR)
    os.makedirs(shards_dir, exist_ok=True)
    plan = {
        "size": n,
        "num_shards": num_shards,
        "dtype": dtype,
        "stage1_dtype": stage1_dtype,
        "model": model_fingerprint(model),
        "processor": processor_fingerprint(processor),
        "qids_sha256": StringColumn.from_list(view.qids).sha256(),
    }
    plan = json.loads(json.dumps(plan))  # as read back from JSON (tuples -> lists)
    with _locked(shards_dir):
        plan_path = os.path.join(shards_dir, _PLAN)
        if os.path.isfile(plan_path):
            with open(plan_path, encoding="utf-8") as f:
                old = json.load(f)
            if old != plan:
                diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
                raise IndexMismatchError(
                    f"{shards_dir} holds shards of another build (differs in {', '.join(diff)}): delete it or build into "
                    "another folder"
                )
        else:
            with _AtomicFile(plan_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(plan, f)
        codecs = _shared_codecs(shards_dir, model, processor, view, dtype, batch_size, seed)
    rank, world = _world()
    mine = [shard_index] if shard_index is not None else list(range(rank, num_shards, world))
    for s in mine:
        path, (a, b) = _shard_dir(shards_dir, s, num_shards), bounds[s : s + 2]
        try:
            done = EntityIndex.load(path, verify=False)
            if list(done.qids) == view.qids[a:b]:
                logger.info("shard %d of %d already written (%s); skipped", s, num_shards, path)
                continue
            logger.warning("shard %d in %s holds other rows; encoding it again", s, path)
        except FileNotFoundError:
            pass
        except IndexMismatchError as err:
            logger.warning("shard %d in %s is damaged (%s); encoding it again", s, path, err)
        logger.info("encoding shard %d of %d (rows %d-%d)", s, num_shards, a, b - 1)
        _encode_rows(model, processor, view, a, b, dtype, codecs, None, batch_size, progress, stage1_dtype).save(path)
    if shard_index is not None:
        return None
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    index = merge_shards(out_dir, ann=ann, keep_shards=keep_shards) if rank == 0 else None
    if world > 1:
        dist.barrier()
        index = index if rank == 0 else EntityIndex.load(out_dir, verify=False)
    return index


def merge_shards(out_dir: str, ann="auto", keep_shards: bool = False, block: int = 16384) -> EntityIndex:
    """Merges the shards [`build_index`] wrote in `out_dir/shards/` into the index saved in `out_dir` (streamed:
    never more than `block` rows of a shard in memory) and returns it, memory-mapped; builds the ANN structure
    (`ann`, see [`build_index`])."""
    out_dir = os.path.abspath(out_dir)
    shards_dir = os.path.join(out_dir, SHARDS_DIR)
    if not os.path.isfile(os.path.join(shards_dir, _PLAN)):
        raise FileNotFoundError(
            f"{shards_dir} holds no shards to merge (no {_PLAN}): encode them first with build_index / otmel-index "
            "--model ... --kb ... (--num_shards N --shard_index I for one shard per process)"
        )
    with open(os.path.join(shards_dir, _PLAN), encoding="utf-8") as f:
        plan = json.load(f)
    parts = []
    for s in range(plan["num_shards"]):
        path = _shard_dir(shards_dir, s, plan["num_shards"])
        if not os.path.isfile(os.path.join(path, INDEX_META)):
            raise FileNotFoundError(f"shard {s} of {plan['num_shards']} is missing ({path}): run build_index again")
        parts.append(EntityIndex.load(path))
    first = parts[0]
    for s, p in enumerate(parts[1:], start=1):
        same = (
            p.meta["model"] == first.meta["model"] and p.splits == first.splits and set(p.fields) == set(first.fields)
        )
        same = same and all(_same_codec(c, p.codecs[k]) for k, c in first.codecs.items())
        if not same:
            raise IndexMismatchError(
                f"shard {s} in {shards_dir} was built differently from shard 0; delete the shards"
            )
    n = sum(len(p) for p in parts)
    length = max(p._text_length() for p in parts)
    rows = [p._row_tensors() for p in parts]

    def chunks(key):
        for r in rows:
            t = r[key]
            for a in range(0, len(t), block):
                yield _fit_text({key: t[a : a + block]}, length)[key]

    lazy = {}
    for key, t in rows[0].items():
        shape = list(t.shape)
        shape[0] = n
        if key.split(PART, 1)[0] in OTMELEntityFeatures.TEXT_TOKEN_FIELDS:
            shape[1] = length
        lazy[key] = _Chunks(t.dtype, shape, (lambda key=key: chunks(key)))
    hashes = lazy.pop(_ROW_HASHES, None)
    hashes = torch.cat([r[_ROW_HASHES] for r in rows]) if hashes is not None else None
    merged = EntityIndex.joined(parts, lazy, hashes)
    merged.save(out_dir)
    del merged
    index = EntityIndex.load(out_dir)
    build_args = ann_build_args(ann, len(index))
    if build_args is not None:
        index.build_ann(**build_args)
        index.save(out_dir)  # rewrites the JSON and the ANN file only
    if not keep_shards:
        import shutil

        shutil.rmtree(shards_dir, ignore_errors=True)
    return index


def convert_index(
    source: str,
    out_dir: str,
    dtype: str | None = None,
    stage1_dtype: str | None = None,
    rows: range | None = None,
    shard_size: int = 50_000,
    ann="source",
    sample: int = 2048,
    seed: int = 0,
) -> EntityIndex:
    """Writes the rows `rows` (default: all) of the index saved in `source` into `out_dir` in another storage `dtype`
    (e.g. a float32 index into a `res2` one; default: the source's), without encoding the KB again: the stored
    features are decoded to float32 and encoded with the new codecs (residual codecs trained on the real tokens of
    `sample` random rows). `ann`: as in [`build_index`], or `"source"` (default): an ANN structure of the source's kind
    when the source has one, else `"auto"`. Shard by shard and resumable, like [`build_index`]; returns the new index,
    memory-mapped (also the way to rebuild an index whose HNSW graph holds many removed rows)."""
    _require_positive(shard_size=shard_size)
    src = EntityIndex.load(source, verify=False)
    dtype = check_index_dtype(dtype or src.meta["dtype"])
    if ann == "source":
        ann = {"kind": src.ann.kind} if src.ann is not None else "auto"
    rows = rows if rows is not None else range(len(src))
    if not rows or rows.start < 0 or rows.stop > len(src) or rows.step != 1:
        raise ValueError(
            f"rows must be a non-empty contiguous range within the {len(src)} rows of {source}, got {rows}"
        )
    n = len(rows)
    num_shards = max(1, math.ceil(n / shard_size))
    bounds = [rows.start + n * i // num_shards for i in range(num_shards + 1)]
    shards_dir = os.path.join(os.path.abspath(out_dir), SHARDS_DIR)
    os.makedirs(shards_dir, exist_ok=True)
    plan = {
        "size": n,
        "num_shards": num_shards,
        "dtype": dtype,
        "stage1_dtype": stage1_dtype,
        "rows": [rows.start, rows.stop],
        "source": src._saved["checksums"]["weights_sha256"],
    }
    fields = src.fields
    with _locked(shards_dir):
        plan_path = os.path.join(shards_dir, _PLAN)
        if os.path.isfile(plan_path):
            with open(plan_path, encoding="utf-8") as f:
                if json.load(f) != plan:
                    raise IndexMismatchError(
                        f"{shards_dir} holds shards of another conversion: delete it or use another folder"
                    )
        else:
            with _AtomicFile(plan_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(plan, f)
        codecs_path = os.path.join(shards_dir, _CODECS)
        if dtype.startswith("res") and not os.path.isfile(codecs_path + ".json"):
            g = torch.Generator().manual_seed(seed)
            picked = (rows.start + torch.randperm(n, generator=g)[: min(n, sample)]).sort().values
            feats = src.gather(picked, trim_text=False)
            example = {k: v for k, v in feats.row_fields().items() if k in fields}
            tokens = {
                name: example[name][example[name.replace("_queries", "_mask")].bool()]
                for name in TOKEN_FIELDS
                if name in example
            }
            codecs = default_codecs(dtype, example, tokens, seed=seed)
            states = {f"{field}/{name}": t for field, c in codecs.items() for name, t in c.state().items()}
            with _AtomicFile(codecs_path) as tmp:
                _write_safetensors(tmp, states)
            with _AtomicFile(codecs_path + ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump({field: c.config() for field, c in codecs.items()}, f)
        codecs = _shared_codecs(shards_dir, None, None, None, dtype, 0, seed) if dtype.startswith("res") else None
    retrieval_codec = stage1_codec(dtype, stage1_dtype)
    for s in range(num_shards):
        path, (a, b) = _shard_dir(shards_dir, s, num_shards), bounds[s : s + 2]
        if os.path.isfile(os.path.join(path, INDEX_META)):
            continue
        block = torch.arange(a, b)
        feats = src.gather(block, trim_text=False)
        values = {k: v for k, v in feats.row_fields().items() if k in fields}
        if codecs is None:
            codecs = default_codecs(dtype, values)
        parts = _stored_parts(src.stage1_vectors(block), values, fields, codecs, retrieval_codec)
        hashes = src.row_hashes[a:b].clone() if src.row_hashes is not None else None
        meta = dict(src.meta, dtype=dtype, size=b - a, kb=content_fingerprint(hashes) if hashes is not None else None)
        part_codecs = {k: c for k, c in codecs.items() if k in values}
        _index_of_parts(parts, src.qids[a:b], src.names[a:b], meta, hashes, part_codecs).save(path)
    return merge_shards(out_dir, ann=ann)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the commands' sizes and counts)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def main(argv=None) -> int:
    """`python index_otmel.py --model DIR --kb SOURCE --out_dir DIR [--dtype res2] [--num_shards N --shard_index I]`:
    builds an entity index shard by shard (resumable; run the same command again after an interruption), under
    `torchrun --nproc_per_node N` with N processes; `--merge` merges the shards of separate `--shard_index` runs;
    `--convert_from DIR` rewrites an index in another `--dtype` without encoding the KB."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", help="OT-MEL folder (model and processor)")
    parser.add_argument("--kb", help="KB source (see data_otmel.load_kb: a table file, dataset folder, Hub id, ...)")
    parser.add_argument("--kb_columns", default=None, help="map the KB's column names, e.g. qid=id,name=title")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument(
        "--dtype",
        default=None,
        choices=INDEX_DTYPES,
        help="storage (default float32; with --convert_from the source's)",
    )
    parser.add_argument("--stage1_dtype", default=None, choices=("float32", "float16", "int8"))
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--shard_size", type=positive_int, default=50_000)
    parser.add_argument("--num_shards", type=positive_int, default=None)
    parser.add_argument("--shard_index", type=int, default=None)  # range checked by build_index
    parser.add_argument("--merge", action="store_true", help="only merge the shards already written")
    parser.add_argument("--convert_from", default=None, help="an index folder to rewrite in --dtype")
    parser.add_argument(
        "--ann",
        default=None,
        choices=("auto", "yes", "no"),
        help=f"approximate stage-1 structure: auto (from {ANN_MIN_ROWS:,} entities on; default), yes, no; with "
        "--convert_from, by default one of the source's kind when it has one",
    )
    parser.add_argument(
        "--ann_kind", default="auto", choices=("auto", *ANN_KINDS), help="the ANN structure (AnnIndex)"
    )
    parser.add_argument("--threads", type=positive_int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ann is None and args.ann_kind == "auto" and args.convert_from:
        ann = "source"
    else:
        ann = {"auto": "auto", "yes": True, "no": False}[args.ann or "auto"]
    if ann is not False and ann != "source" and args.ann_kind != "auto":
        ann = {"kind": args.ann_kind, **({"min_rows": ANN_MIN_ROWS} if ann == "auto" else {})}
    if not (args.merge or args.convert_from) and not (args.model and args.kb):
        parser.error("--model and --kb are needed to build an index")
    try:
        if args.merge:
            index = merge_shards(args.out_dir, ann=ann)
        elif args.convert_from:
            index = convert_index(
                args.convert_from, args.out_dir, args.dtype, args.stage1_dtype, shard_size=args.shard_size, ann=ann
            )
        else:
            try:
                from .data_otmel import load_kb
                from .modeling_otmel import OTMELModel
                from .processing_otmel import OTMELProcessor
            except ImportError:
                from data_otmel import load_kb
                from modeling_otmel import OTMELModel
                from processing_otmel import OTMELProcessor

            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun
                import torch.distributed as dist

                dist.init_process_group("gloo")
            model = OTMELModel.from_pretrained(args.model).eval()
            processor = OTMELProcessor.from_pretrained(args.model)
            kb = load_kb(args.kb, args.kb_columns)
            index = build_index(
                model,
                processor,
                kb,
                args.out_dir,
                dtype=args.dtype or "float32",
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                num_shards=args.num_shards,
                shard_index=args.shard_index,
                ann=ann,
                stage1_dtype=args.stage1_dtype,
            )
            if index is None:
                print(f"shard {args.shard_index} written; merge with --merge once every shard is", file=sys.stderr)
                return 0
    except (OSError, ValueError) as err:  # a missing file, a refused index or KB, a bad shard plan: named, exit 2
        print(f"otmel-index: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: {index!r}, {index.nbytes() / len(index):.0f} bytes per entity", file=sys.stderr)
    return 0


__all__ = [
    "ANN_DEFAULT_KIND",
    "ANN_FLAT_BELOW",
    "ANN_KINDS",
    "ANN_MIN_ROWS",
    "INDEX_DTYPES",
    "INDEX_FORMAT",
    "INDEX_META",
    "INDEX_WEIGHTS",
    "AnnIndex",
    "EntityIndex",
    "FloatCodec",
    "IndexCorruptError",
    "IndexMismatchError",
    "Int8Codec",
    "KBView",
    "ResidualCodec",
    "StringColumn",
    "ann_build_args",
    "ann_default_code",
    "build_index",
    "check_index_dtype",
    "codec_kind",
    "content_fingerprint",
    "convert_index",
    "encode_kb",
    "import_faiss",
    "index_towers",
    "inference_mode",
    "kb_fingerprint",
    "kb_row_hashes",
    "merge_shards",
    "model_fingerprint",
    "positive_int",
    "processor_fingerprint",
    "stage1_codec",
    "storage_dtype",
    "train_codecs",
]


if __name__ == "__main__":
    sys.exit(main())
