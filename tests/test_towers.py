"""Faster towers at inference (towers_otmel, OTMELLinker.from_pretrained(quantize=...), otmel-link --quantize): int8
and bfloat16 towers agree with float32 within the stated tolerance, an index of the float32 model serves the optimised
one (fingerprint), an index records the towers that encoded it, and the training path is untouched. A random tiny
CLIP (hidden 64, 2 layers): these tests check the tolerance and the bookkeeping, not linking quality."""

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

from tiny_worlds import noise_png as _png  # noqa: E402
from tiny_worlds import tiny_model_folder  # noqa: E402

import index_otmel as ix  # noqa: E402
import linking_otmel as lk  # noqa: E402
import towers_otmel as tw  # noqa: E402
from modeling_otmel import OTMELModel  # noqa: E402


# The tolerance of int8 (and bfloat16) towers, as docs/benchmarks.md ("Full-size towers") states it: S_O of a
# (mention, entity) pair moves by at most SCORE_TOLERANCE (cosine scale; measured at most 0.006 at full size, 0.0044
# here), so the top-1 entity can change only where the float32 first and second scores lie within 2 x SCORE_TOLERANCE
# of each other (a near tie), and at least 90% of the top-1 answers are the same.
SCORE_TOLERANCE = 0.01

FIRST = "ada bob cyd dan eve fay gus hal ivy jon kim lea".split()
LAST = "smith jones brown".split()
JOBS = "doctor singer painter writer actor pilot chef judge nurse baker".split()
CITIES = "paris london rome oslo lima".split()
KB_SIZE = 30


def _kb_rows():
    return [
        {
            "qid": f"Q{100 + i}",
            "name": f"{FIRST[i % 12]} {LAST[i % 3]}",
            "attributes": f"works as a {JOBS[i % 10]}. lives in {CITIES[i % 5]}.",
            "image": _png(i) if i % 4 else None,
        }
        for i in range(KB_SIZE)
    ]


def _mentions():
    return [
        {
            "mention": FIRST[g % 12] if i % 3 == 1 else f"{FIRST[g % 12]} {LAST[g % 3]}",
            "sentence": f"the {JOBS[g % 10]} was seen in {CITIES[g % 5]} yesterday",
            "image": PILImage.open(io.BytesIO(_png(g))) if i % 2 == 0 else None,
        }
        for i, g in enumerate(range(0, KB_SIZE, 2))
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("towers")
    rows = _kb_rows()
    texts = [f"{r['name']} [SEP] {r['attributes']}" for r in rows] + [
        f"{m['mention']} {m['sentence']}" for m in _mentions()
    ]
    model, processor, model_dir = tiny_model_folder(str(root), texts)
    reference = lk.OTMELLinker.from_pretrained(model_dir, quantize=None)
    reference.build_index(rows, progress=False)
    index_dir = str(root / "index")
    reference.save_index(index_dir)
    return {"root": root, "rows": rows, "model_dir": model_dir, "index_dir": index_dir, "reference": reference}


def _link_all(linker):
    return linker.link(_mentions(), top_k=KB_SIZE, strategy="exhaustive", nil_threshold=None)


def _check_tolerance(expected, got):
    """Every score within SCORE_TOLERANCE; a changed top-1 only at a float32 near tie. Returns the max difference."""
    worst = 0.0
    for exp, out in zip(expected, got):
        by_qid = {c["qid"]: c["score"] for c in out}
        diffs = [abs(by_qid[c["qid"]] - c["score"]) for c in exp]
        worst = max(worst, max(diffs))
        if out[0]["qid"] != exp[0]["qid"]:
            assert exp[0]["score"] - exp[1]["score"] <= 2 * SCORE_TOLERANCE, (exp[:2], out[:2])
    assert worst <= SCORE_TOLERANCE, worst
    return worst


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_optimised_linker_agrees_with_float32_on_a_float32_index(world, precision):
    linker = lk.OTMELLinker.from_pretrained(world["model_dir"], quantize=precision)
    assert tw.towers_precision(linker.model) == precision
    layer = linker.model.clip.text_model.encoder.layers[0].self_attn.q_proj
    if precision == "int8":
        assert type(layer).__module__.startswith("torch.ao.nn.quantized.dynamic")
    else:
        assert layer.weight.dtype == torch.bfloat16
    # The heads and the projections stay float32.
    assert linker.model.clip.text_projection.weight.dtype == torch.float32
    assert linker.model.text_matching.query.weight.dtype == torch.float32
    # The float32 model's index loads: same weights fingerprint, other towers.
    linker.load_index(world["index_dir"])
    assert ix.model_fingerprint(linker.model)["weights"] == linker.index.meta["model"]["weights"]
    expected, got = _link_all(world["reference"]), _link_all(linker)
    worst = _check_tolerance(expected, got)
    assert worst > 0  # the towers did change (the comparison is not of a model with itself)
    agree = sum(a[0]["qid"] == b[0]["qid"] for a, b in zip(expected, got)) / len(expected)
    assert agree >= 0.9, agree
    # A mention linked alone or in a batch: the same within the tolerance (int8 scales activations per batch).
    alone = [linker.link([m], top_k=KB_SIZE, strategy="exhaustive", nil_threshold=None)[0] for m in _mentions()[:4]]
    _check_tolerance(got[:4], alone)
    # Entities encoded by the optimised towers too: still within the tolerance, and the index says how it was built.
    linker.build_index(world["rows"], progress=False)
    assert (
        linker.index.meta["model"]["towers"] == precision and ix.index_towers(linker.index.meta["model"]) == precision
    )
    _check_tolerance(expected, _link_all(linker))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_loaded_in_half_precision_links(world, dtype, tmp_path):
    # from_pretrained(dtype=...) (pipeline(..., dtype=...)): the heads go back to float32 for the index's float32
    # features, the towers stay in the loaded dtype, and the scores are those of the float32 model within the tolerance.
    loaded = OTMELModel.from_pretrained(world["model_dir"], dtype=dtype)
    assert loaded.text_matching.query.weight.dtype == dtype
    linker = lk.OTMELLinker(loaded, world["reference"].processor)
    assert tw.towers_precision(linker.model) == str(dtype).removeprefix("torch.")
    assert linker.model.clip.text_model.encoder.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert linker.model.text_matching.query.weight.dtype == torch.float32
    linker.build_index(world["rows"], progress=False)
    _check_tolerance(_link_all(world["reference"]), _link_all(linker))
    # Its own index round-trips; the float32 model's is refused, saying why and what to do.
    linker.save_index(str(tmp_path / "half"))
    again = lk.OTMELLinker.from_pretrained(world["model_dir"], quantize=None, dtype=dtype)
    again.load_index(str(tmp_path / "half"), kb=world["rows"])
    assert again.link(_mentions()[:3], top_k=3) == linker.link(_mentions()[:3], top_k=3)
    with pytest.raises(
        ix.IndexMismatchError, match=f"the model was loaded in {str(dtype)[6:]}, which rounds its weights"
    ):
        again.load_index(world["index_dir"])
    with pytest.raises(RuntimeError, match="cannot be saved"):
        linker.model.save_pretrained(str(tmp_path / "no"))


def test_index_round_trip_records_the_towers(world, tmp_path):
    int8 = lk.OTMELLinker.from_pretrained(world["model_dir"], quantize="int8")
    int8.build_index(world["rows"], progress=False)
    path = str(tmp_path / "int8-index")
    int8.save_index(path)
    with open(os.path.join(path, ix.INDEX_META)) as f:
        assert json.load(f)["model"]["towers"] == "int8"
    reference = world["reference"]
    assert "towers" not in reference.index.meta["model"]  # float32: the fingerprint of before, unchanged
    # Either way round: an int8 index loads for the float32 model, a float32 index for the int8 one.
    loaded = ix.EntityIndex.load(path, model=reference.model, processor=reference.processor, kb=world["rows"])
    assert ix.index_towers(loaded.meta["model"]) == "int8"
    again = lk.OTMELLinker.from_pretrained(world["model_dir"], quantize="int8")
    again.load_index(path, kb=world["rows"])
    assert again.link(_mentions()[:3], top_k=3) == int8.link(_mentions()[:3], top_k=3)
    again.load_index(world["index_dir"], kb=world["rows"])
    # Another model's weights are still refused, whatever its towers.
    other = OTMELModel.from_pretrained(world["model_dir"])
    with torch.no_grad():
        other.text_global_small.weight.add_(0.01)
    tw.optimize_towers(other, "int8")
    with pytest.raises(ix.IndexMismatchError, match="model weights differ"):
        ix.EntityIndex.load(path, model=other)
    # Rows of other towers added to a float32 index: recorded as mixed.
    mixed = ix.EntityIndex.load(world["index_dir"])
    new = [{**world["rows"][0], "qid": "Q999", "name": "zed quux"}]
    again.index = mixed
    assert again.add_entities(new) == {"added": 1, "replaced": 0}
    assert ix.index_towers(mixed.meta["model"]) == "float32+int8"


def test_training_path_untouched(world):
    model = OTMELModel.from_pretrained(world["model_dir"])
    assert tw.towers_precision(model) == "float32" and not hasattr(model, tw.TOWERS_ATTRIBUTE)
    optimised = tw.optimize_towers(OTMELModel.from_pretrained(world["model_dir"]), "int8")
    with pytest.raises(RuntimeError, match="cannot train"):
        optimised.train()
    with pytest.raises(RuntimeError, match="cannot be saved"):
        optimised.save_pretrained(str(world["root"] / "nowhere"))
    optimised.eval()  # eval mode still works (inference_mode toggles it)
    with pytest.raises(ValueError, match="already optimised"):
        tw.optimize_towers(optimised, "bfloat16")
    # The float32 model trains as before: every tower weight is a float32 nn.Linear with a gradient.
    model.train()
    proc = world["reference"].processor
    m = proc.process_mentions(["ada smith", "bob jones"], ["a doctor", "a singer"], [None, _png(1)])
    e = proc.process_entities(["ada smith", "bob jones"], ["doctor.", "singer."], [None, _png(1)])
    out = model(
        m["input_ids"],
        m["attention_mask"],
        e["input_ids"],
        e["attention_mask"],
        m["pixel_values"],
        m["has_image"],
        e["pixel_values"],
        e["has_image"],
    )
    out.loss.backward()
    q_proj = model.clip.text_model.encoder.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.weight.grad is not None


def test_quantize_choices(world):
    assert tw.resolve_quantize("auto", "cpu") == "int8" and tw.resolve_quantize("auto", "cuda") == "float32"
    assert tw.resolve_quantize(None) == tw.resolve_quantize("none") == "float32"
    with pytest.raises(ValueError, match="quantize must be one of auto, none, int8, bfloat16"):
        tw.resolve_quantize("int4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        lk.OTMELLinker.from_pretrained(world["model_dir"], quantize="fp8")
    default = lk.OTMELLinker.from_pretrained(world["model_dir"])  # on the CPU: int8 by default
    assert tw.towers_precision(default.model) == tw.default_towers_precision("cpu") == "int8"
    assert tw.towers_precision(lk.OTMELLinker.from_pretrained(world["model_dir"], quantize="none").model) == "float32"
    on_meta = OTMELModel.from_pretrained(world["model_dir"]).to("meta")
    with pytest.raises(ValueError, match="run on the CPU only"):
        tw.optimize_towers(on_meta, "int8")


def test_cli_quantize_option(world, tmp_path, capsys):
    src = tmp_path / "mentions.jsonl"
    src.write_text(
        "".join(json.dumps({"mention": m["mention"], "sentence": m["sentence"]}) + "\n" for m in _mentions())
    )
    results = {}
    for choice in ("none", "int8"):
        out = tmp_path / f"{choice}.jsonl"
        argv = ["--model", world["model_dir"], "--kb", world["index_dir"], "--input", str(src), "--output", str(out)]
        assert lk.main([*argv, "--quantize", choice, "--top_k", "3", "--nil_threshold", "none"]) == 0
        results[choice] = [json.loads(line)["candidates"] for line in out.read_text().splitlines()]
    assert "towers: int8" in capsys.readouterr().err
    plain = [{"mention": m["mention"], "sentence": m["sentence"]} for m in _mentions()]
    assert results["none"] == json.loads(json.dumps(world["reference"].link(plain, top_k=3, nil_threshold=None)))
    for a, b in zip(results["none"], results["int8"]):
        assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=SCORE_TOLERANCE)
    assert lk.main([*argv, "--quantize", "int4"]) == 2
    assert "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
