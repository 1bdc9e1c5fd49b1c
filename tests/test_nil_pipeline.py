"""NIL answers (metrics_otmel.choose_nil_threshold / nil_metrics, OTMELLinker.link, run_mel's threshold on validation),
the `multimodal-entity-linking` pipeline loaded from a run_mel output folder in a fresh process outside the checkout,
and the zero-shot linker (OTMELLinker.from_clip). Tiny models, a tiny synthetic world with NIL mentions."""

import io
import json
import logging
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import metrics_otmel as mx  # noqa: E402
from linking_otmel import OTMELLinker  # noqa: E402


# ---- threshold choice and metrics on hand-made scores ------------------------------------------------------------


def _accuracy(scores, is_nil, correct, threshold):
    right = 0
    for s, n, c in zip(scores, is_nil, correct):
        answered_nil = threshold is not None and s < threshold
        right += (n and answered_nil) or (not n and not answered_nil and c)
    return right / len(scores)


def test_is_nil_answer():
    assert all(mx.is_nil_answer(a) for a in ("nil", "NIL", " Nil ", "", None))
    assert not any(mx.is_nil_answer(a) for a in ("Q42", "nile", "0"))


def test_choose_nil_threshold_hand_made():
    # Two NIL mentions scored below two in-KB ones: the threshold lies between 0.2 and 0.5.
    assert mx.choose_nil_threshold([0.1, 0.2, 0.5, 0.6], [True, True, False, False]) == pytest.approx(0.35)
    # No NIL mention: nothing to choose.
    assert mx.choose_nil_threshold([0.1, 0.9], [False, False]) is None
    # A NIL mention scored between two in-KB ones: answering it NIL costs an in-KB mention, so NIL stays off.
    assert mx.choose_nil_threshold([0.2, 0.5, 0.6], [False, True, False]) is None
    # Only NIL mentions: every one answered NIL (threshold just above the highest score).
    t = mx.choose_nil_threshold([0.1, 0.2], [True, True])
    assert 0.2 < t < 0.21
    # A wrongly linked in-KB mention (correct=False) costs nothing when answered NIL: the best thresholds are
    # (0.1, 0.3]; the middle of the first best range is chosen.
    assert mx.choose_nil_threshold([0.1, 0.2, 0.3], [True, False, False], [False, False, True]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="NIL flags"):
        mx.choose_nil_threshold([0.1, 0.2], [True])


def test_choose_nil_threshold_is_optimal_on_random_data():
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(1, 30)
        scores = [round(rng.uniform(-1, 1), 2) for _ in range(n)]  # rounded: ties happen
        is_nil = [rng.random() < 0.3 for _ in range(n)]
        correct = [rng.random() < 0.7 for _ in range(n)]
        t = mx.choose_nil_threshold(scores, is_nil, correct)
        candidates = [None] + [v + d for v in scores for d in (-1e-3, 1e-3)]
        best = max(_accuracy(scores, is_nil, correct, c) for c in candidates)
        got = _accuracy(scores, is_nil, correct, t)
        assert got == pytest.approx(best), (trial, scores, is_nil, correct, t)
        if not any(is_nil) or _accuracy(scores, is_nil, correct, None) == pytest.approx(best):
            assert t is None
        metrics = mx.nil_metrics(scores, is_nil, correct, t)
        assert metrics["nil_accuracy"] == pytest.approx(got)


def test_nil_metrics_hand_made():
    scores = [0.1, 0.2, 0.5, 0.6, 0.3]
    is_nil = [True, False, False, True, True]
    correct = [False, True, True, True, False]  # ignored for NIL mentions
    m = mx.nil_metrics(scores, is_nil, correct, 0.35)
    # Answered NIL: 0.1 (NIL, right), 0.2 (in-KB, wrong), 0.3 (NIL, right) -> precision 2/3, recall 2/3 (0.6 is missed).
    assert m["n_predicted_nil"] == 3 and m["n_nil"] == 3 and m["n_inkb"] == 2
    assert m["nil_precision"] == pytest.approx(2 / 3) and m["nil_recall"] == pytest.approx(2 / 3)
    assert m["nil_f1"] == pytest.approx(2 / 3)
    assert m["inkb_hits@1"] == pytest.approx(1 / 2)  # 0.5 linked right; 0.2 answered NIL
    assert m["nil_accuracy"] == pytest.approx(3 / 5)
    off = mx.nil_metrics(scores, is_nil, correct, None)
    assert off["n_predicted_nil"] == 0 and off["nil_precision"] == off["nil_recall"] == off["nil_f1"] == 0.0
    assert off["inkb_hits@1"] == 1.0 and off["nil_accuracy"] == pytest.approx(2 / 5)


def test_trainer_metrics_split_nil_from_in_kb():
    """run_mel's metrics: hits@k / MRR over the in-KB mentions only, NIL metrics at the model's threshold."""
    from ranking_otmel import RankResult
    from run_mel import OTMELTrainer

    result = RankResult(
        scores=torch.tensor([[0.9, 0.1], [0.2, 0.1], [0.8, 0.7], [0.3, 0.2]]),
        indices=torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]]),
        gold_ranks=torch.tensor([1, -1, 2, -1]),
        stage1_gold_ranks=torch.tensor([1, -1, 1, -1]),
    )
    answers = ["Q0", "nil", "Q0", "NIL"]
    model = SimpleNamespace(config=SimpleNamespace(nil_threshold=0.5))
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        model=model,
        rank_options=SimpleNamespace(strategy="two_stage"),
    )
    metrics = OTMELTrainer.ranking_metrics(fake, result, "test", answers=answers)
    assert metrics["test_n"] == 2 and metrics["test_hits@1"] == 0.5 and metrics["test_mrr"] == pytest.approx(0.75)
    assert metrics["test_n_nil"] == 2 and metrics["test_nil_threshold"] == 0.5
    assert metrics["test_nil_precision"] == 1.0 and metrics["test_nil_recall"] == 1.0
    assert metrics["test_inkb_hits@1"] == 0.5 and metrics["test_nil_accuracy"] == 0.75
    model.config.nil_threshold = None  # no threshold and no NIL mention: the usual metrics only
    plain = OTMELTrainer.ranking_metrics(fake, result, "eval", answers=["Q0", "Q1", "Q0", "Q1"])
    assert plain["eval_n"] == 4 and not any("nil" in k for k in plain)


def test_keep_linkable(caplog):
    from datasets import Dataset

    from run_mel import keep_linkable

    split = Dataset.from_dict({"answer": ["Q1", "nil", "Q9", "NIL", "Q2", ""]})
    qids = {"Q1": 0, "Q2": 1}
    with caplog.at_level(logging.INFO, logger="run_mel"):
        train = keep_linkable(split, qids, "train")
        test = keep_linkable(split, qids, "test", keep_nil=True)
    assert train["answer"] == ["Q1", "Q2"]
    assert test["answer"] == ["Q1", "nil", "NIL", "Q2", ""]
    log = caplog.text
    assert "train: 3 of 6 mentions have a NIL answer" in log and "test: 3 of 6 mentions are NIL" in log
    assert log.count("1 of 6 mentions have an answer absent from the KB (e.g. 'Q9')") == 2


# ---- link() with NIL answers, and the zero-shot linker ---------------------------------------------------------


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (40, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


KB = [
    {"qid": "Q1", "name": "barack obama", "attributes": "44th president. born in honolulu.", "image": _png("red")},
    {"qid": "Q2", "name": "michelle obama", "attributes": "attorney and author.", "image": None},
    {"qid": "Q3", "name": "paris hilton", "attributes": "media personality.", "image": _png("blue")},
    {"qid": "Q4", "name": "jaguar cars", "attributes": "british luxury vehicle company.", "image": _png("green")},
]
MENTIONS = [
    {"mention": "obama", "sentence": "obama spoke in paris on monday.", "image": _png("red")},
    {"mention": "paris", "sentence": "hilton opened a hotel in paris.", "image": None},
    {"mention": "jaguar", "sentence": "a jaguar was seen near the river.", "image": _png("green")},
]


@pytest.fixture(scope="module")
def zero_shot(tiny_clip_dir):
    linker = OTMELLinker.from_clip(tiny_clip_dir, quantize=None)  # float32 towers: CLIP's cosines exactly
    linker.build_index(KB, progress=False)
    return linker


def test_zero_shot_linker_scores_are_clip_cosines(zero_shot, tiny_clip_dir):
    """from_clip: S_O = (CLIP text cosine + CLIP image cosine) / 2, a missing picture contributing 0."""
    from transformers import CLIPModel

    linker = zero_shot
    assert linker.model.config.fusion_assignment == linker.model.config.unimodal_assignment == "off"
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    proc = linker.processor

    def features(batch):
        with torch.no_grad():
            text = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            image = clip.get_image_features(pixel_values=batch["pixel_values"])
        text = torch.nn.functional.normalize(text.pooler_output, dim=-1)
        image = torch.nn.functional.normalize(image.pooler_output, dim=-1) * batch["has_image"][:, None]
        return text, image

    e_text, e_image = features(
        proc.process_entities([e["name"] for e in KB], [e["attributes"] for e in KB], [e["image"] for e in KB])
    )
    m_text, m_image = features(
        proc.process_mentions(
            [m["mention"] for m in MENTIONS], [m["sentence"] for m in MENTIONS], [m["image"] for m in MENTIONS]
        )
    )
    expected = (m_text @ e_text.T + m_image @ e_image.T) / 2
    results = linker.link(MENTIONS, top_k=len(KB), strategy="exhaustive", nil_threshold=None)
    qid_row = {e["qid"]: i for i, e in enumerate(KB)}
    for i, answers in enumerate(results):
        assert [a["qid"] for a in answers] == [KB[j]["qid"] for j in expected[i].argsort(descending=True).tolist()]
        for a in answers:
            assert a["score"] == pytest.approx(float(expected[i, qid_row[a["qid"]]]), abs=1e-5)
    # The mention without a picture is ranked by its text alone.
    assert results[1][0]["score"] == pytest.approx(float((m_text[1] @ e_text.T).max()) / 2, abs=1e-5)


def test_link_answers_nil_first_below_the_threshold(zero_shot):
    linker = zero_shot
    plain = linker.link(MENTIONS, top_k=3, nil_threshold=None)
    assert all("nil" not in a for answers in plain for a in answers)
    assert linker.link(MENTIONS, top_k=3) == plain  # the config has no threshold: off
    tops = [answers[0]["score"] for answers in plain]
    threshold = sorted(tops)[1]  # the lowest-scored mention falls below it, the others do not
    for how in ("argument", "config"):
        if how == "config":
            linker.model.config.nil_threshold = threshold
            got = linker.link(MENTIONS, top_k=3)
        else:
            got = linker.link(MENTIONS, top_k=3, nil_threshold=threshold)
        for answers, reference, top in zip(got, plain, tops):
            assert len(answers) == 3
            if top < threshold:
                assert answers[0] == {"qid": None, "name": None, "nil": True, "score": top}
                assert answers[1:] == reference[:2]
            else:
                assert answers == reference
        assert sum(answers[0].get("nil", False) for answers in got) == 1
    try:
        assert linker.link(MENTIONS, top_k=3, nil_threshold=None) == plain  # None overrides the config's
        with pytest.raises(ValueError, match="nil_threshold"):
            linker.link(MENTIONS, nil_threshold="high")
    finally:
        linker.model.config.nil_threshold = None


def test_cli_answers_nil_first(zero_shot, tmp_path):
    import linking_otmel as lk

    folder, index_dir = tmp_path / "zero-shot", tmp_path / "index"
    zero_shot.model.save_pretrained(folder)
    zero_shot.processor.save_pretrained(folder)
    zero_shot.save_index(str(index_dir))
    mentions = [{"mention": m["mention"], "sentence": m["sentence"]} for m in MENTIONS]
    src = tmp_path / "mentions.jsonl"
    src.write_text("".join(json.dumps(m) + "\n" for m in mentions))
    plain = zero_shot.link(mentions, top_k=2, nil_threshold=None)
    tops = [answers[0]["score"] for answers in plain]
    threshold = sorted(tops)[1]
    for flag, expected_nil in (("none", [False] * 3), (repr(threshold), [t < threshold for t in tops])):
        out = tmp_path / f"links-{flag}.jsonl"
        args = [
            "--model",
            str(folder),
            "--kb",
            str(index_dir),
            "--input",
            str(src),
            "--output",
            str(out),
            "--top_k",
            "2",
            "--nil_threshold",
            flag,
            "--quantize",
            "none",  # the float32 towers of `plain`: the threshold sits exactly on one of its scores
        ]
        assert lk.main(args) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["candidates"][0].get("nil", False) for r in rows] == expected_nil
        for row, reference, is_nil in zip(rows, plain, expected_nil):
            got = row["candidates"]
            assert len(got) == 2
            if is_nil:
                assert got[0]["qid"] is None and got[0]["name"] is None
                assert got[0]["score"] == pytest.approx(reference[0]["score"], abs=1e-5)
                assert got[1]["qid"] == reference[0]["qid"]
            else:
                assert [c["qid"] for c in got] == [c["qid"] for c in reference]


# ---- run_mel on a world with NIL mentions; the pipeline from its output folder ----------------------------------


@pytest.fixture(scope="module")
def nil_run(tmp_path_factory):
    from datasets_scripts.make_synthetic import generate

    root = tmp_path_factory.mktemp("nil_run")
    generate(root / "world", entities=100, mentions=240, seed=2, workers=1, nil_fraction=0.15)
    out = root / "run"
    args = [
        os.path.join(ROOT, "run_mel.py"),
        "--dataset_name",
        str(root / "world"),
        "--data_cache_dir",
        str(root / "cache"),
        "--output_dir",
        str(out),
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--num_train_epochs",
        "2",
        "--eval_every_epochs",
        "2",
        "--tiny_hidden_size",
        "32",
        "--tiny_vocab_size",
        "600",
        "--hidden_size",
        "16",
        "--per_device_train_batch_size",
        "16",
        "--kb_batch_size",
        "64",
        "--learning_rate",
        "2e-3",
        "--warmup_steps",
        "0",
        "--logging_steps",
        "5",
        "--seed",
        "3",
        "--report_to",
        "none",
        "--log_level",
        "info",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"root": root, "world": root / "world", "out": out, "log": proc.stdout + proc.stderr}


def test_run_mel_chooses_and_reports_the_nil_threshold(nil_run):
    out, world = nil_run["out"], nil_run["world"]
    ceilings = json.loads((world / "ceilings.json").read_text())["splits"]
    results = json.loads((out / "all_results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert "validation: %d of" % ceilings["dev"]["n_nil"] in nil_run["log"]
    assert "mentions are NIL (entity not in the KB): kept for NIL evaluation" in nil_run["log"]
    assert "have a NIL answer (entity not in the KB) and are skipped" in nil_run["log"]  # train
    threshold = config["nil_threshold"]
    assert "NIL threshold on the best S_O, chosen on the validation split" in nil_run["log"]
    if threshold is None:  # possible, but then it was a choice: nothing beat answering no NIL
        assert "eval_nil_threshold" not in results
    else:
        assert results["eval_nil_threshold"] == results["test_nil_threshold"] == threshold
    assert results["eval_n_nil"] == ceilings["dev"]["n_nil"] and results["test_n_nil"] == ceilings["test"]["n_nil"]
    assert results["test_n"] == ceilings["test"]["n_in_kb"]  # hits@k and MRR over the in-KB mentions
    # The test metrics, recomputed from the predictions file.
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == ceilings["test"]["mentions"]
    nil = [r["gold"] == "nil" for r in rows]
    answered_nil = [r.get("nil", False) for r in rows]
    assert all(r["rank"] == -1 for r, n in zip(rows, nil) if n)
    if threshold is not None:
        assert answered_nil == [r["predictions"][0]["score"] < threshold for r in rows]
    tp = sum(a and n for a, n in zip(answered_nil, nil))
    assert results["test_n_predicted_nil"] == sum(answered_nil)
    assert results["test_nil_recall"] == pytest.approx(tp / sum(nil))
    assert results["test_nil_precision"] == pytest.approx(tp / sum(answered_nil) if any(answered_nil) else 0.0)
    in_kb = [r for r, n in zip(rows, nil) if not n]
    assert results["test_hits@1"] == pytest.approx(sum(r["rank"] == 1 for r in in_kb) / len(in_kb))
    linked = sum(r["rank"] == 1 and not a for r, a, n in zip(rows, answered_nil, nil) if not n)
    assert results["test_inkb_hits@1"] == pytest.approx(linked / len(in_kb))
    assert results["test_nil_accuracy"] == pytest.approx((tp + linked) / len(rows))
    # The saved folder names the pipeline and carries its code.
    assert config["custom_pipelines"]["multimodal-entity-linking"]["impl"] == "pipeline_otmel.OTMELPipeline"
    for name in ("pipeline_otmel.py", "linking_otmel.py", "ranking_otmel.py", "index_otmel.py", "metrics_otmel.py"):
        assert (out / name).read_text() == open(os.path.join(ROOT, name)).read()


def test_remote_code_imports_only_common_packages():
    """From the Hub (unlike from a local folder) transformers checks the imports of every remote-code file the pipeline
    needs, except those inside `try`: none may be an optional package (faiss) or a part of the checkout that the
    folder does not carry (datasets_scripts)."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    allowed = set(sys.stdlib_module_names) | {
        "torch",
        "transformers",
        "datasets",
        "pyarrow",
        "safetensors",
        "tqdm",
        "PIL",
        "numpy",
        "huggingface_hub",
    }
    start = os.path.join(ROOT, "pipeline_otmel.py")
    for path in [start, *get_relative_import_files(start)]:
        assert set(get_imports(path)) <= allowed, (path, set(get_imports(path)) - allowed)


FRESH_PROCESS = r"""
import importlib.util, json, os, sys
# A user without the checkout: drop an editable install of it (a finder on sys.meta_path) and its folder on sys.path.
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(sys.argv[2])]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("linking_otmel") is None, "the checkout leaked into the fresh process"
from transformers import pipeline

folder, kb_dir, mentions, threshold = json.load(open(sys.argv[1]))
linker = pipeline("multimodal-entity-linking", model=folder, trust_remote_code=True, index=kb_dir)
assert "transformers_modules" in type(linker).__module__, type(linker).__module__
out = {
    "single": linker(mentions[0], top_k=3),
    "batch": linker(mentions, top_k=3),
    "off": linker(mentions, top_k=3, nil_threshold=None),
    "all_nil": linker(mentions, top_k=3, nil_threshold=threshold),
    "config": linker.model.config.nil_threshold,
}
print("RESULT " + json.dumps(out))
"""


def test_pipeline_from_the_saved_folder_in_a_fresh_process(nil_run, tmp_path):
    from datasets import load_dataset

    out = nil_run["out"]
    cache = nil_run["root"] / "cache"  # run_mel's conversion of the world
    converted = next(p for p in cache.iterdir() if (p / "conversion_summary.json").is_file())
    test = load_dataset(str(converted), "mentions")["test"]
    rows = [test[i] for i in range(6)]
    mentions = [{"mention": r["mention"], "sentence": r["sentence"], "image": None} for r in rows]
    # Pictures as paths, relative to nothing: absolute files outside the checkout.
    for i, r in enumerate(rows[:3]):
        if r["image"] is not None:
            path = tmp_path / f"m{i}.png"
            r["image"].save(path)
            mentions[i]["image"] = str(path)

    reference = OTMELLinker.from_pretrained(str(out), quantize=None)  # the pipeline runs the model as given
    reference.build_index(load_dataset(str(converted), "kb")["train"], progress=False)
    expected = reference.link(mentions, top_k=3)
    off = reference.link(mentions, top_k=3, nil_threshold=None)
    high = max(a[0]["score"] for a in off) + 1.0

    args = tmp_path / "args.json"
    args.write_text(json.dumps([str(out), str(converted), mentions, high]))
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONNOUSERSITE="1",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(args), ROOT],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])

    def close(a, b):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert [(e["qid"], e.get("nil")) for e in x] == [(e["qid"], e.get("nil")) for e in y]
            assert [e["score"] for e in x] == pytest.approx([e["score"] for e in y], abs=1e-5)

    assert got["config"] == reference.model.config.nil_threshold
    close([got["single"]], expected[:1])
    close(got["batch"], expected)
    close(got["off"], off)
    assert all(a[0]["nil"] and a[0]["qid"] is None and a[1:] == b[:2] for a, b in zip(got["all_nil"], got["off"]))


def test_model_card_says_what_the_model_does(nil_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(nil_run["out"] / "README.md")
    assert card.data.pipeline_tag is None  # no Hub task fits; the custom pipeline is named in the text
    assert "multimodal-entity-linking" in card.data.tags
    assert 'pipeline("multimodal-entity-linking"' in card.text
    assert str(nil_run["out"]) not in card.text  # no local path as the model's name


# ---- the pipeline's inputs, call arguments and saving (in-process, the zero-shot linker's model) --------------------


@pytest.fixture
def zero_shot_pipeline(zero_shot):
    """An OTMELPipeline on copies of the zero-shot linker's model and processor (the tests change and save them)."""
    import copy

    from pipeline_otmel import OTMELPipeline

    return OTMELPipeline(
        model=copy.deepcopy(zero_shot.model), processor=copy.deepcopy(zero_shot.processor), index=zero_shot.index
    )


def test_pipeline_refuses_unknown_mention_keys(zero_shot_pipeline):
    """`{"mention", "Sentence", "picture"}` used to link as `{"mention"}` alone: the unknown keys are refused, named."""
    linker = zero_shot_pipeline
    mention = {"mention": "obama", "sentence": "obama spoke in paris on monday.", "image": _png("red")}
    with pytest.raises(ValueError) as err:
        linker({"mention": "obama", "Sentence": mention["sentence"], "picture": mention["image"]}, top_k=2)
    message = str(err.value)
    assert "mention 0 has unknown key(s) 'Sentence' (did you mean 'sentence'?), 'picture'" in message
    assert "id, mention, sentence, image, answer" in message
    with pytest.raises(ValueError, match="mention 1 has unknown key"):
        linker([mention, dict(mention, foo=1)])
    # The other columns of a mentions split are accepted (and unused).
    plain = linker(mention, top_k=2)
    assert linker(dict(mention, id="m1", answer="Q1"), top_k=2) == plain


def test_pipeline_takes_the_call_arguments_of_every_pipeline(zero_shot_pipeline):
    """`batch_size=` and `num_workers=` of transformers' Pipeline.__call__ used to raise a TypeError."""
    linker = zero_shot_pipeline
    mentions = [dict(m) for m in MENTIONS]
    expected = linker(mentions, top_k=3, nil_threshold=None)
    for kwargs in ({"batch_size": 2}, {"batch_size": 1, "num_workers": 2}, {"num_workers": 0}):
        got = linker(mentions, top_k=3, nil_threshold=None, **kwargs)
        assert [[a["qid"] for a in answers] for answers in got] == [
            [a["qid"] for a in answers] for answers in expected
        ]
        for g, e in zip(got, expected):
            assert [a["score"] for a in g] == pytest.approx([a["score"] for a in e], abs=1e-5)
    assert linker.linker.batch_size == 64  # a call's batch_size is for that call only
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        linker(mentions, batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be a non-negative integer, got -1"):
        linker(mentions, num_workers=-1)
    with pytest.raises(TypeError, match="topk"):
        linker(mentions, topk=3)


def test_pipeline_refuses_a_dataset_dict_and_reads_file_urls(zero_shot_pipeline, tmp_path):
    from datasets import Dataset, DatasetDict

    linker = zero_shot_pipeline
    rows = [{"mention": m["mention"], "sentence": m["sentence"]} for m in MENTIONS]
    splits = DatasetDict({"test": Dataset.from_list(rows)})
    with pytest.raises(
        TypeError, match=r"got a DatasetDict with the splits test: pass one split, e.g. dataset\['test'\]"
    ):
        linker(splits)
    assert linker(splits["test"], top_k=2) == linker(rows, top_k=2)
    # A picture as a file:// URL is the local file.
    path = tmp_path / "red picture.png"
    path.write_bytes(_png("red"))
    mention = {"mention": "obama", "sentence": "obama spoke in paris on monday."}
    by_path = linker(dict(mention, image=str(path)), top_k=2, nil_threshold=None)
    assert linker(dict(mention, image=path.as_uri()), top_k=2, nil_threshold=None) == by_path
    assert by_path != linker(mention, top_k=2, nil_threshold=None)  # the picture counts
    # A KB of one split is taken as that split (it used to be refused as a Mapping).
    kb = DatasetDict({"train": Dataset.from_list([{k: v for k, v in row.items() if k != "image"} for row in KB])})
    assert len(linker.set_index(kb, progress=False)) == len(KB)


def test_pipeline_save_pretrained_keeps_the_processor(zero_shot_pipeline, tmp_path):
    """Pipeline.save_pretrained wrote the tokenizer and image processor but not processor_config.json: a reload had
    max_text_length 40 and the default separator, silently. Now the folder loads back identically."""
    from transformers import pipeline

    linker = zero_shot_pipeline
    linker.processor.max_text_length = 12
    linker.processor.separator = " | "
    linker.set_index(KB, progress=False)  # the KB encoded with these settings too
    folder = tmp_path / "saved"
    linker.save_pretrained(folder)
    assert (folder / "processor_config.json").is_file() and (folder / "pipeline_otmel.py").is_file()
    again = pipeline(model=str(folder), trust_remote_code=True, index=KB)
    assert type(again).__name__ == "OTMELPipeline"
    assert (again.processor.max_text_length, again.processor.separator) == (12, " | ")
    mentions = [{"mention": m["mention"], "sentence": m["sentence"] * 3} for m in MENTIONS]  # over 12 tokens
    got, expected = again(mentions, top_k=4), linker(mentions, top_k=4)
    assert [[a["qid"] for a in x] for x in got] == [[a["qid"] for a in x] for x in expected]
    for g, e in zip(got, expected):
        assert [a["score"] for a in g] == pytest.approx([a["score"] for a in e], abs=1e-5)


def test_pipeline_from_a_folder_without_processor_says_so(zero_shot_pipeline, tmp_path):
    """A folder written by model.save_pretrained alone names the pipeline but has no processor: the error used to be
    transformers' 'Can't load image processor ... preprocessor_config.json'."""
    from transformers import pipeline

    from pipeline_otmel import pipeline_config

    folder = tmp_path / "model-only"
    model = zero_shot_pipeline.model
    model.config.custom_pipelines = pipeline_config()  # as in a model loaded from a run_mel.py folder
    model.save_pretrained(folder)
    assert (folder / "pipeline_otmel.py").is_file() and not (folder / "processor_config.json").exists()
    with pytest.raises(ValueError) as err:
        pipeline(model=str(folder), trust_remote_code=True, index=KB)
    message = str(err.value)
    assert f"{folder} has none (no processor_config.json" in message and "processor.save_pretrained(FOLDER)" in message
    # Given the processor, the same folder works.
    again = pipeline(model=str(folder), trust_remote_code=True, index=KB, processor=zero_shot_pipeline.processor)
    assert again(MENTIONS[0], top_k=1)[0]["qid"] == zero_shot_pipeline(MENTIONS[0], top_k=1)[0]["qid"]
