"""Benchmark of whole-KB linking (index_otmel, ranking_otmel): two-stage vs exhaustive ranking, OT vs KD (attention) path,
stage-1 recall, memory, on synthetic KBs of growing size.

    .venv/bin/python benchmarks/bench_linking.py [--model DIR] [--sizes 3000 30000 100000] [--mentions 300]
        [--exhaustive_mentions 200 50 20] [--ks 20 50 100] [--index_dtype float16] [--threads 2]
        [--work_dir data/bench_linking] [--json results.json]

For each KB size N the synthetic world generator (`datasets_scripts/make_synthetic.py`, then `convert_mimic.py`) writes
a world of N entities (cached under `--work_dir`); its validation + test mentions (the first `--mentions`) are linked.
Without `--model`, a tiny random OT-MEL is built once (tiny CLIP: hidden 64, 2 layers, 64-px images, 16-px patches;
OT-MEL hidden 96; tokenizer trained on the KB texts): its speed and memory are representative, its H@1 is not (random
weights), but two-stage minus exhaustive H@1 still measures what the shortlist loses for that model.

Each size runs in two fresh processes, so peak memory (`ru_maxrss`, resident set including memory-mapped dataset pages)
is per size: "build" encodes the KB and saves the entity index; "serve" loads model + index (no KB) and ranks.
Timings: rank throughput is `ranking_otmel.rank` on pre-encoded mentions without gold answers, as when linking (the
metrics come from a separate, untimed run with them); "stage 2" times the re-ranking of a fixed stage-1 shortlist
alone, the only part that the OT / KD (attention) choice changes; end-to-end adds mention encoding
(1 / (1/encode + 1/rank)). Each figure is the best of `--reps` runs, OT and KD runs alternating. Exhaustive ranking
scores every (mention, entity) pair with the same pairwise code as stage 2, on the first `--exhaustive_mentions`
mentions only (it is slow), and its H@1 is compared with two-stage H@1 on the same mentions. Gold ranks count ties
pessimistically. The machine may be shared: the load average is printed.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def world_dir(work_dir: str, n: int, n_mentions: int) -> str:
    """Generates (once) a synthetic world of n entities and converts it to a dataset folder; returns the folder."""
    from datasets_scripts.convert_mimic import convert
    from datasets_scripts.make_synthetic import generate

    raw = os.path.join(work_dir, f"synth-{n}-raw")
    out = os.path.join(work_dir, f"synth-{n}")
    if not os.path.isfile(os.path.join(out, "README.md")):
        if not os.path.isfile(os.path.join(raw, "kb_entity.json")):
            print(f"generating a synthetic world of {n} entities in {raw} ...", flush=True)
            generate(raw, entities=n, mentions=n_mentions, seed=0)
        print(f"converting {raw} -> {out} ...", flush=True)
        convert(raw, out, overwrite=True, verbose=False)
        shutil.rmtree(raw)  # the converted folder holds everything the benchmark reads
    return out


def build_tiny_model(work_dir: str, dataset_dirs: list) -> str:
    import torch
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoTokenizer

    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor
    from tiny_clip import build_tiny_clip

    out = os.path.join(work_dir, "tiny-otmel")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    texts = []
    for d in dataset_dirs:
        kb = load_dataset(d, "kb")["train"]
        texts += [f"{n} [SEP] {a}" for n, a in zip(kb["name"], kb["attributes"])]
        train = load_dataset(d, "mentions")["train"]
        texts += [f"{m} [SEP] {s}" for m, s in zip(train["mention"], train["sentence"])]
    clip_dir = build_tiny_clip(os.path.join(work_dir, "tiny-clip"), texts, vocab_size=4000)
    torch.manual_seed(0)
    model = OTMELModel.from_clip(clip_dir)
    processor = OTMELProcessor(AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _mentions(dataset_dir: str, n: int):
    from datasets import concatenate_datasets, load_dataset

    ms = load_dataset(dataset_dir, "mentions")
    pool = concatenate_datasets([ms["validation"], ms["test"]])
    return pool.select(range(min(n, len(pool))))


def child_build(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset

    import linking_otmel as lk

    linker = lk.OTMELLinker.from_pretrained(args.model, quantize=None)  # float32 towers, as measured
    rss_model = peak_rss_mb()
    kb = load_dataset(args.dataset, "kb")["train"]
    start = time.perf_counter()
    index = linker.build_index(kb, batch_size=128, dtype=args.index_dtype, progress=False)
    seconds = time.perf_counter() - start
    linker.save_index(args.index_dir)
    fp32 = index.retrieval.nbytes + sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in index.tensors.values()
    )
    return {
        "n": len(index),
        "encode_kb_s": seconds,
        "entities_per_s": len(index) / seconds,
        "index_mb": index.nbytes() / 2**20,
        "index_fp32_mb": fp32 / 2**20,
        "text_len": index.tensors["text_mask"].shape[1],
        "rss_model_mb": rss_model,
        "peak_rss_build_mb": peak_rss_mb(),
    }


def _best_time(fn, reps):
    return _best_times({None: fn}, reps)[None]


def _best_times(fns: dict, reps: int) -> dict:
    """Best time of each function over `reps` rounds, the functions alternating (so load spikes hit all of them)."""
    best, out = {name: float("inf") for name in fns}, {}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], out[name]) for name in fns}


def child_serve(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import index_otmel as ix
    import linking_otmel as lk
    import metrics_otmel as mx
    import ranking_otmel as rk

    linker = lk.OTMELLinker.from_pretrained(args.model, quantize=None)  # float32 towers, as measured
    model, processor = linker.model, linker.processor
    index = linker.load_index(args.index_dir)
    rss_loaded = peak_rss_mb()
    mentions = _mentions(args.dataset, args.mentions)
    gold = torch.tensor([index.row_of(a) for a in mentions["answer"]])
    rk.encode_mentions(model, processor, mentions.select(range(min(16, len(mentions)))))  # warm-up
    enc_s, feats = _best_time(lambda: rk.encode_mentions(model, processor, mentions, batch_size=64), args.reps)
    out = {
        "mentions": len(mentions),
        "encode_mentions_per_s": len(mentions) / enc_s,
        "rss_loaded_mb": rss_loaded,
        "runs": [],
    }
    n_ex = min(args.exhaustive_mentions, len(mentions))
    paths = ("ot", "attention")
    for k in args.ks:
        shortlist = rk.rank(model, feats, index, candidates=k, assignment="attention").indices  # any order will do
        rank_s = _best_times(
            {a: (lambda a=a: rk.rank(model, feats, index, candidates=k, assignment=a)) for a in paths}, args.reps
        )
        with ix.inference_mode(model):
            stage2_s = _best_times(
                {
                    a: (lambda a=a: rk.score_rows(model, feats, index, shortlist, rk.RankOptions(assignment=a)))
                    for a in paths
                },
                args.reps,
            )
        for assignment in paths:
            res = rk.rank(model, feats, index, candidates=k, assignment=assignment, gold=gold)
            metrics = mx.ranking_metrics(res.gold_ranks)
            out["runs"].append(
                {
                    "strategy": "two_stage",
                    "k": k,
                    "assignment": assignment,
                    "mentions_per_s": len(mentions) / rank_s[assignment][0],
                    "stage2_mentions_per_s": len(mentions) / stage2_s[assignment][0],
                    "h1": metrics["hits@1"],
                    "mrr": metrics["mrr"],
                    "h1_subset": mx.ranking_metrics(res.gold_ranks[:n_ex])["hits@1"],
                    "stage1_recall": mx.stage1_recall(res.stage1_gold_ranks, (k,))[f"recall@{k}"],
                }
            )
    if n_ex:
        sub = feats.rows(slice(0, n_ex)).trimmed()
        for assignment in args.exhaustive_assignments:
            start = time.perf_counter()
            rk.rank(model, sub, index, strategy="exhaustive", candidates=50, assignment=assignment)
            seconds = time.perf_counter() - start
            res = rk.rank(
                model, sub, index, strategy="exhaustive", candidates=50, assignment=assignment, gold=gold[:n_ex]
            )
            metrics = mx.ranking_metrics(res.gold_ranks)
            out["runs"].append(
                {
                    "strategy": "exhaustive",
                    "k": None,
                    "assignment": assignment,
                    "mentions_per_s": n_ex / seconds,
                    "h1": metrics["hits@1"],
                    "mrr": metrics["mrr"],
                    "h1_subset": metrics["hits@1"],
                    "mentions": n_ex,
                }
            )
    out["exhaustive_mentions"] = n_ex
    out["peak_rss_serve_mb"] = peak_rss_mb()  # before the FAISS comparison, which copies the stage-1 vectors
    # Stage 1 alone, torch vs FAISS (exact inner product), top-50, no gold.
    for stage1 in ("torch", "faiss"):
        queries = model.mention_stage1(feats).float()
        if stage1 == "torch":
            step = max(1, (1 << 23) // len(index))  # the chunking of rk.rank

            def fn():
                return [
                    (queries[i : i + step] @ index.retrieval.T).topk(50, dim=1) for i in range(0, len(queries), step)
                ]

        else:
            rk.faiss_stage1(index, queries[:2], 50)  # builds the FAISS index outside the timing
            fn = lambda: rk.faiss_stage1(index, queries, 50)  # noqa: E731
        seconds, _ = _best_time(fn, args.reps)
        out[f"stage1_{stage1}_per_s"] = len(mentions) / seconds
    return out


def run_child(mode: str, args, dataset: str, index_dir: str, n_exhaustive: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        mode,
        "--model",
        args.model,
        "--_dataset",
        dataset,
        "--_index_dir",
        index_dir,
        "--mentions",
        str(args.mentions),
        "--exhaustive_mentions",
        str(n_exhaustive),
        "--ks",
        *map(str, args.ks),
        "--index_dtype",
        args.index_dtype,
        "--threads",
        str(args.threads),
        "--reps",
        str(args.reps),
        "--exhaustive_assignments",
        *args.exhaustive_assignments,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"benchmark child {mode} failed for {dataset}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict, args):
    load = os.getloadavg()
    print(
        f"\n## Whole-KB linking: {args.threads} threads, index {args.index_dtype}, model {args.model_desc}; "
        f"load average {load[0]:.1f} / {load[1]:.1f}\n"
    )
    print(
        "| KB | strategy | k | assignment | mentions/s (rank) | mentions/s (stage 2) | mentions/s (end-to-end) "
        "| KD / OT speed (rank, stage 2) | speed-up vs exhaustive | stage-1 recall@k | H@1 | MRR "
        "| H@1 - exhaustive (same mentions) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        serve = r["serve"]
        enc = serve["encode_mentions_per_s"]
        runs = {(x["strategy"], x["k"], x["assignment"]): x for x in serve["runs"]}
        ex = {x["assignment"]: x for x in serve["runs"] if x["strategy"] == "exhaustive"}
        for x in serve["runs"]:
            two_stage = x["strategy"] == "two_stage"
            e2e = 1 / (1 / x["mentions_per_s"] + 1 / enc)
            ref = ex.get(x["assignment"]) or ex.get("ot")
            speed = f"{x['mentions_per_s'] / ref['mentions_per_s']:.0f}x" if ref and two_stage else ""
            diff = f"{100 * (x['h1_subset'] - ref['h1']):+.1f} (n={ref['mentions']})" if ref and two_stage else ""
            recall = f"{100 * x['stage1_recall']:.1f}" if "stage1_recall" in x else ""
            stage2 = f"{x['stage2_mentions_per_s']:.1f}" if "stage2_mentions_per_s" in x else ""
            ot = runs.get((x["strategy"], x["k"], "ot"))
            kd_speed = ""
            if x["assignment"] == "attention" and ot:
                kd_speed = f"{x['mentions_per_s'] / ot['mentions_per_s']:.2f}x"
                if stage2:
                    kd_speed += f", {x['stage2_mentions_per_s'] / ot['stage2_mentions_per_s']:.2f}x"
            k = x["k"] if x["k"] else "all"
            n_m = x.get("mentions", serve["mentions"])
            print(
                f"| {n:,} | {x['strategy']} | {k} | {x['assignment']} | {x['mentions_per_s']:.1f} | {stage2} "
                f"| {e2e:.1f} | {kd_speed} | {speed} | {recall} | {100 * x['h1']:.1f} (n={n_m}) | {100 * x['mrr']:.1f} "
                f"| {diff} |"
            )
    print(
        "\n| KB | KD H@1 - OT H@1 (k=50) | stage 1 torch / FAISS (mentions/s, top-50) | mention encoding /s "
        "| KB encoding entities/s | index MB (fp32 MB) | text tokens | peak RSS build MB | peak RSS serve MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in results.items():
        serve, build = r["serve"], r["build"]
        runs = {(x["strategy"], x["k"], x["assignment"]): x for x in serve["runs"]}
        ot, kd = runs.get(("two_stage", 50, "ot")), runs.get(("two_stage", 50, "attention"))
        kd_loss = f"{100 * (kd['h1'] - ot['h1']):+.1f}" if ot and kd else ""
        print(
            f"| {n:,} | {kd_loss} | {serve['stage1_torch_per_s']:.0f} / {serve['stage1_faiss_per_s']:.0f} "
            f"| {serve['encode_mentions_per_s']:.0f} | {build['entities_per_s']:.0f} "
            f"| {build['index_mb']:.0f} ({build['index_fp32_mb']:.0f}) | {build['text_len']} "
            f"| {build['peak_rss_build_mb']:.0f} | {serve['peak_rss_serve_mb']:.0f} |"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="OT-MEL folder (model + processor); default: a tiny random one built offline")
    p.add_argument("--sizes", type=int, nargs="+", default=[3000, 30000, 100000])
    p.add_argument("--mentions", type=int, default=300, help="mentions linked per KB (validation + test pool)")
    p.add_argument(
        "--exhaustive_mentions",
        type=int,
        nargs="+",
        default=[200, 50, 20],
        help="mentions ranked exhaustively, per size (the last value repeats)",
    )
    p.add_argument("--exhaustive_assignments", nargs="+", default=["ot", "attention"], choices=["ot", "attention"])
    p.add_argument("--ks", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--index_dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each two-stage run (best is kept)")
    p.add_argument("--world_mentions", type=int, default=2000, help="mentions generated per synthetic world")
    p.add_argument("--work_dir", default=os.path.join(REPO, "data", "bench_linking"))
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--_child", choices=["build", "serve"], help=argparse.SUPPRESS)
    p.add_argument("--_dataset", help=argparse.SUPPRESS)
    p.add_argument("--_index_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        args.dataset, args.index_dir = args._dataset, args._index_dir
        args.exhaustive_mentions = args.exhaustive_mentions[0]
        result = child_build(args) if args._child == "build" else child_serve(args)
        print(json.dumps(result))
        return
    os.makedirs(args.work_dir, exist_ok=True)
    datasets = {n: world_dir(args.work_dir, n, args.world_mentions) for n in args.sizes}
    args.model_desc = args.model
    if not args.model:
        args.model = build_tiny_model(args.work_dir, list(datasets.values()))
        args.model_desc = "tiny random OT-MEL (speed/memory only)"
    results = {}
    for i, n in enumerate(args.sizes):
        n_ex = args.exhaustive_mentions[min(i, len(args.exhaustive_mentions) - 1)]
        index_dir = os.path.join(args.work_dir, f"index-{n}-{args.index_dtype}")
        start = time.time()
        build = run_child("build", args, datasets[n], index_dir, n_ex)
        serve = run_child("serve", args, datasets[n], index_dir, n_ex)
        results[n] = {"build": build, "serve": serve}
        print(f"KB {n:,}: done in {time.time() - start:.0f} s", flush=True)
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
