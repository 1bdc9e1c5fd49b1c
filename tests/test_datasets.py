"""Tests for datasets_scripts/: the synthetic world generator and the MIMIC-layout converter."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
# `pytest tests/...` (not `python -m pytest`) does not put the repo root on sys.path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from datasets_scripts import convert_mimic as cm  # noqa: E402
from datasets_scripts import make_synthetic as ms  # noqa: E402


# ---------------------------------------------------------------------------------------------
# helpers


def _jpeg(colour=(200, 30, 30), mode="RGB", size=(16, 16)) -> bytes:
    im = Image.new("RGB", size, colour)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def _png(mode="RGBA", size=(16, 16)) -> bytes:
    im = Image.new("RGBA", size, (10, 200, 10, 128))
    if mode == "P":
        im = Image.new("RGB", size, (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGBA":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _truncated() -> bytes:
    data = _jpeg(size=(64, 64))
    return data[: len(data) // 2]


def _write(path: Path, data, ascii_only: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, (bytes, bytearray)):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data, ensure_ascii=ascii_only), encoding="utf-8")


def assert_counts_add_up(summary: dict) -> None:
    for config, splits in summary["configs"].items():
        for split, s in splits.items():
            assert s["input_rows"] == s["rows"] + sum(s["skipped"].values()), (config, split, s)
            assert s["rows"] == sum(s["images"].values()), (config, split, s)
            if "files" in s:
                f = s["files"]
                assert f["listed"] == f["used"] + f["missing"] + f["unreadable"] + f["unsafe path"] + f["not checked"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# generator


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    ms.generate(out, entities=60, mentions=160, seed=3, image_size=32, workers=1)
    return out


def test_generator_is_deterministic(small_world, tmp_path):
    # Two workers here against one in the fixture: pictures must not depend on scheduling.
    again = tmp_path / "again"
    ms.generate(again, entities=60, mentions=160, seed=3, image_size=32, workers=2)
    a, b = _tree(small_world), _tree(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    other = tmp_path / "other"
    ms.generate(other, entities=60, mentions=160, seed=4, image_size=32, workers=1)
    assert (other / "kb_entity.json").read_bytes() != a["kb_entity.json"]


def test_generator_layout(small_world):
    kb = json.loads((small_world / "kb_entity.json").read_text(encoding="utf-8"))
    qid2id = json.loads((small_world / "qid2id.json").read_text(encoding="utf-8"))
    assert len(kb) == 60 and {e["qid"]: e["id"] for e in kb} == qid2id
    for e in kb:
        assert set(e) == {"id", "qid", "type", "entity_name", "attr", "image_list"}
        assert " " not in e["entity_name"] and quote(unquote(e["entity_name"])) == e["entity_name"]
        assert e["attr"].count(".") >= 3
        for name in e["image_list"]:
            with Image.open(small_world / "kb_image" / name) as im:
                assert im.format == "JPEG" and im.size == (32, 32)
    assert 0.05 < sum(not e["image_list"] for e in kb) / len(kb) < 0.4
    names = {unquote(e["entity_name"]) for e in kb}
    assert len(names) < len(kb)  # namesakes exist
    counts = {}
    for split in ("train", "dev", "test"):
        rows = json.loads((small_world / f"Synth_{split}.json").read_text(encoding="utf-8"))
        counts[split] = len(rows)
        for m in rows:
            assert set(m) == {"id", "mentions", "sentence", "imgPath", "answer"}
            assert m["answer"] in qid2id and unquote(m["mentions"]) in m["sentence"]
            if m["imgPath"]:
                stem = os.path.basename(m["imgPath"]).split(".", 1)[0]
                assert (small_world / "mention_image" / f"{stem}.jpg").is_file()
    assert counts == {"train": 112, "dev": 24, "test": 24}
    assert cm.is_mimic_layout(small_world) and not cm.is_mimic_layout(small_world / "kb_image")


def test_ceilings_sane():
    # No pictures needed for the ceilings: use the world builder directly, on a world big enough
    # for stable shares.
    world = ms.build_world(600, 2000, seed=0)
    ceil = ms.compute_ceilings(world)["splits"]
    assert set(ceil) == {"train", "dev", "test"}
    for split, s in ceil.items():
        for r in ("name_only", "text_only", "image_only", "both"):
            assert 0 < s[r]["h1"] <= s[r]["mrr"] <= 1
        assert s["both"]["h1"] >= s["text_only"]["h1"] >= s["name_only"]["h1"]
        assert s["both"]["h1"] >= s["image_only"]["h1"] >= s["name_only"]["h1"]
        assert s["text_only"]["h1"] < s["both"]["h1"] - 0.03, split
        assert s["image_only"]["h1"] < s["both"]["h1"] - 0.03, split
        assert s["both"]["mrr"] >= max(s["text_only"]["mrr"], s["image_only"]["mrr"])
    assert ceil["train"]["both"]["h1"] > 0.88
    assert ceil["train"]["text_only"]["h1"] < 0.9 and ceil["train"]["image_only"]["h1"] < 0.75


def test_text_ceiling_recomputed_from_files(small_world):
    # An independent reader that sees only the written files must reach exactly the text-only
    # ceiling the generator claims: the ceiling is not using hidden information.
    kb = json.loads((small_world / "kb_entity.json").read_text(encoding="utf-8"))
    vocab = set(ms.OCCUPATIONS) | set(ms.CITIES) | set(ms.ORGANISATIONS)
    words_of = {e["qid"]: {w.strip(".,") for w in e["attr"].split()} & vocab for e in kb}
    by_surface = {}
    for e in kb:
        full = unquote(e["entity_name"])
        for s in {full, *full.split()}:
            by_surface.setdefault(s, []).append(e["qid"])
    ceilings = json.loads((small_world / "ceilings.json").read_text(encoding="utf-8"))
    for split in ("train", "dev", "test"):
        rows = json.loads((small_world / f"Synth_{split}.json").read_text(encoding="utf-8"))
        total = 0.0
        for m in rows:
            cands = by_surface[unquote(m["mentions"])]
            seen = {w.strip(".,") for w in m["sentence"].split()} & set().union(*(words_of[c] for c in cands))
            consistent = [c for c in cands if seen <= words_of[c]]
            assert m["answer"] in consistent
            total += 1 / len(consistent)
        assert total / len(rows) == pytest.approx(ceilings["splits"][split]["text_only"]["h1"], abs=1e-6)


def test_generator_cli(tmp_path, capsys):
    assert (
        ms.main(
            [
                str(tmp_path / "w"),
                "--entities",
                "12",
                "--mentions",
                "20",
                "--seed",
                "1",
                "--image-size",
                "16",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "both" in capsys.readouterr().out
    assert (tmp_path / "w" / "ceilings.json").is_file()


def test_generator_refuses_a_folder_that_is_not_its_world(tmp_path, capsys):
    """A non-empty folder that holds no world (someone's own data) is never written into without --overwrite; an
    earlier world of the generator is regenerated in place."""
    small = ["--entities", "12", "--mentions", "20", "--image-size", "16", "--workers", "1", "--no-progress"]
    data = tmp_path / "mimic"
    data.mkdir()
    (data / "kb_entity.json").write_text("mine")
    capsys.readouterr()
    assert ms.main([str(data), *small]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data} is not empty and holds no world of make_synthetic.py") and "\n" not in err
    assert sorted(os.listdir(data)) == ["kb_entity.json"] and (data / "kb_entity.json").read_text() == "mine"
    with pytest.raises(ValueError, match="refusing to write into it"):
        ms.generate(data, entities=12, mentions=20, image_size=16, workers=1)
    (tmp_path / "a_file").write_text("x")
    assert ms.main([str(tmp_path / "a_file"), *small]) == 2
    # --overwrite writes there; then the folder is a world, which a later run may regenerate.
    assert ms.main([str(data), *small, "--overwrite"]) == 0
    assert ms.synthetic_world(data)["entities"] == 12
    assert ms.main([str(data), *small[2:], "--entities", "14"]) == 0
    assert ms.synthetic_world(data)["entities"] == 14
    assert ms.synthetic_world(tmp_path) is None


# ---------------------------------------------------------------------------------------------
# converter on a clean synthetic world


def test_convert_synthetic_world(small_world, tmp_path):
    summary = cm.convert(small_world, tmp_path / "hf", num_proc=2, verbose=False)  # exercises the pool
    assert_counts_add_up(summary)
    kb = json.loads((small_world / "kb_entity.json").read_text(encoding="utf-8"))
    assert summary["dataset"] == "Synth"
    k = summary["configs"]["kb"]["train"]
    assert k["rows"] == 60 and k["images"]["found"] == sum(bool(e["image_list"]) for e in kb)
    for split, raw in (("train", "train"), ("validation", "dev"), ("test", "test")):
        rows = json.loads((small_world / f"Synth_{raw}.json").read_text(encoding="utf-8"))
        s = summary["configs"]["mentions"][split]
        assert s["rows"] == len(rows) and sum(s["skipped"].values()) == 0
        assert s["images"]["found"] == sum(bool(m["imgPath"]) for m in rows)
        assert s["images"]["missing"] == s["images"]["unreadable"] == s["reencoded"] == 0
    assert (tmp_path / "hf" / "ceilings.json").read_bytes() == (small_world / "ceilings.json").read_bytes()


def test_mention_images_folder_spelling(small_world, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(small_world / "kb_image", raw / "kb_image")
    for p in small_world.glob("*.json"):
        (raw / p.name).write_bytes(p.read_bytes())
    (raw / "mention_images").mkdir()
    for p in (small_world / "mention_image").iterdir():
        (raw / "mention_images" / p.name).write_bytes(p.read_bytes())
    summary = cm.convert(raw, tmp_path / "hf", verbose=False)
    assert_counts_add_up(summary)
    assert summary["mention_image_dirs"] == ["mention_images"]
    s = summary["configs"]["mentions"]["train"]
    assert s["images"]["found"] > 0 and s["images"]["missing"] == 0
    # kb_image is a symlink to another folder here: a legitimate layout, not an unsafe path
    assert summary["configs"]["kb"]["train"]["images"]["unsafe path"] == 0


def test_fingerprint_and_cache(small_world, tmp_path):
    fp = cm.fingerprint_raw_dir(small_world)
    assert fp == cm.fingerprint_raw_dir(small_world)
    out, summary = cm.cached_convert(small_world, tmp_path / "cache", verbose=False)
    assert out.name == f"Synth-{fp}" and summary["fingerprint"] == fp
    out2, _ = cm.cached_convert(small_world, tmp_path / "cache", verbose=False)
    assert out2 == out
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in small_world.glob("*.json"):
        (copy / p.name).write_bytes(p.read_bytes())
    (copy / "Synth_test.json").write_text("[]", encoding="utf-8")
    assert cm.fingerprint_raw_dir(copy) != fp


def test_output_folder_protection(small_world, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        cm.convert(small_world, foreign, overwrite=True, verbose=False)
    assert (foreign / "precious.txt").read_text() == "keep me"
    out = tmp_path / "hf"
    cm.convert(small_world, out, verbose=False)
    with pytest.raises(FileExistsError):
        cm.convert(small_world, out, verbose=False)
    cm.convert(small_world, out, overwrite=True, verbose=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


# ---------------------------------------------------------------------------------------------
# converter on dirty data

LONG_SENTENCE = " ".join(f"word{i}" for i in range(5000))


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    base = tmp_path_factory.mktemp("dirty")
    raw = base / "datasets" / "Dirty"
    kb_img, m_img = raw / "kb_image", raw / "mention_image"
    good = _jpeg()
    _write(base / "outside.jpg", _jpeg((1, 2, 3)))  # must never be read
    _write(base / "datasets" / "secret.jpg", _jpeg((4, 5, 6)))
    _write(kb_img / "Q1.jpg", good)
    _write(kb_img / "Q3.jpg", _png("RGBA"))
    _write(kb_img / "Q4.jpg", _jpeg(mode="L"))
    _write(kb_img / "Q5.jpg", _png("P"))
    _write(kb_img / "Q6.jpg", _jpeg(mode="CMYK"))
    _write(kb_img / "Q7_bad.jpg", b"this is not a picture")
    _write(kb_img / "Q7_good.jpg", good)
    _write(kb_img / "Q8.jpg", _truncated())
    kb = [
        {
            "id": 100,
            "qid": "Q1",
            "type": "person",
            "entity_name": "John%20Smith",
            "attr": "A painter. Lives in Oslo.",
            "image_list": ["Q1.jpg"],
        },
        {"id": 7, "qid": "Q2", "entity_name": "Q%20Two", "attr": "Gone.", "image_list": ["Q2.jpg"]},  # missing file
        {"id": 3, "qid": "Q3", "entity_name": "Rgba", "attr": "", "image_list": ["Q3.jpg"]},
        {"id": 4, "qid": "Q4", "entity_name": "Grey", "attr": "x.", "image_list": ["Q4.jpg"]},
        {"id": 5, "qid": "Q5", "entity_name": "Palette", "attr": "x.", "image_list": ["Q5.jpg"]},
        {"id": 6, "qid": "Q6", "entity_name": "Cmyk", "attr": "x.", "image_list": ["Q6.jpg"]},
        {
            "id": 8,
            "qid": "Q7",
            "entity_name": "Second",
            "attr": "x.",
            "image_list": ["Q7_bad.jpg", "Q7_good.jpg", "x.jpg"],
        },
        {"id": 9, "qid": "Q8", "entity_name": "Truncated", "attr": "x.", "image_list": ["Q8.jpg"]},
        {"id": 10, "qid": "Q1", "entity_name": "Duplicate", "attr": "dup.", "image_list": []},  # duplicate qid
        {"id": 11, "qid": "Q9", "entity_name": "Escape", "attr": "x.", "image_list": ["../../secret.jpg"]},
        {"id": 12, "qid": "Q10", "entity_name": quote("Zoë 😀 Ångström"), "attr": "Émoji 🎉.", "image_list": []},
        {"id": 13, "qid": "Q11", "entity_name": "NoPicture", "attr": "x.", "image_list": []},
    ]
    _write(raw / "kb_entity.json", kb)
    _write(raw / "qid2id.json", {e["qid"]: e["id"] for e in kb})

    _write(m_img / "m0.jpg", good)
    _write(m_img / "m2.jpg", b"\x00garbage")
    _write(m_img / "m3.jpg", _truncated())
    _write(m_img / "m4.jpg", _png("RGBA"))
    _write(m_img / "m5.jpg", _jpeg(mode="L"))
    _write(m_img / "m6.jpg", _png("P"))
    _write(m_img / "m7.jpg", _jpeg(mode="CMYK"))
    _write(m_img / "m8.jpg", good)
    _write(m_img / "m9.v2.png", _png("RGB"))
    os.symlink(base / "outside.jpg", m_img / "m11.jpg")
    _write(m_img / "passwd.jpg", good)  # what a basename-only lookup of ../../etc/passwd would find

    def m(i, img="", answer="Q1", sentence="A sentence.", mention="John%20Smith"):
        return {"id": f"m{i}", "mentions": mention, "sentence": sentence, "imgPath": img, "answer": answer}

    train = [
        m(0, "mention_image/m0.jpg"),
        m(1, "m1.jpg"),  # missing
        m(2, "m2.jpg"),  # corrupt
        m(3, "m3.jpg"),  # truncated
        m(4, "m4.jpg"),  # PNG RGBA named .jpg
        m(5, "m5.jpg"),  # greyscale
        m(6, "m6.jpg"),  # palette
        m(7, "m7.jpg"),  # CMYK
        m(8, "some/dir/m8.extra.dots.png"),  # extra dots and directories
        m(9, "m9.v2.png"),  # no m9.jpg: exact basename
        m(10, "../../etc/passwd"),  # traversal
        m(11, "m11.jpg"),  # symlink leaving the folder
        m(12, "m0.jpg", answer="nil"),
        m(13, "m0.jpg", answer="Q999"),
        m(14, "", sentence=""),
        m(15, "", sentence=LONG_SENTENCE),
        m(16, "", sentence="Zoë 😀 was at the café 🎉.", mention=quote("Zoë 😀"), answer="Q10"),
        m(17, "", answer="NIL"),
        m(18, "", sentence="lone \ud83d surrogate"),
        {"id": 19, "mentions": "Q%20Two", "sentence": "int id", "imgPath": "/abs/elsewhere/m0.jpg", "answer": "Q2"},
    ]
    # \u escapes here (the lone surrogate cannot be written as UTF-8), raw UTF-8 in the KB file
    _write(raw / "Dirty_train.json", train, ascii_only=True)
    _write(raw / "Dirty_dev.json", [m(100, "m0.jpg"), m(101, "", answer="Q404")])
    _write(raw / "Dirty_test.json", [m(200, "m8.jpg", answer="Q11")])

    reads = []
    real_decode = cm._decode

    def recording_decode(path):
        reads.append(os.path.realpath(path))
        return real_decode(path)

    logger = logging.getLogger(cm.__name__)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cm, "_decode", recording_decode)
            summary = cm.convert(raw, base / "hf", num_proc=1, verbose=False)
    finally:
        logger.removeHandler(handler)
    from datasets import load_dataset

    cache = base / "hf_cache"
    mentions = load_dataset(str(base / "hf"), "mentions", cache_dir=str(cache))
    kbds = load_dataset(str(base / "hf"), "kb", cache_dir=str(cache))["train"]
    return {
        "raw": raw,
        "summary": summary,
        "reads": reads,
        "logs": [r.getMessage() for r in records],
        "mentions": mentions,
        "kb": kbds,
        "m": {r["id"]: r for r in mentions["train"]},
        "e": {r["qid"]: r for r in kbds},
    }


def _is_rgb(im) -> bool:
    return im is not None and im.convert("RGB").size[0] > 0 and im.mode == "RGB"


def test_dirty_counts_add_up(dirty):
    s = dirty["summary"]
    assert_counts_add_up(s)
    t = s["configs"]["mentions"]["train"]
    assert t["input_rows"] == 20 and t["rows"] == 19 and t["nil"] == 2  # NIL rows are kept (answer "nil")
    assert t["skipped"] == {"answer not in KB": 1}
    assert t["images"] == {"found": 9, "no image": 5, "missing": 1, "unreadable": 2, "unsafe path": 2}
    assert t["reencoded"] == 5
    v = s["configs"]["mentions"]["validation"]
    assert v["rows"] == 1 and v["skipped"]["answer not in KB"] == 1
    k = s["configs"]["kb"]["train"]
    assert k["input_rows"] == 12 and k["rows"] == 11 and k["skipped"] == {"duplicate qid": 1}
    assert k["images"] == {"found": 6, "no image listed": 2, "missing": 1, "unreadable": 1, "unsafe path": 1}
    assert k["files"] == {"listed": 11, "used": 6, "missing": 1, "unreadable": 2, "unsafe path": 1, "not checked": 1}


def test_dirty_warnings_carry_counts(dirty):
    logs = "\n".join(dirty["logs"])
    assert "skipped 1 of 20 rows: answer not in KB 1" in logs
    assert "duplicate qid 1" in logs
    assert "missing 1, unreadable 2, unsafe path 2" in logs
    assert "repaired 1 strings" in logs


def test_dirty_missing_mention_image(dirty):
    assert dirty["m"]["m1"]["image"] is None


def test_dirty_corrupt_and_truncated(dirty):
    assert dirty["m"]["m2"]["image"] is None and dirty["m"]["m3"]["image"] is None
    assert dirty["e"]["Q8"]["image"] is None


@pytest.mark.parametrize("mid", ["m4", "m5", "m6", "m7"])
def test_dirty_odd_formats_become_rgb(dirty, mid):
    assert _is_rgb(dirty["m"][mid]["image"])


@pytest.mark.parametrize("qid", ["Q3", "Q4", "Q5", "Q6"])
def test_dirty_odd_formats_in_kb(dirty, qid):
    assert _is_rgb(dirty["e"][qid]["image"])


def test_dirty_good_jpeg_kept_byte_for_byte(dirty):
    import pyarrow.parquet as pq

    out = Path(dirty["summary"]["out_dir"])
    table = pq.read_table(next((out / "data" / "mentions").glob("train-*.parquet")))
    first = table.column("image")[0].as_py()
    assert first["bytes"] == (dirty["raw"] / "mention_image" / "m0.jpg").read_bytes()


def test_dirty_imgpath_with_dots_and_directories(dirty):
    assert _is_rgb(dirty["m"]["m8"]["image"])  # some/dir/m8.extra.dots.png -> mention_image/m8.jpg
    assert _is_rgb(dirty["m"]["m9"]["image"])  # m9.v2.png, no m9.jpg -> the exact basename
    assert dirty["mentions"]["test"][0]["image"] is not None


def test_dirty_paths_leaving_the_folder_are_never_read(dirty):
    assert dirty["m"]["m10"]["image"] is None  # ../../etc/passwd: refused, although passwd.jpg exists
    assert dirty["m"]["m11"]["image"] is None  # symlink to a file outside
    assert dirty["e"]["Q9"]["image"] is None  # ../../secret.jpg in image_list
    raw_real = os.path.realpath(dirty["raw"])
    assert dirty["reads"] and all(p.startswith(raw_real + os.sep) for p in dirty["reads"])
    assert not any(p.endswith("passwd.jpg") for p in dirty["reads"])
    # an absolute imgPath only contributes its basename
    assert dirty["m"]["19"]["image"] is not None


def test_dirty_answers_nil_kept_and_out_of_kb_skipped(dirty):
    ids = set(dirty["m"])
    assert "m13" not in ids  # Q999: neither nil nor a KB qid
    assert dirty["m"]["m12"]["answer"] == dirty["m"]["m17"]["answer"] == "nil"  # "nil" and "NIL", kept as "nil"
    assert all(
        r["answer"] in dirty["e"] or r["answer"] == "nil" for split in dirty["mentions"].values() for r in split
    )


def test_dirty_sentences_kept(dirty):
    assert dirty["m"]["m14"]["sentence"] == ""
    assert dirty["m"]["m15"]["sentence"] == LONG_SENTENCE
    assert dirty["m"]["m18"]["sentence"] == "lone \ufffd surrogate"


def test_dirty_unicode_and_emoji(dirty):
    assert dirty["m"]["m16"]["mention"] == "Zoë 😀"
    assert dirty["m"]["m16"]["sentence"] == "Zoë 😀 was at the café 🎉."
    assert dirty["e"]["Q10"]["name"] == "Zoë 😀 Ångström" and dirty["e"]["Q10"]["attributes"] == "Émoji 🎉."


def test_dirty_duplicate_qid_keeps_first(dirty):
    assert dirty["e"]["Q1"]["name"] == "John Smith"
    assert [r["qid"] for r in dirty["kb"]].count("Q1") == 1


def test_dirty_kb_ids_not_dense_and_missing_entity_image(dirty):
    assert len(dirty["kb"]) == 11
    assert dirty["e"]["Q2"]["image"] is None and dirty["e"]["Q2"]["image_names"] == ["Q2.jpg"]
    assert dirty["e"]["Q11"]["image"] is None and dirty["e"]["Q11"]["image_names"] == []
    # the first listed picture that decodes is used; the list is kept whole
    assert _is_rgb(dirty["e"]["Q7"]["image"])
    assert dirty["e"]["Q7"]["image_names"] == ["Q7_bad.jpg", "Q7_good.jpg", "x.jpg"]


def test_load_dataset_round_trip(dirty):
    from datasets import Image as ImageFeature
    from datasets import List, Value

    mentions, kb = dirty["mentions"], dirty["kb"]
    assert list(mentions) == ["train", "validation", "test"]
    f = mentions["train"].features
    assert list(f) == ["id", "mention", "sentence", "image", "answer"]
    assert isinstance(f["image"], ImageFeature) and f["id"] == Value("string") and f["answer"] == Value("string")
    assert list(kb.features) == ["qid", "name", "attributes", "image", "image_names"]
    assert isinstance(kb.features["image"], ImageFeature)
    assert kb.features["image_names"] == List(Value("string"))
    assert dirty["m"]["19"]["id"] == "19"  # integer ids become strings
    for split in mentions.values():
        for r in split:
            assert r["image"] is None or _is_rgb(r["image"])
    for r in kb:
        assert r["image"] is None or _is_rgb(r["image"])
    card = (Path(dirty["summary"]["out_dir"]) / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "config_name: kb" in card and "license:" in card
    assert "duplicate qid: 1" in card


# ---------------------------------------------------------------------------------------------
# malformed input stops the conversion


def _minimal(raw: Path, kb=None, train=None):
    _write(
        raw / "kb_entity.json",
        kb if kb is not None else [{"id": 0, "qid": "Q1", "entity_name": "A", "attr": "", "image_list": []}],
    )
    _write(
        raw / "Bad_train.json",
        train if train is not None else [{"id": "0", "mentions": "A", "sentence": "", "imgPath": "", "answer": "Q1"}],
    )


@pytest.mark.parametrize(
    "case, where",
    [
        ("kb_not_json", "kb_entity.json"),
        ("train_not_list", "Bad_train.json"),
        ("row_missing_answer", "Bad_train.json: row 1"),
        ("row_not_object", "Bad_train.json: row 0"),
        ("kb_missing_qid", "kb_entity.json: row 0"),
    ],
)
def test_malformed_input_raises(tmp_path, case, where):
    raw = tmp_path / "raw"
    ok = {"id": "0", "mentions": "A", "sentence": "", "imgPath": "", "answer": "Q1"}
    if case == "kb_not_json":
        _minimal(raw)
        (raw / "kb_entity.json").write_text("[{not json", encoding="utf-8")
    elif case == "train_not_list":
        _minimal(raw, train={"rows": []})
    elif case == "row_missing_answer":
        _minimal(raw, train=[ok, {"id": "1", "mentions": "A", "sentence": "", "imgPath": ""}])
    elif case == "row_not_object":
        _minimal(raw, train=["just a string"])
    else:
        _minimal(raw, kb=[{"id": 0, "entity_name": "A"}])
    with pytest.raises(cm.MalformedDataError, match=where.replace(".", r"\.")) as err:
        cm.convert(raw, tmp_path / "out", verbose=False)
    assert isinstance(err.value, ValueError)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_cli(tmp_path):
    raw = tmp_path / "raw"
    _minimal(raw, train=[{"id": "0", "mentions": "A", "sentence": ""}])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = REPO / "datasets_scripts" / "convert_mimic.py"
    bad = subprocess.run(
        [sys.executable, str(script), str(raw), str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0 and "Bad_train.json: row 0" in bad.stderr and "'answer'" in bad.stderr
    _minimal(raw)
    good = subprocess.run(
        [sys.executable, str(script), str(raw), str(tmp_path / "out"), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert good.returncode == 0, good.stderr
    good = subprocess.run(
        [sys.executable, str(script), str(raw), str(tmp_path / "out"), "--overwrite"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert good.returncode == 0 and "mentions  train" in good.stdout


# ---------------------------------------------------------------------------------------------
# empty splits and KBs, named offenders, URL-quoted picture names


def _mention(i, answer="Q1", img=""):
    return {"id": f"m{i}", "mentions": "A", "sentence": "s.", "imgPath": img, "answer": answer}


def test_empty_split_left_out_and_the_others_load(tmp_path, caplog):
    from datasets import load_dataset

    raw = tmp_path / "raw"
    _minimal(raw, train=[_mention(0), _mention(1)])
    _write(raw / "Bad_dev.json", [])  # empty file
    _write(raw / "Bad_test.json", [_mention(0, answer="Q404"), _mention(1, answer="Q405")])  # every row skipped
    with caplog.at_level(logging.WARNING, logger=cm.__name__):
        summary = cm.convert(raw, tmp_path / "hf", verbose=False)
    assert_counts_add_up(summary)
    assert list(summary["data_files"]["mentions"]) == ["train"]
    assert summary["configs"]["mentions"]["validation"]["input_rows"] == 0  # still counted in the summary
    assert summary["configs"]["mentions"]["test"]["skipped"] == {"answer not in KB": 2}
    logs = caplog.text
    assert "mentions/validation (Bad_dev.json): no rows (0 in the file, 0 skipped)" in logs
    assert "mentions/test (Bad_test.json): no rows (2 in the file, 2 skipped)" in logs
    assert sorted(p.name for p in (tmp_path / "hf" / "data" / "mentions").iterdir()) == [
        "train-00000-of-00001.parquet"
    ]
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "split: train" in card and "split: validation" not in card and "split: test" not in card
    mentions = load_dataset(str(tmp_path / "hf"), "mentions", cache_dir=str(tmp_path / "cache"))
    assert list(mentions) == ["train"] and mentions["train"].num_rows == 2
    assert load_dataset(str(tmp_path / "hf"), "kb", cache_dir=str(tmp_path / "cache"))["train"].num_rows == 1


def test_no_mention_rows_in_any_split_raises(tmp_path):
    raw = tmp_path / "raw"
    _minimal(raw, train=[_mention(0, answer="Q404")])
    with pytest.raises(
        cm.MalformedDataError, match=r"no mention rows in any split \(Bad_train\.json: 1 rows, 1 skipped"
    ):
        cm.convert(raw, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_empty_kb_raises(tmp_path, capsys):
    raw = tmp_path / "raw"
    _minimal(raw, kb=[])
    with pytest.raises(cm.MalformedDataError, match=r"kb_entity\.json: no entities$"):
        cm.convert(raw, tmp_path / "out", verbose=False)
    assert cm.main([str(raw), str(tmp_path / "out"), "--quiet"]) == 2
    assert "kb_entity.json: no entities" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_kb_of_duplicates_or_empty_qids(tmp_path):
    # No KB can end with every row skipped: duplicates keep their first row, an empty qid stops the conversion.
    raw = tmp_path / "raw"
    _minimal(raw, kb=[{"qid": "Q1", "entity_name": "A"}, {"qid": "Q1", "entity_name": "B"}])
    summary = cm.convert(raw, tmp_path / "ok", verbose=False)
    assert summary["configs"]["kb"]["train"]["rows"] == 1
    assert summary["configs"]["kb"]["train"]["examples"] == {"duplicate qid": ["row 1: qid Q1 (first in row 0)"]}
    _minimal(raw, kb=[{"qid": "", "entity_name": "A"}, {"qid": "", "entity_name": "B"}])
    with pytest.raises(cm.MalformedDataError, match=r"kb_entity\.json: row 0: empty 'qid'"):
        cm.convert(raw, tmp_path / "out", verbose=False)


def test_dirty_warnings_name_offenders(dirty):
    # Each counted warning names its first offenders: row (0-based, as MalformedDataError), id or qid, picture.
    logs = "\n".join(dirty["logs"])
    assert "skipped 1 of 20 rows: answer not in KB 1. First: row 13 (id m13): answer Q999" in logs
    assert "duplicate qid 1. First: row 8: qid Q1 (first in row 0)" in logs
    assert (
        "missing 1, unreadable 2, unsafe path 2. First: row 1 (id m1): m1.jpg (missing: no mention_image/m1.jpg)"
        in logs
    )
    assert "row 2 (id m2): m2.jpg (unreadable: mention_image/m2.jpg: not a picture format PIL reads)" in logs
    assert "row 10 (id m10): ../../etc/passwd (unsafe path: '..' in the path)" in logs
    assert "row 11 (id m11): m11.jpg (unsafe path: mention_image/m11.jpg resolves outside the dataset folder)" in logs
    assert "row 1 (qid Q2): Q2.jpg (missing: no kb_image/Q2.jpg)" in logs
    assert "row 7 (qid Q8): Q8.jpg (unreadable: kb_image/Q8.jpg: " in logs
    assert "id m0)" not in logs and "id m14)" not in logs  # a found picture or imgPath "" is no offender
    # the same examples are kept per reason in the summary (conversion_summary.json)
    t = dirty["summary"]["configs"]["mentions"]["train"]["examples"]
    assert set(t) == {"answer not in KB", "missing", "unreadable", "unsafe path"}
    assert t["unreadable"][1].startswith("row 3 (id m3): m3.jpg (unreadable: mention_image/m3.jpg: ")
    saved = json.loads((Path(dirty["summary"]["out_dir"]) / "conversion_summary.json").read_text(encoding="utf-8"))
    assert saved["configs"]["kb"]["train"]["examples"]["unsafe path"] == [
        "row 9 (qid Q9): ../../secret.jpg (unsafe path: '..' in the path)"
    ]


def test_examples_are_capped(tmp_path, caplog):
    raw = tmp_path / "raw"
    _minimal(raw, train=[_mention(0)] + [_mention(i, answer=f"Q{900 + i}") for i in range(1, 9)])
    with caplog.at_level(logging.WARNING, logger=cm.__name__):
        summary = cm.convert(raw, tmp_path / "hf", verbose=False)
    ex = summary["configs"]["mentions"]["train"]["examples"]["answer not in KB"]
    assert len(ex) == cm.EXAMPLES and ex[0] == "row 1 (id m1): answer Q901"
    assert "answer not in KB 8. First: row 1 (id m1): answer Q901; " in caplog.text
    assert caplog.text.rstrip().endswith("; ...") and "Q906" not in caplog.text


def test_url_quoted_picture_names(tmp_path):
    base = tmp_path / "base"
    raw = base / "raw"
    _write(raw / "mention_image" / "Gödel pic.jpg", _jpeg())
    _write(raw / "kb_image" / "Kurt Gödel.jpg", _jpeg((0, 0, 200)))
    _write(base / "secret.jpg", _jpeg((4, 5, 6)))  # must never be read
    _write(raw / "mention_image" / "m1.jpg", _jpeg())  # exact name wins over nothing
    kb = [
        {"qid": "Q1", "entity_name": "Kurt%20G%C3%B6del", "image_list": ["Kurt%20G%C3%B6del.jpg"]},
        {"qid": "Q2", "entity_name": "Escape", "image_list": ["..%2Fsecret.jpg", "..%2F..%2Fsecret.jpg"]},
    ]
    train = [
        _mention(0, img="mention_image/G%C3%B6del%20pic.jpg"),
        _mention(1, img="mention_image/m1.jpg"),
        _mention(2, img="mention_image/..%2F..%2Fsecret.jpg"),
        _mention(3, img="mention_image/%2E%2E%2Fsecret.jpg"),
        _mention(4, img="mention_image/G%C3%B6del%20missing.jpg"),
    ]
    _minimal(raw, kb=kb, train=train)
    reads = []
    real_decode = cm._decode

    def recording_decode(path):
        reads.append(os.path.realpath(path))
        return real_decode(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cm, "_decode", recording_decode)
        summary = cm.convert(raw, tmp_path / "hf", verbose=False)
    assert_counts_add_up(summary)
    t = summary["configs"]["mentions"]["train"]
    assert t["images"] == {"found": 2, "no image": 0, "missing": 1, "unreadable": 0, "unsafe path": 2}
    assert (
        "(missing: no mention_image/G%C3%B6del%20missing.jpg or mention_image/Gödel missing.jpg)"
        in (t["examples"]["missing"][0])
    )
    k = summary["configs"]["kb"]["train"]
    assert k["images"]["found"] == 1 and k["images"]["unsafe path"] == 1
    assert all(p.startswith(os.path.realpath(raw) + os.sep) for p in reads)
    assert os.path.realpath(base / "secret.jpg") not in reads
    import pyarrow.parquet as pq

    out = tmp_path / "hf" / "data"
    m = pq.read_table(next((out / "mentions").glob("train-*.parquet"))).to_pylist()
    assert m[0]["image"]["bytes"] == (raw / "mention_image" / "Gödel pic.jpg").read_bytes()
    assert m[0]["image"]["path"] == "Gödel pic.jpg"
    e = pq.read_table(next((out / "kb").glob("train-*.parquet"))).to_pylist()
    assert e[0]["image"]["bytes"] == (raw / "kb_image" / "Kurt Gödel.jpg").read_bytes()
    assert e[0]["image_names"] == ["Kurt%20G%C3%B6del.jpg"]  # the list is kept as written
    assert e[1]["image"] is None


def test_empty_imgpath_means_no_picture(tmp_path, caplog):
    raw = tmp_path / "raw"
    _minimal(raw, train=[_mention(0, img=""), _mention(1, img="  "), {**_mention(2), "imgPath": None}])
    with caplog.at_level(logging.WARNING, logger=cm.__name__):
        summary = cm.convert(raw, tmp_path / "hf", verbose=False)
    t = summary["configs"]["mentions"]["train"]
    assert t["images"]["no image"] == 3 and t["rows"] == 3 and t["examples"] == {}
    assert "without their picture" not in caplog.text


def test_repeated_mention_ids_are_kept_and_warned(tmp_path, caplog):
    raw = tmp_path / "raw"
    _minimal(raw, train=[_mention(0), _mention(1), {**_mention(2), "id": "m0"}, {**_mention(3), "id": "m0"}])
    with caplog.at_level(logging.WARNING, logger=cm.__name__):
        summary = cm.convert(raw, tmp_path / "hf", verbose=False)
    t = summary["configs"]["mentions"]["train"]
    assert t["rows"] == 4 and t["repeated_ids"] == 2
    assert (
        "mentions/train (Bad_train.json): 2 rows repeat the id of an earlier row (kept; predictions name both by "
        "that id). First: row 2 (id m0, as row 0); row 3 (id m0, as row 0)" in caplog.text
    )


def test_work_folders_of_killed_conversions_are_removed(tmp_path):
    raw = tmp_path / "raw"
    _minimal(raw, train=[_mention(0)])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    abandoned = tmp_path / f".hf.tmp-{dead.pid}"
    running = tmp_path / f".hf.tmp-{os.getppid()}"  # a live process's folder is left alone
    for folder in (abandoned, running):
        (folder / "data").mkdir(parents=True)
    cm.convert(raw, tmp_path / "hf", verbose=False)
    assert not abandoned.exists() and running.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".hf.tmp-" + str(os.getppid()), "hf", "raw"])
