#!/usr/bin/env python
"""OT, ATT, KD and the CLIP baseline on the synthetic world, several seeds, same budget: the README's comparison table.

    .venv/bin/python benchmarks/compare_modes.py [--world data/demo_world] [--seeds 0 1 2] [--epochs 15]

Each run is `run_mel.py --mode MODE --seed S --num_train_epochs E --do_train --do_eval --do_predict` with the tiny offline
model; the table gives the mean and standard deviation over seeds of the test metrics (whole-KB ranking).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("test_hits@1", "test_hits@3", "test_hits@5", "test_mrr", "eval_mrr", "train_runtime")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default=os.path.join(HERE, "data", "demo_world"))
    parser.add_argument("--modes", nargs="+", default=["ot", "att", "kd", "clip"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--output_dir", default=os.path.join(HERE, "outputs", "compare"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further run_mel.py arguments, after --")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.world, "ceilings.json")):
        subprocess.run([sys.executable, os.path.join(HERE, "datasets_scripts", "make_synthetic.py"), args.world,
                        "--entities", "3000", "--mentions", "6000", "--seed", "0"], check=True)  # fmt: skip
    results = {}
    for seed in args.seeds:  # seed-major, so an interrupted comparison still covers every mode
        for mode in args.modes:
            out = os.path.join(args.output_dir, f"{mode}-seed{seed}")
            path = os.path.join(out, "all_results.json")
            if not os.path.isfile(path):
                subprocess.run(
                    [sys.executable, os.path.join(HERE, "run_mel.py"), "--dataset_name", args.world, "--output_dir", out,
                     "--mode", mode, "--seed", str(seed), "--num_train_epochs", str(args.epochs), "--do_train",
                     "--do_eval", "--do_predict", "--save_total_limit", "1", "--disable_tqdm", "true",
                     *[a for a in args.extra if a != "--"]],
                    check=True, stdout=subprocess.DEVNULL,
                )  # fmt: skip
            with open(path) as f:
                results.setdefault(mode, []).append(json.load(f))
            print(mode, seed, {k: round(results[mode][-1][k], 4) for k in KEYS}, flush=True)
    with open(os.path.join(args.world, "ceilings.json")) as f:
        both = json.load(f)["splits"]["test"]["both"]
    print(f"\n{len(args.seeds)} seeds x {args.epochs:g} epochs each; test split against the whole KB; mean ± std (%)")
    print("| mode | H@1 | H@3 | H@5 | MRR | H@1 / ceiling | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        cells = []
        for key in KEYS[:4]:
            values = [100 * r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        share = statistics.mean(r["test_hits@1"] for r in runs) / both["h1"]
        runtime = statistics.mean(r["train_runtime"] for r in runs)
        print(f"| {mode} | {' | '.join(cells)} | {100 * share:.1f}% | {runtime:.0f} |")


if __name__ == "__main__":
    main()
