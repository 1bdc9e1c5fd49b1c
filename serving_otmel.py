"""A linking server for OT-MEL: other programs link mentions over HTTP, and the KB takes new entities while it serves.

    otmel-serve --model DIR_OR_HUB_ID --index INDEX_DIR [--kb KB] [--host 127.0.0.1] [--port 8000] [--image_root DIR]
    python serving_otmel.py ...    # the same

- `POST /link`: `{"mentions": [{"mention", "sentence", "image_base64"?, "image_path"?}], "top_k": 5, "candidates": 50,
  "assignment": "ot" | "attention" | null, "nil_threshold": number | null (no NIL) | absent (the model's)}` ->
  `{"results": [[{"qid", "name", "score"}, ...], ...], "index_version",
  "index_fingerprint", "index_size"}`: one list per mention, whatever [`~linking_otmel.OTMELLinker.link`] returns for
  it, or `{"error": "..."}` in the slot of a mention that cannot be linked (empty, text too long, picture unreadable,
  too large, or a path outside `--image_root`); the others are linked. A request none of whose mentions can be linked
  is answered 422 with every mention's error. A picture comes as base64 bytes (`image_base64`, a `data:` URL prefix is
  accepted), or as a path relative to `--image_root` (`image_path`; symlinks are resolved and the file must lie under
  the root: a client can never make the server read any other file).
- `GET /health`; `GET /info`: the model, the index (size, fingerprint, version, folder), the settings and counters.
- `POST /entities` `{"entities": [{"qid", "name", "attributes", "image_base64"? or "image_path"?}]}` adds entities or
  replaces those whose qid is in the KB (an empty qid or name is refused); `DELETE /entities/{qid}` removes one (a
  qid may hold "/"). Only the new entities are encoded; the new index is built beside the serving one
  (copy-on-write), saved to `--index`, then swapped in under a lock, so every link request is ranked against one
  whole KB state, old or new, and reports its `index_version`. Changes are
  answered once saved; they are all-or-nothing and applied one at a time. Without `--index` they are refused (409).

Dynamic batching: requests wait in an asyncio queue; one batcher takes up to `--max_batch_mentions` mentions from it
(waiting at most `--max_wait_ms` for more once the queue is empty), groups them by their settings (`top_k`,
`candidates`, `assignment`, `nil_threshold`) and links each group with one [`~linking_otmel.OTMELLinker.link`] call on the single
model thread, which also encodes new entities. Under load the queue fills while the model works, so batches grow by
themselves. With `--worker process` the model runs in a worker process instead of a thread ([`ProcessWorker`]): the
same batches over a pipe, and the model never shares a GIL with the HTTP event loop.

Limits, each answered with a 4xx and a message (`{"detail": ...}`), never a 500: request body size (413), mentions or
entities per request (413), queued mentions (429, with Retry-After), picture pixels (a decompression bomb is refused
before it is decoded), malformed JSON (400), a body that is not JSON (415), unknown fields, wrong types or bad
settings (422, naming the field). Shutdown (SIGINT / SIGTERM) stops taking connections and finishes the requests that
are running (at most `--graceful_timeout` seconds).
"""

import argparse
import asyncio
import base64
import binascii
import contextlib
import copy
import io
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .data_otmel import load_kb
    from .index_otmel import INDEX_META, EntityIndex
    from .linking_otmel import OTMELLinker
    from .processing_otmel import read_image
except ImportError:
    from data_otmel import load_kb
    from index_otmel import INDEX_META, EntityIndex
    from linking_otmel import OTMELLinker
    from processing_otmel import read_image


logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000  # mention, sentence, name or attributes; the processor keeps max_text_length tokens anyway


# ----------------------------------------------------------------------------------------------------------------
# Settings and request bodies
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ServerSettings:
    """Batching and limits of a [`LinkingService`] (each is a command-line option of the same name).

    Args:
        max_batch_mentions (`int`): most mentions linked together (a single larger request still goes as one batch).
        max_wait_ms (`float`): once the queue is empty, how long the batcher waits for more requests before it runs a
            batch that is not full (0: never waits; the queue still fills while the model works).
        max_queue_mentions (`int`): mentions waiting at once; beyond it requests get 429.
        max_request_bytes (`int`): request body limit (base64 pictures included).
        max_mentions_per_request, max_entities_per_request (`int`).
        max_image_pixels (`int`): width x height limit of a picture, checked from its header before decoding.
        max_top_k, max_candidates (`int`): bounds of the per-request settings.
        image_root (`str`, *optional*): the folder `image_path` may point into; without it `image_path` is refused.
        index_dir (`str`, *optional*): where entity changes are saved; without it they are refused.
        graceful_timeout (`float`): seconds a shutdown waits for running requests.
    """

    max_batch_mentions: int = 64
    max_wait_ms: float = 2.0
    max_queue_mentions: int = 8192
    max_request_bytes: int = 16 * 2**20
    max_mentions_per_request: int = 256
    max_entities_per_request: int = 1024
    max_image_pixels: int = 25_000_000
    max_top_k: int = 100
    max_candidates: int = 1000
    image_root: str | None = None
    index_dir: str | None = None
    graceful_timeout: float = 30.0


class MentionIn(BaseModel):
    """One mention of a `POST /link` request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mention: str
    sentence: str = ""
    image_base64: str | None = None
    image_path: str | None = None


class LinkRequest(BaseModel):
    """Body of `POST /link`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mentions: list[MentionIn] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, description="entities per mention (default 5)")
    candidates: int | None = Field(None, ge=1, description="stage-1 shortlist (default 50, or the server's limit)")
    assignment: Literal["ot", "attention"] | None = None
    nil_threshold: Annotated[float, Field(allow_inf_nan=False)] | Literal["config"] | None = Field(
        "config", description="NIL below this best score; null: no NIL answers; default: the model's"
    )


class EntityIn(BaseModel):
    """One entity of a `POST /entities` request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    qid: str = Field(min_length=1, max_length=256)
    name: str = Field(max_length=MAX_TEXT_CHARS)
    attributes: str = Field("", max_length=MAX_TEXT_CHARS)
    image_base64: str | None = None
    image_path: str | None = None


class EntitiesRequest(BaseModel):
    """Body of `POST /entities`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    entities: list[EntityIn] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_qids(self):
        seen, repeated = set(), []
        for e in self.entities:
            if e.qid in seen:
                repeated.append(e.qid)
            seen.add(e.qid)
        if repeated:
            raise ValueError(f"qid(s) given more than once: {', '.join(sorted(set(repeated))[:10])}")
        return self


class ServiceError(Exception):
    """An answer other than 200: `status` and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


# ----------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------


def decode_base64(text: str) -> bytes:
    """Bytes of standard base64 text (an optional `data:...;base64,` prefix is dropped); raises `ValueError`."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ValueError("image_base64 is a data: URL without ';base64,'")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"image_base64 is not valid base64 ({err})") from None


def decode_picture(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB picture from encoded bytes; the pixel count is checked from the header before any pixel is decoded.
    Raises `ValueError` with the reason.

    No warnings filter is touched (they are process-wide and the model thread reads pictures meanwhile): a header over
    PIL's own limit (`Image.MAX_IMAGE_PIXELS`, above ours by default) raises or warns in PIL, and is refused here."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ValueError(f"picture refused: {err}") from None
    except Exception as err:  # noqa: BLE001 - any failure to identify the bytes is the client's
        raise ValueError(f"unreadable picture ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(
            f"picture of {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,}"
        )
    rgb, reason = read_image(image)
    if rgb is None:
        raise ValueError(reason or "unreadable picture")
    return rgb


def resolve_image_path(path: str, image_root: str | None) -> str:
    """The real path of `path` (relative to `image_root`, or absolute) when it is a regular file under the real
    `image_root`; raises `ValueError` otherwise. Symlinks are resolved before the check."""
    if image_root is None:
        raise ValueError("image_path is not accepted: this server was started without --image_root")
    root = os.path.realpath(image_root)
    try:
        full = os.path.realpath(os.path.join(root, path))
    except (ValueError, OSError) as err:
        raise ValueError(f"image_path {path[:200]!r} is not a usable path ({err})") from None
    if os.path.commonpath([full, root]) != root:
        raise ValueError(f"image_path {path[:200]!r} is outside the server's image root")
    if not os.path.isfile(full):
        raise ValueError(f"image_path {path[:200]!r}: no such file under the server's image root")
    return full


def _picture_bytes(image_base64, image_path, settings: ServerSettings) -> bytes | None:
    if image_base64 is not None and image_path is not None:
        raise ValueError("give image_base64 or image_path, not both")
    if image_base64 is not None:
        return decode_base64(image_base64)
    if image_path is not None:
        full = resolve_image_path(image_path, settings.image_root)
        size = os.path.getsize(full)
        if size > settings.max_request_bytes:
            raise ValueError(
                f"image_path {image_path[:200]!r} is {size:,} bytes, over the limit of {settings.max_request_bytes:,}"
            )
        with open(full, "rb") as f:
            return f.read()
    return None


def prepare_mention(m: MentionIn, settings: ServerSettings) -> dict:
    """The `OTMELLinker.link` input of one mention: `mention`, `sentence`, `image` (the decoded RGB picture, within the
    pixel limit, or None) and `image_bytes` (its encoded bytes, what a worker process is sent); raises `ValueError`
    naming what is wrong with it. Decoding here, on the event loop's side, spares the model thread that work."""
    if not m.mention.strip():
        raise ValueError("empty mention")
    for name in ("mention", "sentence"):
        if len(getattr(m, name)) > MAX_TEXT_CHARS:
            raise ValueError(f"{name} is {len(getattr(m, name)):,} characters, over the limit of {MAX_TEXT_CHARS:,}")
    data = _picture_bytes(m.image_base64, m.image_path, settings)
    image = decode_picture(data, settings.max_image_pixels) if data is not None else None  # refused here if unreadable
    return {"mention": m.mention, "sentence": m.sentence, "image": image, "image_bytes": data}


def prepare_entity(e: EntityIn, settings: ServerSettings) -> dict:
    """A KB row (`qid`, `name`, `attributes`, `image` = encoded picture bytes, checked to decode, or None)."""
    if not e.qid.strip():
        raise ValueError("empty qid")
    if not e.name.strip():
        raise ValueError("empty name")
    data = _picture_bytes(e.image_base64, e.image_path, settings)
    if data is not None:
        decode_picture(data, settings.max_image_pixels)
    return {"qid": e.qid, "name": e.name, "attributes": e.attributes, "image": data}


# ----------------------------------------------------------------------------------------------------------------
# The service: one model thread, a batching queue, copy-on-write index snapshots
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexSnapshot:
    """One state of the KB: the index, its version (0 at start, +1 per change) and its fingerprint."""

    index: EntityIndex
    version: int
    fingerprint: str


def index_fingerprint(index: EntityIndex) -> str:
    """The KB content fingerprint the index carries (`meta["kb"]`, kept up to date by `EntityIndex.add` / `remove`)."""
    return str(index.meta.get("kb") or "")


def copy_for_write(index: EntityIndex) -> EntityIndex:
    """A new `EntityIndex` object for [`~EntityIndex.add`] / [`~EntityIndex.remove`] to change while `index` keeps
    serving; `index.copy()` when the class has one, else a copy that shares the tensors.

    `add` and `remove` build new tensors and lists and assign them to the object they are called on, update its `meta`
    dict in place, and update its ANN structure (a FAISS index and a slot table) in place: so the copy gets its own
    `meta`, tensor dict and ANN structure, and shares the rest, which is never written to.
    (tests/test_serving.py checks that the served index is unchanged after a change.)
    """
    if callable(getattr(index, "copy", None)):
        return index.copy()
    new = copy.copy(index)
    new.meta = copy.deepcopy(index.meta)
    new.tensors = dict(index.tensors)
    if getattr(index, "ann", None) is not None:
        new.ann = index.ann.copy()
    return new


class ModelCore:
    """The model side of the server, synchronous: links groups of mentions against one KB snapshot, builds new
    indexes (copy-on-write), saves them and swaps them in. Runs on one model thread ([`ThreadWorker`]) or in the main
    thread of a worker process ([`ProcessWorker`]); `commit` may run on another thread meanwhile."""

    def __init__(self, linker: OTMELLinker, index_dir: str | None = None):
        if linker.index is None:
            raise ValueError("the linker has no entity index: load or build one first")
        self.linker, self.index_dir = linker, index_dir
        self._snapshot = IndexSnapshot(linker.index, 0, index_fingerprint(linker.index))
        self._lock = threading.Lock()

    @property
    def snapshot(self) -> IndexSnapshot:
        """The current KB state; a batch reads it once and ranks all its mentions against it."""
        with self._lock:
            return self._snapshot

    @staticmethod
    def state(snapshot: IndexSnapshot) -> dict:
        return {
            "index_size": len(snapshot.index),
            "index_version": snapshot.version,
            "index_fingerprint": snapshot.fingerprint,
        }

    def info(self) -> dict:
        """The model and index facts of `GET /info`."""
        snapshot = self.snapshot
        model = self.linker.model
        return {
            "model_weights_sha256": snapshot.index.meta.get("model", {}).get("weights"),
            "device": str(model.device),
            "torch_threads": torch.get_num_threads(),
            "inference_assignment": getattr(model.config, "inference_assignment", None),
            "index_dtype": snapshot.index.meta.get("dtype"),
            **self.state(snapshot),
        }

    def link_groups(self, groups: list) -> tuple:
        """Links `[((top_k, candidates, assignment, nil_threshold), mentions), ...]` against one snapshot.

        Returns `(state, outcomes, seconds, cpu_seconds)`: per group the `OTMELLinker.link` results or an error
        message."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        snapshot = self.snapshot
        outcomes = []
        for (top_k, candidates, assignment, nil_threshold), mentions in groups:
            try:
                self.linker.index = snapshot.index
                outcomes.append(
                    self.linker.link(
                        mentions,
                        top_k=top_k,
                        candidates=candidates,
                        assignment=assignment,
                        nil_threshold=nil_threshold,
                    )
                )
            except Exception as err:  # noqa: BLE001 - reported to each request of the group
                logger.exception("linking %d mentions failed", len(mentions))
                outcomes.append(f"linking failed ({type(err).__name__}: {err})")
        return self.state(snapshot), outcomes, time.perf_counter() - start, time.thread_time() - cpu_start

    def build_added(self, rows: list) -> tuple:
        """A new index: the current one plus the encoded `rows` (same qids replaced); `(new index, replaced qids)`."""
        base = self.snapshot.index
        replaced = sorted({r["qid"] for r in rows if base.row_of(r["qid"]) >= 0})
        new = copy_for_write(base)
        self.linker.index = new
        try:
            self.linker.add_entities(rows)
        finally:
            self.linker.index = base
        return new, replaced

    def build_removed(self, qid: str) -> EntityIndex:
        """A new index without `qid`; `ServiceError` 404 when it is not in the KB, 409 when it is the last entity."""
        base = self.snapshot.index
        if base.row_of(qid) < 0:
            raise ServiceError(404, f"qid {qid!r} is not in the KB")
        if len(base) == 1:
            raise ServiceError(409, f"qid {qid!r} is the last entity of the KB; an empty KB cannot link")
        new = copy_for_write(base)
        self.linker.index = new
        try:
            self.linker.remove_entities([qid])
        finally:
            self.linker.index = base
        return new

    def commit(self, new_index: EntityIndex) -> dict:
        """Saves `new_index` to the index folder (atomically), then makes it the current snapshot; its state."""
        try:
            new_index.save(self.index_dir)
        except OSError as err:
            raise ServiceError(
                507, f"could not save the entity index to {self.index_dir} ({err}); the KB is unchanged"
            ) from err
        with self._lock:
            self._snapshot = IndexSnapshot(new_index, self._snapshot.version + 1, index_fingerprint(new_index))
            return self.state(self._snapshot)


def _error_tuple(err: Exception) -> tuple:
    if isinstance(err, ServiceError):
        return err.status, err.message
    return 500, f"{type(err).__name__}: {err}"


class ThreadWorker:
    """The model on one thread of the server process (simple; the HTTP event loop shares the GIL with it)."""

    def __init__(self, linker: OTMELLinker, index_dir: str | None = None):
        self.core = ModelCore(linker, index_dir)
        self._executor = None

    def launch(self) -> dict:
        return self.core.info()

    async def start(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otmel-model")

    async def stop(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def state(self) -> dict:
        return self.core.state(self.core.snapshot)

    def info(self) -> dict:
        return self.core.info()

    async def link(self, groups: list) -> tuple:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.core.link_groups, groups)

    async def add(self, rows: list) -> dict:
        loop = asyncio.get_running_loop()
        new, replaced = await loop.run_in_executor(self._executor, self.core.build_added, rows)
        state = await asyncio.to_thread(self.core.commit, new)  # links go on meanwhile, against the old snapshot
        return {"added": len(rows) - len(replaced), "replaced": replaced, **state}

    async def remove(self, qid: str) -> dict:
        new = await asyncio.get_running_loop().run_in_executor(self._executor, self.core.build_removed, qid)
        return {"removed": qid, **(await asyncio.to_thread(self.core.commit, new))}


def _worker_main(conn, spec: dict):
    """The worker process of [`ProcessWorker`]: loads the linker, then answers requests from the pipe in order; an
    index save runs on a thread while links go on against the old snapshot."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server process decides when to stop (a "stop" message or EOF)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=spec.get("log_level", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s",
    )
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        linker = load_linker(
            spec["model"], spec.get("index"), spec.get("kb"), spec.get("device"), spec.get("batch_size", 64)
        )
        core = ModelCore(linker, spec.get("index"))
    except Exception as err:  # noqa: BLE001 - reported to the server process, which exits with it
        conn.send(("failed", str(err) or type(err).__name__))
        return
    conn.send(("ready", core.info()))
    saving = None  # (request id, thread, outcome dict, extra answer fields)

    def finish_save():
        nonlocal saving
        rid, thread, outcome, extra = saving
        thread.join()
        saving = None
        if "error" in outcome:
            conn.send((rid, False, outcome["error"]))
        else:
            conn.send((rid, True, {**extra, **outcome["state"]}))

    while True:
        if saving is not None and not saving[1].is_alive():
            finish_save()
        if not conn.poll(0.005 if saving is not None else None):
            continue
        try:
            rid, kind, payload = conn.recv()
        except (EOFError, OSError):
            break
        if kind == "stop":
            if saving is not None:
                finish_save()
            conn.send((rid, True, None))
            break
        try:
            if kind == "link":
                conn.send((rid, True, core.link_groups(payload)))
                continue
            if kind == "add":
                new, replaced = core.build_added(payload)
                extra = {"added": len(payload) - len(replaced), "replaced": replaced}
            elif kind == "remove":
                new, extra = core.build_removed(payload), {"removed": payload}
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as err:  # noqa: BLE001 - answered, the worker goes on
            if not isinstance(err, ServiceError):
                logger.exception("%s failed", kind)
            conn.send((rid, False, _error_tuple(err)))
            continue
        outcome = {}

        def commit(new=new, outcome=outcome):
            try:
                outcome["state"] = core.commit(new)
            except Exception as err:  # noqa: BLE001
                logger.exception("saving the index failed")
                outcome["error"] = _error_tuple(err)

        thread = threading.Thread(target=commit, name="otmel-save")
        thread.start()
        saving = (rid, thread, outcome, extra)
    conn.close()


class ProcessWorker:
    """The model in a worker process (spawned): the model never waits for the GIL of the HTTP event loop.

    Requests go over a pipe and are answered in order; a reader thread hands the answers to the event loop. Mentions
    travel with their pictures as encoded bytes (decoded again by `OTMELLinker.link` there, as in-process)."""

    def __init__(
        self,
        model: str,
        index: str | None = None,
        kb: str | None = None,
        device=None,
        threads=None,
        batch_size: int = 64,
        log_level: str = "warning",
        start_timeout: float = 900,
    ):
        self.spec = {
            "model": model,
            "index": index,
            "kb": kb,
            "device": device,
            "threads": threads,
            "batch_size": batch_size,
            "log_level": log_level,
        }
        self.start_timeout = start_timeout
        self._proc = self._conn = self._reader = self._loop = None
        self._pending, self._ids, self._dead = {}, itertools.count(), None
        self._info, self._state = {}, {}

    def launch(self) -> dict:
        """Starts the worker process and waits until it has loaded the model and index (blocking); its info.
        Raises `ValueError` with the worker's message when loading failed."""
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, self.spec), name="otmel-model-worker", daemon=True)
        self._proc.start()
        child.close()
        try:
            if not self._conn.poll(self.start_timeout):
                raise RuntimeError(f"the model worker did not start within {self.start_timeout:.0f} s")
            kind, payload = self._conn.recv()
        except EOFError:
            self._proc.join(10)
            raise RuntimeError(f"the model worker exited while starting (exit code {self._proc.exitcode})") from None
        except BaseException:
            self._proc.kill()
            raise
        if kind == "failed":
            self._proc.join(30)
            raise ValueError(payload)
        self._info = payload
        self._state = {k: payload[k] for k in ("index_size", "index_version", "index_fingerprint")}
        return payload

    async def start(self):
        if self._proc is None:
            await asyncio.to_thread(self.launch)
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="otmel-worker-reader", daemon=True)
        self._reader.start()

    def _read(self):
        while True:
            try:
                rid, ok, payload = self._conn.recv()
            except (EOFError, OSError):
                self._loop.call_soon_threadsafe(self._fail_all)
                return
            self._loop.call_soon_threadsafe(self._resolve, rid, ok, payload)

    def _resolve(self, rid, ok, payload):
        future = self._pending.pop(rid, None)
        if future is not None and not future.done():
            future.set_result((ok, payload))

    def _fail_all(self):
        self._dead = f"the model worker process stopped (exit code {self._proc.exitcode})"
        for future in self._pending.values():
            if not future.done():
                future.set_result((False, (503, self._dead)))
        self._pending.clear()

    async def _call(self, kind: str, payload=None):
        if self._dead:
            raise ServiceError(503, self._dead)
        rid = next(self._ids)
        future = self._loop.create_future()
        self._pending[rid] = future
        self._conn.send((rid, kind, payload))
        ok, result = await future
        if not ok:
            raise ServiceError(*result)
        return result

    async def stop(self):
        if self._proc is None:
            return
        if not self._dead and self._proc.is_alive():
            with contextlib.suppress(ServiceError):
                await self._call("stop")
        await asyncio.to_thread(self._proc.join, 60)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc = None

    def state(self) -> dict:
        return dict(self._state)

    def info(self) -> dict:
        return {**self._info, **self._state, "worker_pid": self._proc.pid if self._proc is not None else None}

    def _keep_state(self, state: dict):
        if state["index_version"] >= self._state.get("index_version", -1):
            self._state = {k: state[k] for k in ("index_size", "index_version", "index_fingerprint")}

    async def link(self, groups: list) -> tuple:
        # Pictures travel encoded (a few kB) rather than decoded; link() decodes them again there.
        groups = [
            (
                key,
                [
                    {
                        "mention": m["mention"],
                        "sentence": m.get("sentence", ""),
                        "image": m.get("image_bytes", m.get("image")),
                    }
                    for m in mentions
                ],
            )
            for key, mentions in groups
        ]
        result = await self._call("link", groups)
        self._keep_state(result[0])
        return result

    async def add(self, rows: list) -> dict:
        answer = await self._call("add", rows)
        self._keep_state(answer)
        return answer

    async def remove(self, qid: str) -> dict:
        answer = await self._call("remove", qid)
        self._keep_state(answer)
        return answer


@dataclass
class _Job:
    mentions: list
    key: tuple  # (top_k, candidates, assignment, nil_threshold)
    future: asyncio.Future


class LinkingService:
    """The server's core, for asyncio code: requests wait in a queue, a batcher links them in batches on a model
    worker ([`ProcessWorker`] or [`ThreadWorker`]), entity changes are applied one at a time (copy-on-write).

    ```python
    service = LinkingService(ThreadWorker(linker, index_dir="index/"), ServerSettings(index_dir="index/"))
    await service.start()
    results, state = await service.link([{"mention": "Ada", "sentence": "...", "image": None}])
    await service.add_entities([{"qid": "Q1", "name": "Ada", "attributes": "", "image": None}])
    await service.stop()
    ```
    """

    def __init__(self, worker, settings: ServerSettings | None = None, model_name: str | None = None):
        self.worker = worker
        self.settings = settings or ServerSettings()
        self.model_name = model_name
        self._queue = self._batcher = self._write_lock = self._carry = None
        self.queued_mentions = 0
        self.stats = {
            "requests": 0,
            "mentions": 0,
            "batches": 0,
            "batched_mentions": 0,
            "largest_batch": 0,
            "model_seconds": 0.0,
            "model_cpu_seconds": 0.0,
            "entity_changes": 0,
        }

    # ---- lifecycle --------------------------------------------------------------------------------------------

    async def start(self):
        await self.worker.start()
        self._queue = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def stop(self):
        """Links what is queued, then stops the batcher and the model worker."""
        if self._batcher is not None:
            await self._queue.put(None)
            await self._batcher
            self._batcher = None
        await self.worker.stop()

    def state(self) -> dict:
        """`index_size`, `index_version`, `index_fingerprint` of the current KB."""
        return self.worker.state()

    # ---- linking ----------------------------------------------------------------------------------------------

    async def link(
        self,
        mentions: list,
        top_k: int = 5,
        candidates: int = 50,
        assignment: str | None = None,
        nil_threshold: float | str | None = "config",
    ):
        """Links prepared mentions (dicts for `OTMELLinker.link`) in the next batch: `(results, state)`, the state of
        the KB they were ranked against."""
        if self._batcher is None:
            raise ServiceError(503, "the server is not running (starting or shutting down)")
        limit = self.settings.max_queue_mentions
        if self.queued_mentions and self.queued_mentions + len(mentions) > limit:
            raise ServiceError(
                429,
                f"server busy: {self.queued_mentions} mentions queued (limit {limit}); retry later",
                headers={"Retry-After": "1"},
            )
        future = asyncio.get_running_loop().create_future()
        self.queued_mentions += len(mentions)
        await self._queue.put(_Job(mentions, (top_k, candidates, assignment, nil_threshold), future))
        return await future

    async def _next_job(self, timeout: float | None):
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self._queue.get()
        if not self._queue.empty():
            return self._queue.get_nowait()
        if timeout <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(self._queue.get(), timeout)

    async def _batch_loop(self):
        loop = asyncio.get_running_loop()
        wait = self.settings.max_wait_ms / 1000
        stopping = False
        while not (stopping and self._carry is None):
            job = await self._next_job(None)  # the job carried over from the last batch first
            if job is None:
                break
            jobs, count = [job], len(job.mentions)
            deadline = loop.time() + wait
            while count < self.settings.max_batch_mentions and not stopping:
                try:
                    job = await self._next_job(deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                if job is None:
                    stopping = True
                    break
                if count + len(job.mentions) > self.settings.max_batch_mentions:
                    self._carry = job
                    break
                jobs.append(job)
                count += len(job.mentions)
            self.queued_mentions -= count
            await self._run_batch([j for j in jobs if not j.future.done()])  # skips clients that went away

    async def _run_batch(self, jobs: list):
        """Links a batch, one group per setting, and answers each job."""
        if not jobs:
            return
        groups = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        payload = [(key, [m for job in group for m in job.mentions]) for key, group in groups.items()]
        try:
            state, outcomes, seconds, cpu_seconds = await self.worker.link(payload)
        except Exception as err:  # noqa: BLE001 - never leave a request waiting
            if not isinstance(err, ServiceError):
                logger.exception("batch failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        size = sum(len(j.mentions) for j in jobs)
        self.stats["model_seconds"] += seconds
        self.stats["model_cpu_seconds"] += cpu_seconds
        self.stats["batches"] += 1
        self.stats["batched_mentions"] += size
        self.stats["largest_batch"] = max(self.stats["largest_batch"], size)
        for group, outcome in zip(groups.values(), outcomes):
            start = 0
            for job in group:
                if job.future.done():
                    pass
                elif isinstance(outcome, str):
                    job.future.set_exception(ServiceError(500, outcome))
                else:
                    job.future.set_result((outcome[start : start + len(job.mentions)], state))
                start += len(job.mentions)

    # ---- entity changes ---------------------------------------------------------------------------------------

    def _require_index_dir(self):
        if self.settings.index_dir is None:
            raise ServiceError(
                409, "entity changes are refused: this server was started without --index, so it could not save them"
            )

    async def add_entities(self, rows: list) -> dict:
        """Adds KB rows (`qid`, `name`, `attributes`, `image`), replacing the entities with the same qids; answers
        once the new index is saved and serving: `added`, `replaced` and the new state."""
        self._require_index_dir()
        async with self._write_lock:
            answer = await self.worker.add(rows)
        self.stats["entity_changes"] += 1
        return answer

    async def remove_entity(self, qid: str) -> dict:
        """Removes one entity (404 when the qid is not in the KB, 409 when it is the last one)."""
        self._require_index_dir()
        async with self._write_lock:
            answer = await self.worker.remove(qid)
        self.stats["entity_changes"] += 1
        return answer

    def info(self) -> dict:
        worker = self.worker.info()
        index_keys = ("index_size", "index_version", "index_fingerprint")
        return {
            "model": self.model_name,
            "worker": "process" if isinstance(self.worker, ProcessWorker) else "thread",
            **{k: v for k, v in worker.items() if k not in index_keys and k != "index_dtype"},
            "index": {
                **{k: worker[k] for k in index_keys},
                "dtype": worker.get("index_dtype"),
                "directory": self.settings.index_dir,
            },
            "settings": asdict(self.settings),
            "stats": dict(self.stats, queued_mentions=self.queued_mentions),
        }


# ----------------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Answers 413 (JSON, naming the limit) to a request body over `limit` bytes: at once when its Content-Length says
    so, else as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _too_large(self, size: str) -> str:
        return f"request body of {size} bytes is over the limit of {self.limit:,} bytes (--max_request_bytes)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            try:
                length = int(length)
            except ValueError:
                return await JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)(
                    scope, receive, send
                )
            if length > self.limit:
                return await JSONResponse({"detail": self._too_large(f"{length:,}")}, status_code=413)(
                    scope, receive, send
                )
        total = 0

        async def limited_receive():
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.limit:
                    raise HTTPException(413, self._too_large(f"more than {self.limit:,}"))
            return message

        await self.app(scope, limited_receive, send)


def _validation_message(errors) -> str:
    parts = []
    for e in errors[:10]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


def create_app(service: LinkingService) -> FastAPI:
    """The FastAPI application of a [`LinkingService`] (started and stopped with the application)."""
    import contextlib

    settings = service.settings

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="OT-MEL linking server",
        description="Links mentions to a KB with OT-MEL; the KB takes new entities while it serves.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)

    @app.exception_handler(ServiceError)
    async def _service_error(request, err: ServiceError):
        return JSONResponse({"detail": err.message, **err.extra}, status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        errors = err.errors()
        content_type = request.headers.get("content-type", "")
        if any(e.get("type") == "json_invalid" for e in errors):
            e = next(e for e in errors if e.get("type") == "json_invalid")
            where = e.get("loc", ("body", "?"))[-1]
            reason = (e.get("ctx") or {}).get("error", e.get("msg"))
            return JSONResponse({"detail": f"malformed JSON: {reason} (at character {where})"}, status_code=400)
        if "json" not in content_type.lower() and request.method in ("POST", "PUT"):
            return JSONResponse(
                {
                    "detail": f"the body must be JSON with 'Content-Type: application/json' (got {content_type or 'none'!r})"
                },
                status_code=415,
            )
        return JSONResponse({"detail": _validation_message(errors)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    @app.get("/health")
    async def health():
        state = service.state()
        return {"status": "ok", "index_version": state["index_version"], "index_size": state["index_size"]}

    @app.get("/info")
    async def info():
        return service.info()

    @app.post("/link")
    async def link(body: LinkRequest):
        """Links each mention to the KB: its candidates best first, or `{"error"}` for a mention that cannot be
        linked."""
        n = len(body.mentions)
        if n > settings.max_mentions_per_request:
            raise ServiceError(
                413, f"{n} mentions in one request; this server takes at most {settings.max_mentions_per_request}"
            )
        top_k = body.top_k if body.top_k is not None else min(5, settings.max_top_k)
        candidates = body.candidates if body.candidates is not None else min(50, settings.max_candidates)
        if top_k > settings.max_top_k:
            raise ServiceError(422, f"top_k: {top_k} is over this server's limit of {settings.max_top_k}")
        if candidates > settings.max_candidates:
            raise ServiceError(
                422, f"candidates: {candidates} is over this server's limit of {settings.max_candidates}"
            )
        if any(m.image_base64 is not None or m.image_path is not None for m in body.mentions):
            prepared = await asyncio.to_thread(_prepare_all, body.mentions, settings)
        else:
            prepared = _prepare_all(body.mentions, settings)
        ok = [p for p in prepared if not isinstance(p, str)]
        errors = [{"error": f"mention {i}: {p}"} if isinstance(p, str) else None for i, p in enumerate(prepared)]
        if not ok:
            raise ServiceError(
                422,
                "no mention of the request could be linked: " + "; ".join(e["error"] for e in errors),
                results=errors,
            )
        service.stats["requests"] += 1
        service.stats["mentions"] += len(ok)
        results, state = await service.link(ok, top_k, candidates, body.assignment, body.nil_threshold)
        linked = iter(results)
        merged = [error if error is not None else next(linked) for error in errors]
        return JSONResponse({"results": merged, **state})  # plain JSON: no jsonable_encoder walk

    @app.post("/entities")
    async def add_entities(body: EntitiesRequest):
        """Adds entities (or replaces those whose qid is in the KB); answered once the new index is saved."""
        service._require_index_dir()
        n = len(body.entities)
        if n > settings.max_entities_per_request:
            raise ServiceError(
                413, f"{n} entities in one request; this server takes at most {settings.max_entities_per_request}"
            )
        rows, problems = [], []
        for i, e in enumerate(body.entities):
            try:
                if e.image_base64 is not None or e.image_path is not None:
                    rows.append(await asyncio.to_thread(prepare_entity, e, settings))
                else:
                    rows.append(prepare_entity(e, settings))
            except ValueError as err:
                problems.append(f"entity {i} ({e.qid[:60]!r}): {err}")
        if problems:
            raise ServiceError(422, "no entity was changed: " + "; ".join(problems))
        return await service.add_entities(rows)

    @app.delete("/entities/{qid:path}")  # a qid may hold "/" (encoded %2F or not)
    async def remove_entity(qid: str):
        """Removes one entity; answered once the new index is saved."""
        return await service.remove_entity(qid)

    return app


def _prepare_all(mentions, settings) -> list:
    """Each mention's linker input, or the reason (a string) it cannot be linked."""
    out = []
    for m in mentions:
        try:
            out.append(prepare_mention(m, settings))
        except ValueError as err:
            out.append(str(err))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def check_sources(index: str | None, kb: str | None):
    """Raises `ValueError` / `FileNotFoundError` when `--index` / `--kb` cannot give an index (before any loading)."""
    if not index and not kb:
        raise ValueError("give --index INDEX_DIR or --kb KB")
    if index and not kb and not os.path.isfile(os.path.join(index, INDEX_META)):
        raise FileNotFoundError(
            f"--index {index}: no entity index there ({INDEX_META} missing); give --kb to build it"
        )


def load_linker(model: str, index: str | None, kb: str | None, device=None, batch_size: int = 64) -> OTMELLinker:
    """The linker of `otmel-serve`: the model, and the index in `index` if there is one there, else one built from
    `kb` (a dataset folder with a 'kb' config, or an index folder) and saved to `index` when given."""
    check_sources(index, kb)
    # float32 towers: a served answer must not depend on the requests that share its batch, which int8 towers'
    # per-batch activation scales would break (towers_otmel).
    linker = OTMELLinker.from_pretrained(model, device=device, quantize=None)
    linker.batch_size = batch_size
    if index and os.path.isfile(os.path.join(index, INDEX_META)):
        linker.load_index(index)
        if kb:
            logger.info("--index %s holds an index: --kb %s is not read", index, kb)
    elif kb and os.path.isfile(os.path.join(kb, INDEX_META)):
        linker.load_index(kb)
        if index:
            linker.save_index(index)
    else:
        linker.build_index(load_kb(kb, where="--kb"))
        if index:
            linker.save_index(index)
    return linker


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `(host, port)` (port 0: any free port) for uvicorn's `sockets=`.

    Made with `IPPROTO_TCP` explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on accepted sockets of
    that protocol, and with Nagle on, each small answer waits for the client's delayed ACK (about 40 ms a request).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerSettings()
    p = argparse.ArgumentParser(
        prog="otmel-serve",
        description="Serve OT-MEL linking over HTTP: POST /link, GET /health, GET /info, POST /entities, "
        "DELETE /entities/{qid}.",
    )
    p.add_argument("--model", required=True, help="OT-MEL folder or Hub id (model and processor)")
    p.add_argument(
        "--index",
        help="entity index folder: loaded if it holds one, else built from --kb and saved "
        "there; entity changes are saved there (without it they are refused)",
    )
    p.add_argument("--kb", help="dataset folder with a 'kb' config (or an index folder), when --index holds none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed on stdout)")
    p.add_argument("--image_root", help="image_path of a request must lie under this folder (else it is refused)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch_size", type=int, default=64, help="mentions per forward pass inside a batch")
    p.add_argument(
        "--worker",
        default="thread",
        choices=("thread", "process"),
        help="run the model on one thread of the server process (default) or in a worker process (the "
        "model then never shares a GIL with the HTTP loop; startup is slower)",
    )
    for name in (
        "max_batch_mentions",
        "max_queue_mentions",
        "max_request_bytes",
        "max_mentions_per_request",
        "max_entities_per_request",
        "max_image_pixels",
        "max_top_k",
        "max_candidates",
    ):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    p.add_argument("--max_wait_ms", type=float, default=defaults.max_wait_ms)
    p.add_argument(
        "--graceful_timeout",
        type=float,
        default=defaults.graceful_timeout,
        help="seconds a shutdown waits for running requests",
    )
    p.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--no_access_log", action="store_true", help="no log line per request")
    return p


def main(argv=None) -> int:
    """`otmel-serve`: loads the model and index, serves until SIGINT / SIGTERM."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.image_root and not os.path.isdir(args.image_root):
        print(f"error: --image_root {args.image_root} is not a folder", file=sys.stderr)
        return 2
    settings = ServerSettings(
        **{k: getattr(args, k) for k in ServerSettings.__dataclass_fields__ if k not in ("image_root", "index_dir")},
        image_root=args.image_root,
        index_dir=args.index,
    )
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port} ({err})", file=sys.stderr)
        return 2
    try:
        check_sources(args.index, args.kb)
        if args.worker == "process":
            worker = ProcessWorker(
                args.model, args.index, args.kb, args.device, args.threads, args.batch_size, args.log_level
            )
        else:
            worker = ThreadWorker(
                load_linker(args.model, args.index, args.kb, args.device, args.batch_size), args.index
            )
        state = worker.launch()
    except (ValueError, FileNotFoundError) as err:
        sock.close()
        print(f"error: {err}", file=sys.stderr)
        return 2
    service = LinkingService(worker, settings, model_name=args.model)
    app = create_app(service)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, restores the handlers it found and raises the signal again:
    # these handlers note it, so the process ends normally (exit 0) after the shutdown.
    signals = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: signals.append(signal.Signals(number).name))
    print(f"otmel-serve: {state['index_size']} entities; listening on http://{args.host}:{port}", flush=True)
    started = time.time()
    uvicorn.Server(config).run(sockets=[sock])
    reason = f" on {signals[0]}" if signals else ""
    print(f"otmel-serve: stopped{reason} after {time.time() - started:.0f} s", flush=True)
    return 0


__all__ = [
    "EntitiesRequest",
    "EntityIn",
    "IndexSnapshot",
    "LinkRequest",
    "LinkingService",
    "MentionIn",
    "ModelCore",
    "ProcessWorker",
    "ServerSettings",
    "ServiceError",
    "ThreadWorker",
    "BodyLimitMiddleware",
    "bind_socket",
    "build_parser",
    "check_sources",
    "copy_for_write",
    "create_app",
    "decode_base64",
    "decode_picture",
    "index_fingerprint",
    "load_linker",
    "main",
    "prepare_entity",
    "prepare_mention",
    "resolve_image_path",
]


if __name__ == "__main__":
    sys.exit(main())
