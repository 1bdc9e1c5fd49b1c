"""Benchmark of the linking server (serving_otmel.py) against in-process `OTMELLinker.link` on the same mentions.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--entities 3000] [--requests 300]
        [--mentions_per_request 4] [--concurrency 1 8 32] [--threads 1] [--changes 20] [--json results.json]

1. A synthetic world of `--entities` entities (`datasets_scripts/make_synthetic.py` + `convert_mimic.py`, cached under
   `--work_dir`); its entity index is built once. The model is `--model`, else `outputs/demo` if it exists, else a tiny
   random OT-MEL built offline as in `bench_linking.py` (its speed is representative, its answers are not).
2. In-process: `OTMELLinker.link` of all the benchmark's mentions in one call (`--threads` torch threads, pictures
   given as encoded bytes): mentions/s.
3. The server (`serving_otmel.py --port 0 --threads T`) in a child process on 127.0.0.1, driven by an async httpx
   client in this process at each concurrency: `--requests` requests of `--mentions_per_request` mentions (pictures
   as base64), at most `--max_seconds` per level: requests/s, mentions/s, p50 / p99 latency, errors (non-200 answers,
   transport errors, error entries), and the share of mentions whose served top-k equals the in-process top-k.
   Client and server share the machine's cores, as they would on one host. In-process and server runs alternate for
   `--reps` rounds and the best of each is kept (the machine may be shared; the load average is printed); errors
   are counted over all rounds.
4. Mixed: `--mixed_concurrency` clients link while one writer adds and removes entities (`--changes` changes, one at
   a time). Every answer reports the KB version it was ranked against; each answer's entities must all be in the KB
   of that version (the writer knows each version's qids), and a request sent after a removal was answered must be
   ranked against that version or a later one (so it cannot return the removed entity). Violations are counted.
5. SIGTERM: the server must stop with exit code 0.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
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


def percentile(values, q):
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_mentions(dataset_dir: str, n: int) -> list:
    """`n` mentions (validation + test, cycled if fewer) as dicts with the picture as encoded bytes (or None)."""
    from datasets import Image, concatenate_datasets, load_dataset

    ms = load_dataset(dataset_dir, "mentions")
    pool = concatenate_datasets([ms["validation"], ms["test"]]).cast_column("image", Image(decode=False))
    rows = []
    for i in range(n):
        r = pool[i % len(pool)]
        image = r["image"]["bytes"] if r.get("image") else None
        rows.append({"mention": r["mention"], "sentence": r["sentence"] or "", "image": image})
    return rows


def request_body(mentions: list, top_k: int, candidates: int) -> bytes:
    out = []
    for m in mentions:
        item = {"mention": m["mention"], "sentence": m["sentence"]}
        if m["image"] is not None:
            item["image_base64"] = base64.b64encode(m["image"]).decode()
        out.append(item)
    return json.dumps({"mentions": out, "top_k": top_k, "candidates": candidates}).encode()


def same_top_k(served: list, expected: list, atol: float = 1e-4) -> bool:
    """The served candidates are the in-process ones (scores within `atol`; entities may swap only within a tie)."""
    if len(served) != len(expected):
        return False
    scores = {c["qid"]: c["score"] for c in expected}
    for a, b in zip(served, expected):
        if abs(a["score"] - b["score"]) > atol:
            return False
        if a["qid"] != b["qid"] and abs(scores.get(a["qid"], float("inf")) - a["score"]) > atol:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Server process
# ----------------------------------------------------------------------------------------------------------------


class ServerProcess:
    """`serving_otmel.py` in a child process on 127.0.0.1, any free port (read from its first line)."""

    def __init__(self, model: str, index_dir: str, threads: int, extra=()):
        cmd = [
            sys.executable,
            os.path.join(REPO, "serving_otmel.py"),
            "--model",
            model,
            "--index",
            index_dir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            str(threads),
            "--no_access_log",
            "--log_level",
            "warning",
            *extra,
        ]
        self.log_path = os.path.join(os.path.dirname(index_dir), "server.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if "listening on " not in line:
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line!r}; see {self.log_path}")
        self.url = line.strip().rsplit(" ", 1)[-1]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.proc.stdout.close()
        self.log.close()
        return code


# ----------------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------------


async def drive(url: str, bodies: list, concurrency: int, max_seconds: float) -> dict:
    """Sends `bodies` (JSON bytes) to POST /link from `concurrency` client tasks; per request: latency, answer."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    answers, latencies, errors = [None] * len(bodies), [], []
    queue = iter(range(len(bodies)))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()

        async def worker():
            for i in queue:  # one iterator shared by the tasks: each request is sent once
                if time.perf_counter() - start > max_seconds:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/link", content=bodies[i], headers=headers)
                except httpx.HTTPError as err:
                    errors.append(f"request {i}: {type(err).__name__}: {err}")
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"request {i}: HTTP {r.status_code}: {r.text[:200]}")
                    continue
                answers[i] = r.json()
                errors.extend(f"request {i}: {x['error']}" for x in answers[i]["results"] if isinstance(x, dict))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"answers": answers, "latencies": latencies, "errors": errors, "wall": wall}


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of this process, or of process `pid` (Linux /proc; NaN elsewhere)."""
    if pid is None:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def server_stats(url) -> dict:
    import httpx

    return httpx.get(f"{url}/info", timeout=60).json()["stats"]


def run_level(url, bodies, per_request, concurrency, max_seconds, expected, server_pids) -> dict:
    """One load level; `server_pids`: the server's processes (front end, model worker), whose CPU time is counted."""
    before = server_stats(url)
    cpu_before = sum(cpu_seconds(p) for p in server_pids), cpu_seconds()
    out = asyncio.run(drive(url, bodies, concurrency, max_seconds))
    cpu_after = sum(cpu_seconds(p) for p in server_pids), cpu_seconds()
    after = server_stats(url)
    batches = after["batches"] - before["batches"]
    done = [i for i, a in enumerate(out["answers"]) if a is not None]
    mentions = sum(len(out["answers"][i]["results"]) for i in done)
    same = total = 0
    for i in done:
        for j, served in enumerate(out["answers"][i]["results"]):
            if isinstance(served, list):
                total += 1
                same += same_top_k(served, expected[i * per_request + j])
    return {
        "concurrency": concurrency,
        "requests": len(done),
        "mentions": mentions,
        "seconds": out["wall"],
        "requests_per_s": len(done) / out["wall"],
        "mentions_per_s": mentions / out["wall"],
        "p50_ms": 1000 * percentile(out["latencies"], 50),
        "p99_ms": 1000 * percentile(out["latencies"], 99),
        "errors": len(out["errors"]),
        "error_examples": out["errors"][:3],
        "same_as_in_process": same / total if total else float("nan"),
        "mean_batch": (after["batched_mentions"] - before["batched_mentions"]) / max(batches, 1),
        "model_busy": (after["model_seconds"] - before["model_seconds"]) / out["wall"],
        "model_running": (after["model_cpu_seconds"] - before["model_cpu_seconds"])
        / max(after["model_seconds"] - before["model_seconds"], 1e-9),
        "server_cpu_ms": 1000 * (cpu_after[0] - cpu_before[0]) / max(mentions, 1),
        "client_cpu_ms": 1000 * (cpu_after[1] - cpu_before[1]) / max(mentions, 1),
    }


async def mixed(
    url: str,
    bodies: list,
    concurrency: int,
    initial_qids: set,
    changes: int,
    new_entities: list,
    removable: list,
    max_seconds: float,
) -> dict:
    """Links from `concurrency` tasks while one writer makes `changes` entity changes (add, remove, add, ...)."""
    import httpx

    kb = {0: set(initial_qids)}
    removed_at = {}  # qid -> version of the KB without it, once its DELETE was answered
    answers, errors, change_ms, found = [], [], [], []
    writer_done = asyncio.Event()
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()

        async def reader(k):
            i = k
            while not writer_done.is_set() and time.perf_counter() - start < max_seconds and i < 100_000:
                sent_after = dict(removed_at)
                try:
                    r = await client.post("/link", content=bodies[i % len(bodies)], headers=headers)
                except httpx.HTTPError as err:
                    errors.append(f"{type(err).__name__}: {err}")
                    continue
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                else:
                    answers.append((sent_after, r.json()))
                i += concurrency

        async def writer():
            version = 0
            try:
                for step in range(changes):
                    t0 = time.perf_counter()
                    if step % 2 == 0:
                        entity = new_entities[step // 2]
                        r = await client.post("/entities", json={"entities": [entity]})
                    else:
                        qid = removable[step // 2]
                        r = await client.delete(f"/entities/{qid}")
                    change_ms.append(1000 * (time.perf_counter() - t0))
                    if r.status_code != 200:
                        errors.append(f"change {step}: HTTP {r.status_code}: {r.text[:200]}")
                        return
                    state = r.json()
                    if state["index_version"] != version + 1:
                        errors.append(f"change {step}: version {state['index_version']} after {version}")
                    version = state["index_version"]
                    if step % 2 == 0:
                        kb[version] = kb[version - 1] | {entity["qid"]}
                        probe = {
                            "mentions": [{"mention": entity["name"], "sentence": entity["attributes"]}],
                            "top_k": 5,
                        }
                        p = await client.post("/link", json=probe)
                        if p.status_code == 200:
                            found.append(entity["qid"] in {c["qid"] for c in p.json()["results"][0]})
                    else:
                        kb[version] = kb[version - 1] - {qid}
                        removed_at[qid] = version
                    await asyncio.sleep(0.05)
            finally:
                writer_done.set()

        await asyncio.gather(writer(), *(reader(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    violations = []
    for sent_after, body in answers:
        version = body["index_version"]
        if version not in kb:
            violations.append(f"answer from unknown version {version}")
            continue
        for result in body["results"]:
            if not isinstance(result, list):
                violations.append(f"error entry {result}")
                continue
            strays = {c["qid"] for c in result if c["qid"] is not None} - kb[version]
            if strays:
                violations.append(f"version {version} answer lists {sorted(strays)}, not in that KB")
        late = [q for q, v in sent_after.items() if version < v]
        if late:
            violations.append(f"sent after {late} were removed, answered from version {version}")
    mentions = sum(len(body["results"]) for _, body in answers)
    return {
        "concurrency": concurrency,
        "changes": len(change_ms),
        "links": len(answers),
        "mentions_per_s": mentions / wall,
        "versions_seen": len({b["index_version"] for _, b in answers}),
        "violations": len(violations),
        "violation_examples": violations[:3],
        "errors": len(errors),
        "error_examples": errors[:3],
        "change_p50_ms": percentile(change_ms, 50),
        "change_max_ms": max(change_ms) if change_ms else float("nan"),
        "added_found_top5": f"{sum(found)}/{len(found)}",
        "seconds": wall,
    }


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def load_linker(model_dir, index_dir, threads):
    import torch

    import linking_otmel as lk

    torch.set_num_threads(threads)
    linker = lk.OTMELLinker.from_pretrained(model_dir, quantize=None)  # as the server
    linker.load_index(index_dir)
    return linker


def time_in_process(linker, mentions, top_k, candidates) -> tuple[float, list, float]:
    """Mentions/s of one `link()` call on all the mentions, its results, and its CPU ms per mention."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    results = linker.link(mentions, top_k=top_k, candidates=candidates)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return len(mentions) / wall, results, 1000 * cpu / len(mentions)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="OT-MEL folder; default outputs/demo if it exists, else a tiny random one")
    p.add_argument("--entities", type=int, default=3000, help="KB size of the synthetic world")
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    p.add_argument("--mentions_per_request", type=int, default=4)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, in-process and in the server (1 leaves the other core to HTTP and the client)",
    )
    p.add_argument("--max_wait_ms", type=float, default=2.0, help="the server's --max_wait_ms")
    p.add_argument("--max_batch_mentions", type=int, default=64, help="the server's --max_batch_mentions")
    p.add_argument("--worker", default="thread", choices=("thread", "process"), help="the server's --worker")
    p.add_argument("--reps", type=int, default=2, help="rounds of in-process and server runs (best of each kept)")
    p.add_argument("--max_seconds", type=float, default=120, help="time bound of each load level")
    p.add_argument("--changes", type=int, default=20, help="entity changes of the mixed run (0: no mixed run)")
    p.add_argument("--mixed_concurrency", type=int, default=8)
    p.add_argument("--work_dir", default=os.path.join(REPO, "data", "bench_serve"))
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()

    import httpx
    from bench_linking import build_tiny_model, world_dir

    os.makedirs(args.work_dir, exist_ok=True)
    dataset = world_dir(args.work_dir, args.entities, 2000)
    model = args.model
    if not model:
        demo = os.path.join(REPO, "outputs", "demo")
        model = (
            demo if os.path.isfile(os.path.join(demo, "config.json")) else build_tiny_model(args.work_dir, [dataset])
        )
    model_desc = model if args.model or model.endswith(os.path.join("outputs", "demo")) else "tiny random OT-MEL"
    index_dir = os.path.join(args.work_dir, f"index-{args.entities}")
    if not os.path.isfile(os.path.join(index_dir, "entity_index.json")):
        from datasets import load_dataset

        import linking_otmel as lk

        linker = lk.OTMELLinker.from_pretrained(model, quantize=None)  # as the server
        print(f"encoding the KB of {args.entities} entities ...", flush=True)
        linker.build_index(load_dataset(dataset, "kb")["train"], progress=False)
        linker.save_index(index_dir)

    per = args.mentions_per_request
    mentions = load_mentions(dataset, args.requests * per)
    linker = load_linker(model, index_dir, args.threads)
    linker.link(mentions[:16], top_k=args.top_k, candidates=args.candidates)  # warm-up
    _, expected, _ = time_in_process(linker, mentions, args.top_k, args.candidates)
    bodies = [request_body(mentions[i : i + per], args.top_k, args.candidates) for i in range(0, len(mentions), per)]

    serve_dir = os.path.join(args.work_dir, "serve")
    shutil.rmtree(serve_dir, ignore_errors=True)
    os.makedirs(serve_dir)
    shutil.copytree(index_dir, os.path.join(serve_dir, "index"))
    server = ServerProcess(
        model,
        os.path.join(serve_dir, "index"),
        args.threads,
        [
            "--max_wait_ms",
            str(args.max_wait_ms),
            "--max_batch_mentions",
            str(args.max_batch_mentions),
            "--worker",
            args.worker,
        ],
    )
    levels, mixed_result = [], None
    try:
        asyncio.run(drive(server.url, bodies[:8], 4, args.max_seconds))  # warm-up
        worker_pid = httpx.get(f"{server.url}/info", timeout=60).json().get("worker_pid")
        server_pids = [server.proc.pid] + ([worker_pid] if worker_pid else [])
        # In-process and server runs alternate, `--reps` rounds, best of each kept: load from other processes on the
        # machine then hits both alike (the server is idle while link() runs in this process, and the reverse).
        local_rates, best = [], {}
        for rep in range(args.reps):
            for c in args.concurrency:
                print(f"round {rep + 1}/{args.reps}: in-process, then the server at concurrency {c} ...", flush=True)
                rate, _, cpu_ms = time_in_process(linker, mentions, args.top_k, args.candidates)
                local_rates.append((rate, cpu_ms))
                r = run_level(server.url, bodies, per, c, args.max_seconds, expected, server_pids)
                if c not in best or r["mentions_per_s"] > best[c]["mentions_per_s"]:
                    best[c] = r
                best[c]["errors_all_rounds"] = best[c].get("errors_all_rounds", 0) + r["errors"]
        levels = [best[c] for c in args.concurrency]
        local_rate, local_cpu_ms = max(local_rates)
        if args.changes:
            import index_otmel as ix

            index = ix.EntityIndex.load(index_dir)
            n_add = (args.changes + 1) // 2
            new_entities = [
                {
                    "qid": f"QNEW{i}",
                    "name": f"{mentions[i]['mention']} the {i}th",
                    "attributes": mentions[i]["sentence"][:200],
                    **(
                        {"image_base64": base64.b64encode(mentions[i]["image"]).decode()}
                        if mentions[i]["image"]
                        else {}
                    ),
                }
                for i in range(n_add)
            ]
            removable = index.qids[: args.changes // 2]
            print(f"mixed: {args.changes} entity changes under concurrency {args.mixed_concurrency} ...", flush=True)
            mixed_result = asyncio.run(
                mixed(
                    server.url,
                    bodies,
                    args.mixed_concurrency,
                    set(index.qids),
                    args.changes,
                    new_entities,
                    removable,
                    args.max_seconds,
                )
            )
            saved = ix.EntityIndex.load(os.path.join(serve_dir, "index"))
            expect = (set(index.qids) | {e["qid"] for e in new_entities}) - set(removable)
            mixed_result["saved_index_matches"] = set(saved.qids) == expect
    finally:
        exit_code = server.stop()

    load = os.getloadavg()
    print(
        f"\n## Serving: {model_desc}, {args.entities:,} entities, {args.threads} torch threads, top_k {args.top_k}, "
        f"candidates {args.candidates}, {per} mentions per request (about half with a picture), server "
        f"--worker {args.worker} --max_batch_mentions {args.max_batch_mentions} --max_wait_ms {args.max_wait_ms:g}; "
        f"load average {load[0]:.1f} / {load[1]:.1f}\n"
    )
    print(
        "| run | concurrency | requests | requests/s | mentions/s | vs in-process | p50 ms | p99 ms "
        "| errors (all rounds) | same top-k as in-process | mean batch | model thread busy (running) "
        "| CPU ms per mention: server (client) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| in-process `link()` | - | - | - | {local_rate:.1f} | 100% | - | - | - | - | {len(mentions)} | - "
        f"| {local_cpu_ms:.2f} |"
    )
    for r in levels:
        print(
            f"| server | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['mentions_per_s']:.1f} "
            f"| {100 * r['mentions_per_s'] / local_rate:.0f}% | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['errors_all_rounds']} | {100 * r['same_as_in_process']:.1f}% | {r['mean_batch']:.1f} "
            f"| {100 * r['model_busy']:.0f}% ({100 * r['model_running']:.0f}%) "
            f"| {r['server_cpu_ms']:.2f} ({r['client_cpu_ms']:.2f}) |"
        )
    if mixed_result:
        m = mixed_result
        print(
            f"\nMixed run: {m['links']} link requests at concurrency {m['concurrency']} while {m['changes']} entity "
            f"changes were made ({m['versions_seen']} KB versions seen in answers; change p50 {m['change_p50_ms']:.0f} ms, "
            f"max {m['change_max_ms']:.0f} ms): {m['mentions_per_s']:.1f} mentions/s, {m['violations']} consistency "
            f"violations, {m['errors']} errors; added entities found in the top 5 by a mention of their name: "
            f"{m['added_found_top5']}; saved index has the final KB: {m['saved_index_matches']}."
        )
        for x in m["violation_examples"] + m["error_examples"]:
            print(f"  {x}")
    for r in levels:
        for x in r["error_examples"]:
            print(f"  concurrency {r['concurrency']}: {x}")
    print(f"Server exit code after SIGTERM: {exit_code}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "in_process_mentions_per_s": local_rate,
                    "in_process_cpu_ms": local_cpu_ms,
                    "levels": levels,
                    "mixed": mixed_result,
                    "exit_code": exit_code,
                    "model": model_desc,
                    "args": vars(args),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
