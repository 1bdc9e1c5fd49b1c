"""Benchmark of the entity index at scale (index_otmel, ranking_otmel): a KB of a million entities with the tiny model,
compressed memory-mapped storage, approximate stage 1, sharded resumable building.

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py [--entities 1000000] [--mentions 1000] [--threads 2]
        [--dtype res2] [--work_dir data/bench_scale] [--json results.json]

Steps (each cached under `--work_dir`, so an interrupted run resumes; every measurement runs in a fresh process so
peak memory is per step):

1. a synthetic world of `--entities` entities (`datasets_scripts/make_synthetic.py`, `convert_mimic.py`); its
   validation + test mentions (the first `--mentions`) are linked;
2. a tiny random OT-MEL (as `bench_linking.py`: tiny CLIP, hidden 96, tokenizer trained on the world's texts): its
   speed and memory are representative, its H@1 is not (random weights), but compressed + ANN minus float32 + exact
   H@1 on the same mentions still measures what compression and approximate search lose for that model;
3. "build": every entity encoded for real (no replicated features) into a float32 index, shard by shard
   (`index_otmel.build_index`, resumable); entities/s counts the encoding of this run only;
4. "convert": the float32 index rewritten as `--dtype` (`index_otmel.convert_index`, no re-encoding) with the ANN
   structure of `--ann_kind` (the index's default, `index_otmel.ANN_DEFAULT_KIND`; a kind other than IVF is kept in
   folders of its own, built on a copy of the IVF index of the same storage when there is one); also its first
   100K / 300K rows (the smaller KBs);
5. "serve": model + index loaded (memory-mapped) in a fresh process; stage-1 recall@50 of ANN against exact search (the
   ANN top 50 found in the exact top 50, and the gold's recall@50 both ways); link() throughput, two-stage k=50,
   OT and attention (mention encoding included, best of `--reps`); H@1 with gold answers; memory (peak RSS, and the
   resident anonymous / file-backed parts after the runs);
6. "reference": the float32 index with exact stage 1, the same mentions: H@1 for the comparison;
7. bytes per entity of every storage for this model and for ViT-B/32 dimensions (from the CLIP and OT-MEL configs).

The machine may be shared: the load average is printed with the results.
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
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from index_otmel import ANN_DEFAULT_KIND, ANN_KINDS  # noqa: E402 - after the path and environment set-up


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> dict:
    """VmRSS and its anonymous / file-backed parts (/proc/self/status), MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def world_dir(work_dir: str, n: int, n_mentions: int) -> str:
    from datasets_scripts.convert_mimic import convert
    from datasets_scripts.make_synthetic import generate

    raw, out = os.path.join(work_dir, f"synth-{n}-raw"), os.path.join(work_dir, f"synth-{n}")
    if not os.path.isfile(os.path.join(out, "README.md")):
        if not os.path.isfile(os.path.join(raw, "kb_entity.json")):
            print(f"generating a synthetic world of {n:,} entities in {raw} ...", flush=True)
            generate(raw, entities=n, mentions=n_mentions, seed=0, workers=1)
        print(f"converting {raw} -> {out} ...", flush=True)
        convert(raw, out, overwrite=True, verbose=False, num_proc=1)
        shutil.rmtree(raw)
    return out


def _mentions(dataset_dir: str, n: int):
    from datasets import concatenate_datasets, load_dataset

    ms = load_dataset(dataset_dir, "mentions")
    pool = concatenate_datasets([ms["validation"], ms["test"]])
    pool = pool.filter(lambda a: a != "nil", input_columns="answer")
    return pool.select(range(min(n, len(pool))))


# ---- children ----------------------------------------------------------------------------------------------------


def child_build(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset

    import index_otmel as ix
    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor

    model = OTMELModel.from_pretrained(args.model).eval()
    processor = OTMELProcessor.from_pretrained(args.model)
    kb = load_dataset(args._dataset, "kb")["train"]
    view = ix.KBView(kb)
    encoded = {"rows": 0, "seconds": 0.0}
    real = ix._encode_rows

    def timed(model, processor, view, start, end, *rest):
        t = time.perf_counter()
        out = real(model, processor, view, start, end, *rest)
        encoded["rows"] += end - start
        encoded["seconds"] += time.perf_counter() - t
        return out

    ix._encode_rows = timed
    start = time.perf_counter()
    index = ix.build_index(
        model,
        processor,
        view,
        args._index_dir,
        dtype="float32",
        batch_size=128,
        shard_size=args.shard_size,
        ann=False,
        progress=False,
    )
    total = time.perf_counter() - start
    return {
        "n": len(index),
        "rows_encoded_this_run": encoded["rows"],
        "encode_s": encoded["seconds"],
        "entities_per_s": encoded["rows"] / encoded["seconds"] if encoded["rows"] else None,
        "build_total_s": total,
        "bytes_per_entity": index.nbytes() / len(index),
        "text_len": index.tensors["text_mask"].shape[1],
        "peak_rss_build_mb": peak_rss_mb(),
    }


def child_convert(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import index_otmel as ix

    start = time.perf_counter()
    rows = range(args._rows) if args._rows else None
    source = ix.EntityIndex.load(args._source, verify=False)
    if source.meta["dtype"] == args.dtype and rows is None:  # only another ANN structure: the storage is copied
        source.ann = None
        source.save(args._index_dir)
        index = ix.EntityIndex.load(args._index_dir, verify=False)
    else:
        index = ix.convert_index(args._source, args._index_dir, args.dtype, rows=rows, shard_size=20_000, ann=False)
    del source
    convert_s = time.perf_counter() - start
    out = {"n": len(index), "convert_s": convert_s, "bytes_per_entity": index.nbytes() / len(index)}
    out["ann_kind"] = args.ann_kind
    if args._ann:
        start = time.perf_counter()
        index.build_ann(kind=args.ann_kind)
        out["ann_build_s"] = time.perf_counter() - start
        out["ann"] = index.ann.config
        out["ann_bytes_per_entity"] = len(ix.import_faiss().serialize_index(index.ann.index)) / len(index)
        index.save(args._index_dir)
    files = [os.path.join(args._index_dir, f) for f in os.listdir(args._index_dir)]
    out["disk_bytes_per_entity"] = sum(os.path.getsize(f) for f in files if os.path.isfile(f)) / len(index)
    out["peak_rss_convert_mb"] = peak_rss_mb()
    return out


def _best(fns: dict, reps: int) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def child_serve(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import index_otmel as ix
    import linking_otmel as lk
    import metrics_otmel as mx
    import ranking_otmel as rk

    out = {"rss_start": rss_now_mb()}
    linker = lk.OTMELLinker.from_pretrained(args.model, quantize=None)  # float32 towers, as measured
    model, processor = linker.model, linker.processor
    out["rss_model"] = rss_now_mb()
    start = time.perf_counter()
    index = ix.EntityIndex.load(args._index_dir, verify=False)
    out["open_s"] = time.perf_counter() - start
    if index.nbytes() < 8 << 30:  # as a server opens it (the sha256 of a very large reference is not worth reading)
        start = time.perf_counter()
        index = ix.EntityIndex.load(args._index_dir, verify=True)
        out["open_verified_s"] = time.perf_counter() - start
    if args.nprobe and index.ann is not None:  # query-time settings: IVF lists searched, HNSW search breadth
        index.ann.config["nprobe"] = args.nprobe
    if args.ef_search and index.ann is not None:
        index.ann.config["ef_search"] = args.ef_search
    linker.index = index
    out["rss_opened"] = rss_now_mb()
    out["n"], out["dtype"], out["ann"] = len(index), index.meta["dtype"], index.ann.config if index.ann else None
    mentions = _mentions(args._dataset, args.mentions)
    out["mentions"] = len(mentions)
    gold = torch.tensor([index.row_of(a) for a in mentions["answer"]])
    out["gold_in_kb"] = int((gold >= 0).sum())
    # link(): mention encoding + both stages, two-stage k=50, OT and attention; first, so that the peak memory is
    # that of serving, not of the exact searches the comparisons below make.
    search = args._stage1
    sample = mentions.select(range(min(len(mentions), args.link_mentions)))
    linker.link(sample.select(range(8)), top_k=5, candidates=50, stage1=search)  # warm-up
    seconds = _best(
        {
            a: (lambda a=a: linker.link(sample, top_k=5, candidates=50, assignment=a, stage1=search))
            for a in ("ot", "attention")
        },
        args.reps,
    )
    out["link_mentions_per_s"] = {a: len(sample) / s for a, s in seconds.items()}
    out["link_stage1"] = rk.stage1_search(rk.RankOptions(stage1=search), index)
    out["peak_rss_link_mb"], out["rss_after_link"] = peak_rss_mb(), rss_now_mb()  # serving: before the evaluation
    t = time.perf_counter()
    feats = rk.encode_mentions(model, processor, mentions, batch_size=64)
    out["encode_mentions_per_s"] = len(mentions) / (time.perf_counter() - t)
    queries = model.mention_stage1(feats).float()
    stage1 = {"exact": lambda: index.stage1_topk(queries, 50)}
    if index.ann is not None:
        stage1["ann"] = lambda: index.ann_topk(queries, 50)
    seconds = _best(stage1, args.reps)
    out["stage1_mentions_per_s"] = {k: len(mentions) / v for k, v in seconds.items()}
    exact_rows = index.stage1_topk(queries, 50)[1]
    if index.ann is not None:
        ann_rows = index.ann_topk(queries, 50)[1]
        overlap = (ann_rows.unsqueeze(2) == exact_rows.unsqueeze(1)).any(2).float().mean().item()
        out["ann_recall_of_exact_top50"] = overlap
        has = gold >= 0
        out["gold_recall50_exact"] = (exact_rows[has] == gold[has].unsqueeze(1)).any(1).float().mean().item()
        out["gold_recall50_ann"] = (ann_rows[has] == gold[has].unsqueeze(1)).any(1).float().mean().item()
    # H@1 with gold answers: the shortlist from this stage-1 search; gold ranks need every S_R (exact, untimed).
    options = rk.RankOptions(candidates=50, stage1=search)
    for assignment in ("ot", "attention"):
        res = rk.rank(model, feats, index, options, gold=gold, assignment=assignment)
        metrics = mx.ranking_metrics(res.gold_ranks)
        out[f"h1_{assignment}"], out[f"mrr_{assignment}"] = metrics["hits@1"], metrics["mrr"]
        out[f"gold_ranks_{assignment}"] = res.gold_ranks.tolist()
        out[f"top1_{assignment}"] = res.indices[:, 0].tolist()
    out["stage1_gold_recall50"] = mx.stage1_recall(res.stage1_gold_ranks, (50,))["recall@50"]
    out["peak_rss_serve_mb"] = peak_rss_mb()
    out["rss_end"] = rss_now_mb()
    return out


def child_accuracy(args) -> dict:
    """What compression and approximate search cost a TRAINED model: `--accuracy_model` ranks the test mentions of
    `--accuracy_world` (a raw synthetic world folder) against its KB, float32 + exact stage 1 against each compressed
    storage + ANN stage 1 (each of `--accuracy_ann_kinds`, forced whatever the KB size; `--accuracy_distractors` more
    entities from the scale world in the KB), two-stage k=50, OT. A random model's H@1 (the 1M run) is
    near zero and its scores nearly tied, so this is where an H@1 change can show."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import load_dataset

    import index_otmel as ix
    import metrics_otmel as mx
    import ranking_otmel as rk
    from datasets_scripts.convert_mimic import convert
    from linking_otmel import OTMELLinker

    converted = os.path.join(args.work_dir, "accuracy-world")
    convert(args.accuracy_world, converted, overwrite=True, verbose=False, num_proc=1)
    kb = load_dataset(converted, "kb")["train"]
    if args.accuracy_distractors:  # the scale world's first entities join the KB (their qids prefixed: no clash)
        from datasets import concatenate_datasets

        scale_kb = load_dataset(world_dir(args.work_dir, args.entities, args.generate_mentions), "kb")["train"]
        others = scale_kb.select(range(min(args.accuracy_distractors, len(scale_kb))))
        others = others.map(lambda q: {"qid": "distractor-" + q}, input_columns="qid").cast(kb.features)
        kb = concatenate_datasets([kb, others])
    mentions = load_dataset(converted, "mentions")["test"].filter(lambda a: a != "nil", input_columns="answer")
    linker = OTMELLinker.from_pretrained(args.accuracy_model, quantize=None)
    model, processor = linker.model, linker.processor
    feats = rk.encode_mentions(model, processor, mentions, batch_size=64)
    kb_qids = list(kb["qid"])
    qid_rows = {q: i for i, q in enumerate(kb_qids)}
    gold = torch.tensor([qid_rows.get(a, -1) for a in mentions["answer"]])
    out = {"model": args.accuracy_model, "world": args.accuracy_world, "entities": len(kb), "mentions": len(mentions)}
    out["distractors"] = args.accuracy_distractors

    queries = model.mention_stage1(feats).float()

    def measure(index, stage1: str) -> dict:
        assert list(index.qids) == kb_qids, "the index rows are the KB rows"
        res = rk.rank(model, feats, index, rk.RankOptions(candidates=50, stage1=stage1), gold=gold)
        metrics = mx.ranking_metrics(res.gold_ranks)
        # The gold entity among the 50 rows stage 1 hands to stage 2 (exact S_R ranks say nothing of the ANN's).
        rows = index.ann_topk(queries, 50)[1] if stage1 == "ann" else index.stage1_topk(queries, 50)[1]
        recall = (rows == gold.unsqueeze(1)).any(1).float().mean().item()
        return {"h1": metrics["hits@1"], "mrr": metrics["mrr"], "recall50": recall, "top1": res.indices[:, 0].tolist()}

    if args.accuracy_reference != "float32":  # too large for a float32 index in memory: one storage, built on disk
        folder = os.path.join(args.work_dir, f"accuracy-{args.accuracy_reference}-{len(kb)}")
        start = time.perf_counter()
        if os.path.isfile(os.path.join(folder, ix.INDEX_META)):  # an earlier run's (refused if of another KB or model)
            index = ix.EntityIndex.load(folder, model=model, processor=processor, kb=kb)
            out["reused_index"] = folder
        else:
            index = ix.build_index(
                model, processor, kb, folder, dtype=args.accuracy_reference, ann=False, progress=False
            )
            out["build_s"] = time.perf_counter() - start  # encoding included (resumed shards excepted)
        out[f"{args.accuracy_reference}_exact"] = measure(index, "torch")
        base = out[f"{args.accuracy_reference}_exact"].pop("top1")
        for kind in args.accuracy_ann_kinds:
            start = time.perf_counter()
            index.build_ann(kind=kind)
            build_s = time.perf_counter() - start
            m = measure(index, "ann")
            m["ann_build_s"] = build_s
            m["same_top1"] = sum(a == b for a, b in zip(m.pop("top1"), base)) / len(base)
            m["ann"] = index.ann.config
            out[f"{args.accuracy_reference}_ann_{kind}"] = m
        return out
    reference = linker.build_index(kb, dtype="float32", progress=False)
    out["float32_exact"] = measure(reference, "torch")
    base = out["float32_exact"]["top1"]
    reference.save(os.path.join(args.work_dir, "accuracy-float32"))
    for dtype in args.accuracy_dtypes:
        folder = os.path.join(args.work_dir, f"accuracy-{dtype}")
        index = ix.convert_index(os.path.join(args.work_dir, "accuracy-float32"), folder, dtype, ann=False)
        for name, kind in (("exact", None), *((f"ann_{k}", k) for k in args.accuracy_ann_kinds)):
            if kind is not None:
                index.build_ann(kind=kind)
            m = measure(index, "ann" if kind else "torch")
            m["same_top1"] = sum(a == b for a, b in zip(m.pop("top1"), base)) / len(base)
            m["bytes_per_entity"] = index.nbytes() / len(index)
            m["ann"] = index.ann.config if kind else None
            out[f"{dtype}_{name}"] = m
    out["float32_exact"].pop("top1")
    return out


def cached_child(name: str, mode: str, args, **extra) -> dict:
    """`run_child`, or the result a previous run saved for this step when its index is still there (so a rerun, e.g.
    with other `--threads`, measures serving again without building again). An index left by a run that saved no
    result is reused as it is, with its size only (`"reused": True`): no figure is made up for it."""
    path = os.path.join(args.work_dir, f"step-{name}.json")
    index_dir = extra["index_dir"]
    done = os.path.isfile(os.path.join(index_dir, "entity_index.json"))
    if os.path.isfile(path) and done:
        with open(path) as f:
            return json.load(f)
    if done and mode in ("build", "convert"):
        import index_otmel as ix

        index = ix.EntityIndex.load(index_dir, verify=False)
        files = [os.path.join(index_dir, f) for f in os.listdir(index_dir)]
        return {
            "n": len(index),
            "reused": True,
            "bytes_per_entity": index.nbytes() / len(index),
            "disk_bytes_per_entity": sum(os.path.getsize(f) for f in files if os.path.isfile(f)) / len(index),
            "ann": index.ann.config if index.ann is not None else None,
        }
    out = run_child(mode, args, **extra)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
    return out


def child_build_rate(args) -> dict:
    """KB encoding speed with 1 process (`--threads` threads) and with 2 processes (1 thread each), measured with the
    public command `python index_otmel.py ... --num_shards N --shard_index I` (the way a user spreads a build over
    processes or machines): one shard alone, then two other shards at once. Peak RSS of the largest process."""
    num_shards = max(2, args.entities // args.rate_rows)
    out_dir = os.path.join(args.work_dir, f"build-rate-{args.entities}")
    shutil.rmtree(out_dir, ignore_errors=True)

    def run(shards: list, threads: int) -> float:
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    os.path.join(REPO, "index_otmel.py"),
                    "--model",
                    args.model,
                    "--kb",
                    args._dataset,
                    "--out_dir",
                    out_dir,
                    "--dtype",
                    "float32",
                    "--batch_size",
                    "128",
                    "--num_shards",
                    str(num_shards),
                    "--shard_index",
                    str(s),
                    "--threads",
                    str(threads),
                ],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for s in shards
        ]
        encode_s = []
        for proc in procs:
            _, err = proc.communicate()
            end = time.time()
            if proc.returncode != 0:
                raise SystemExit(f"index_otmel.py failed:\n{err[-3000:]}")
            begun = [line for line in err.splitlines() if "encoding shard" in line]  # logged as the encoding starts
            stamp = time.mktime(time.strptime(begun[0].split(",")[0], "%Y-%m-%d %H:%M:%S"))
            encode_s.append(end - stamp)
        return time.perf_counter() - start, max(encode_s)

    rows = args.entities // num_shards
    one, one_encode = run([0], args.threads)
    two, two_encode = run([1, 2], 1)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "rows_per_shard": rows,
        "one_process": {
            "threads": args.threads,
            "seconds": one,
            "encode_s": one_encode,
            "entities_per_s": rows / one_encode,
        },
        "two_processes": {
            "threads": 1,
            "seconds": two,
            "encode_s": two_encode,
            "entities_per_s": 2 * rows / two_encode,
        },
        "peak_rss_build_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "note": "entities/s from the 'encoding shard' log line to the end of the process (shard written); 'seconds' "
        "also counts loading the model and the KB",
    }


def run_child(mode: str, args, **extra) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        mode,
        "--model",
        args.model or "",
        "--threads",
        str(args.threads),
        "--mentions",
        str(args.mentions),
        "--link_mentions",
        str(args.link_mentions),
        "--reps",
        str(args.reps),
        "--dtype",
        args.dtype,
        "--shard_size",
        str(args.shard_size),
        "--entities",
        str(args.entities),
        "--rate_rows",
        str(args.rate_rows),
        "--work_dir",
        args.work_dir,
    ]
    if args.nprobe:
        cmd += ["--nprobe", str(args.nprobe)]
    if args.ef_search:
        cmd += ["--ef_search", str(args.ef_search)]
    cmd += ["--ann_kind", args.ann_kind]
    for k, v in extra.items():
        cmd += [f"--_{k}", str(v)]
    print(f"[{time.strftime('%H:%M:%S')}] {mode} {extra}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"benchmark child {mode} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- layout ------------------------------------------------------------------------------------------------------


def stage1_width(hidden: int, projection: int, fusion: bool = True) -> int:
    """Dimensions of a stage-1 vector: the fused feature (2 x hidden, with fusion) and the text and visual global
    features (projection each)."""
    return (2 * hidden if fusion else 0) + 2 * projection


def layout_bytes(text_tokens: int, visual_tokens: int, hidden: int, projection: int, fusion: bool = True) -> dict:
    """Bytes per entity of each storage, computed by encoding random features of these dimensions with the index's
    codecs (so the figure is what `EntityIndex.nbytes` counts per row, codec tables excluded)."""
    import torch

    import index_otmel as ix

    n = 512
    g = torch.Generator().manual_seed(0)
    stage1 = torch.randn(n, stage1_width(hidden, projection, fusion), generator=g)
    rows = {
        "text_queries": torch.randn(n, text_tokens, hidden, generator=g),
        "text_mask": torch.ones(n, text_tokens, dtype=torch.bool),
        "visual_queries": torch.randn(n, visual_tokens, hidden, generator=g),
        "visual_mask": torch.ones(n, visual_tokens, dtype=torch.bool),
        "text_global_small": torch.randn(n, hidden, generator=g),
        "visual_global_small": torch.randn(n, hidden, generator=g),
        "has_image": torch.ones(n, dtype=torch.bool),
    }
    tokens = {k: rows[k].reshape(-1, hidden) for k in ("text_queries", "visual_queries")}
    out = {}
    for dtype in ix.INDEX_DTYPES:
        codecs = ix.default_codecs(dtype, rows, tokens if dtype.startswith("res") else None)
        parts = ix._stored_parts(stage1, rows, list(rows), codecs, ix.stage1_codec(dtype))
        out[dtype] = sum(t.nbytes for t in parts.values()) / n
    return out


def ann_layout_bytes(dim: int, rows: tuple = (2048, 4096)) -> dict:
    """Bytes per entity that each ANN structure (with the codes `AnnIndex.build` picks from `ANN_FLAT_BELOW` entities
    on, and IVF with the product codes it used before) adds for stage-1 vectors of `dim` dimensions: the growth of its
    serialised size between two KB sizes of seeded random vectors, over the rows added (fixed parts such as codebooks
    cancel out). Random vectors have no principal directions to drop, so the scan keeps (nearly) all `dim`: its
    figure is an upper bound (a trained model's vectors need fewer)."""
    import torch

    import index_otmel as ix

    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(max(rows), dim, generator=g), dim=1)
    out = {}
    default = ix.ann_default_code(ix.ANN_FLAT_BELOW)
    kinds = (
        ("scan", "scan", "pq4"),
        ("hnsw", "hnsw", default),
        ("ivf", "ivf", default),
        ("ivf-pq", "ivf", f"pq{dim // 4}"),
    )
    for name, kind, code in kinds:
        sizes = []
        for n in rows:
            ann = ix.AnnIndex.build(vectors[:n], kind=kind, code=code, nlist=16, train_size=rows[0])
            sizes.append(ann.to_tensors()["faiss"].numel() + 8 * n)  # + the slot table (int64)
        out[name] = (sizes[1] - sizes[0]) / (rows[1] - rows[0])
    return out


def vit_b32_layout() -> dict:
    """Bytes per entity of every storage and ANN structure at openai/clip-vit-base-patch32 dimensions."""
    from transformers import CLIPConfig

    from configuration_otmel import OTMELConfig

    clip, otmel = CLIPConfig(), OTMELConfig()  # defaults: openai/clip-vit-base-patch32 dimensions
    vision = clip.vision_config
    vit_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return {
        "dims": {
            "text_tokens": otmel.max_text_length,
            "visual_tokens": vit_tokens,
            "hidden": otmel.hidden_size,
            "projection": clip.projection_dim,
        },
        "bytes": layout_bytes(otmel.max_text_length, vit_tokens, otmel.hidden_size, clip.projection_dim),
        "ann_bytes": ann_layout_bytes(stage1_width(otmel.hidden_size, clip.projection_dim)),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entities", type=int, default=1_000_000)
    p.add_argument("--generate_mentions", type=int, default=10_000, help="mentions the world generator writes")
    p.add_argument("--mentions", type=int, default=1000, help="validation + test mentions ranked with gold answers")
    p.add_argument("--link_mentions", type=int, default=500, help="mentions per timed link() call")
    p.add_argument("--smaller", type=int, nargs="*", default=[100_000, 300_000], help="smaller KBs: the first rows")
    p.add_argument("--dtype", default="res2")
    p.add_argument("--shard_size", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rate_rows", type=int, default=20_000, help="rows per shard of the 1- vs 2-process build measure")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--work_dir", default=os.path.join(REPO, "data", "bench_scale"))
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query (default: the index's own)")
    p.add_argument(
        "--ef_search", type=int, default=None, help="HNSW candidates kept per search (default: the index's own)"
    )
    p.add_argument(
        "--ann_kind",
        default=ANN_DEFAULT_KIND,
        choices=ANN_KINDS,
        help="the ANN structure of the compressed indexes (index_otmel.AnnIndex; default: the index's default); "
        "other than ivf, in folders of its own, built on a copy of the IVF index of the same storage when there is one",
    )
    p.add_argument("--serve_only", action="store_true", help="only the compressed + ANN serving step (cached steps)")
    p.add_argument("--accuracy_model", default=None, help="a trained OT-MEL folder: run only the accuracy step")
    p.add_argument("--accuracy_world", default=None, help="the raw synthetic world folder it was trained on")
    p.add_argument(
        "--accuracy_distractors",
        type=int,
        default=0,
        help="accuracy step: this many entities of the scale world (--entities) join the trained model's KB",
    )
    p.add_argument(
        "--accuracy_ann_kinds",
        nargs="+",
        default=list(ANN_KINDS),
        choices=ANN_KINDS,
        help="accuracy step: the ANN structures measured (each forced, whatever the KB size)",
    )
    p.add_argument(
        "--accuracy_dtypes",
        nargs="+",
        default=["float16", "int8", "res4", "res2", "res1"],
        help="accuracy step: the storages compared with float32",
    )
    p.add_argument(
        "--accuracy_reference",
        default="float32",
        help="accuracy step: the storage of the exact reference; other than float32 (for KBs too large for a float32 "
        "index in memory), that storage alone, built on disk in shards, exact against each ANN kind",
    )
    p.add_argument("--layout_only", action="store_true", help="only the bytes per entity at ViT-B/32 dimensions")
    p.add_argument("--report", default=None, help="only print the report of a --json file written earlier")
    for hidden in ("_child", "_dataset", "_index_dir", "_source", "_rows", "_ann", "_stage1"):
        p.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args._rows = int(args._rows) if args._rows else None
    args._ann = args._ann == "True"
    if args._child:
        fn = {
            "build": child_build,
            "build_rate": child_build_rate,
            "convert": child_convert,
            "serve": child_serve,
            "accuracy": child_accuracy,
        }
        fn = fn[args._child]
        print(json.dumps(fn(args)))
        return
    if args.layout_only:
        print(json.dumps(vit_b32_layout(), indent=1))
        return
    if args.accuracy_model:
        out = child_accuracy(args)
        print(json.dumps(out, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    if args.report:
        with open(args.report) as f:
            report(json.load(f))
        return

    os.makedirs(args.work_dir, exist_ok=True)
    n = args.entities
    dataset = world_dir(args.work_dir, n, args.generate_mentions)
    if args.model is None:
        from bench_linking import build_tiny_model

        args.model = build_tiny_model(args.work_dir, [dataset])
    results = {"entities": n, "threads": args.threads, "dtype": args.dtype, "load_start": os.getloadavg()}
    f32 = os.path.join(args.work_dir, f"index-{n}-float32")
    results["build"] = cached_child(f"build-{n}", "build", args, dataset=dataset, index_dir=f32)
    results["build_rate"] = cached_child(f"build-rate-{n}", "build_rate", args, dataset=dataset, index_dir=f32)
    kind = "" if args.ann_kind == "ivf" else f"-{args.ann_kind}"
    results["ann_kind"] = args.ann_kind
    compressed = os.path.join(args.work_dir, f"index-{n}-{args.dtype}{kind}")

    def source_of(rows: int) -> dict:
        """Where a compressed index of `rows` rows comes from: the IVF one of the same storage when there is one
        (only the ANN structure is built again), else the float32 index's first rows."""
        ivf = os.path.join(args.work_dir, f"index-{rows}-{args.dtype}")
        if kind and os.path.isfile(os.path.join(ivf, "entity_index.json")):
            return {"source": ivf}
        return {"source": f32, **({"rows": rows} if rows != n else {})}

    results["convert"] = cached_child(
        f"convert-{n}-{args.dtype}{kind}", "convert", args, index_dir=compressed, ann=True, **source_of(n)
    )
    for m in args.smaller:
        small = os.path.join(args.work_dir, f"index-{m}-{args.dtype}{kind}")
        results[f"convert_{m}"] = cached_child(
            f"convert-{m}-{args.dtype}{kind}", "convert", args, index_dir=small, ann=True, **source_of(m)
        )
    results["serve"] = run_child("serve", args, dataset=dataset, index_dir=compressed, stage1="ann")
    if args.serve_only:
        s = results["serve"]
        print(json.dumps({k: v for k, v in s.items() if not k.startswith(("gold_ranks", "top1"))}, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    results["serve_exact"] = run_child("serve", args, dataset=dataset, index_dir=compressed, stage1="torch")
    results["reference"] = run_child("serve", args, dataset=dataset, index_dir=f32, stage1="torch")
    for m in args.smaller:
        small = os.path.join(args.work_dir, f"index-{m}-{args.dtype}{kind}")
        results[f"serve_{m}"] = run_child("serve", args, dataset=dataset, index_dir=small, stage1="auto")
        results[f"serve_{m}_ann"] = run_child("serve", args, dataset=dataset, index_dir=small, stage1="ann")
    results["layout_vit_b32"] = vit_b32_layout()
    results["load_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    report(results)


def report(r: dict):
    n, build, conv, serve, ref = r["entities"], r["build"], r["convert"], r["serve"], r["reference"]
    vit = r["layout_vit_b32"]
    today = vit["bytes"]["float16"]  # float16 features, float32 stage-1 vectors: today's layout
    print(
        f"\n## Scale: {n:,} entities, tiny model, {r['threads']} threads; load average "
        f"{r['load_start'][0]:.1f} at the start, {r['load_end'][0]:.1f} at the end\n"
    )
    if build.get("reused"):
        print(f"- KB encoding: the float32 index of an earlier run was reused ({build['n']:,} entities; no figure)")
    else:
        print(
            f"- KB encoding (float32 index, every entity encoded): {build['entities_per_s']:.0f} entities/s "
            f"({build['rows_encoded_this_run']:,} rows in this run), peak RSS building {build['peak_rss_build_mb']:.0f} MB"
        )
    rate = r.get("build_rate")
    if rate:
        one, two = rate["one_process"], rate["two_processes"]
        print(
            f"- KB encoding speed ({rate['rows_per_shard']:,} rows per shard, `index_otmel.py --shard_index`): 1 process "
            f"({one['threads']} threads) {one['entities_per_s']:.0f} entities/s, 2 processes (1 thread each) "
            f"{two['entities_per_s']:.0f} entities/s ({two['entities_per_s'] / one['entities_per_s']:.2f}x); start-up "
            f"(model, KB, plan) {one['seconds'] - one['encode_s']:.0f} s; peak RSS of a building process "
            f"{rate['peak_rss_build_mb']:.0f} MB"
        )
    if not conv.get("reused"):
        print(
            f"- conversion to {r['dtype']} + ANN: {conv['convert_s']:.0f} s + {conv.get('ann_build_s', 0):.0f} s "
            f"({conv.get('ann')}), peak RSS {conv['peak_rss_convert_mb']:.0f} MB"
        )
    print(
        f"- bytes per entity (tiny model): float32 {build['bytes_per_entity']:.0f}, {r['dtype']} "
        f"{conv['bytes_per_entity']:.0f} (on disk with qids, names and ANN: {conv['disk_bytes_per_entity']:.0f})"
    )
    print(
        f"- bytes per entity at ViT-B/32 dimensions {vit['dims']}: "
        + ", ".join(f"{k} {v:.0f}" for k, v in vit["bytes"].items())
    )
    print(
        f"- opening the {r['dtype']} index: {serve['open_s']:.2f} s (with sha256 verification "
        f"{serve.get('open_verified_s', float('nan')):.2f} s); RSS model {serve['rss_model']['VmRSS']:.0f} MB -> opened "
        f"{serve['rss_opened']['VmRSS']:.0f} MB"
    )
    for key, label in (
        ("serve", f"{r['dtype']} + ANN"),
        ("serve_exact", f"{r['dtype']} + exact"),
        ("reference", "float32 + exact"),
    ):
        s = r[key]
        print(
            f"- {label}: link() {s['link_mentions_per_s']['ot']:.1f} mentions/s OT, "
            f"{s['link_mentions_per_s']['attention']:.1f} attention ({s['link_mentions_per_s']['attention'] / s['link_mentions_per_s']['ot']:.2f}x), "
            f"stage 1 {s['link_stage1']}; H@1 OT {100 * s['h1_ot']:.1f}, attention {100 * s['h1_attention']:.1f} "
            f"(n={s['mentions']}); peak RSS serving {s['peak_rss_link_mb']:.0f} MB (then anon {s['rss_after_link']['RssAnon']:.0f} "
            f"+ file {s['rss_after_link']['RssFile']:.0f} MB), with the evaluation {s['peak_rss_serve_mb']:.0f} MB"
        )
    print(
        f"- stage-1 recall@50 of ANN against exact: {100 * serve['ann_recall_of_exact_top50']:.1f}% of the exact top 50; "
        f"gold recall@50 {100 * serve['gold_recall50_ann']:.1f} (ANN) vs {100 * serve['gold_recall50_exact']:.1f} (exact); "
        f"stage 1 alone {serve['stage1_mentions_per_s']}"
    )
    for a in ("ot", "attention"):
        print(
            f"- H@1 {a}: {r['dtype']} + ANN minus float32 + exact = {100 * (serve[f'h1_{a}'] - ref[f'h1_{a}']):+.2f} "
            f"points; same top-1 for {100 * sum(x == y for x, y in zip(serve[f'top1_{a}'], ref[f'top1_{a}'])) / len(ref[f'top1_{a}']):.1f}% of mentions"
        )
    print(
        f"- float16 today at ViT-B/32 dimensions: {today:.0f} bytes per entity; {r['dtype']}: "
        f"{vit['bytes'][r['dtype']]:.0f} ({vit['bytes'][r['dtype']] / today:.2f} of it)"
        + "".join(
            f"; with {kind.upper()} {vit['bytes'][r['dtype']] + b:.0f} ({(vit['bytes'][r['dtype']] + b) / today:.2f})"
            for kind, b in vit.get("ann_bytes", {}).items()
        )
    )
    for key in sorted(k for k in r if k.startswith("serve_") and k[6:].isdigit()):
        s, a = r[key], r[key + "_ann"]
        print(
            f"- {int(key[6:]):,} entities: link() OT {s['link_mentions_per_s']['ot']:.1f} / attention "
            f"{s['link_mentions_per_s']['attention']:.1f} mentions/s ({s['link_mentions_per_s']['attention'] / s['link_mentions_per_s']['ot']:.2f}x, stage 1 {s['link_stage1']}); "
            f"with ANN {a['link_mentions_per_s']['ot']:.1f} / {a['link_mentions_per_s']['attention']:.1f}; stage 1 alone "
            f"exact {s['stage1_mentions_per_s']['exact']:.0f} vs ANN {a['stage1_mentions_per_s'].get('ann', 0):.0f} mentions/s; "
            f"ANN recall of exact top 50 {100 * a.get('ann_recall_of_exact_top50', float('nan')):.1f}%"
        )


if __name__ == "__main__":
    main()
