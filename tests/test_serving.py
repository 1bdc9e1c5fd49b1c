"""The linking server (serving_otmel): a real uvicorn server on a free 127.0.0.1 port, a real HTTP client (httpx).

Linking with and without pictures gives what `OTMELLinker.link` gives in-process; bad requests get a 4xx with a
message; a bad mention gets its own error entry; paths outside --image_root are refused; concurrent requests are
batched; entities added, replaced and removed are seen by the next request, never half-applied, and saved; shutdown
finishes running requests; the command line serves and stops on SIGTERM. A random tiny CLIP: consistency, not quality.
"""

import base64
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tiny_worlds import tiny_model_folder  # noqa: E402

import index_otmel as ix  # noqa: E402
import linking_otmel as lk  # noqa: E402
import serving_otmel as sv  # noqa: E402


NAMES = "ada smith|bob jones|cyd brown|dan smith|eve jones|fay brown|gus smith|hal jones|ivy brown|jon smith|kim jones|lea brown"
NAMES = NAMES.split("|")
JOBS = "doctor singer painter writer actor pilot chef judge nurse baker farmer poet".split()
CITIES = "paris london rome oslo lima cairo".split()


def _png(seed: int, size=(52, 40), plain=False) -> bytes:
    g = torch.Generator().manual_seed(seed)
    array = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    if plain:  # one colour: a large picture in few bytes
        array[:] = array[0, 0]
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kb_rows():
    return [
        {
            "qid": f"Q{100 + i}",
            "name": name,
            "attributes": f"works as a {JOBS[i]}. lives in {CITIES[i % 6]}.",
            "image": _png(i) if i % 3 else None,
        }
        for i, name in enumerate(NAMES)
    ]


def _huge_png_header(width=100_000, height=100_000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb as far as any decoder can tell)."""
    data = bytearray(_png(0, (1, 1)))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("serving")
    rows = _kb_rows()
    texts = [f"{r['name']} [SEP] {r['attributes']}" for r in rows] + ["zed quux works as a sailor in lima"]
    model, processor, model_dir = tiny_model_folder(str(root), texts)
    index_dir = str(root / "index")
    ix.encode_kb(model, processor, rows, batch_size=8, progress=False).save(index_dir)
    image_root = root / "pictures"
    (image_root / "sub").mkdir(parents=True)
    (image_root / "sub" / "face.png").write_bytes(_png(4))
    outside = root / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(5))
    os.symlink(outside / "secret.png", image_root / "link.png")
    reference = lk.OTMELLinker.from_pretrained(model_dir, quantize=None)  # the server's float32 towers
    reference.load_index(index_dir)
    return {
        "root": root,
        "rows": rows,
        "model_dir": model_dir,
        "index_dir": index_dir,
        "image_root": str(image_root),
        "reference": reference,
    }


class ServerThread:
    """uvicorn serving `app` in a thread on a free 127.0.0.1 port; `stop()` is a graceful shutdown."""

    def __init__(self, app, graceful_timeout=20):
        import uvicorn

        sock = sv.bind_socket("127.0.0.1", 0)  # as otmel-serve does
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            app, log_level="warning", log_config=None, access_log=False, timeout_graceful_shutdown=graceful_timeout
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the test server did not stop"


def _start(world, index_dir=None, worker="thread", **settings):
    if worker == "thread":
        worker = sv.ThreadWorker(sv.load_linker(world["model_dir"], index_dir or world["index_dir"], None), index_dir)
    else:
        worker = sv.ProcessWorker(world["model_dir"], index_dir or world["index_dir"], threads=1)
    settings = sv.ServerSettings(image_root=world["image_root"], index_dir=index_dir, **settings)
    service = sv.LinkingService(worker, settings, model_name=world["model_dir"])
    return ServerThread(sv.create_app(service)), service


@pytest.fixture(scope="module")
def server(world):
    """A read-only server (no --index: entity changes refused) with small limits."""
    srv, service = _start(
        world,
        max_request_bytes=300_000,
        max_mentions_per_request=16,
        max_image_pixels=100_000,
        max_wait_ms=5,
        max_top_k=20,
        max_candidates=30,
    )
    srv.service = service
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        srv.client = client
        yield srv
    srv.stop()


@pytest.fixture
def writable(world, tmp_path):
    """A server whose entity changes are saved to its own copy of the index."""
    index_dir = str(tmp_path / "index")
    shutil.copytree(world["index_dir"], index_dir)
    srv, service = _start(world, index_dir=index_dir, max_wait_ms=2)
    srv.service, srv.index_dir = service, index_dir
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        srv.client = client
        yield srv
    srv.stop()


def _mention(i, picture=None):
    name = NAMES[i % len(NAMES)]
    m = {"mention": name.split()[0] if i % 2 else name, "sentence": f"the {JOBS[i % 12]} was seen in {CITIES[i % 6]}"}
    if picture is not None:
        m["image_base64"] = _b64(picture)
    return m


def _assert_same(served, expected, atol=1e-5):
    """Two candidate lists agree: the same scores position by position, the same qid wherever scores are not tied."""
    assert len(served) == len(expected)
    for a, b in zip(served, expected):
        assert abs(a["score"] - b["score"]) <= atol, (served, expected)
    by_qid = {c["qid"]: c["score"] for c in expected}
    for a, b in zip(served, expected):
        if a["qid"] != b["qid"]:  # only a near-tie may swap two entities
            assert abs(by_qid.get(a["qid"], float("inf")) - a["score"]) <= atol, (served, expected)
        assert set(a) >= {"qid", "name", "score"}


# ---------------------------------------------------------------------------------------------------------------


def test_health_and_info(server, world):
    r = server.client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    info = server.client.get("/info").json()
    reference = world["reference"].index
    assert info["index"]["index_size"] == len(NAMES) == len(reference)
    assert info["index"]["index_fingerprint"] == reference.meta["kb"] and reference.meta["kb"]
    assert info["index"]["index_version"] == 0
    assert info["model"] == world["model_dir"]
    assert info["model_weights_sha256"] == reference.meta["model"]["weights"]
    assert info["settings"]["max_mentions_per_request"] == 16 and info["settings"]["index_dir"] is None


def test_link_takes_a_nil_threshold(server, world):
    query = {"mentions": [_mention(0)], "top_k": 3}
    best = server.client.post("/link", json={**query, "nil_threshold": None}).json()["results"][0]
    assert all(c["qid"] is not None for c in best)
    r = server.client.post("/link", json={**query, "nil_threshold": best[0]["score"] + 0.5})
    first, *rest = r.json()["results"][0]
    assert first == {"qid": None, "name": None, "nil": True, "score": best[0]["score"]} and rest == best[:2]
    assert server.client.post("/link", json={**query, "nil_threshold": -5}).json()["results"][0] == best
    assert server.client.post("/link", json={**query, "nil_threshold": "high"}).status_code == 422


@pytest.mark.parametrize("assignment", ["ot", "attention"])
def test_link_matches_in_process_link(server, world, assignment):
    mentions = [_mention(i) for i in range(5)] + [_mention(6, _png(6)), _mention(7, _png(20))]
    mentions.append({**_mention(4), "image_path": "sub/face.png"})
    r = server.client.post("/link", json={"mentions": mentions, "top_k": 4, "candidates": 8, "assignment": assignment})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index_version"] == 0 and body["index_size"] == len(NAMES)
    local = []
    for m in mentions:
        picture = m.get("image_base64") and base64.b64decode(m["image_base64"])
        if "image_path" in m:
            picture = (world["root"] / "pictures" / m["image_path"]).read_bytes()
        local.append({"mention": m["mention"], "sentence": m["sentence"], "image": picture or None})
    expected = world["reference"].link(local, top_k=4, candidates=8, assignment=assignment)
    assert len(body["results"]) == len(mentions)
    for served, exp in zip(body["results"], expected):
        assert len(served) == 4
        _assert_same(served, exp)
    # The picture counts: the same text with another picture scores differently.
    assert (
        body["results"][5]
        != server.client.post(
            "/link", json={"mentions": [_mention(6)], "top_k": 4, "candidates": 8, "assignment": assignment}
        ).json()["results"][0]
    )


def test_process_worker(world, tmp_path):
    """The model in a worker process (otmel-serve --worker process): the same answers, entity changes consistent."""
    index_dir = str(tmp_path / "index")
    shutil.copytree(world["index_dir"], index_dir)
    srv, service = _start(world, index_dir=index_dir, worker="process", max_wait_ms=2)
    try:
        mentions = [_mention(i) for i in range(3)] + [
            _mention(6, _png(6)),
            {**_mention(4), "image_path": "sub/face.png"},
        ]
        r = httpx.post(f"{srv.url}/link", json={"mentions": mentions, "top_k": 4, "candidates": 8}, timeout=60)
        assert r.status_code == 200, r.text
        local = [{"mention": m["mention"], "sentence": m["sentence"], "image": None} for m in mentions]
        local[3]["image"], local[4]["image"] = _png(6), (world["root"] / "pictures" / "sub" / "face.png").read_bytes()
        for served, expected in zip(r.json()["results"], world["reference"].link(local, top_k=4, candidates=8)):
            _assert_same(served, expected)
        info = httpx.get(f"{srv.url}/info", timeout=60).json()
        assert info["worker"] == "process" and info["worker_pid"] != os.getpid() and info["torch_threads"] == 1
        assert info["index"]["index_size"] == len(NAMES) and info["stats"]["batches"] == 1
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            srv.client, srv.service, srv.index_dir = client, service, index_dir
            _check_links_during_entity_changes(srv)
            r = client.delete("/entities/nobody")
            assert r.status_code == 404 and "not in the KB" in r.json()["detail"]
    finally:
        srv.stop()
    assert service.worker._proc is None  # the worker process was stopped and joined


def test_bad_mentions_get_their_own_error_entry(server, world):
    mentions = [
        _mention(0),
        {**_mention(1), "image_base64": "not base64 at all!"},
        {**_mention(2), "image_path": "../private/secret.png"},
        {**_mention(3), "image_path": "link.png"},  # a symlink out of the root
        {**_mention(4), "image_path": str(world["root"] / "private" / "secret.png")},
        {**_mention(5), "image_path": "sub/missing.png"},
        {"mention": "  ", "sentence": "nothing to link"},
        {**_mention(6), "image_base64": _b64(b"these bytes are no picture")},
        {**_mention(7), "image_base64": _b64(_png(1, (400, 300), plain=True))},  # 120,000 pixels > 100,000
        {**_mention(8), "image_base64": _b64(_huge_png_header())},
        {**_mention(9), "image_base64": _b64(_png(9)), "image_path": "sub/face.png"},
        _mention(10),
    ]
    r = server.client.post("/link", json={"mentions": mentions, "top_k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    errors = {i: results[i]["error"] for i in range(len(mentions)) if isinstance(results[i], dict)}
    assert sorted(errors) == list(range(1, 11))
    assert "base64" in errors[1]
    for i in (2, 3, 4):
        assert "outside the server's image root" in errors[i]
    assert "private" not in errors[3]  # the message names the client's path, never where a link points
    assert "no such file" in errors[5]
    assert "empty mention" in errors[6]
    assert "unreadable picture" in errors[7]
    assert "120,000 pixels exceeds the limit of 100,000" in errors[8]
    assert "picture refused" in errors[9] or "exceeds the limit" in errors[9]
    assert "not both" in errors[10]
    assert all(errors[i].startswith(f"mention {i}: ") for i in errors)
    expected = world["reference"].link([{**_mention(0), "image": None}, {**_mention(10), "image": None}], top_k=3)
    _assert_same(results[0], expected[0])
    _assert_same(results[11], expected[1])


BAD_REQUESTS = [
    ("malformed JSON", b'{"mentions": [', 400, "malformed JSON"),
    ("unknown field", {"mentions": [{"mention": "ada", "colour": "red"}]}, 422, "mentions.0.colour: Extra inputs"),
    ("unknown top-level field", {"mentions": [{"mention": "ada"}], "k": 3}, 422, "k: Extra inputs"),
    ("no mentions", {"mentions": []}, 422, "mentions"),
    ("missing mentions", {"top_k": 3}, 422, "mentions: Field required"),
    ("not an object", [1, 2], 422, "valid dictionary"),
    ("mention not a string", {"mentions": [{"mention": 5}]}, 422, "mentions.0.mention"),
    ("top_k zero", {"mentions": [{"mention": "ada"}], "top_k": 0}, 422, "top_k"),
    ("top_k as text", {"mentions": [{"mention": "ada"}], "top_k": "5"}, 422, "top_k"),
    ("top_k over the limit", {"mentions": [{"mention": "ada"}], "top_k": 21}, 422, "limit of 20"),
    ("candidates over the limit", {"mentions": [{"mention": "ada"}], "candidates": 31}, 422, "limit of 30"),
    ("unknown assignment", {"mentions": [{"mention": "ada"}], "assignment": "sinkhorn"}, 422, "assignment"),
    ("too many mentions", {"mentions": [{"mention": "ada"}] * 17}, 413, "at most 16"),
    ("body too large", {"mentions": [{"mention": "ada", "sentence": "x" * 400_000}]}, 413, "300,000 bytes"),
    ("only a bad mention", {"mentions": [{"mention": "ada", "image_base64": "%%%"}]}, 422, "base64"),
    ("only a bomb", {"mentions": [{"mention": "ada", "image_base64": _b64(_huge_png_header())}]}, 422, "mention 0"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_with_a_message(server, case):
    _, body, status, message = case
    if isinstance(body, bytes):
        r = server.client.post("/link", content=body, headers={"content-type": "application/json"})
    else:
        r = server.client.post("/link", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail, detail


def test_small_answers_are_not_held_back(server):
    """Nagle's algorithm is off on the server's connections: a small answer does not wait ~40 ms for a delayed ACK."""
    import statistics

    times = []
    for _ in range(15):
        start = time.perf_counter()
        assert server.client.get("/health").status_code == 200
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.03, times


def test_other_bad_requests(server):
    r = server.client.post(
        "/link", content=b'{"mentions": [{"mention": "ada"}]}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    assert server.client.get("/nowhere").status_code == 404
    assert server.client.get("/link").status_code == 405
    r = server.client.post("/entities", json={"entities": [{"qid": "Q1", "name": "x"}]})
    assert r.status_code == 409 and "without --index" in r.json()["detail"]
    assert server.client.delete("/entities/Q100").status_code == 409
    assert server.client.get("/health").status_code == 200  # still serving


def test_concurrent_requests_are_batched(server, world):
    import asyncio

    requests = [{"mentions": [_mention(i)], "top_k": 3 + i % 2, "candidates": 6} for i in range(24)]

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/link", json=body) for body in requests))

    before = server.client.get("/info").json()["stats"]
    responses = asyncio.run(fire())
    after = server.client.get("/info").json()["stats"]
    assert [r.status_code for r in responses] == [200] * 24
    for body, r in zip(requests, responses):
        expected = world["reference"].link([{**body["mentions"][0], "image": None}], top_k=body["top_k"], candidates=6)
        _assert_same(r.json()["results"][0], expected[0])
    assert after["mentions"] - before["mentions"] == 24
    assert after["batches"] - before["batches"] < 24  # some requests shared a batch
    assert after["largest_batch"] > 1


def test_entities_added_replaced_removed_and_saved(writable, world):
    client, n = writable.client, len(NAMES)
    everything = {"top_k": 50, "candidates": 50}
    thread = isinstance(writable.service.worker, sv.ThreadWorker)
    served_before = writable.service.worker.core.snapshot.index if thread else None
    qids_before = list(world["reference"].index.qids)
    retrieval_before = served_before.retrieval.clone() if thread else None
    new = {
        "qid": "Q900",
        "name": "zed quux",
        "attributes": "works as a sailor. lives in lima.",
        "image_base64": _b64(_png(42)),
    }
    r = client.post("/entities", json={"entities": [new]})
    assert r.status_code == 200, r.text
    state = r.json()
    assert state["added"] == 1 and state["replaced"] == [] and state["index_size"] == n + 1
    assert state["index_version"] == 1 and state["index_fingerprint"] != world["reference"].index.meta["kb"]
    if thread:  # the index that served before is untouched (copy-on-write)
        assert list(served_before.qids) == qids_before and torch.equal(served_before.retrieval, retrieval_before)

    query = {"mentions": [{"mention": "zed quux", "sentence": "a sailor in lima"}], **everything}
    r = client.post("/link", json=query).json()
    assert r["index_version"] == 1
    found = {c["qid"]: c for c in r["results"][0]}
    assert len(found) == n + 1 and found["Q900"]["name"] == "zed quux"
    # Its score is the one a KB encoded from scratch with the new entity gives.
    rows = world["rows"] + [{"qid": "Q900", "name": new["name"], "attributes": new["attributes"], "image": _png(42)}]
    fresh = lk.OTMELLinker(world["reference"].model, world["reference"].processor)
    fresh.build_index(rows, progress=False)
    expected = fresh.link([{**query["mentions"][0], "image": None}], top_k=50)[0]
    _assert_same(r["results"][0], expected, atol=1e-4)
    saved = ix.EntityIndex.load(writable.index_dir, model=fresh.model, processor=fresh.processor)
    assert list(saved.qids) == qids_before + ["Q900"] and saved.meta["kb"] == state["index_fingerprint"]

    # Replace: same qid, new name; the KB keeps its size.
    r = client.post("/entities", json={"entities": [{"qid": "Q900", "name": "zed quux junior"}]})
    assert r.status_code == 200 and r.json()["replaced"] == ["Q900"] and r.json()["index_size"] == n + 1
    names = {c["qid"]: c["name"] for c in client.post("/link", json=query).json()["results"][0]}
    assert names["Q900"] == "zed quux junior"

    # Remove: gone from the next answer and from the saved index.
    r = client.delete("/entities/Q900")
    assert r.status_code == 200 and r.json() == {**r.json(), "removed": "Q900", "index_size": n, "index_version": 3}
    r = client.post("/link", json=query).json()
    assert r["index_version"] == 3 and "Q900" not in {c["qid"] for c in r["results"][0]} and len(r["results"][0]) == n
    assert "Q900" not in ix.EntityIndex.load(writable.index_dir).qids
    assert client.delete("/entities/Q900").status_code == 404

    # A qid holding "/" is added and removed (encoded or not in the path).
    for path in ("/entities/wd%2FQ901", "/entities/wd/Q901"):
        assert (
            client.post("/entities", json={"entities": [{"qid": "wd/Q901", "name": "zed slash"}]}).status_code == 200
        )
        r = client.delete(path)
        assert r.status_code == 200 and r.json()["removed"] == "wd/Q901", r.text

    # Bad changes change nothing.
    for body, message in [
        ({"entities": [{"qid": "Q901", "name": "x", "image_base64": "@@"}]}, "no entity was changed"),
        ({"entities": [{"qid": "Q901", "name": "x"}, {"qid": "Q901", "name": "y"}]}, "more than once"),
        ({"entities": [{"qid": "Q901", "name": "x", "picture": "a.png"}]}, "entities.0.picture"),
        ({"entities": [{"qid": "Q901", "name": "x", "image_path": "../private/secret.png"}]}, "outside"),
        ({"entities": [{"qid": "Q901", "name": "x"}, {"qid": "Q902", "name": " "}]}, "entity 1 ('Q902'): empty name"),
    ]:
        r = client.post("/entities", json=body)
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert client.get("/info").json()["index"]["index_version"] == 7


@pytest.mark.parametrize("with_ann", [False, True])
def test_copy_for_write_leaves_the_served_index_untouched(world, with_ann):
    linker = lk.OTMELLinker.from_pretrained(world["model_dir"])
    served = linker.load_index(world["index_dir"])
    if with_ann:
        served.ann = ix.AnnIndex.build(served, kind="ivf", nlist=1, code="flat")
    before = {
        "qids": list(served.qids),
        "names": list(served.names),
        "meta": json_copy(served.meta),
        "tensors": {k: v.clone() for k, v in _row_tensors(served).items()},
    }
    if with_ann:
        before["ann"] = (served.ann.slot_rows.clone(), served.ann.index.ntotal, served.ann.version)
    for change in ("add", "remove"):
        new = sv.copy_for_write(served)
        linker.index = new
        if change == "add":
            linker.add_entities(
                [
                    {"qid": "Q100", "name": "ada replaced", "attributes": ""},
                    {"qid": "Q999", "name": "zed quux", "attributes": "", "image": _png(3)},
                ]
            )
            assert new.qids[-1] == "Q999" and new.names[0] == "ada replaced"
        else:
            linker.remove_entities(["Q101", "Q102"])
            assert "Q101" not in new.qids and len(new) == len(NAMES) - 2
        assert new.meta["kb"] != served.meta["kb"]
        assert list(served.qids) == before["qids"] and list(served.names) == before["names"]
        assert json_copy(served.meta) == before["meta"]
        now = _row_tensors(served)
        assert now.keys() == before["tensors"].keys()
        assert all(torch.equal(now[k], v) for k, v in before["tensors"].items())
        if with_ann:
            assert new.ann is not served.ann
            slot_rows, ntotal, version = before["ann"]
            assert torch.equal(served.ann.slot_rows, slot_rows) and served.ann.index.ntotal == ntotal
            assert served.ann.version == version


def _row_tensors(index) -> dict:
    out = {"retrieval": index.retrieval, **index.tensors}
    for name in ("retrieval_scale", "row_hashes"):
        if getattr(index, name, None) is not None:
            out[name] = getattr(index, name)
    return out


def json_copy(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def test_links_during_entity_changes_see_one_whole_kb(writable):
    """Links run while entities come and go: each answer lists exactly the KB of the version it reports, and no
    request sent after a removal was answered sees the removed entity."""
    _check_links_during_entity_changes(writable)


def _check_links_during_entity_changes(writable):
    client = writable.client
    kb = {0: {f"Q{100 + i}" for i in range(len(NAMES))}}
    removed_at = {}  # qid -> version of its removal
    stop = threading.Event()
    answers, failures = [], []

    def reader():
        with httpx.Client(base_url=writable.url, timeout=60) as c:
            for i in range(400):  # bounded
                if stop.is_set():
                    break
                sent_after = dict(removed_at)
                r = c.post("/link", json={"mentions": [_mention(i)], "top_k": 50, "candidates": 50})
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                answers.append((sent_after, r.json()))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    version = 0
    for step in range(4):
        qid = f"Q95{step}"
        r = client.post("/entities", json={"entities": [{"qid": qid, "name": f"new person {step}"}]})
        assert r.status_code == 200, r.text
        version += 1
        assert r.json()["index_version"] == version
        kb[version] = kb[version - 1] | {qid}
        gone = f"Q{100 + step}"
        r = client.delete(f"/entities/{gone}")
        assert r.status_code == 200, r.text
        version += 1
        kb[version] = kb[version - 1] - {gone}
        removed_at[gone] = version
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(120)
    assert not failures
    assert len(answers) >= 5
    for sent_after, body in answers:
        version = body["index_version"]
        assert {c["qid"] for c in body["results"][0]} == kb[version]
        assert all(version >= v for v in sent_after.values())
    assert set(ix.EntityIndex.load(writable.index_dir).qids) == kb[version]


def test_graceful_shutdown_finishes_running_requests(world):
    srv, _ = _start(world, max_wait_ms=500)  # a request waits ~0.5 s in the batcher
    results = {}

    def send():
        results["response"] = httpx.post(f"{srv.url}/link", json={"mentions": [_mention(0)]}, timeout=60)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.2)
    srv.stop()  # asks the server to exit while the request is in the batcher
    t.join(60)
    assert results["response"].status_code == 200 and len(results["response"].json()["results"][0]) == 5
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health", timeout=5)


def test_index_built_from_a_kb_file_and_saved(world, tmp_path):
    import json

    kb = tmp_path / "kb.jsonl"
    kb.write_text("".join(json.dumps({"qid": f"K{i}", "name": NAMES[i], "attributes": "x"}) + "\n" for i in range(3)))
    index_dir = str(tmp_path / "index")
    linker = sv.load_linker(world["model_dir"], index_dir, str(kb))
    assert list(linker.index.qids) == ["K0", "K1", "K2"]
    assert list(ix.EntityIndex.load(index_dir).qids) == ["K0", "K1", "K2"]
    kb.write_text(json.dumps({"qid": "other", "name": "x"}) + "\n")  # an index in --index wins over --kb
    assert list(sv.load_linker(world["model_dir"], index_dir, str(kb)).index.qids) == ["K0", "K1", "K2"]
    with pytest.raises(ValueError, match="--index INDEX_DIR or --kb"):
        sv.load_linker(world["model_dir"], None, None)


def test_command_line(world, tmp_path, capsys):
    assert sv.main(["--model", world["model_dir"], "--index", str(tmp_path / "none")]) == 2
    assert "no entity index there" in capsys.readouterr().err
    # A failure while the worker loads (here: no model) is its first message, which the server process reports
    # (run in this process here, to save spawning one).
    import multiprocessing

    ours, theirs = multiprocessing.Pipe()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sv._worker_main(theirs, {"model": str(tmp_path / "no-model"), "index": world["index_dir"]})
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    kind, message = ours.recv()
    assert kind == "failed" and "no-model" in message
    assert (
        sv.main(["--model", world["model_dir"], "--index", world["index_dir"], "--image_root", str(tmp_path / "x")])
        == 2
    )
    cmd = [
        sys.executable,
        os.path.join(REPO, "serving_otmel.py"),
        "--model",
        world["model_dir"],
        "--index",
        world["index_dir"],
        "--port",
        "0",
        "--threads",
        "1",
        "--no_access_log",
        "--log_level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        line = proc.stdout.readline()  # blocks until the server prints its address (or exits)
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.strip().rsplit(" ", 1)[-1]
        r = httpx.post(f"{url}/link", json={"mentions": [_mention(3)], "top_k": 2}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
