#!/usr/bin/env python
"""The offline demo: generate a synthetic MEL world, train OT-MEL with the tiny CLIP on the CPU, rank the test mentions
against the whole KB, and compare with a lexical baseline and the world's ceilings.

    make demo            # or: .venv/bin/python demo.py [--entities 3000 --mentions 6000 --seed 0]

The trained model is saved in outputs/demo/, where AutoModel / AutoProcessor (trust_remote_code=True) load it.

The demo replaces its own earlier output (a folder holding its `demo_output.json`) and reuses an existing world of
`make_synthetic.py` in --world_dir (whose --entities / --mentions / --seed then come from the world: a warning says so
when other values are given). It refuses, unless --overwrite, to replace a non-empty --output_dir it did not write or
to write a world into a non-empty --world_dir that holds none.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


HERE = os.path.dirname(os.path.abspath(__file__))
# Written into --output_dir before training: marks the folder as the demo's, which a later demo may replace.
DEMO_MARKER = "demo_output.json"
WORLD_DEFAULTS = {"entities": 3000, "mentions": 6000, "seed": 0}


def demo_wrote(output_dir: str, world_dir: str) -> bool:
    """Whether `output_dir` is the demo's own output: it holds `DEMO_MARKER`, or (written before the demo left a
    marker) its `run_settings.json` names `world_dir` as the dataset."""
    if os.path.isfile(os.path.join(output_dir, DEMO_MARKER)):
        return True
    try:
        with open(os.path.join(output_dir, "run_settings.json"), encoding="utf-8") as f:
            dataset = json.load(f).get("dataset_name")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(dataset, str) and os.path.realpath(dataset) == os.path.realpath(world_dir)


def check_output_dir(output_dir: str, world_dir: str, overwrite: bool = False) -> None:
    """Raises `ValueError` when the demo may not delete and replace `output_dir`: a file, or a non-empty folder that
    the demo did not write ([`demo_wrote`]), unless `overwrite`."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder")
    if overwrite or not os.path.isdir(output_dir) or not os.listdir(output_dir) or demo_wrote(output_dir, world_dir):
        return
    raise ValueError(
        f"--output_dir {output_dir} is not empty and was not written by the demo: refusing to delete it; choose a new "
        "or empty folder, or pass --overwrite to replace it"
    )


def world_mismatches(world: dict, asked: dict) -> list[str]:
    """The "--entities 3000 (the world has 150)" of each setting in `asked` (those given on the command line) that
    differs from the existing `world` (its `ceilings.json` world entry)."""
    return [
        f"--{key} {value} (the world has {world.get(key)})" for key, value in asked.items() if world.get(key) != value
    ]


def tfidf_baseline(dataset_dir: str, split: str = "test") -> dict:
    """Ranks the whole KB for each mention by TF-IDF cosine of `surface sentence` against `name attributes`."""
    from datasets import load_dataset
    from sklearn.feature_extraction.text import TfidfVectorizer

    from metrics_otmel import ranking_metrics

    kb = load_dataset(dataset_dir, "kb")["train"].remove_columns("image")
    mentions = load_dataset(dataset_dir, "mentions")[split].remove_columns("image")
    index = {qid: i for i, qid in reversed(list(enumerate(kb["qid"])))}
    mentions = mentions.filter(lambda row: row["answer"] in index)
    vectorizer = TfidfVectorizer(sublinear_tf=True)
    kb_matrix = vectorizer.fit_transform([f"{n} {a}" for n, a in zip(kb["name"], kb["attributes"])])
    queries = vectorizer.transform([f"{m} {s}" for m, s in zip(mentions["mention"], mentions["sentence"])])
    scores = (queries @ kb_matrix.T).toarray()
    gold = np.array([index[q] for q in mentions["answer"]])
    gold_scores = scores[np.arange(len(gold)), gold]
    # Ties are not resolved in the gold entity's favour: every entity scoring at least as high counts.
    ranks = 1 + (scores > gold_scores[:, None]).sum(1) + ((scores == gold_scores[:, None]).sum(1) - 1)
    return ranking_metrics(ranks.tolist())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in WORLD_DEFAULTS.items():  # None: not given (an existing world keeps its own)
        parser.add_argument(f"--{key}", type=int, default=None, help=f"of a new world (default {default})")
    parser.add_argument("--world_dir", default=os.path.join(HERE, "data", "demo_world"))
    parser.add_argument("--output_dir", default=os.path.join(HERE, "outputs", "demo"))
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output_dir the demo did not write, and write a world into a non-empty --world_dir "
        "that holds none",
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further run_mel.py arguments, after --")
    args = parser.parse_args(argv)
    start = time.time()
    from datasets_scripts.make_synthetic import check_out_dir, synthetic_world

    asked = {key: getattr(args, key) for key in WORLD_DEFAULTS if getattr(args, key) is not None}
    world = synthetic_world(args.world_dir)
    try:
        check_output_dir(args.output_dir, args.world_dir, args.overwrite)
        if world is None:
            check_out_dir(args.world_dir, args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    if world is None:
        settings = {**WORLD_DEFAULTS, **asked}
        generator = [sys.executable, os.path.join(HERE, "datasets_scripts", "make_synthetic.py"), args.world_dir]
        generator += [f"--{key}={value}" for key, value in settings.items()]
        subprocess.run(generator + (["--overwrite"] if args.overwrite else []), check=True)
    else:
        differ = world_mismatches(world, asked)
        if differ:
            print(
                f"warning: {args.world_dir} already holds a world, used as it is: ignoring {', '.join(differ)} "
                "(--seed still seeds training); choose another --world_dir for a new world",
                file=sys.stderr,
            )
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, DEMO_MARKER), "w", encoding="utf-8") as f:
        json.dump({"written_by": "demo.py"}, f)
    extra = [a for a in args.extra if a != "--"]
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "run_mel.py"),
            "--dataset_name",
            args.world_dir,
            "--output_dir",
            args.output_dir,
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--seed",
            str(WORLD_DEFAULTS["seed"] if args.seed is None else args.seed),
            *extra,
        ],
        check=True,
    )

    with open(os.path.join(args.output_dir, "all_results.json")) as f:
        results = json.load(f)
    with open(os.path.join(args.world_dir, "ceilings.json")) as f:
        ceilings = json.load(f)["splits"]["test"]
    sys.path.insert(0, HERE)
    from run_mel import load_mel_dataset

    _, kb, dataset_path = load_mel_dataset(args.world_dir)
    lexical = tfidf_baseline(dataset_path)

    rows = [
        ("OT-MEL (tiny CLIP, trained here)", [results[f"test_{k}"] for k in ("hits@1", "hits@3", "hits@5", "mrr")])
    ]
    rows.append(("TF-IDF lexical baseline", [lexical[k] for k in ("hits@1", "hits@3", "hits@5", "mrr")]))
    for key, label in (
        ("name_only", "ceiling: surface name only"),
        ("text_only", "ceiling: text only"),
        ("image_only", "ceiling: surface + image only"),
        ("both", "ceiling: text + image"),
    ):
        c = ceilings[key]
        rows.append((label, [c["h1"], None, None, c["mrr"]]))
    print(f"\nTest split ({results['test_n']} mentions) ranked against the whole KB ({len(kb)} entities)")
    print(f"| {'model':<34} | {'H@1':>6} | {'H@3':>6} | {'H@5':>6} | {'MRR':>6} |")
    print(f"|{'-' * 36}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for label, values in rows:
        cells = " | ".join(f"{100 * v:6.2f}" if v is not None else f"{'':>6}" for v in values)
        print(f"| {label:<34} | {cells} |")
    share = results["test_hits@1"] / ceilings["both"]["h1"]
    print(f"\nOT-MEL H@1 is {100 * share:.1f}% of the text + image ceiling.")

    code = (
        "from transformers import AutoModel, AutoProcessor; import sys; "
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "print(f'AutoModel -> {type(m).__name__}, AutoProcessor -> {type(p).__name__}')"
    )
    subprocess.run([sys.executable, "-c", code, os.path.abspath(args.output_dir)], check=True, cwd="/")
    print(f"Model saved in {args.output_dir}; demo took {time.time() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
