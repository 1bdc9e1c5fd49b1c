"""Tests for the hardness knobs of datasets_scripts/make_synthetic.py (partial names, picture share, style
shifts, several KB pictures per entity, NIL mentions, the hard preset)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from datasets_scripts import make_synthetic as ms  # noqa: E402


SMALL = {"entities": 60, "mentions": 160, "seed": 3, "image_size": 32, "workers": 1}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(world: Path, name: str):
    return json.loads((world / name).read_text(encoding="utf-8"))


def _rows(world: Path) -> list[dict]:
    return [m for split in ("train", "dev", "test") for m in _load(world, f"Synth_{split}.json")]


def _stem(m: dict) -> str:
    return os.path.basename(m["imgPath"]).split(".", 1)[0]


@pytest.fixture(scope="module")
def plain_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "world"
    ms.generate(out, **SMALL)
    return out


# ---------------------------------------------------------------------------------------------
# options


def test_default_options_are_version_1():
    assert ms._is_default(ms.resolve_options())
    assert ms._is_default(ms.resolve_options("default", partial_name_fraction=0.12, style_shift=0, nil_fraction=0))
    a = ms.build_world(80, 300, seed=2)
    b = ms.build_world(80, 300, seed=2, preset="default", style_shifts="jpeg,palette", partial_name_cues="rich")
    assert a["mentions"] == b["mentions"] and a["entities"] == b["entities"]


def test_default_files_carry_no_new_keys(plain_world):
    ceilings = _load(plain_world, "ceilings.json")
    assert "options" not in ceilings["world"]
    for s in ceilings["splits"].values():
        assert not {"n_nil", "n_in_kb", "nil_detectable"} & set(s)
    assert not any({"style", "nil"} & set(t) for t in _load(plain_world, "synth_truth.json"))


def test_preset_and_explicit_flags_compose():
    hard = ms.resolve_options("hard")
    assert hard["partial_name_fraction"] == 0.5 and hard["mention_image_fraction"] == 0.85
    assert hard["kb_images_per_entity"] == 2 and hard["style_shift"] > 0 and hard["style_shifts"] == ms.STYLE_SHIFTS
    mixed = ms.resolve_options("hard", style_shift=0.0, style_shifts="jpeg, rotate", nil_fraction=0.1)
    assert mixed["style_shift"] == 0.0 and mixed["style_shifts"] == ("rotate", "jpeg") and mixed["nil_fraction"] == 0.1
    assert mixed["partial_name_fraction"] == 0.5 and mixed["kb_images_per_entity"] == 2
    for bad in (
        {"style_shifts": "sepia"},
        {"partial_name_fraction": 1.5},
        {"nil_fraction": 1.0},
        {"kb_images_per_entity": -1},
        {"partial_name_cues": "rare"},
    ):
        with pytest.raises(ValueError):
            ms.resolve_options(**bad)
    with pytest.raises(ValueError):
        ms.resolve_options("impossible")
    with pytest.raises(ValueError, match="out of reach"):
        ms.build_world(60, 100, seed=0, mention_image_fraction=0.2)


def test_cli_preset_with_override(tmp_path, capsys):
    out = tmp_path / "w"
    args = [
        str(out),
        "--entities",
        "16",
        "--mentions",
        "40",
        "--seed",
        "1",
        "--image-size",
        "16",
        "--workers",
        "1",
        "--no-progress",
        "--preset",
        "hard",
        "--style_shift",
        "0",
        "--nil-fraction",
        "0.2",
    ]
    assert ms.main(args) == 0
    assert "NIL mentions" in capsys.readouterr().out
    options = _load(out, "ceilings.json")["world"]["options"]
    assert options["preset"] == "hard" and options["style_shift"] == 0.0 and options["nil_fraction"] == 0.2
    assert options["kb_images_per_entity"] == 2 and options["partial_name_fraction"] == 0.5
    assert ms.main([str(tmp_path / "x"), "--entities", "16", "--mentions", "8", "--style_shifts", "sepia"]) == 2


# ---------------------------------------------------------------------------------------------
# partial names, picture share, hard preset


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7])
def test_partial_name_fraction(fraction):
    world = ms.build_world(300, 3000, seed=1, partial_name_fraction=fraction)
    kinds = [m["name_kind"] for m in world["mentions"]]
    partial = sum(k != "full" for k in kinds) / len(kinds)
    assert partial == pytest.approx(fraction, abs=0.03)
    if fraction:
        assert kinds.count("first") / kinds.count("last") == pytest.approx(1.0, abs=0.2)
    for m in world["mentions"]:
        e = world["entities"][m["gold"]]
        assert m["surface"] == (e["name"] if m["name_kind"] == "full" else e[m["name_kind"]])


def test_partial_name_cues():
    rich = ms.build_world(200, 2000, seed=1, partial_name_fraction=0.5)
    plain = ms.build_world(200, 2000, seed=1, partial_name_fraction=0.5, partial_name_cues="plain")
    rich_partial = [m for m in rich["mentions"] if m["name_kind"] != "full"]
    plain_partial = [m for m in plain["mentions"] if m["name_kind"] != "full"]
    assert all(m["mode"] != "image" and len(m["cue_words"]) >= 2 for m in rich_partial)
    assert any(m["mode"] == "image" for m in plain_partial)
    assert any(m["mode"] != "image" and len(m["cue_words"]) == 1 for m in plain_partial)


def test_mention_image_fraction():
    world = ms.build_world(300, 3000, seed=5, mention_image_fraction=0.9)
    share = sum(m["image_kind"] != "none" for m in world["mentions"]) / 3000
    assert share == pytest.approx(0.9, abs=0.02)
    world = ms.build_world(300, 3000, seed=5, preset="hard")
    share = sum(m["image_kind"] != "none" for m in world["mentions"]) / 3000
    assert share == pytest.approx(0.85, abs=0.02)
    assert sum(m["name_kind"] != "full" for m in world["mentions"]) / 3000 == pytest.approx(0.5, abs=0.03)


def test_hard_preset_ceilings_lower():
    default = ms.compute_ceilings(ms.build_world(600, 2000, seed=0))["splits"]
    hard = ms.compute_ceilings(ms.build_world(600, 2000, seed=0, preset="hard"))["splits"]
    for split in ("train", "dev", "test"):
        assert hard[split]["both"]["h1"] < default[split]["both"]["h1"] - 0.03, split
        assert hard[split]["both"]["mrr"] < default[split]["both"]["mrr"], split
        assert hard[split]["name_only"]["h1"] < default[split]["name_only"]["h1"], split
    for r in ("text_only", "image_only"):
        assert hard["train"][r]["h1"] < default["train"][r]["h1"], r
    for s in hard.values():  # the usual order of the readers still holds
        assert s["both"]["h1"] >= max(s["text_only"]["h1"], s["image_only"]["h1"])
        assert min(s["text_only"]["h1"], s["image_only"]["h1"]) >= s["name_only"]["h1"] > 0


# ---------------------------------------------------------------------------------------------
# style shifts


def _close_counts(data: bytes, colours) -> list[int]:
    """Pixels within distance 60 of each of the given colours."""
    raw = Image.open(io.BytesIO(data)).convert("RGB").tobytes()
    counts = [0] * len(colours)
    for px in zip(raw[0::3], raw[1::3], raw[2::3]):
        for i, c in enumerate(colours):
            if sum((a - b) ** 2 for a, b in zip(px, c)) < 3600:
                counts[i] += 1
    return counts


def _top2(counts: list[int]) -> set[int]:
    return set(sorted(range(len(counts)), key=lambda i: -counts[i])[:2])


@pytest.mark.parametrize("style", [(), ("palette",), ("invert",), ("rotate",), ("rotate", "jpeg")])
def test_style_keeps_identity_readable(style):
    # A reader that knows the style finds the identity's two colours, through the palette map or the
    # negative, as the two commonest figure colours; the plain reading does not, for colour shifts.
    palette = ms._palette_permutation(7)
    inverted = [tuple(255 - v for v in c) for c in ms.COLOURS]
    for k, identity in enumerate([(0, 0, 1, 2, 0), (2, 3, 3, 7, 1), (1, 5, 0, 6, 0), (3, 4, 2, 1, 1)]):
        data = ms._render("mention", identity, f"7:mention:{k}", 64, style, palette)
        assert data != ms._render("mention", identity, f"7:mention:{k}", 64, (), palette) or not style
        colours = {i: ms.COLOURS[i] for i in range(len(ms.COLOURS))}
        if "palette" in style:
            colours = {i: ms.COLOURS[palette[i]] for i in colours}
        elif "invert" in style:
            colours = {i: inverted[i] for i in colours}
        counts = _close_counts(data, [colours[i] for i in range(len(ms.COLOURS))])
        assert _top2(counts) == {identity[1], identity[3]}, (style, identity, counts)
        if "palette" in style or "invert" in style:
            naive = _close_counts(data, ms.COLOURS)
            assert _top2(naive) != {identity[1], identity[3]}, (style, identity, naive)


def test_palette_map_is_a_derangement():
    for seed in range(5):
        perm = ms._palette_permutation(seed)
        assert sorted(perm) == list(range(len(ms.COLOURS))) and all(i != p for i, p in enumerate(perm))


def test_style_shift_changes_only_mention_pictures(plain_world, tmp_path):
    out = tmp_path / "shifted"
    ms.generate(out, **SMALL, style_shift=0.5)
    a, b = _tree(plain_world), _tree(out)
    assert a.keys() == b.keys()
    # The text side, the KB pictures and the unshifted mention pictures are those of the default world.
    for name in ("kb_entity.json", "qid2id.json", "Synth_train.json", "Synth_dev.json", "Synth_test.json"):
        assert a[name] == b[name], name
    assert all(a[k] == b[k] for k in a if k.startswith("kb_image/"))
    truth = {t["id"]: t for t in _load(out, "synth_truth.json")}
    shifted = same = 0
    for m in _rows(out):
        if not m["imgPath"]:
            assert "style" not in truth[m["id"]]
            continue
        key = f"mention_image/{_stem(m)}.jpg"
        style = truth[m["id"]].get("style")
        if style:
            shifted += 1
            assert a[key] != b[key] and 1 <= len(style) <= 2 and set(style) <= set(ms.STYLE_SHIFTS)
            assert not {"palette", "invert"} <= set(style)
        else:
            same += 1
            assert a[key] == b[key]
    assert shifted > 20 and same > 20
    # Same sets as the default world: the perfect reader knows the styles.
    plain_truth = _load(plain_world, "synth_truth.json")
    assert [t["set_sizes"] for t in plain_truth] == [truth[t["id"]]["set_sizes"] for t in plain_truth]
    assert _load(out, "ceilings.json")["splits"] == _load(plain_world, "ceilings.json")["splits"]
    assert set(_load(out, "ceilings.json")["world"]["options"]["palette_map"]) == set(ms.COLOUR_NAMES)


def test_style_family_restricts_shifts():
    world = ms.build_world(60, 400, seed=0, style_shift=1.0, style_shifts="outline,jpeg")
    styles = [m["style"] for m in world["mentions"] if m["image_kind"] != "none"]
    assert styles and all(s and set(s) <= {"outline", "jpeg"} for s in styles)
    world = ms.build_world(60, 400, seed=0, style_shift=1.0, style_shifts="rotate")
    assert {m["style"] for m in world["mentions"] if m["image_kind"] == "identity"} == {("rotate",)}
    assert {m["style"] for m in world["mentions"] if m["image_kind"] != "identity"} == {()}
    assert all(m["style"] == () for m in world["mentions"] if m["image_kind"] == "none")


# ---------------------------------------------------------------------------------------------
# several KB pictures, NIL mentions, determinism


def test_kb_images_per_entity(tmp_path):
    out = tmp_path / "kb3"
    ms.generate(out, **SMALL, kb_images_per_entity=3)
    kb = _load(out, "kb_entity.json")
    counts = [len(e["image_list"]) for e in kb]
    assert set(counts) == {0, 3} and 0.05 < counts.count(0) / len(kb) < 0.4
    world = ms.build_world(SMALL["entities"], SMALL["mentions"], SMALL["seed"], kb_images_per_entity=3)
    for e, row in zip(world["entities"], kb):
        assert e["qid"] == row["qid"]
        if e["image_list"]:
            assert e["image_styles"][0] == () and len(set(e["image_styles"])) == 3  # three different styles
            pictures = [(out / "kb_image" / name).read_bytes() for name in row["image_list"]]
            assert len(set(pictures)) == 3
    assert _load(out, "ceilings.json")["world"]["kb_images"] == sum(counts)


@pytest.fixture(scope="module")
def nil_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nil") / "world"
    ms.generate(out, **SMALL, nil_fraction=0.25)
    return out


def test_nil_fraction_withholds_whole_entities(nil_world, plain_world):
    kb, qid2id = _load(nil_world, "kb_entity.json"), _load(nil_world, "qid2id.json")
    plain_kb = _load(plain_world, "kb_entity.json")
    truth = {t["id"]: t for t in _load(nil_world, "synth_truth.json")}
    assert [e["id"] for e in kb] == list(range(len(kb))) and {e["qid"]: e["id"] for e in kb} == qid2id
    rows, plain_rows = _rows(nil_world), _rows(plain_world)
    assert [m["id"] for m in rows] == [m["id"] for m in plain_rows]  # same mentions, same splits
    withheld = set()
    for m, p in zip(rows, plain_rows):
        if m["answer"] == "nil":
            assert truth[m["id"]]["nil"] and truth[m["id"]]["withheld_qid"] == p["answer"]
            withheld.add(p["answer"])
        else:
            assert m["answer"] == p["answer"] and m["answer"] in qid2id and "nil" not in truth[m["id"]]
    n_nil = sum(m["answer"] == "nil" for m in rows)
    assert n_nil / len(rows) == pytest.approx(0.25, abs=0.04)
    assert not withheld & set(qid2id)  # withheld entities are gone from the KB ...
    assert all(p["answer"] in withheld for m, p in zip(rows, plain_rows) if m["answer"] == "nil")
    assert not any(p["answer"] in withheld for m, p in zip(rows, plain_rows) if m["answer"] != "nil")  # ... wholly
    assert len(kb) + len(withheld) == len(plain_kb)
    ceilings = _load(nil_world, "ceilings.json")
    assert ceilings["world"]["options"]["withheld_entities"] == len(withheld)
    for split, s in ceilings["splits"].items():
        split_rows = _load(nil_world, f"Synth_{split}.json")
        assert s["mentions"] == len(split_rows) and s["n_nil"] + s["n_in_kb"] == s["mentions"]
        assert s["n_nil"] == sum(m["answer"] == "nil" for m in split_rows)
        assert all(0 <= v <= 1 for v in s["nil_detectable"].values())
        assert s["nil_detectable"]["both"] >= s["nil_detectable"]["text_only"] >= s["nil_detectable"]["name_only"]


def test_nil_text_ceiling_recomputed_from_files(nil_world):
    # As in test_datasets: an independent reader over the written files (in-KB mentions only).
    kb = _load(nil_world, "kb_entity.json")
    vocab = set(ms.OCCUPATIONS) | set(ms.CITIES) | set(ms.ORGANISATIONS)
    words_of = {e["qid"]: {w.strip(".,") for w in e["attr"].split()} & vocab for e in kb}
    by_surface = {}
    for e in kb:
        full = unquote(e["entity_name"])
        for s in {full, *full.split()}:
            by_surface.setdefault(s, []).append(e["qid"])
    ceilings = _load(nil_world, "ceilings.json")["splits"]
    for split in ("train", "dev", "test"):
        total, n, empty, nil = 0.0, 0, 0, 0
        for m in _load(nil_world, f"Synth_{split}.json"):
            cands = by_surface.get(unquote(m["mentions"]), [])
            seen = {w.strip(".,") for w in m["sentence"].split()} & set().union(*(words_of[c] for c in cands))
            consistent = [c for c in cands if seen <= words_of[c]]
            if m["answer"] == "nil":
                nil += 1
                empty += not consistent
                continue
            n += 1
            total += 1 / len(consistent)
        assert total / n == pytest.approx(ceilings[split]["text_only"]["h1"], abs=1e-6)
        assert empty / max(nil, 1) == pytest.approx(ceilings[split]["nil_detectable"]["text_only"], abs=1e-6)


def test_converter_keeps_nil_mentions(nil_world, tmp_path):
    from datasets import load_dataset

    from datasets_scripts import convert_mimic as cm

    summary = cm.convert(nil_world, tmp_path / "hf", num_proc=1, verbose=False)
    ceilings = _load(nil_world, "ceilings.json")["splits"]
    converted = load_dataset(str(tmp_path / "hf"), "mentions", cache_dir=str(tmp_path / "cache"))
    for split, raw in (("train", "train"), ("validation", "dev"), ("test", "test")):
        s = summary["configs"]["mentions"][split]
        assert s["nil"] == ceilings[raw]["n_nil"] > 0 and s["skipped"]["answer not in KB"] == 0
        assert s["rows"] == ceilings[raw]["n_in_kb"] + ceilings[raw]["n_nil"]
        answers = converted[split]["answer"]
        assert answers.count("nil") == ceilings[raw]["n_nil"] and len(answers) == s["rows"]


def test_knobs_deterministic(tmp_path):
    kw = {**SMALL, "preset": "hard", "nil_fraction": 0.1, "style_shift": 1.0}
    ms.generate(tmp_path / "a", **kw)
    ms.generate(tmp_path / "b", **{**kw, "workers": 2})
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    ms.generate(tmp_path / "c", **{**kw, "seed": 4})
    assert (tmp_path / "c" / "kb_entity.json").read_bytes() != a["kb_entity.json"]
