"""The entity index (index_otmel): live updates (add / remove / replace), their consistency with a fresh build, with
link() and the stage-1 caches, and persistence after changes. A random tiny CLIP: these tests check consistency, not
quality."""

import io
import os
import re
import sys

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tiny_worlds import noise_png as _png  # noqa: E402
from transformers import AutoImageProcessor, AutoTokenizer  # noqa: E402

import index_otmel as ix  # noqa: E402
import linking_otmel as lk  # noqa: E402
import ranking_otmel as rk  # noqa: E402
import serving_otmel as sv  # noqa: E402
from modeling_otmel import OTMELModel  # noqa: E402
from processing_otmel import OTMELProcessor  # noqa: E402
from tiny_clip import build_tiny_clip  # noqa: E402


NAMES = "ada bob cyd dan eve fay gus hal ivy jon kim lea".split()
JOBS = "doctor singer painter writer actor pilot".split()
LONG = "a famous explorer who crossed the northern sea by boat and wrote many books about the trip"


def _row(i: int, name=None, attributes=None, image=True) -> dict:
    return {
        "qid": f"Q{i}",
        "name": name or f"{NAMES[i % 12]} {JOBS[i % 6]}",
        "attributes": attributes or f"works as a {JOBS[i % 6]}.",
        "image": _png(i) if image and i % 3 else None,
    }


KB = [_row(i) for i in range(12)]
NEW = [_row(20, name="zed long", attributes=LONG), _row(21, name="yan nine", attributes="a pilot.")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("index")
    texts = [f"{r['name']} [SEP] {r['attributes']}" for r in KB + NEW] + ["renamed person [SEP] a spy."]
    clip_dir = build_tiny_clip(str(root / "clip"), texts * 3, vocab_size=200)
    processor = OTMELProcessor(AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir))
    model = OTMELModel.from_clip(clip_dir, hidden_size=32).eval()
    return {"root": root, "clip_dir": clip_dir, "model": model, "processor": processor}


def _encode(world, rows, **kw):
    return ix.encode_kb(world["model"], world["processor"], rows, batch_size=5, progress=False, **kw)


def _linker(world, rows):
    linker = lk.OTMELLinker(world["model"], world["processor"], batch_size=4)
    linker.index = _encode(world, rows)
    return linker


def _mention_of(row) -> dict:
    """A mention whose text and picture are exactly the entity's: its stage-1 score is the largest possible."""
    image = PILImage.open(io.BytesIO(row["image"])) if row["image"] else None
    return {"mention": row["name"], "sentence": row["attributes"], "image": image}


MENTIONS = [_mention_of(r) for r in KB[:6]] + [
    {"mention": "zed", "sentence": "the explorer wrote books", "image": None}
]


def _all_scores(linker, mentions, strategy="two_stage"):
    n = len(linker.index)
    results = linker.link(mentions, top_k=n, candidates=n, strategy=strategy)
    return [{c["qid"]: (c["name"], c["score"]) for c in r} for r in results]


def _assert_same_links(a, b):
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for qid in x:
            assert x[qid][0] == y[qid][0]
            assert x[qid][1] == pytest.approx(y[qid][1], abs=1e-4)


def test_add_equals_a_fresh_build_and_the_new_entity_is_found(world):
    linker = _linker(world, KB)
    length = linker.index.tensors["text_mask"].shape[1]
    version = linker.index.version
    assert linker.add_entities(NEW) == {"added": 2, "replaced": 0}
    index = linker.index
    assert len(index) == 14 and index.qids[-2:] == ["Q20", "Q21"] and index.version > version
    assert index.row_of("Q20") == 12 and index.row_of("Q21") == 13
    # The long text of Q20 is longer than any text of the first KB: the text fields were padded, none cut.
    assert index.tensors["text_mask"].shape[1] > length
    assert index.tensors["text_mask"][12].sum() > index.tensors["text_mask"][:12].sum(1).max()
    fresh = _linker(world, KB + NEW)
    _assert_same_links(_all_scores(linker, MENTIONS), _all_scores(fresh, MENTIONS))
    # A mention identical to a new entity has it in its stage-1 top 3, so link() returns it.
    found = linker.link([_mention_of(NEW[1]), _mention_of(NEW[0])], top_k=3, candidates=3)
    assert "Q21" in [c["qid"] for c in found[0]] and "Q20" in [c["qid"] for c in found[1]]
    assert index.meta["edits"] == {"added": 2, "replaced": 0, "removed": 0}
    assert index.meta["size"] == 14


def test_remove_never_returns_the_entity(world):
    linker = _linker(world, KB + NEW)
    gone = ["Q3", "Q20"]
    assert linker.remove_entities(gone) == 2
    index = linker.index
    assert len(index) == 12 and not set(gone) & set(index.qids)
    assert index.row_of("Q3") == -1 and index.row_of("Q4") == 3
    for strategy in ("two_stage", "exhaustive"):
        for links in _all_scores(linker, MENTIONS + [_mention_of(KB[3]), _mention_of(NEW[0])], strategy):
            assert len(links) == 12 and not set(gone) & set(links)
    rest = [r for r in KB + NEW if r["qid"] not in gone]
    _assert_same_links(_all_scores(linker, MENTIONS), _all_scores(_linker(world, rest), MENTIONS))
    assert index.meta["edits"]["removed"] == 2


def test_remove_unknown_qids(world):
    index = _encode(world, KB)
    with pytest.raises(KeyError, match="Q99"):
        index.remove(["Q1", "Q99"])
    assert len(index) == 12 and index.version == 0  # nothing removed
    assert index.remove(["Q1", "Q99"], missing_ok=True) == 1 and len(index) == 11
    assert index.remove("Q98", missing_ok=True) == 0
    with pytest.raises(ValueError, match="empty"):
        index.remove(index.qids)
    assert len(index) == 11


def test_replacing_an_entity_changes_its_name_and_score(world):
    linker = _linker(world, KB)
    before = _all_scores(linker, MENTIONS)
    changed = _row(4, name="renamed person", attributes="a spy.", image=False)
    assert linker.add_entities([changed]) == {"added": 0, "replaced": 1}
    index = linker.index
    assert len(index) == 12 and index.row_of("Q4") == 4 and index.names[4] == "renamed person"
    after = _all_scores(linker, MENTIONS)
    for b, a in zip(before, after):
        assert a["Q4"][0] == "renamed person" and a["Q4"][1] != pytest.approx(b["Q4"][1], abs=1e-4)
        for qid in a:
            if qid != "Q4":
                assert a[qid][1] == pytest.approx(b[qid][1], abs=1e-5)
    fresh = _linker(world, KB[:4] + [changed] + KB[5:])
    _assert_same_links(after, _all_scores(fresh, MENTIONS))


def test_add_refuses_another_model_and_repeated_qids(world):
    index = _encode(world, KB)
    other = OTMELModel.from_clip(world["clip_dir"], hidden_size=32).eval()  # new random heads
    foreign = ix.encode_kb(other, world["processor"], NEW, progress=False)
    with pytest.raises(ix.IndexMismatchError, match="model weights differ"):
        index.add(foreign)
    small = OTMELModel.from_clip(world["clip_dir"], hidden_size=16).eval()
    with pytest.raises(ix.IndexMismatchError, match="hidden_size"):
        index.add(ix.encode_kb(small, world["processor"], NEW, progress=False))
    with pytest.raises(ValueError, match="Q20"):
        index.add(_encode(world, [NEW[0], dict(NEW[0])]))
    assert len(index) == 12 and index.version == 0
    with pytest.raises(ValueError, match="KB row 1"):
        _encode(world, [NEW[0], {"name": "no qid"}])


def test_faiss_stage1_follows_changes(world):
    pytest.importorskip("faiss")
    index = _encode(world, KB)
    feats = rk.encode_mentions(world["model"], world["processor"], [_mention_of(NEW[1])])
    options = rk.RankOptions(candidates=3, stage1="faiss")
    first = rk.rank(world["model"], feats, index, options)
    assert 13 not in first.indices.tolist()[0]
    index.add(_encode(world, NEW))
    assert index.row_of("Q21") == 13 and 13 in rk.rank(world["model"], feats, index, options).indices.tolist()[0]
    index.remove(["Q21"])
    assert index.row_of("Q21") == -1
    rows = rk.rank(world["model"], feats, index, options).indices.tolist()[0]
    assert max(rows) < len(index)


def test_save_load_after_changes(world, tmp_path):
    linker = _linker(world, KB)
    linker.add_entities([NEW[0], _row(2, name="renamed person", attributes="a spy.")])
    linker.remove_entities(["Q5"])
    before = _all_scores(linker, MENTIONS)
    path = str(tmp_path / "index")
    linker.save_index(path)
    again = lk.OTMELLinker(world["model"], world["processor"], batch_size=4)
    edited_kb = [r for r in KB if r["qid"] != "Q5"]
    edited_kb[2] = _row(2, name="renamed person", attributes="a spy.")
    edited_kb.append(NEW[0])
    again.load_index(path, kb=edited_kb)  # the edited KB, in the index's row order, matches
    assert again.index.qids == linker.index.qids and again.index.names == linker.index.names
    assert again.index.meta["edits"] == {"added": 1, "replaced": 1, "removed": 1}
    assert again.index.meta["kb"] == ix.kb_fingerprint(edited_kb)
    _assert_same_links(_all_scores(again, MENTIONS), before)
    with pytest.raises(ix.IndexMismatchError, match="KB qids differ \\(first at row 5: index 'Q6', KB 'Q5'\\)"):
        again.load_index(path, kb=KB)  # the KB before the changes
    stale = list(edited_kb)
    stale[2] = KB[2]  # the row before its replacement
    with pytest.raises(ix.IndexMismatchError, match="KB content differs at row 2 \\(qid 'Q2'\\)"):
        again.load_index(path, kb=stale)
    # Editing the reloaded index keeps working (and a float16 index stores added rows in float16).
    half = _encode(world, KB, dtype="float16")
    half.add(_encode(world, NEW))
    assert half.tensors["text_queries"].dtype == torch.float16 and len(half) == 14


# ---- saved-index integrity and atomic writes ------------------------------------------------------------------


def _saved(world, tmp_path, rows=KB):
    path = str(tmp_path / "index")
    _encode(world, rows).save(path)
    return path


def _files(path):
    with open(os.path.join(path, ix.INDEX_META), encoding="utf-8") as f:
        meta = __import__("json").load(f)
    return os.path.join(path, ix.INDEX_META), os.path.join(path, meta["files"]["weights"]), meta


def _rewrite_meta(meta_path, meta):
    with open(meta_path, "w", encoding="utf-8") as f:
        __import__("json").dump(meta, f)


def test_reordered_qids_or_names_are_refused(world, tmp_path):
    path = _saved(world, tmp_path)
    meta_path, weights, meta = _files(path)
    original = open(weights, "rb").read()
    # The qids Q10, Q11 are stored one after the other: swapping them keeps the file size.
    assert original.count(b"Q10Q11") == 1
    open(weights, "wb").write(original.replace(b"Q10Q11", b"Q11Q10"))
    with pytest.raises(ix.IndexCorruptError, match=f"{weights}: contents do not match the sha256.*rebuild"):
        ix.EntityIndex.load(path)
    # Without the file checksum, the checksum of the qid list still catches it.
    with pytest.raises(
        ix.IndexCorruptError, match=f"{weights}: the qids list does not match its checksum in {meta_path}"
    ):
        ix.EntityIndex.load(path, verify=False)
    name_a, name_b = KB[0]["name"].encode(), KB[1]["name"].encode()
    assert len(name_a) == len(name_b) and original.count(name_a + name_b) == 1
    open(weights, "wb").write(original.replace(name_a + name_b, name_b + name_a))
    with pytest.raises(ix.IndexCorruptError, match="names list does not match"):
        ix.EntityIndex.load(path, verify=False)
    open(weights, "wb").write(original)
    assert ix.EntityIndex.load(path).qids == [r["qid"] for r in KB]
    _rewrite_meta(meta_path, {**meta, "checksums": {**meta["checksums"], "weights_bytes": 5}})
    with pytest.raises(ix.IndexCorruptError, match=f"{weights} has {len(original)} bytes, {meta_path} says 5"):
        ix.EntityIndex.load(path)


def test_same_size_corruption_of_the_tensors_is_refused(world, tmp_path):
    path = _saved(world, tmp_path)
    index = ix.EntityIndex.load(path)
    _, weights, _ = _files(path)
    data = bytearray(open(weights, "rb").read())
    data[-3] ^= 0x40  # a byte of the last tensor's data, not of the header
    open(weights, "wb").write(bytes(data))
    with pytest.raises(ix.IndexCorruptError, match=f"{weights}: contents do not match the sha256.*rebuild"):
        ix.EntityIndex.load(path)
    # Without verification the same-size change is not seen (the size and layout checks still run).
    assert len(ix.EntityIndex.load(path, verify=False)) == len(index)


def test_truncated_or_missing_tensors_file_names_the_file(world, tmp_path):
    path = _saved(world, tmp_path)
    _, weights, _ = _files(path)
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    for verify in (True, False):
        with pytest.raises(ix.IndexCorruptError, match=f"{weights} has {len(data) // 2} bytes.*truncated.*rebuild"):
            ix.EntityIndex.load(path, verify=verify)
    os.remove(weights)
    with pytest.raises(ix.IndexCorruptError, match=f"{weights} is missing"):
        ix.EntityIndex.load(path)


def test_broken_json_and_old_format_name_the_file(world, tmp_path):
    path = _saved(world, tmp_path)
    meta_path, _, meta = _files(path)
    text = open(meta_path, encoding="utf-8").read()
    open(meta_path, "w", encoding="utf-8").write(text[:-40])
    with pytest.raises(ix.IndexCorruptError, match=f"{meta_path}: not valid JSON.*rebuild"):
        ix.EntityIndex.load(path)
    _rewrite_meta(meta_path, {**meta, "format": 1})
    with pytest.raises(ix.IndexCorruptError, match=f"{meta_path}: entity index format 1.*rebuild"):
        ix.EntityIndex.load(path)
    # The CLI's handler (IndexMismatchError) catches corruption too.
    assert issubclass(ix.IndexCorruptError, ix.IndexMismatchError)


def test_interrupted_save_keeps_the_previous_index(world, tmp_path, monkeypatch):
    path = _saved(world, tmp_path)
    before = sorted(os.listdir(path))
    real_save = ix._write_safetensors

    def half_save(filename, tensors, *args, **kwargs):  # writes half a file, then dies
        real_save(filename, tensors, *args, **kwargs)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ix, "_write_safetensors", half_save)
    bigger = _encode(world, KB + NEW)
    with pytest.raises(KeyboardInterrupt):
        bigger.save(path)
    assert sorted(os.listdir(path)) == before  # no half index, no temporary left
    assert ix.EntityIndex.load(path, model=world["model"]).qids == [r["qid"] for r in KB]
    # Into a new folder: nothing that loads is left.
    with pytest.raises(KeyboardInterrupt):
        bigger.save(str(tmp_path / "fresh"))
    assert os.listdir(tmp_path / "fresh") == []
    monkeypatch.undo()

    # Dying after the tensors are written but before the JSON commit: still the previous index.
    real_dump = ix.json.dump

    def dump_and_die(obj, f, **kwargs):
        real_dump(obj, f, **kwargs)
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(ix.json, "dump", dump_and_die)
    with pytest.raises(KeyboardInterrupt):
        bigger.save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(path)) == before
    assert len(ix.EntityIndex.load(path)) == len(KB)
    # A temporary left by a killed process is ignored by load and cleaned by the next save.
    open(os.path.join(path, f".{ix.INDEX_META}.tmp-999-dead"), "w").write("{")
    assert len(ix.EntityIndex.load(path)) == len(KB)
    bigger.save(path)
    assert len(ix.EntityIndex.load(path)) == len(KB) + len(NEW)
    assert len(os.listdir(path)) == 2  # the JSON and one tensors file


# ---- compressed, memory-mapped storage; approximate stage 1; sharded building ----------------------------------


DISTINCT = [
    _row(i, name=f"{NAMES[i % 12]} {JOBS[i // 12 % 6]} {i}", attributes=f"number {i} works as a {JOBS[i % 6]}.")
    for i in range(60)
]
EXTRA = [{**r, "qid": f"Q{100 + i}"} for i, r in enumerate(NEW)]  # NEW under qids that DISTINCT does not hold


def test_codecs_reconstruct_with_bounded_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=g) * torch.rand(4000, 1, generator=g)
    parts = ix.Int8Codec().encode(x)
    assert parts[""].dtype == torch.int8 and parts["scale"].shape == (4000,)
    error = (ix.Int8Codec().decode(parts) - x).abs()
    assert bool((error <= parts["scale"].float().unsqueeze(1) * 0.5 + 1e-3 * x.abs() + 1e-7).all())
    relative = {}
    for bits in (4, 2, 1):
        codec = ix.ResidualCodec.train(x, bits, num_centroids=32)
        parts = codec.encode(x)
        assert parts["codes"].shape == (4000, 24 * bits // 8) and parts["codes"].dtype == torch.uint8
        assert parts["centroid"].dtype == torch.int16
        relative[bits] = ((codec.decode(parts) - x).norm() / x.norm()).item()
        # The stored state rebuilds the same codec.
        again = ix.make_codec(codec.config(), codec.state())
        assert torch.equal(again.decode(parts), codec.decode(parts))
    assert relative[4] < relative[2] < relative[1] < 0.8
    assert (ix.Int8Codec().decode(ix.Int8Codec().encode(x)) - x).norm() / x.norm() < relative[4]


def test_compressed_indexes_link_like_float32(world, tmp_path):
    model, processor = world["model"], world["processor"]
    mentions = [_mention_of(r) for r in DISTINCT[:20]]
    feats = rk.encode_mentions(model, processor, mentions)
    exact = _encode(world, DISTINCT)
    base = rk.rank(model, feats, exact, candidates=10)
    sizes = {}
    for dtype in ("float16", "int8", "res4", "res2", "res1"):
        index = _encode(world, DISTINCT, dtype=dtype)
        sizes[dtype] = index.nbytes()
        if dtype != "float16":
            assert index.retrieval.dtype == torch.int8 and index.retrieval_scale.shape == (len(DISTINCT),)
        # Same pairs, scored from each storage: S_O moves by little.
        so = rk.score_rows(model, feats, index, base.indices, rk.RankOptions())
        so_exact = rk.score_rows(model, feats, exact, base.indices, rk.RankOptions())
        assert (so - so_exact).abs().max() < (2e-3 if dtype == "float16" else 2e-2), dtype
        # A mention identical to an entity has it first in stage 1 whatever the storage.
        queries = model.mention_stage1(feats).float()
        assert index.stage1_topk(queries, 1)[1].flatten().tolist() == list(range(20)), dtype
        path = str(tmp_path / dtype)
        index.save(path)
        back = ix.EntityIndex.load(path, model=model, processor=processor)
        assert torch.equal(
            rk.rank(model, feats, back, candidates=10).indices, rk.rank(model, feats, index, candidates=10).indices
        )
    sizes["float32"] = exact.nbytes()
    order = ["float32", "float16", "int8", "res4", "res2", "res1"]
    assert [sizes[d] for d in order] == sorted(sizes.values(), reverse=True)
    assert sizes["res2"] < sizes["float16"] / 2.5


def _mapped_ranges(path):
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(path):
                a, b = line.split()[0].split("-")
                ranges.append((int(a, 16), int(b, 16)))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_load_memory_maps_the_tensors(world, tmp_path):
    path = str(tmp_path / "index")
    _encode(world, DISTINCT, dtype="res2").save(path)
    index = ix.EntityIndex.load(path)
    _, weights, _ = _files(path)
    ranges = _mapped_ranges(os.path.realpath(weights))
    assert ranges
    for t in [index.retrieval, index.retrieval_scale, *index.tensors.values()]:
        assert any(a <= t.data_ptr() < b for a, b in ranges), "tensor not in the mapped file"
    copy = ix.EntityIndex.load(path, mmap=False)
    assert not any(a <= copy.retrieval.data_ptr() < b for a, b in ranges)
    assert copy.qids == index.qids == [r["qid"] for r in DISTINCT]
    # Editing a mapped index copies what it edits; the file is untouched.
    size = os.path.getsize(weights)
    assert index.add(_encode(world, EXTRA, dtype="res2", codecs=index.codecs)) == {"added": 2, "replaced": 0}
    index.remove(["Q0"])
    assert len(index) == 61 and os.path.getsize(weights) == size
    assert len(ix.EntityIndex.load(path)) == 60


def test_ann_stage1_search_and_updates(world, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    model, processor = world["model"], world["processor"]
    index = _encode(world, DISTINCT, dtype="int8")
    feats = rk.encode_mentions(model, processor, [_mention_of(r) for r in DISTINCT[:20]])
    exact = rk.rank(model, feats, index, candidates=10)
    index.build_ann(kind="ivf", nlist=4, code="flat")
    assert rk.stage1_search(rk.RankOptions(stage1="auto"), index) == "torch"  # a small KB: exact
    monkeypatch.setattr(rk, "ANN_MIN_ROWS", 50)
    assert rk.stage1_search(rk.RankOptions(stage1="auto"), index) == "ann"
    # Searching every list with a shortlist of the whole KB is exact.
    full = rk.rank(model, feats, index, candidates=10, stage1="ann", ann_nprobe=4, ann_refine=60)
    assert torch.equal(full.indices, exact.indices)
    one = rk.rank(model, feats, index, candidates=10, stage1="ann", ann_nprobe=1, ann_refine=10)
    assert one.indices.min() >= 0 and one.indices[:, 0].tolist() == exact.indices[:, 0].tolist()
    for code in ("sq8", "pq8"):
        other = _encode(world, DISTINCT, dtype="int8")
        other.build_ann(kind="ivf", nlist=2, code=code)
        assert rk.rank(model, feats, other, candidates=5, stage1="ann", ann_nprobe=2).indices.min() >= 0
    # Updates reach the ANN structure: removed rows never come back, added ones are found.
    index.remove(["Q3", "Q7"])
    assert index.add(_encode(world, EXTRA, dtype="int8", codecs=index.codecs)) == {"added": 2, "replaced": 0}
    queries = model.mention_stage1(
        rk.encode_mentions(model, processor, [_mention_of(EXTRA[1]), _mention_of(DISTINCT[3])])
    )
    rows = index.ann_topk(queries.float(), 60, nprobe=4, refine=62)[1]
    assert index.qids[rows[0, 0]] == "Q101"
    assert not {"Q3", "Q7"} & {index.qids[r] for r in rows.flatten().tolist()}
    assert sorted(rows[0].tolist()) == list(range(len(index)))  # every row exactly once
    path = str(tmp_path / "ann")
    index.save(path)
    back = ix.EntityIndex.load(path)
    assert back.ann is not None and back.ann.config["code"] == "flat"
    assert torch.equal(back.ann_topk(queries.float(), 5, nprobe=4)[1], index.ann_topk(queries.float(), 5, nprobe=4)[1])
    # Read in place in the memory-mapped file; an edit (IVF: removing the replaced row's vector) makes it its own.
    assert back.ann.zero_copy
    edited = ix.EntityIndex.load(path)
    assert edited.add(_encode(world, EXTRA[1:2], dtype="int8", codecs=index.codecs)) == {"added": 0, "replaced": 1}
    assert not edited.ann.zero_copy and edited.ann.index.ntotal == back.ann.index.ntotal
    assert edited.qids[edited.ann_topk(queries.float(), 1, nprobe=4)[1][0, 0]] == "Q101"
    # Saving back where it came from rewrites only the ANN file when only the ANN changed.
    files = {n: os.path.getmtime(os.path.join(path, n)) for n in os.listdir(path)}
    back.build_ann(kind="ivf", nlist=2, code="flat")
    back.save(path)
    weights = [n for n in os.listdir(path) if n.endswith(".safetensors") and not n.endswith("-ann.safetensors")]
    assert (
        len(weights) == 1
        and weights[0] in files
        and os.path.getmtime(os.path.join(path, weights[0])) == files[weights[0]]
    )
    assert ix.EntityIndex.load(path).ann.config["nlist"] == 2


def test_hnsw_ann_search_updates_and_round_trip(world, tmp_path):
    pytest.importorskip("faiss")
    model, processor = world["model"], world["processor"]
    index = _encode(world, DISTINCT, dtype="int8")
    feats = rk.encode_mentions(model, processor, [_mention_of(r) for r in DISTINCT[:20]])
    exact = rk.rank(model, feats, index, candidates=10)
    with pytest.raises(ValueError, match="'flat' or 'sq8'"):
        index.build_ann(kind="hnsw", code="pq8")
    with pytest.raises(ValueError, match="ANN kind"):
        index.build_ann(kind="lsh")
    index.build_ann(kind="hnsw", hnsw_m=8)
    assert index.ann.config == {"kind": "hnsw", "code": "flat", "hnsw_m": 8, "ef_search": ix.HNSW_EF_SEARCH}
    # A graph of 60 nodes searched with ef >= 60 finds every node: the shortlist is the exact one.
    ann = rk.rank(model, feats, index, candidates=10, stage1="ann", ann_refine=60)
    assert torch.equal(ann.indices, exact.indices)
    sq8 = _encode(world, DISTINCT, dtype="int8")
    sq8.build_ann(kind="hnsw", code="sq8", hnsw_m=8)
    assert (
        rk.rank(model, feats, sq8, candidates=10, stage1="ann").indices[:, 0].tolist() == exact.indices[:, 0].tolist()
    )
    # Removed rows stay in the graph as tombstones and never come back; added and replaced rows are found.
    index.remove(["Q3", "Q7"])
    assert index.add(_encode(world, EXTRA, dtype="int8", codecs=index.codecs)) == {"added": 2, "replaced": 0}
    assert index.ann.index.ntotal == 62 and int((index.ann.slot_rows >= 0).sum()) == len(index) == 60
    queries = model.mention_stage1(
        rk.encode_mentions(model, processor, [_mention_of(EXTRA[1]), _mention_of(DISTINCT[3])])
    ).float()
    rows = index.ann_topk(queries, 60, refine=62)[1]
    assert index.qids[rows[0, 0]] == "Q101"
    assert not {"Q3", "Q7"} & {index.qids[r] for r in rows.flatten().tolist()}
    assert sorted(rows[0].tolist()) == list(range(len(index)))  # every live row exactly once
    path = str(tmp_path / "hnsw")
    index.save(path)
    back = ix.EntityIndex.load(path)
    assert back.ann.kind == "hnsw" and back.ann.config == index.ann.config
    assert torch.equal(back.ann_topk(queries, 5)[1], index.ann_topk(queries, 5)[1])
    # Loaded memory-mapped, the graph is read in place in the file; a copy shares it until its first edit, which
    # makes the copy its own (FAISS aborts the process on growing a graph it does not own).
    assert back.ann.zero_copy and not ix.EntityIndex.load(path, mmap=False).ann.zero_copy
    copy = sv.copy_for_write(back)
    copy.remove(["Q101"])
    assert int((back.ann.slot_rows >= 0).sum()) == 60 and int((copy.ann.slot_rows >= 0).sum()) == 59
    assert copy.add(_encode(world, EXTRA[1:2], dtype="int8", codecs=index.codecs)) == {"added": 1, "replaced": 0}
    assert not copy.ann.zero_copy and copy.ann.index is not back.ann.index
    assert back.ann.zero_copy and back.ann.index.ntotal == 62 and copy.ann.index.ntotal == 63
    assert copy.qids[copy.ann_topk(queries, 1)[1][0, 0]] == "Q101"
    assert torch.equal(back.ann_topk(queries, 5)[1], index.ann_topk(queries, 5)[1])


def test_scan_ann_projection_search_updates_and_round_trip(world, tmp_path):
    pytest.importorskip("faiss")
    # The projection keeps the fewest dimensions (a multiple of 16) holding ANN_SCAN_ENERGY of the second moment.
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0][:, :20]
    vectors = torch.randn(3000, 20, generator=g) @ basis.T + 0.01 * torch.randn(3000, 64, generator=g)
    ann = ix.AnnIndex.build(vectors, kind="scan")
    assert ann.config["dims"] == 32 and ann.config["energy"] >= ix.ANN_SCAN_ENERGY and ann.config["code"] == "pq4"
    assert ann.default_refine(10) == ix.ANN_SCAN_REFINE_MIN and ann.default_refine(100) == 100 * ix.ANN_SCAN_REFINE
    queries = torch.randn(40, 20, generator=g) @ basis.T
    exact = (queries @ vectors.T).topk(10, dim=1).indices
    found = ann.search(queries, 200)
    assert (exact.unsqueeze(2) == found.unsqueeze(1)).any(2).float().mean() >= 0.95
    with pytest.raises(ValueError, match="'pq4'"):
        ix.AnnIndex.build(vectors, kind="scan", code="sq8")
    few = ix.AnnIndex.build(vectors[:5], kind="scan")  # fewer vectors than the 16 codes of a dimension
    assert few.search(vectors[:5], 1).flatten().tolist() == [0, 1, 2, 3, 4]

    model, processor = world["model"], world["processor"]
    index = _encode(world, DISTINCT, dtype="int8")
    feats = rk.encode_mentions(model, processor, [_mention_of(r) for r in DISTINCT[:20]])
    exact = rk.rank(model, feats, index, candidates=10)
    index.build_ann(kind="scan")
    # Its default shortlist (ANN_SCAN_REFINE_MIN rows) holds the whole 60-row KB: exact; a short one keeps the top 1.
    assert torch.equal(rk.rank(model, feats, index, candidates=10, stage1="ann").indices, exact.indices)
    short = rk.rank(model, feats, index, candidates=10, stage1="ann", ann_refine=20)
    assert short.indices[:, 0].tolist() == exact.indices[:, 0].tolist()
    # Removed rows leave the codes (the later slots move up), added and replaced rows are found.
    index.remove(["Q3", "Q7"])
    assert index.ann.index.ntotal == 58 and index.ann.slot_rows.tolist() == list(range(58))
    assert index.add(_encode(world, EXTRA, dtype="int8", codecs=index.codecs)) == {"added": 2, "replaced": 0}
    assert index.ann.index.ntotal == len(index) == 60 and sorted(index.ann.slot_rows.tolist()) == list(range(60))
    queries = model.mention_stage1(
        rk.encode_mentions(model, processor, [_mention_of(EXTRA[1]), _mention_of(DISTINCT[3])])
    ).float()
    rows = index.ann_topk(queries, 60)[1]
    assert index.qids[rows[0, 0]] == "Q101"
    assert not {"Q3", "Q7"} & {index.qids[r] for r in rows.flatten().tolist()}
    assert sorted(rows[0].tolist()) == list(range(len(index)))  # every row exactly once
    assert index.add(_encode(world, EXTRA[1:2], dtype="int8", codecs=index.codecs)) == {"added": 0, "replaced": 1}
    assert index.ann.index.ntotal == 60 and index.qids[index.ann_topk(queries, 1)[1][0, 0]] == "Q101"
    path = str(tmp_path / "scan")
    index.save(path)
    back = ix.EntityIndex.load(path)
    assert back.ann.kind == "scan" and back.ann.config == index.ann.config
    assert not back.ann.zero_copy  # FAISS copies fast-scan codes out of the mapped file: nothing is read in place
    assert torch.equal(back.ann_topk(queries, 5, refine=20)[1], index.ann_topk(queries, 5, refine=20)[1])
    copy = sv.copy_for_write(back)
    copy.remove(["Q101"])
    assert back.ann.index.ntotal == 60 and copy.ann.index.ntotal == 59 and copy.ann.index is not back.ann.index
    assert "Q101" not in {copy.qids[r] for r in copy.ann_topk(queries, 10)[1].flatten().tolist()}


KILL_SCRIPT = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
torch.set_num_threads(1)
import index_otmel as ix
import test_index as T
from modeling_otmel import OTMELModel
from processing_otmel import OTMELProcessor

model = OTMELModel.from_pretrained({model!r}).eval()
processor = OTMELProcessor.from_pretrained({model!r})
real_save, saved = ix.EntityIndex.save, []

def save_then_die(self, directory):
    real_save(self, directory)
    saved.append(directory)
    if len(saved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # killed right after the second shard is on disk

ix.EntityIndex.save = save_then_die
ix.build_index(model, processor, T.DISTINCT, {out!r}, dtype="res2", shard_size=12, batch_size=5, progress=False)
"""


def test_sharded_build_resumes_after_a_kill(world, tmp_path, monkeypatch):
    import subprocess

    model_dir, out = str(tmp_path / "model"), str(tmp_path / "index")
    world["model"].save_pretrained(model_dir)
    world["processor"].save_pretrained(model_dir)
    script = KILL_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"), model=model_dir, out=out)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    shards = sorted(n for n in os.listdir(os.path.join(out, "shards")) if n.startswith("shard-"))
    assert shards == ["shard-00000-of-00005", "shard-00001-of-00005"] and not os.path.exists(
        os.path.join(out, ix.INDEX_META)
    )

    model = OTMELModel.from_pretrained(model_dir).eval()
    processor = OTMELProcessor.from_pretrained(model_dir)
    encoded = []
    real_encode = model.encode_entities

    def counting(*args, **kwargs):
        out = real_encode(*args, **kwargs)
        encoded.append(out.text_global.shape[0])
        return out

    monkeypatch.setattr(model, "encode_entities", counting)
    monkeypatch.setattr(ix, "train_codecs", lambda *a, **k: pytest.fail("the codecs were trained again"))
    index = ix.build_index(model, processor, DISTINCT, out, dtype="res2", shard_size=12, batch_size=5, progress=False)
    assert sum(encoded) == 36  # shards 2, 3 and 4 only
    assert index.qids == [r["qid"] for r in DISTINCT] and not os.path.exists(os.path.join(out, "shards"))
    assert index.meta["kb"] == ix.kb_fingerprint(DISTINCT)
    again = ix.EntityIndex.load(out, model=model, processor=processor, kb=DISTINCT)
    single = ix.encode_kb(model, processor, DISTINCT, batch_size=12, progress=False, dtype="res2", codecs=again.codecs)
    feats = rk.encode_mentions(model, processor, MENTIONS)
    a, b = rk.rank(model, feats, again, candidates=10), rk.rank(model, feats, single, candidates=10)
    assert torch.equal(a.indices, b.indices) and torch.allclose(a.scores, b.scores, atol=1e-4)
    # Another KB in the same folder's shards is refused; one shard at a time, then a merge, works.
    os.makedirs(os.path.join(out, "shards"))
    ix.build_index(model, processor, DISTINCT, out, dtype="int8", num_shards=2, shard_index=1, progress=False)
    with pytest.raises(ix.IndexMismatchError, match="shards of another build"):
        ix.build_index(model, processor, DISTINCT[:30], out, dtype="int8", num_shards=2, shard_index=0)
    with pytest.raises(FileNotFoundError, match="shard 0 of 2 is missing"):
        ix.merge_shards(out)
    ix.build_index(model, processor, DISTINCT, out, dtype="int8", num_shards=2, shard_index=0, progress=False)
    merged = ix.merge_shards(out, ann=True)
    assert merged.qids == [r["qid"] for r in DISTINCT] and merged.ann is not None and merged.meta["dtype"] == "int8"


def _distributed_encode(rank, world_size, port, model_dir, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = OTMELModel.from_pretrained(model_dir).eval()
        processor = OTMELProcessor.from_pretrained(model_dir)
        encoded = []
        real_encode = model.encode_entities
        model.encode_entities = lambda *a, **k: encoded.append(k["input_ids"].shape[0]) or real_encode(*a, **k)
        index = ix.encode_kb(model, processor, DISTINCT, batch_size=8, progress=False, dtype="res2", distributed=True)
        torch.save(
            {
                "encoded": sum(encoded),
                "qids": list(index.qids),
                "vectors": index.stage1_vectors(torch.arange(len(index))),
                "centroids": index.codecs["text_queries"].centroids,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_distributed_encoding_encodes_each_entity_once(world, tmp_path):
    import socket

    import torch.multiprocessing as mp

    model_dir = str(tmp_path / "model")
    world["model"].save_pretrained(model_dir)
    world["processor"].save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_encode, args=(2, port, model_dir, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(str(tmp_path / f"rank{r}.pt")) for r in (0, 1))
    # Rank 0 also encodes the codec-training sample (2048 rows at most: all 60 here); the KB rows once in all.
    assert r0["encoded"] - len(DISTINCT) + r1["encoded"] == len(DISTINCT) and r1["encoded"] == len(DISTINCT) // 2
    assert r0["qids"] == r1["qids"] == [r["qid"] for r in DISTINCT]
    assert torch.equal(r0["vectors"], r1["vectors"]) and torch.equal(r0["centroids"], r1["centroids"])
    single = _encode(world, DISTINCT, dtype="res2")
    assert torch.allclose(r0["vectors"], single.stage1_vectors(torch.arange(len(single))), atol=1e-2)


def test_convert_index_changes_the_storage_without_encoding(world, tmp_path, monkeypatch):
    model, processor = world["model"], world["processor"]
    source = str(tmp_path / "f32")
    _encode(world, DISTINCT).save(source)
    monkeypatch.setattr(model, "encode_entities", lambda *a, **k: pytest.fail("the KB was encoded again"))
    out = ix.convert_index(source, str(tmp_path / "res2"), "res2", rows=range(10, 50), shard_size=15, ann=False)
    assert out.meta["dtype"] == "res2" and "text_queries@codes" in out.tensors
    assert out.qids == [r["qid"] for r in DISTINCT[10:50]] and out.meta["kb"] == ix.kb_fingerprint(DISTINCT[10:50])
    monkeypatch.undo()
    feats = rk.encode_mentions(model, processor, [_mention_of(r) for r in DISTINCT[10:20]])
    rows = torch.arange(40).expand(10, 40)
    exact = _encode(world, DISTINCT[10:50])
    so = rk.score_rows(model, feats, out, rows, rk.RankOptions())
    assert (so - rk.score_rows(model, feats, exact, rows, rk.RankOptions())).abs().max() < 2e-2


def test_index_cli_names_what_is_missing(tmp_path, capsys):
    """`otmel-index` on a folder without shards, or a source index that does not exist: one error line, exit 2."""
    assert ix.main(["--out_dir", str(tmp_path / "empty"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "holds no shards to merge" in err and "Traceback" not in err
    assert (
        ix.main(["--out_dir", str(tmp_path / "out"), "--convert_from", str(tmp_path / "nope"), "--dtype", "res2"]) == 2
    )
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_ann_settings_and_the_cli_ann_kind(world, tmp_path):
    assert ix.ann_build_args("auto", ix.ANN_MIN_ROWS - 1) is None and ix.ann_build_args("auto", ix.ANN_MIN_ROWS) == {}
    assert ix.ann_build_args(True, 1) == {} and ix.ann_build_args(False, 10**9) is None
    assert ix.ann_build_args({"kind": "hnsw", "min_rows": 10}, 9) is None
    assert ix.ann_build_args({"kind": "hnsw", "min_rows": 10}, 10) == {"kind": "hnsw"}
    with pytest.raises(ValueError, match="ann must be"):
        ix.ann_build_args("yes", 10)
    pytest.importorskip("faiss")
    source = str(tmp_path / "source")
    _encode(world, DISTINCT, dtype="float32").save(source)
    cases = (
        (["--ann", "yes"], ix.ANN_DEFAULT_KIND),
        (["--ann", "yes", "--ann_kind", "ivf"], "ivf"),
        (["--ann", "yes", "--ann_kind", "hnsw"], "hnsw"),
        (["--ann", "yes", "--ann_kind", "scan"], "scan"),
        (["--ann_kind", "hnsw"], None),
    )
    assert ix.ANN_DEFAULT_KIND == "scan"
    assert ix.ann_default_code(ix.ANN_FLAT_BELOW - 1) == "flat" and ix.ann_default_code(ix.ANN_FLAT_BELOW) == "sq8"
    for i, (flags, kind) in enumerate(cases):
        out = str(tmp_path / f"out-{i}")
        assert ix.main(["--out_dir", out, "--convert_from", source, "--dtype", "int8", *flags]) == 0
        ann = ix.EntityIndex.load(out).ann
        assert (ann.kind if ann is not None else None) == kind  # "auto": 60 entities are searched exactly


def test_kb_rows_repeated_qids_refused_and_unnamed_entities_counted(world, caplog):
    """In-memory KBs (lists or Datasets): a repeated or empty qid is an error naming the rows (the file loaders keep the
    first row with a warning instead); an entity without a name is kept, with one counted warning."""
    from datasets import Dataset

    rows = [KB[0], {**KB[1], "qid": "Q0"}, KB[2]]
    with pytest.raises(ValueError, match=r"1 repeated qid\(s\): 'Q0' \(rows 0 and 1\)"):
        _encode(world, rows)
    table = Dataset.from_dict({"qid": ["Q1", "Q2", "Q1"], "name": ["a", "b", "c"], "attributes": ["", "", ""]})
    with pytest.raises(ValueError, match=r"'Q1' \(rows 0 and 2\)"):
        ix.KBView(table)
    with pytest.raises(ValueError, match="KB row 1: empty qid"):
        ix.KBView(Dataset.from_dict({"qid": ["Q1", " "], "name": ["a", "b"]}))
    unnamed = [{**KB[0], "name": ""}, {**KB[1], "name": None}, {k: v for k, v in KB[2].items() if k != "name"}, KB[3]]
    with caplog.at_level("WARNING", logger="index_otmel"):
        index = _encode(world, unnamed)
    assert len(index) == 4 and list(index.names[:3]) == ["", "", ""]
    assert "3 of 4 KB entities have an empty name (qid 'Q0', 'Q1', 'Q2')" in caplog.text


def test_index_json_contradicting_its_files_is_refused(world, tmp_path):
    """The JSON is not under a checksum: what it says of the rows, the storage and the ANN structure is checked against
    the files themselves."""
    pytest.importorskip("faiss")
    path = str(tmp_path / "index")
    index = _encode(world, DISTINCT, dtype="res2")
    index.build_ann(kind="scan")
    index.save(path)
    meta_path, _, meta = _files(path)
    cases = (
        ({"size": 7}, "says 7 entities, the tensors hold 60"),
        ({"dtype": "float32"}, "says storage dtype 'float32', but text_queries is stored as"),
        ({"dtype": "res4"}, "says storage dtype 'res4'"),
        ({"dtype": "bogus"}, "unknown storage dtype 'bogus'"),
        ({"ann": {**meta["ann"], "kind": "hnsw"}}, "of kind 'hnsw', the file holds a FAISS IndexPreTransform"),
    )
    for change, message in cases:
        _rewrite_meta(meta_path, {**meta, **change})
        with pytest.raises(ix.IndexCorruptError, match=re.escape(message)):
            ix.EntityIndex.load(path, verify=False)
    _rewrite_meta(meta_path, meta)
    assert len(ix.EntityIndex.load(path)) == len(DISTINCT)


def test_index_cli_refuses_sizes_below_one_and_conversion_keeps_storage_and_ann(world, tmp_path, capsys):
    pytest.importorskip("faiss")
    source = str(tmp_path / "source")
    _encode(world, DISTINCT, dtype="res2").save(source)
    for flag in ("--shard_size", "--batch_size", "--num_shards", "--threads"):
        with pytest.raises(SystemExit) as stop:
            ix.main(["--out_dir", str(tmp_path / "x"), "--model", "m", "--kb", "k", flag, "0"])
        assert stop.value.code == 2
        assert f"argument {flag}: must be a positive integer (1 or more), got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -1"):
        ix.build_index(world["model"], world["processor"], KB, str(tmp_path / "api"), batch_size=-1, progress=False)
    assert not os.path.exists(tmp_path / "api")  # refused before any shard plan is written
    hnsw = str(tmp_path / "hnsw")
    assert ix.main(["--out_dir", hnsw, "--convert_from", source, "--ann", "yes", "--ann_kind", "hnsw"]) == 0
    kept = str(tmp_path / "kept")
    assert ix.main(["--out_dir", kept, "--convert_from", hnsw]) == 0  # no --dtype, no --ann: as the source
    out = ix.EntityIndex.load(kept)
    assert out.meta["dtype"] == "res2" and out.ann is not None and out.ann.kind == "hnsw"
    plain = str(tmp_path / "plain")
    assert ix.main(["--out_dir", plain, "--convert_from", hnsw, "--dtype", "int8", "--ann", "no"]) == 0
    out = ix.EntityIndex.load(plain)
    assert out.meta["dtype"] == "int8" and out.ann is None
