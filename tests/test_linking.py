"""Whole-KB linking (index_otmel, ranking_otmel, metrics_otmel, linking_otmel): two-stage ranking against exhaustive S_O, the entity index (round trip,
refusals), mentions with missing / unreadable pictures, the CLI, gold ranks with ties. A random tiny CLIP: these tests
check consistency, not quality."""

import io
import json
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

from datasets import Dataset, Features, Image, Value  # noqa: E402
from tiny_worlds import noise_png as _png  # noqa: E402
from tiny_worlds import tiny_model_folder  # noqa: E402

import index_otmel as ix  # noqa: E402
import linking_otmel as lk  # noqa: E402
import metrics_otmel as mx  # noqa: E402
import ranking_otmel as rk  # noqa: E402
from modeling_otmel import OTMELModel  # noqa: E402


FIRST = "ada bob cyd dan eve fay gus hal ivy jon kim lea max ned ora pat".split()
LAST = "smith jones brown".split()
JOBS = "doctor singer painter writer actor pilot chef judge nurse baker farmer poet".split()
CITIES = "paris london rome oslo lima cairo".split()
KB_SIZE = 24
DUPLICATE_OF = {23: 5}  # row 23 is an exact copy of row 5 under another qid (a tie the ranks must not hide)


def _kb_rows():
    rows = []
    for i in range(KB_SIZE):
        src = DUPLICATE_OF.get(i, i)
        rows.append(
            {
                "qid": f"Q{100 + i}",
                "name": f"{FIRST[src % 16]} {LAST[src % 3]}",
                "attributes": f"works as a {JOBS[src % 12]}. lives in {CITIES[src % 6]}.",
                "image": {"bytes": _png(src), "path": None} if src % 4 else None,
            }
        )
    return rows


KB_FEATURES = Features(
    {"qid": Value("string"), "name": Value("string"), "attributes": Value("string"), "image": Image()}
)


def _kb_dataset(rows=None):
    rows = rows or _kb_rows()
    return Dataset.from_dict({k: [r[k] for r in rows] for k in KB_FEATURES}, features=KB_FEATURES)


def _mentions(n=10):
    out = []
    for i in range(n):
        gold = (3 * i) % KB_SIZE
        src = DUPLICATE_OF.get(gold, gold)
        out.append(
            {
                "mention": FIRST[src % 16] if i % 2 else f"{FIRST[src % 16]} {LAST[src % 3]}",
                "sentence": f"the {JOBS[src % 12]} was seen in {CITIES[src % 6]} yesterday",
                "image": PILImage.open(io.BytesIO(_png(src))) if i % 3 == 0 else None,
                "answer": f"Q{100 + gold}",
            }
        )
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("linking")
    rows = _kb_rows()
    texts = [f"{r['name']} [SEP] {r['attributes']}" for r in rows] + [
        f"{m['mention']} {m['sentence']}" for m in _mentions()
    ]
    model, processor, model_dir = tiny_model_folder(str(root), texts)
    clip_dir = str(root / "clip")
    kb = _kb_dataset(rows)
    index = ix.encode_kb(model, processor, kb, batch_size=7, progress=False)
    _make_duplicates_identical(index)
    return {
        "root": root,
        "clip_dir": clip_dir,
        "model": model,
        "processor": processor,
        "model_dir": model_dir,
        "kb": kb,
        "index": index,
    }


def _make_duplicates_identical(index):
    # Encoded in different batches, the copies could differ in the last bit; the tie tests need exact equality.
    for copy, src in DUPLICATE_OF.items():
        index.retrieval[copy] = index.retrieval[src]
        for t in index.tensors.values():
            t[copy] = t[src]


def _gold(index, mentions):
    return torch.tensor([index.row_of(m["answer"]) for m in mentions])


def test_stage1_and_candidate_scores_match_model_score(world):
    model, index = world["model"], world["index"]
    feats = rk.encode_mentions(model, world["processor"], _mentions())
    entities = index.gather(torch.arange(len(index)))
    with torch.no_grad():
        for assignment in ("ot", "attention"):
            ref = model.score(feats, entities, assignment=assignment)
            s_r = model.mention_stage1(feats) @ index.retrieval.T
            torch.testing.assert_close(s_r, ref.retrieval, atol=1e-5, rtol=0)
            rows = torch.arange(len(index)).flip(0).expand(feats.text_global.shape[0], -1)
            aligned = model.score_candidates(feats, index.gather(rows), assignment=assignment).overall
            torch.testing.assert_close(aligned, ref.overall.flip(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("assignment", ["ot", "attention"])
def test_two_stage_with_all_candidates_is_exhaustive(world, assignment):
    model, index = world["model"], world["index"]
    mentions = _mentions()
    feats = rk.encode_mentions(model, world["processor"], mentions)
    gold = _gold(index, mentions)
    kw = dict(candidates=len(index), assignment=assignment, gold=gold, chunk_size=100_000)
    two = rk.rank(model, feats, index, strategy="two_stage", **kw)
    full = rk.rank(model, feats, index, strategy="exhaustive", **kw)
    assert two.indices.shape == (len(mentions), len(index))
    assert torch.equal(two.indices, full.indices)
    torch.testing.assert_close(two.scores, full.scores, atol=1e-5, rtol=0)
    assert torch.equal(two.gold_ranks, full.gold_ranks)
    assert torch.equal(two.stage1_gold_ranks, full.stage1_gold_ranks)
    # Small chunks change nothing but the batching.
    small = rk.rank(
        model,
        feats,
        index,
        strategy="two_stage",
        candidates=len(index),
        assignment=assignment,
        gold=gold,
        chunk_size=5,
        stage1_budget=3 * len(index),
    )
    assert torch.equal(small.indices, two.indices) and torch.equal(small.gold_ranks, two.gold_ranks)


def test_two_stage_gold_ranks_follow_the_protocol(world):
    model, index = world["model"], world["index"]
    mentions = _mentions()
    feats = rk.encode_mentions(model, world["processor"], mentions)
    gold = _gold(index, mentions)
    k = 4
    res = rk.rank(model, feats, index, strategy="two_stage", candidates=k, top_k=k, gold=gold)
    s_r = model.mention_stage1(feats) @ index.retrieval.T
    cand = s_r.topk(k, dim=1).indices
    for i in range(len(mentions)):
        g = int(gold[i])
        assert set(res.indices[i].tolist()) == set(cand[i].tolist())
        if g in res.indices[i].tolist():
            pos = res.indices[i].tolist().index(g)
            others = torch.cat([res.scores[i, :pos], res.scores[i, pos + 1 :]])
            assert res.gold_ranks[i] == 1 + int((others >= res.scores[i, pos]).sum())
        else:
            outside = torch.ones(len(index), dtype=torch.bool)
            outside[cand[i]] = False
            outside[g] = False
            assert res.gold_ranks[i] == k + 1 + int((s_r[i][outside] >= s_r[i, g]).sum())
        assert res.stage1_gold_ranks[i] == 1 + int((s_r[i] > s_r[i, g]).sum()) + int((s_r[i] == s_r[i, g]).sum()) - 1


def test_gold_rank_helpers_count_ties_against_the_gold():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.5, 0.9, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2]])
    gold = torch.tensor([1, 0, 3])
    assert mx.gold_ranks_exhaustive(scores, gold).tolist() == [2, 3, 4]
    assert mx.gold_ranks_exhaustive(scores, gold, ties="optimistic").tolist() == [1, 3, 1]
    assert mx.gold_ranks_exhaustive(scores, torch.tensor([-1, 0, 0])).tolist() == [-1, 3, 4]
    # Two-stage: candidates [1, 2] re-ranked by S_O; the rest follow in S_R order.
    s_r = torch.tensor([[0.3, 0.9, 0.8, 0.3, 0.3, 0.1]] * 4)
    cand = torch.tensor([[1, 2]] * 4)
    s_o = torch.tensor([[0.4, 0.4]] * 4)
    gold = torch.tensor([1, 2, 0, 5])
    assert mx.gold_ranks_two_stage(s_r, cand, s_o, gold).tolist() == [2, 2, 5, 6]
    assert mx.gold_ranks_two_stage(s_r, cand, s_o, gold, ties="optimistic").tolist() == [1, 1, 3, 6]
    with pytest.raises(ValueError, match="ties"):
        mx.gold_ranks_exhaustive(scores, gold[:3], ties="random")


def test_duplicate_entity_tie_is_not_in_the_gold_favour(world):
    model, index = world["model"], world["index"]
    src, copy = next(iter(DUPLICATE_OF.items()))[::-1]
    mention = [{"mention": "x", "sentence": "y", "image": None, "answer": f"Q{100 + src}"}]
    feats = rk.encode_mentions(model, world["processor"], mention)
    for strategy in ("two_stage", "exhaustive"):
        kw = dict(strategy=strategy, candidates=len(index), gold=torch.tensor([src]))
        pess = rk.rank(model, feats, index, **kw)
        opt = rk.rank(model, feats, index, ties="optimistic", **kw)
        row = pess.indices[0].tolist()
        assert pess.scores[0, row.index(src)] == pess.scores[0, row.index(copy)]
        assert int(pess.gold_ranks[0]) == int(opt.gold_ranks[0]) + 1
        assert int(pess.stage1_gold_ranks[0]) == int(opt.stage1_gold_ranks[0]) + 1


def test_ranking_metrics_and_recall():
    m = mx.ranking_metrics([1, 2, 4, 30, -1], ks=(1, 3, 5))
    assert (
        m["hits@1"] == pytest.approx(0.2) and m["hits@3"] == pytest.approx(0.4) and m["hits@5"] == pytest.approx(0.6)
    )
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 30) / 5)
    assert m["n"] == 5 and m["n_gold_missing"] == 1
    assert mx.stage1_recall([1, 12, 60, -1], ks=(10, 50, 100)) == {
        "recall@10": 0.25,
        "recall@50": 0.5,
        "recall@100": 0.75,
    }


def test_evaluate_kb_on_a_mentions_split(world):
    mentions = _mentions(6)
    mentions[2]["answer"] = "nil"
    ds = Dataset.from_list([{**m, "image": None} for m in mentions])
    result = rk.rank_mentions(
        world["model"], world["processor"], world["index"], ds, gold_qids=ds["answer"], batch_size=4
    )
    metrics, ranks = rk.evaluation_metrics(result), result.gold_ranks
    assert ranks.shape == (6,) and ranks[2] == -1 and metrics["n_gold_missing"] == 1
    assert {"hits@1", "hits@20", "mrr", "stage1_recall@10"} <= set(metrics)


def test_index_round_trip_and_float16(world, tmp_path):
    linker = lk.OTMELLinker.from_pretrained(world["model_dir"])
    linker.build_index(world["kb"], progress=False)
    mentions = _mentions()
    before = linker.link(mentions, top_k=5, candidates=8)
    linker.save_index(str(tmp_path / "index"))
    again = lk.OTMELLinker.from_pretrained(world["model_dir"])
    again.load_index(str(tmp_path / "index"), kb=world["kb"])
    assert again.link(mentions, top_k=5, candidates=8) == before
    assert all(len(r) == 5 and set(r[0]) == {"qid", "name", "score"} for r in before)
    assert all(r[i]["score"] >= r[i + 1]["score"] for r in before for i in range(4))
    half = ix.encode_kb(linker.model, linker.processor, world["kb"], progress=False, dtype="float16")
    assert half.tensors["text_queries"].dtype == torch.float16 and half.retrieval.dtype == torch.float32
    assert half.nbytes() < linker.index.nbytes()
    linker.index = half
    for a, b in zip(linker.link(mentions, top_k=5, candidates=8), before):
        assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=2e-3)


def test_index_refuses_another_model_or_kb(world, tmp_path):
    index, model, processor = world["index"], world["model"], world["processor"]
    path = str(tmp_path / "index")
    index.save(path)
    ix.EntityIndex.load(path, model=model, processor=processor)  # the same model loads
    other = OTMELModel.from_clip(world["clip_dir"], hidden_size=32)  # new random heads
    with pytest.raises(ix.IndexMismatchError, match="model weights differ"):
        ix.EntityIndex.load(path, model=other)
    mean_pool = OTMELModel.from_clip(world["clip_dir"], hidden_size=32, pooling="mean")
    mean_pool.load_state_dict(model.state_dict())
    with pytest.raises(ix.IndexMismatchError, match="model setting pooling: index has 'softpool', given 'mean'"):
        ix.EntityIndex.load(path, model=mean_pool)
    rows = _kb_rows()
    rows[3]["attributes"] = "works as a spy."
    with pytest.raises(ix.IndexMismatchError, match="KB content differs"):
        ix.EntityIndex.load(path, kb=_kb_dataset(rows))
    rows = _kb_rows()
    rows[7]["image"] = None
    with pytest.raises(ix.IndexMismatchError, match="KB content differs"):
        ix.EntityIndex.load(path, kb=_kb_dataset(rows))
    rows = _kb_rows()
    rows[4]["qid"] = "Q999"
    with pytest.raises(ix.IndexMismatchError, match="first at row 4"):
        ix.EntityIndex.load(path, kb=_kb_dataset(rows))
    with pytest.raises(ix.IndexMismatchError, match="KB size differs"):
        ix.EntityIndex.load(path, kb=_kb_dataset(_kb_rows()[:-1]))
    ix.EntityIndex.load(path, kb=_kb_dataset(_kb_rows()))


def test_mentions_without_or_with_unreadable_image_link(world, tmp_path):
    linker = lk.OTMELLinker(world["model"], world["processor"], world["index"], batch_size=3)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png(1)[:200])
    good = tmp_path / "good.png"
    good.write_bytes(_png(2))
    images = [None, str(corrupt), str(tmp_path / "missing.jpg"), str(truncated), str(good), b"garbage", _png(3)]
    mentions = [{"mention": "ada smith", "sentence": "a doctor in paris", "image": image} for image in images]
    results = linker.link(mentions, top_k=3, candidates=6)
    assert len(results) == len(images) and all(len(r) == 3 for r in results)
    # An unreadable picture is "no image": exactly the result of giving none.
    for i in (1, 2, 3, 5):
        assert results[i] == results[0]
    for strategy in ("two_stage", "exhaustive"):
        assert len(linker.link(mentions[:2], top_k=2, strategy=strategy, assignment="attention")) == 2


def _write_kb_folder(folder, kb):
    os.makedirs(os.path.join(folder, "data", "kb"), exist_ok=True)
    kb.to_parquet(os.path.join(folder, "data", "kb", "train-00000-of-00001.parquet"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(
            "---\nconfigs:\n- config_name: kb\n  data_files:\n  - split: train\n    path: data/kb/*.parquet\n---\n"
        )


def test_cli_skips_bad_lines_and_reuses_the_index(world, tmp_path, capsys):
    kb_dir = str(tmp_path / "kb")
    _write_kb_folder(kb_dir, world["kb"])
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png(1))
    (tmp_path / "pics" / "bad.jpg").write_bytes(b"nope")
    lines = [
        json.dumps({"id": "m1", "mention": "ada smith", "sentence": "a doctor in paris", "image": "pics/a.png"}),
        "{not json",
        json.dumps({"sentence": "bob jones"}),
        "",
        json.dumps({"mention": "cyd brown", "sentence": "a painter", "image": "pics/bad.jpg"}),
        json.dumps(["a", "list"]),
        json.dumps({"mention": "dan smith", "sentence": "a writer", "image": None}),
    ]
    src = tmp_path / "mentions.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "results.jsonl"
    index_dir = str(tmp_path / "index")
    args = [
        "--model",
        world["model_dir"],
        "--kb",
        kb_dir,
        "--input",
        str(src),
        "--output",
        str(out),
        "--index_dir",
        index_dir,
        "--top_k",
        "3",
        "--candidates",
        "5",
        "--batch_size",
        "2",
    ]
    assert lk.main(args) == 0
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "line 3: missing or non-string field(s) mention" in err
    assert "line 6: expected a JSON object" in err and "line 5: unreadable image" in err
    assert "linked 3 mention(s), skipped 3 bad line(s) (line 2, 3, 6), 1 unreadable image(s)" in err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in results] == [1, 5, 7] and results[0]["id"] == "m1"
    assert all(len(r["candidates"]) == 3 for r in results)
    first = out.read_text()
    # Second run: the saved index is loaded (and checked against the KB); an index folder works as --kb too.
    assert lk.main(args) == 0
    assert "loaded entity index" in capsys.readouterr().err and out.read_text() == first
    assert (
        lk.main(
            [
                "--model",
                world["model_dir"],
                "--kb",
                index_dir,
                "--input",
                str(src),
                "--output",
                str(out),
                "--top_k",
                "3",
                "--candidates",
                "5",
                "--batch_size",
                "2",
            ]
        )
        == 0
    )
    assert out.read_text() == first
    # A changed KB is refused, with the reason.
    rows = _kb_rows()
    rows[0]["name"] = "zed"
    changed_dir = str(tmp_path / "kb2")
    _write_kb_folder(changed_dir, _kb_dataset(rows))
    assert lk.main([changed_dir if a == kb_dir else a for a in args]) == 2
    assert "KB content differs" in capsys.readouterr().err


def test_models_without_pairwise_matching(world):
    model = OTMELModel.from_clip(world["clip_dir"], hidden_size=32, fusion_assignment="off", unimodal_assignment="off")
    index = ix.encode_kb(model, world["processor"], world["kb"], progress=False)
    assert set(index.tensors) == {"has_image"} and set(index.splits) == {"text_global", "visual_global"}
    mentions = _mentions()
    feats = rk.encode_mentions(model, world["processor"], mentions)
    gold = _gold(index, mentions)
    two = rk.rank(model, feats, index, candidates=3, gold=gold)
    full = rk.rank(model, feats, index, strategy="exhaustive", candidates=3, gold=gold)
    assert torch.equal(two.indices, full.indices) and torch.equal(two.stage1_gold_ranks, two.gold_ranks)
