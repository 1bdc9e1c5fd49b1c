"""The entity index (index_otmel): live updates (add / remove / replace), their consistency with a fresh build, with
link() and the stage-1 caches, and persistence after changes. A random tiny CLIP: these tests check consistency, not
quality."""

import io
import os
import sys

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from transformers import AutoImageProcessor, AutoTokenizer  # noqa: E402

import index_otmel as ix  # noqa: E402
import linking_otmel as lk  # noqa: E402
import ranking_otmel as rk  # noqa: E402
from modeling_otmel import OTMELModel  # noqa: E402
from processing_otmel import OTMELProcessor  # noqa: E402
from tiny_clip import build_tiny_clip  # noqa: E402


NAMES = "ada bob cyd dan eve fay gus hal ivy jon kim lea".split()
JOBS = "doctor singer painter writer actor pilot".split()
LONG = "a famous explorer who crossed the northern sea by boat and wrote many books about the trip"


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    array = (torch.rand(40, 52, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


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


MENTIONS = [_mention_of(r) for r in KB[:6]] + [{"mention": "zed", "sentence": "the explorer wrote books", "image": None}]


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


def test_reordered_or_removed_qids_are_refused(world, tmp_path):
    path = _saved(world, tmp_path)
    meta_path, _, meta = _files(path)
    meta["qids"][0], meta["qids"][1] = meta["qids"][1], meta["qids"][0]
    _rewrite_meta(meta_path, meta)
    with pytest.raises(ix.IndexCorruptError, match=f"{meta_path}: the qids list does not match its checksum.*rebuild"):
        ix.EntityIndex.load(path)
    meta["qids"][0], meta["qids"][1] = meta["qids"][1], meta["qids"][0]
    del meta["qids"][5]
    _rewrite_meta(meta_path, meta)
    with pytest.raises(ix.IndexCorruptError, match="qids list does not match"):
        ix.EntityIndex.load(path)
    meta["qids"].insert(5, "Q5")
    meta["names"][3] = "someone else"
    _rewrite_meta(meta_path, meta)
    with pytest.raises(ix.IndexCorruptError, match="names list does not match"):
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
    import safetensors.torch

    path = _saved(world, tmp_path)
    before = sorted(os.listdir(path))
    real_save = safetensors.torch.save_file

    def half_save(tensors, filename, *args, **kwargs):  # writes half a file, then dies
        real_save(tensors, filename, *args, **kwargs)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(safetensors.torch, "save_file", half_save)
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
