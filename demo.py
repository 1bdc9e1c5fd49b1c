#!/usr/bin/env python
"""The offline demo: generate a synthetic MEL world, train OT-MEL with the tiny CLIP on the CPU, rank the test mentions
against the whole KB, and compare with a lexical baseline and the world's ceilings.

    make demo            # or: .venv/bin/python demo.py [--entities 3000 --mentions 6000 --seed 0]

The trained model is saved in outputs/demo/, where AutoModel / AutoProcessor (trust_remote_code=True) load it.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=3000)
    parser.add_argument("--mentions", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world_dir", default=os.path.join(HERE, "data", "demo_world"))
    parser.add_argument("--output_dir", default=os.path.join(HERE, "outputs", "demo"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further run_mel.py arguments, after --")
    args = parser.parse_args()
    start = time.time()

    if not os.path.isfile(os.path.join(args.world_dir, "ceilings.json")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "datasets_scripts", "make_synthetic.py"),
                args.world_dir,
                "--entities",
                str(args.entities),
                "--mentions",
                str(args.mentions),
                "--seed",
                str(args.seed),
            ],
            check=True,
        )
    shutil.rmtree(args.output_dir, ignore_errors=True)
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
            str(args.seed),
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

    _, _, dataset_path = load_mel_dataset(args.world_dir)
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
    print(f"\nTest split ({results['test_n']} mentions) ranked against the whole KB ({args.entities} entities)")
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


if __name__ == "__main__":
    main()
