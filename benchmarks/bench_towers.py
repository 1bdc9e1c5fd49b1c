"""Benchmark of full-size tower encoding (towers_otmel): what float32 eager / SDPA attention, int8 dynamic quantisation,
bfloat16, torch.compile and the batch size do to mention and entity encoding speed, and how far each moves the scores.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_towers.py [--threads 2] [--variants ...] \
        [--batch_sizes 1 16 64] [--time_mentions 64] [--time_entities 64] [--agree_mentions 100] \
        [--agree_entities 300] [--reps 2] [--slow_cap 32] [--work_dir data/bench_towers] [--json results.json] [--quick]

About 12 minutes on 2 threads of the 2-core AVX2 CPU (model and world built once, then cached under --work_dir; about
20 minutes with --slow_cap 0); `--variants` and the counts shrink it, `--quick` is a smoke test (2-layer towers).

The model: an OT-MEL at the real architecture (`transformers.CLIPConfig()` defaults, i.e. openai/clip-vit-base-patch32
dimensions: 12 + 12 layers, 512 / 768 wide, 224-px pictures in 32-px patches; OTMELConfig defaults, hidden size 96;
about 151 M parameters) with seeded random weights and the project's offline tokenizer (`tiny_clip.build_tokenizer`
trained on the world's KB and training texts) and a CLIP image processor at 224 px: nothing is downloaded. Its speed
is the real architecture's; its scores are those of random weights (see "agreement" below).

The world: a small synthetic world (`datasets_scripts/make_synthetic.py`, 400 entities, 600 mentions, seed 0).

Speed (per variant and batch size, best of `--reps`): mentions/s of `ranking_otmel.encode_mentions` (processor +
`OTMELModel.encode_mentions`, the linker's path) on the first `--time_mentions` mentions *with a picture* (text +
picture), and entities/s of `index_otmel.encode_kb` (the index's path) on the first `--time_entities` entities with a
picture. At batch size 1 only the first 16 of each are timed.

Variants (each in a fresh process, so peak RSS is per variant):
- `fp32-eager`: float32, eager attention: the reference of every agreement figure;
- `fp32-sdpa`: float32, `attn_implementation="sdpa"` (what `from_pretrained` picks by default);
- `int8`: SDPA + `towers_otmel.optimize_towers(model, "int8")` (dynamic int8 quantisation of the towers' nn.Linear);
- `bf16`: SDPA + `optimize_towers(model, "bfloat16")` (towers in bfloat16);
- `compile`: SDPA + the two towers compiled (`nn.Module.compile(dynamic=True)`, inductor); the first call (the
  compilation) is timed apart;
- `int8-compile`: `int8`, then the two towers compiled as in `compile`.
bf16 and compile run on fewer items (`--slow_cap`, printed with their agreement rows): bf16 is slow on a CPU without
bfloat16 instructions, and compile's agreement is exact to float rounding.

Agreement with the reference, on the first `--agree_mentions` mentions and `--agree_entities` KB entities of the
world (with and without pictures): S_O of every (mention, entity) pair (`ranking_otmel.rank`, exhaustive, OT), with
the variant's mentions against the reference's float32 index ("m") and against the variant's own index ("m+e"):
top-1 agreement, mean top-10 overlap, max and mean |score difference|, and the mean over mentions of the Spearman and
Kendall (tau-b) correlations of the variant's scores with the reference's. With random weights the scores of one
mention lie close together, so the median gap between the reference's first and second entity is printed too: a
variant can only change a top-1 whose gap is below twice its score change, and the top-1 agreement over the mentions
whose gap is at least 0.01 is printed apart. "batch dep." is the max |score difference| between the first 16 mentions
(8 when capped) encoded one by one and in batches of 64 (int8 activations are scaled per batch).

The machine may be shared: the load average before and after is printed.
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
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("fp32-eager", "fp32-sdpa", "int8", "bf16", "compile", "int8-compile")
REFERENCE = "fp32-eager"
# Top-1 agreement is also reported over the mentions whose float32 first and second entities are at least this far apart
# (not near ties).
CLEAR_GAP = 0.01
# Variants run on fewer items (--slow_cap): bf16 (about 6x slower than float32 on a CPU without bfloat16 instructions)
# and compile (its agreement is exact to float rounding; the compilation itself takes minutes).
SLOW_VARIANTS = ("bf16", "compile", "int8-compile")
# Variants whose towers are compiled (the first calls, the compilation, timed apart).
COMPILED_VARIANTS = ("compile", "int8-compile")
# Variants timed at every --batch_sizes; the others at the largest only.
BATCH_VARIANTS = ("fp32-sdpa", "int8", "int8-compile")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- set-up (parent) -------------------------------------------------------------------------------------------


def world_dir(work_dir: str, entities: int, mentions: int) -> str:
    from datasets_scripts.convert_mimic import convert
    from datasets_scripts.make_synthetic import generate

    raw, out = os.path.join(work_dir, f"synth-{entities}-raw"), os.path.join(work_dir, f"synth-{entities}")
    if not os.path.isfile(os.path.join(out, "README.md")):
        if not os.path.isfile(os.path.join(raw, "kb_entity.json")):
            print(f"generating a synthetic world of {entities} entities in {raw} ...", flush=True)
            generate(raw, entities=entities, mentions=mentions, seed=0, workers=1)
        convert(raw, out, overwrite=True, verbose=False, num_proc=1)
        shutil.rmtree(raw)
    return out


def build_model(work_dir: str, dataset: str, layers: int | None) -> str:
    """The full-size random OT-MEL (cached): CLIPConfig() dimensions, the offline tokenizer, 224-px pictures."""
    name = "full-otmel" if layers is None else f"otmel-{layers}-layers"
    out = os.path.join(work_dir, name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    import torch
    from datasets import load_dataset
    from transformers import CLIPConfig, CLIPImageProcessorPil

    from configuration_otmel import OTMELConfig
    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor
    from tiny_clip import build_tokenizer

    kb = load_dataset(dataset, "kb")["train"]
    train = load_dataset(dataset, "mentions")["train"]
    texts = [f"{n} [SEP] {a}" for n, a in zip(kb["name"], kb["attributes"])]
    texts += [f"{m} [SEP] {s}" for m, s in zip(train["mention"], train["sentence"])]
    tokenizer = build_tokenizer(texts, vocab_size=4000)
    ids = {k: tokenizer.convert_tokens_to_ids(k) for k in ("<pad>", "<|startoftext|>", "<|endoftext|>")}
    # CLIP pools the text at its end token: the tokenizer's ids (the default 49407 is not in this vocabulary).
    text = dict(pad_token_id=ids["<pad>"], bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|endoftext|>"])
    if layers is not None:
        text["num_hidden_layers"] = layers
    vision = {"num_hidden_layers": layers} if layers is not None else {}
    clip = CLIPConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = OTMELModel(OTMELConfig(clip_config=clip))
    size = clip.vision_config.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = OTMELProcessor(images, tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---- one variant (child) -----------------------------------------------------------------------------------------


def _subsets(dataset: str, args):
    from datasets import concatenate_datasets, load_dataset

    kb = load_dataset(dataset, "kb")["train"]
    ms = load_dataset(dataset, "mentions")
    pool = concatenate_datasets([ms["validation"], ms["test"], ms["train"]])
    with_picture = [i for i, im in enumerate(pool["image"]) if im is not None]
    kb_pictured = [i for i, im in enumerate(kb["image"]) if im is not None]
    return {
        "time_mentions": pool.select(with_picture[: args.time_mentions]),
        "time_entities": kb.select(kb_pictured[: args.time_entities]),
        "agree_mentions": pool.select(range(min(args.agree_mentions, len(pool)))),
        "agree_entities": kb.select(range(min(args.agree_entities, len(kb)))),
    }


def load_variant(model_dir: str, variant: str):
    import torch

    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor
    from towers_otmel import optimize_towers, tower_modules

    attn = "eager" if variant == "fp32-eager" else "sdpa"
    model = OTMELModel.from_pretrained(model_dir, attn_implementation=attn).eval()
    processor = OTMELProcessor.from_pretrained(model_dir)
    assert model.config._attn_implementation == attn, model.config._attn_implementation
    assert model.clip.vision_model.config._attn_implementation == attn
    if variant in ("int8", "int8-compile"):
        optimize_towers(model, "int8")
    elif variant == "bf16":
        optimize_towers(model, "bfloat16")
    if variant in COMPILED_VARIANTS:
        for tower in tower_modules(model).values():
            tower.compile(dynamic=True)
    torch.manual_seed(0)
    return model, processor


def _score_matrix(model, mentions, index):
    """`(B, N)` S_O of every mention with every entity of `index` (exhaustive ranking, the linker's scoring)."""
    import torch

    import ranking_otmel as rk

    n = len(index)
    result = rk.rank(model, mentions, index, rk.RankOptions(strategy="exhaustive", candidates=n, top_k=n))
    full = torch.empty(result.scores.shape[0], n)
    full.scatter_(1, result.indices, result.scores.float())
    return full


def _rankdata(x):
    import torch

    order = x.argsort(dim=-1)
    ranks = torch.empty_like(x)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x).contiguous())
    return ranks


def agreement(ref, got) -> dict:
    """Agreement of `got (B, N)` scores with `ref (B, N)`: see the module docstring."""
    import torch

    ref, got = ref.double(), got.double()
    top_ref, top_got = ref.topk(10, dim=1).indices, got.topk(10, dim=1).indices
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(top_ref.tolist(), top_got.tolist())]
    diff = (got - ref).abs()
    rr, rg = _rankdata(ref), _rankdata(got)
    rr, rg = rr - rr.mean(1, keepdim=True), rg - rg.mean(1, keepdim=True)
    spearman = (rr * rg).sum(1) / (rr.norm(dim=1) * rg.norm(dim=1))
    kendall = []
    for a, b in zip(ref, got):
        sa, sb = torch.sign(a[:, None] - a[None, :]), torch.sign(b[:, None] - b[None, :])
        n0 = a.numel() * (a.numel() - 1)
        ties_a, ties_b = n0 - (sa != 0).sum().item(), n0 - (sb != 0).sum().item()
        kendall.append((sa * sb).sum().item() / max(1e-12, ((n0 - ties_a) * (n0 - ties_b)) ** 0.5))
    two = ref.topk(2, dim=1).values
    same = top_ref[:, 0] == top_got[:, 0]
    clear = (two[:, 0] - two[:, 1]) >= CLEAR_GAP
    return {
        "top1": float(same.double().mean()),
        "top1_clear": float(same[clear].double().mean()) if bool(clear.any()) else None,
        "clear_mentions": int(clear.sum()),
        "top10_overlap": sum(overlap) / len(overlap),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "spearman": float(spearman.mean()),
        "kendall": sum(kendall) / len(kendall),
        "ref_top2_gap_median": float((two[:, 0] - two[:, 1]).median()),
        "ref_score_spread_median": float((ref.max(1).values - ref.min(1).values).median()),
        "mentions": ref.shape[0],
        "entities": ref.shape[1],
    }


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import index_otmel as ix
    import ranking_otmel as rk
    from modeling_otmel import OTMELMentionFeatures

    variant = args._child
    out = {"variant": variant, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    model, processor = load_variant(args._model, variant)
    out["load_s"] = time.perf_counter() - start
    out["params"] = sum(p.numel() for p in model.parameters())
    data = _subsets(args._dataset, args)
    out["time_mentions"], out["time_entities"] = len(data["time_mentions"]), len(data["time_entities"])
    sizes = args.batch_sizes if variant in BATCH_VARIANTS else [max(args.batch_sizes)]
    capped = variant in SLOW_VARIANTS and args.slow_cap > 0
    if capped:  # fewer items: the variant is slow (bf16) or its agreement is known to be exact (compile)
        cap = args.slow_cap
        if variant == "bf16":
            for key in ("time_mentions", "time_entities"):
                data[key] = data[key].select(range(min(cap // 2, len(data[key]))))
        data["agree_mentions"] = data["agree_mentions"].select(range(min(cap, len(data["agree_mentions"]))))
        data["agree_entities"] = data["agree_entities"].select(range(min(2 * cap, len(data["agree_entities"]))))
        out["capped"] = cap
    if variant in COMPILED_VARIANTS:  # the compilation: one call of each tower at each timed shape family
        start = time.perf_counter()
        for bs in sizes:
            rk.encode_mentions(model, processor, data["time_mentions"].select(range(min(bs, 4))), bs)
            ix.encode_kb(model, processor, data["time_entities"].select(range(min(bs, 4))), bs, progress=False)
        out["compile_s"] = time.perf_counter() - start
    out["speed"] = {}
    for bs in sizes:
        n_m = min(len(data["time_mentions"]), 16 if bs == 1 else len(data["time_mentions"]))
        n_e = min(len(data["time_entities"]), 16 if bs == 1 else len(data["time_entities"]))
        mentions, entities = data["time_mentions"].select(range(n_m)), data["time_entities"].select(range(n_e))
        # warm-up at this batch size (first-call allocations, oneDNN / fbgemm set-up), not timed
        rk.encode_mentions(model, processor, mentions.select(range(min(bs, n_m, 4))), bs)
        ix.encode_kb(model, processor, entities.select(range(min(bs, n_e, 4))), bs, progress=False)
        t_m = _best(lambda: rk.encode_mentions(model, processor, mentions, bs), args.reps)
        t_e = _best(lambda: ix.encode_kb(model, processor, entities, bs, progress=False), args.reps)
        out["speed"][str(bs)] = {"mentions_per_s": n_m / t_m, "entities_per_s": n_e / t_e, "n_m": n_m, "n_e": n_e}
        print(f"  {variant} batch {bs}: {n_m / t_m:.1f} mentions/s, {n_e / t_e:.1f} entities/s", flush=True)

    # Agreement with the reference (written by the reference's own run, which comes first).
    ref_dir = os.path.join(args.work_dir, f"reference-{os.path.basename(args._model)}")
    feats = rk.encode_mentions(model, processor, data["agree_mentions"], 64)
    index = ix.encode_kb(model, processor, data["agree_entities"], 64, progress=False)
    n_ones = 8 if capped else 16
    ones = rk.encode_mentions(model, processor, data["agree_mentions"].select(range(n_ones)), 1)
    out["index_towers"] = index.meta["model"].get("towers")
    if variant == REFERENCE:
        if os.path.isdir(ref_dir):
            shutil.rmtree(ref_dir)
        index.save(os.path.join(ref_dir, "index"))
        torch.save(feats.row_fields(), os.path.join(ref_dir, "mentions.pt"))
        torch.save(_score_matrix(model, feats, index), os.path.join(ref_dir, "scores.pt"))
    ref_index = ix.EntityIndex.load(os.path.join(ref_dir, "index"), model=model, processor=processor)
    n_m, n_e = len(data["agree_mentions"]), len(data["agree_entities"])
    ref_scores = torch.load(os.path.join(ref_dir, "scores.pt"))[:n_m]  # rows: mentions, columns: KB rows in order
    own = _score_matrix(model, feats, index)
    out["agreement"] = {
        "m": agreement(ref_scores, _score_matrix(model, feats, ref_index)),
        "m+e": agreement(ref_scores[:, :n_e], own),
    }
    ones_scores = _score_matrix(model, ones, index)
    out["batch_dependence_max_abs_diff"] = float((ones_scores - own[:n_ones]).abs().max())
    out["batch_dependence_top1"] = float((ones_scores.argmax(1) == own[:n_ones].argmax(1)).double().mean())
    assert isinstance(feats, OTMELMentionFeatures)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ---- parent ------------------------------------------------------------------------------------------------------


def run_child(args, variant: str) -> dict:
    with open(os.path.join(args.work_dir, f"child-{variant}.json"), "w") as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", variant, "--_json", path]
    for name in ("threads", "time_mentions", "time_entities", "agree_mentions", "agree_entities", "reps", "slow_cap"):
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd += ["--batch_sizes", *map(str, args.batch_sizes), "--work_dir", args.work_dir]
    cmd += ["--_model", args._model, "--_dataset", args._dataset]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"variant {variant} failed (exit {proc.returncode})", flush=True)
        return {"variant": variant, "failed": f"exit status {proc.returncode}", "wall_s": wall}
    with open(path) as f:
        out = json.load(f)
    out["wall_s"] = wall
    return out


def report(r: dict):
    print(
        f"\n## Full-size towers: {r['model']} ({r['params'] / 1e6:.0f} M parameters), {r['threads']} threads; "
        f"load average {r['load_start'][0]:.2f} before, {r['load_end'][0]:.2f} after\n"
    )
    base = r["variants"].get("fp32-sdpa", {}).get("speed", {})
    print("| variant | batch | mentions/s | entities/s | x fp32-sdpa (mentions / entities) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, v in r["variants"].items():
        if "failed" in v:
            print(f"| {name} | | failed: {v['failed']} | | | |")
            continue
        for bs, s in v["speed"].items():
            ratio = ""
            if bs in base:
                ratio = (
                    f"{s['mentions_per_s'] / base[bs]['mentions_per_s']:.2f} / "
                    f"{s['entities_per_s'] / base[bs]['entities_per_s']:.2f}"
                )
            print(
                f"| {name} | {bs} | {s['mentions_per_s']:.1f} | {s['entities_per_s']:.1f} | {ratio} | "
                f"{v['peak_rss_mb']:.0f} |"
            )
    for name in COMPILED_VARIANTS:
        compiled = r["variants"].get(name, {})
        if "compile_s" in compiled:
            print(f"\n{name}: the first calls (compilation) took {compiled['compile_s']:.0f} s")
    print(
        f"\n| variant | index | top-1 agree | top-1 agree, gap >= {CLEAR_GAP} | top-10 overlap | max abs diff | "
        "mean abs diff | Spearman | Kendall | batch dep. |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    gap = None
    for name, v in r["variants"].items():
        if "failed" in v:
            continue
        for which, a in v["agreement"].items():
            gap = a["ref_top2_gap_median"]
            index = "reference float32" if which == "m" else "own"
            if v.get("capped"):
                index += f" ({a['mentions']} x {a['entities']})"
            clear = "" if a["top1_clear"] is None else f"{a['top1_clear']:.3f} (n={a['clear_mentions']})"
            print(
                f"| {name} | {index} | {a['top1']:.3f} | {clear} | {a['top10_overlap']:.3f} | {a['max_abs_diff']:.2e} | "
                f"{a['mean_abs_diff']:.2e} | {a['spearman']:.4f} | {a['kendall']:.4f} | "
                f"{v['batch_dependence_max_abs_diff']:.1e} |"
            )
    if gap is not None:
        a = next(iter(v["agreement"].values()))
        print(
            f"\n{a['mentions']} mentions x {a['entities']} entities; reference (float32 eager): median gap between a "
            f"mention's first and second entity {gap:.2e}, median spread of its scores {a['ref_score_spread_median']:.2e}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--time_mentions", type=int, default=64)
    parser.add_argument("--time_entities", type=int, default=64)
    parser.add_argument("--agree_mentions", type=int, default=100)
    parser.add_argument("--agree_entities", type=int, default=300)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument(
        "--slow_cap",
        type=int,
        default=32,
        help="bf16 and compile: agreement on this many mentions and twice as many entities, bf16 timed on half as "
        "many items (0: no cap, as the other variants)",
    )
    parser.add_argument("--work_dir", default=os.path.join(REPO, "data", "bench_towers"))
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2-layer towers (ViT-B/32 widths), few items, no compile unless asked with --variants",
    )
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_dataset", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        out = child(args)
        with open(args._json, "w") as f:
            json.dump(out, f)
        return 0
    if any(b < 1 for b in args.batch_sizes) or min(args.time_mentions, args.time_entities, args.reps) < 1:
        parser.error("--batch_sizes, --time_mentions, --time_entities and --reps must be positive")
    if args.agree_mentions < 16 or args.agree_entities < 10:
        parser.error("--agree_mentions must be at least 16 and --agree_entities at least 10")
    layers = None
    if args.quick:
        layers = 2
        defaults = parser.parse_args([])
        for name, value in (("time_mentions", 8), ("time_entities", 8), ("agree_mentions", 16)):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
        if args.agree_entities == defaults.agree_entities:
            args.agree_entities = 40
        if args.batch_sizes == defaults.batch_sizes:
            args.batch_sizes = [1, 8]
        if args.reps == defaults.reps:
            args.reps = 1
        if args.variants == defaults.variants:
            args.variants = [v for v in VARIANTS if v not in COMPILED_VARIANTS]
    variants = [REFERENCE] + [v for v in args.variants if v != REFERENCE]  # the reference runs first
    os.makedirs(args.work_dir, exist_ok=True)
    results = {"load_start": os.getloadavg(), "threads": args.threads, "args": vars(args)}
    args._dataset = world_dir(args.work_dir, 400, 600)
    args._model = build_model(args.work_dir, args._dataset, layers)
    results["model"] = "ViT-B/32-shaped OT-MEL" if layers is None else f"{layers}-layer towers (quick)"
    results["variants"] = {}
    for variant in variants:
        print(f"[{time.strftime('%H:%M:%S')}] {variant}", flush=True)
        results["variants"][variant] = run_child(args, variant)
        if args.json:  # written after every variant: an interrupted run keeps what it measured
            results["load_end"] = os.getloadavg()
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    results["load_end"] = os.getloadavg()
    ok = [v for v in results["variants"].values() if "failed" not in v]
    results["params"] = ok[0]["params"] if ok else 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    report(results)
    return 0 if len(ok) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
