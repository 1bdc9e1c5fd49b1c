#!/usr/bin/env python
"""OT, ATT, KD and the CLIP baseline on synthetic worlds, several seeds, same budget, with per-slice figures: the
comparison table of docs/benchmarks.md.

    .venv/bin/python benchmarks/compare_modes.py [--worlds default hard] [--seeds 0 1 2] [--modes ot att kd clip]
        [--epochs E] [-- further run_mel.py arguments]

A world is `default` (`make_synthetic.py`, the demo's world), `hard` (`make_synthetic.py --preset hard`) or a folder
made by `make_synthetic.py`; named worlds are generated once (3,000 entities, 6,000 mentions, seed 0) under
`data/`. Each run is `run_mel.py --mode MODE --seed S --do_train --do_eval --do_predict` with the tiny offline model
and run_mel.py's default schedule (or `--epochs`); finished runs are read back, not re-run. The tables give the mean
and standard deviation over seeds of the test metrics (whole-KB ranking), the share of the text + image ceiling, and
per slice (from the world's `synth_truth.json`, joined on the mention id that `predictions_test.jsonl` keeps): full or
partial (first or last) name; with or without a mention picture; "picture needed" (the perfect text reader's set is
larger than the text + image reader's, so only the picture can single the entity out); gold entity seen in training
or not. Each slice shows H@1 against that slice's own text + image ceiling (mean of 1 / |set|).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("test_hits@1", "test_hits@3", "test_hits@5", "test_mrr", "eval_mrr", "train_runtime")
WORLDS = {
    "default": ("demo_world", []),  # the demo's world: `make demo` generates the same folder
    "hard": ("hard_world", ["--preset", "hard"]),
}
SLICES = (
    "full name",
    "partial name",
    "with picture",
    "no picture",
    "partial, with picture",
    "partial, no picture",
    "picture needed",
    "seen entity",
    "unseen entity",
)


def world_dir(world: str) -> str:
    """The folder of a world (generating a named one on first use)."""
    if world not in WORLDS:
        if not os.path.isfile(os.path.join(world, "synth_truth.json")):
            raise ValueError(f"--worlds: {world!r} is neither {' nor '.join(WORLDS)} nor a make_synthetic.py folder")
        return world
    folder, options = WORLDS[world]
    path = os.path.join(HERE, "data", folder)
    if not os.path.isfile(os.path.join(path, "ceilings.json")):
        subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "datasets_scripts", "make_synthetic.py"),
                path,
                "--entities",
                "3000",
                "--mentions",
                "6000",
                "--seed",
                "0",
                *options,
            ],
            check=True,
        )
    return path


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def mention_slices(world: str) -> dict:
    """`{mention id: (slice names, |text+image set|)}` for the test mentions of a make_synthetic.py world."""
    truth = read_json(os.path.join(world, "synth_truth.json"))
    with open(os.path.join(world, "Synth_train.json"), encoding="utf-8") as f:
        seen = {row["answer"] for row in json.load(f)}
    with open(os.path.join(world, "Synth_test.json"), encoding="utf-8") as f:
        answers = {row["id"]: row["answer"] for row in json.load(f)}
    out = {}
    for row in truth:
        if row["id"] not in answers:
            continue
        sizes = row["set_sizes"]
        names = ["full name" if row["name_kind"] == "full" else "partial name"]
        names.append("no picture" if row["image_kind"] == "none" else "with picture")
        names.append(f"{names[0].split()[0]}, {names[1].split()[0]} picture")  # e.g. "partial, with picture"
        if sizes["text_only"] > sizes["both"]:
            names.append("picture needed")
        names.append("seen entity" if answers[row["id"]] in seen else "unseen entity")
        out[row["id"]] = (names, sizes["both"])
    return out


def slice_metrics(predictions: str, slices: dict) -> dict:
    """`{slice: {"n", "h1", "mrr", "ceiling_h1"}}` (fractions) from a run's predictions_test.jsonl."""
    sums = {}
    with open(predictions, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["id"] not in slices:
                raise ValueError(f"{predictions}: mention id {row['id']!r} is not a test mention of the world")
            names, set_size = slices[row["id"]]
            rank = row["rank"]
            for name in names + ["all"]:
                s = sums.setdefault(name, [0, 0.0, 0.0, 0.0])
                s[0] += 1
                s[1] += rank == 1
                s[2] += 1 / rank if rank >= 1 else 0.0
                s[3] += 1 / max(set_size, 1)
    return {k: {"n": n, "h1": h / n, "mrr": r / n, "ceiling_h1": c / n} for k, (n, h, r, c) in sums.items()}


def mean_std(values):
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(world: str, mode: str, seed: int, out: str, epochs, extra) -> None:
    command = [
        sys.executable,
        os.path.join(HERE, "run_mel.py"),
        "--dataset_name",
        world,
        "--output_dir",
        out,
        "--mode",
        mode,
        "--seed",
        str(seed),
        "--do_train",
        "--do_eval",
        "--do_predict",
        "--save_total_limit",
        "1",
        "--disable_tqdm",
        "true",
    ]
    if epochs is not None:
        command += ["--num_train_epochs", str(epochs)]
    with open(out + ".log", "w") as log:
        subprocess.run(command + extra, check=True, stdout=log, stderr=subprocess.STDOUT)


def report(name: str, world: str, results: dict, seeds: list) -> None:
    both = read_json(os.path.join(world, "ceilings.json"))["splits"]["test"]["both"]
    n_seeds = {mode: len(runs) for mode, runs in results.items()}
    print(f"\n### {name} world ({world}); test split against the whole KB; mean ± std over seeds (%)")
    print(f"seeds per mode: {n_seeds}; text + image ceiling {100 * both['h1']:.2f} H@1 / {100 * both['mrr']:.2f} MRR")
    print("| mode | H@1 | H@3 | H@5 | MRR | H@1 / ceiling | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        cells = ["{:.2f} ± {:.2f}".format(*mean_std(100 * r["metrics"][key] for r in runs)) for key in KEYS[:4]]
        share = statistics.mean(r["metrics"]["test_hits@1"] for r in runs) / both["h1"]
        runtime = statistics.mean(r["metrics"]["train_runtime"] for r in runs)
        print(f"| {mode} | {' | '.join(cells)} | {100 * share:.1f}% | {runtime:.0f} |")
    present = [s for s in SLICES if any(s in r["slices"] for runs in results.values() for r in runs)]
    first = next(iter(results.values()))[0]["slices"]
    print("\nH@1 per slice, mean over seeds (%); the slice's text + image ceiling and size in the header")
    header = [f"{s} (ceil {100 * first[s]['ceiling_h1']:.1f}, n={first[s]['n']})" for s in present]
    print("| mode | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(present))
    for mode, runs in results.items():
        cells = []
        for s in present:
            h1 = statistics.mean(r["slices"][s]["h1"] for r in runs)
            cells.append(f"{100 * h1:.1f} ({100 * h1 / first[s]['ceiling_h1']:.0f}%)")
        print(f"| {mode} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", nargs="+", default=["default", "hard"])
    parser.add_argument("--modes", nargs="+", default=["ot", "att", "kd", "clip"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None, help="default: run_mel.py's own schedule")
    parser.add_argument("--output_dir", default=os.path.join(HERE, "outputs", "compare"))
    parser.add_argument("--report_only", action="store_true", help="read finished runs back, start none")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="further run_mel.py arguments, after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    for name in args.worlds:
        world = world_dir(name)
        slices = mention_slices(world)
        results = {}
        for seed in args.seeds:  # seed-major, so an interrupted comparison still covers every mode
            for mode in args.modes:
                out = os.path.join(args.output_dir, os.path.basename(os.path.normpath(world)), f"{mode}-seed{seed}")
                path = os.path.join(out, "all_results.json")
                if not os.path.isfile(path):
                    if args.report_only:
                        continue
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    run(world, mode, seed, out, args.epochs, extra)
                metrics = read_json(path)
                per_slice = slice_metrics(os.path.join(out, "predictions_test.jsonl"), slices)
                results.setdefault(mode, []).append({"metrics": metrics, "slices": per_slice})
                print(
                    name,
                    mode,
                    seed,
                    {k: round(metrics[k], 4) for k in KEYS},
                    {s: round(v["h1"], 3) for s, v in per_slice.items()},
                    flush=True,
                )
        if results:
            report(name, world, results, args.seeds)


if __name__ == "__main__":
    main()
