#!/usr/bin/env python
"""Convert a MIMIC-layout MEL folder (WikiMEL, RichpediaMEL, WikiDiverse, or the synthetic world)
into a Hugging Face dataset folder: Parquet files with the pictures embedded, and a dataset card.

Usage::

    python datasets_scripts/convert_mimic.py RAW_DIR OUT_DIR [--name NAME] [--num-proc N]
        [--overwrite] [--license ID] [--quiet]

Output (load with ``datasets.load_dataset(OUT_DIR, "mentions")`` / ``load_dataset(OUT_DIR, "kb")``)::

    OUT_DIR/README.md                       card: YAML configs, schema, counts, dirty-data summary
    OUT_DIR/conversion_summary.json         the summary dict returned by convert()
    OUT_DIR/ceilings.json                   copied when RAW_DIR has one (synthetic worlds)
    OUT_DIR/data/mentions/{train,validation,test}-XXXXX-of-YYYYY.parquet
    OUT_DIR/data/kb/train-XXXXX-of-YYYYY.parquet

Config ``mentions``: id (string), mention (URL-unquoted surface), sentence, image (Image, None when
there is none), answer (gold qid, or ``"nil"`` when the entity is not in the KB: kept for NIL evaluation).  Config ``kb``: qid, name (URL-unquoted), attributes,
image (Image, the first listed picture that exists and decodes, else None), image_names (all listed
file names).  Every stored picture decodes with PIL to an RGB image: JPEG/RGB files are stored
byte for byte, anything else (PNG, RGBA, greyscale, palette, CMYK, ...) is re-encoded (JPEG sources
to JPEG, others to PNG).

Dirty data is counted, never dropped silently: for every split, input rows = rows + skipped rows
(an answer that is neither ``nil`` nor a KB qid), rows with a ``nil`` answer are counted (``nil``),
and rows = sum of the image outcomes (found / no image / missing / unreadable / unsafe path).
Each warning names its first offenders (file, row, id or qid, picture name).  A split left with
no rows gets no Parquet file and no card entry (``datasets`` cannot load a 0-row split), with a
warning; the other splits still load.
Malformed input (not JSON, a row that is not an object or lacks a required field, a KB without
entities, no mention rows in any split) stops the conversion with :class:`MalformedDataError`
naming the file and the row.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features
from PIL import Image as PILImage


try:
    from data_otmel import EXAMPLES, KB_FEATURES, MENTION_FEATURES
    from processing_otmel import to_rgb
except ImportError:  # run as a script from a checkout: the project's modules are in the folder above
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from data_otmel import EXAMPLES, KB_FEATURES, MENTION_FEATURES
    from processing_otmel import to_rgb

logger = logging.getLogger(__name__)

# Bump when the output changes, so caches keyed by fingerprint_raw_dir() are rebuilt.
# 2: NIL mentions are kept (answer "nil") instead of skipped; 3: a 0-row split has no (unloadable) file,
# URL-quoted picture names are found, the summary names offenders
CONVERTER_VERSION = 3

# The schema of a converted folder is the one every reader of the project produces (data_otmel).

SPLIT_SUFFIXES = [
    ("train", "train"),
    ("dev", "validation"),
    ("val", "validation"),
    ("valid", "validation"),
    ("validation", "validation"),
    ("test", "test"),
]
SPLIT_ORDER = ("train", "validation", "test")
MENTION_IMAGE_DIRS = ("mention_image", "mention_images")  # the second is one release's spelling
KB_IMAGE_DIR = "kb_image"

MENTION_IMAGE_OUTCOMES = ("found", "no image", "missing", "unreadable", "unsafe path")
KB_IMAGE_OUTCOMES = ("found", "no image listed", "missing", "unreadable", "unsafe path")
MENTION_SKIP_REASONS = ("answer not in KB",)
NIL_ANSWER = "nil"  # the answer of a mention whose entity is not in the KB (source: "nil", any case, or empty)
KB_SKIP_REASONS = ("duplicate qid",)

# Below this many pictures a process pool costs more than it saves.
PARALLEL_MIN_TASKS = 2000
ROWS_PER_ROW_GROUP = 100  # small row groups keep random access into image columns cheap
MAX_SHARD_BYTES = 512 * 1024 * 1024


class MalformedDataError(ValueError):
    """The raw folder cannot be converted; the message names the file (and row)."""


# ---------------------------------------------------------------------------------------------
# Layout detection and fingerprint


def _split_files(raw_dir: Path, name: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for suffix, split in SPLIT_SUFFIXES:
        p = raw_dir / f"{name}_{suffix}.json"
        if p.is_file() and split not in found:
            found[split] = p
    return {s: found[s] for s in SPLIT_ORDER if s in found}


def detect_name(raw_dir) -> str:
    """The dataset name from the ``<Name>_train.json`` file; error when there is none or several."""
    raw_dir = Path(raw_dir)
    names = sorted(p.name[: -len("_train.json")] for p in raw_dir.glob("*_train.json") if p.is_file())
    if not names:
        raise MalformedDataError(f"{raw_dir}: no <Name>_train.json file, not a MIMIC-layout folder")
    if len(names) > 1:
        raise MalformedDataError(f"{raw_dir}: several datasets {names}; pass name=")
    return names[0]


def is_mimic_layout(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "kb_entity.json").is_file() and any(q.is_file() for q in p.glob("*_train.json"))


def fingerprint_raw_dir(raw_dir) -> str:
    """A hash of the converter version and every input file's name, size and mtime.

    Cheap (no file is read), so run_mel can call it on each start to find its cached conversion.
    """
    raw_dir = Path(raw_dir)
    h = hashlib.sha256(f"otmel-convert-mimic:{CONVERTER_VERSION}\n".encode())
    entries = []
    with os.scandir(raw_dir) as it:
        for e in it:
            if e.is_file():
                st = e.stat()
                entries.append((e.name, st.st_size, st.st_mtime_ns))
    for sub in (KB_IMAGE_DIR, *MENTION_IMAGE_DIRS):
        d = raw_dir / sub
        if not d.is_dir():
            continue
        with os.scandir(d) as it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:  # a dangling symlink is an input too; it hashes as size -1
                    entries.append((f"{sub}/{e.name}", -1, 0))
                    continue
                entries.append((f"{sub}/{e.name}", st.st_size, st.st_mtime_ns))
    for name, size, mtime in sorted(entries):
        h.update(f"{name}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Reading JSON


def _load_json_list(path: Path) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise MalformedDataError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise MalformedDataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _field(path: Path, i: int, row, key: str, *, required: bool = True, default=None):
    if not isinstance(row, dict):
        raise MalformedDataError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
    if key not in row:
        if required:
            raise MalformedDataError(f"{path}: row {i}: missing required field {key!r}")
        return default
    return row[key]


def _text(path: Path, i: int, key: str, value, *, allow_none: bool = False) -> str:
    if value is None and allow_none:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MalformedDataError(f"{path}: row {i}: field {key!r} must be a string, got {type(value).__name__}")
    return value if isinstance(value, str) else str(value)


def _repair_text(s: str) -> tuple[str, bool]:
    # JSON may hold lone UTF-16 surrogates ("\ud83d"): valid JSON, but not encodable as the UTF-8
    # that Parquet requires.  Re-pair what can be paired and replace the rest.
    try:
        s.encode("utf-8")
        return s, False
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True


# ---------------------------------------------------------------------------------------------
# Pictures


def _is_traversal(raw_path: str) -> bool:
    """A ``..`` component or a NUL byte, in the name as written or in its URL-unquoted form."""
    for p in (raw_path, unquote(raw_path)):
        if "\x00" in p or ".." in p.replace("\\", "/").split("/"):
            return True
    return False


def _basename(raw_path: str) -> str:
    return posixpath.basename(raw_path.replace("\\", "/"))


def _basenames(raw_path: str) -> list[str]:
    """The basename as written, then its URL-unquoted form (``G%C3%B6del%20pic.jpg`` -> ``Gödel pic.jpg``)
    when that differs and is still a plain file name (an unquoted ``%2F`` never adds a folder)."""
    base = _basename(raw_path)
    out = [base]
    plain = unquote(base)
    if plain != base and not any(c in plain for c in "/\\\x00") and plain not in ("", ".", ".."):
        out.append(plain)
    return out


def _mention_candidates(img_path: str, dirs: list[Path]) -> list[Path]:
    """MIMIC's rule: ``mention_image/<stem>.jpg`` with stem = basename up to its first dot; then the
    exact basename (for files whose stored extension is not .jpg); then both again for the
    URL-unquoted basename."""
    out = []
    for base in _basenames(img_path):
        for d in dirs:
            stem = base.split(".", 1)[0]
            if stem:
                out.append(d / f"{stem}.jpg")
            if base not in ("", ".", "..") and base != f"{stem}.jpg":
                out.append(d / base)
    return out


def _kb_candidates(name: str, kb_dir: Path) -> list[Path]:
    out = []
    for base in _basenames(name):
        if base not in ("", ".", ".."):
            out.append(kb_dir / base)
        stem = base.split(".", 1)[0]
        if stem and f"{stem}.jpg" != base:
            out.append(kb_dir / f"{stem}.jpg")
    return out


def _decode(path: str) -> tuple[bytes | None, str, bool, str]:
    """(bytes that decode to RGB, file suffix, re-encoded?, error) for one existing file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, "", False, f"read error: {e}"
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()  # decodes the pixels: truncated files fail here, not later in a DataLoader
            if im.width <= 0 or im.height <= 0:
                return None, "", False, "empty picture"
            if im.format == "JPEG" and im.mode == "RGB":
                return data, ".jpg", False, ""
            fmt = "JPEG" if im.format == "JPEG" else "PNG"
            rgb = to_rgb(im)
    except PILImage.UnidentifiedImageError:  # its message names a BytesIO object, not the file
        return None, "", False, "not a picture format PIL reads"
    except Exception as e:  # any decoder failure (OSError, SyntaxError, struct.error, ...) = unreadable
        return None, "", False, f"{type(e).__name__}: {e}"
    buf = io.BytesIO()
    if fmt == "JPEG":
        rgb.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), ".jpg", True, ""
    rgb.save(buf, format="PNG")
    return buf.getvalue(), ".png", True, ""


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r + os.sep) for r in roots)


def _probe(task):
    """Resolve and decode the pictures of one row (runs in worker processes).

    task = (roots, entries): roots are the real paths a picture may live under (the dataset folder,
    and the picture folders themselves, which may legitimately be symlinks to another disk);
    entries = [(label, traversal?, [candidate paths])] in priority order.
    Returns (image dict or None, per-entry outcome list, re-encoded?, per-entry note): the note says
    why an entry gave no picture ("" for the others).  The first entry that yields a picture wins;
    later entries are reported as "not checked".
    """
    roots, entries = task
    outcomes: list[str] = []
    notes: list[str] = []
    for k, (_label, traversal, candidates) in enumerate(entries):
        if traversal:
            outcomes.append("unsafe path")
            notes.append("'..' in the path")
            continue
        outcome = "missing"
        note = "no " + " or ".join(_short(c) for c in candidates) if candidates else "no folder to look in"
        for cand in candidates:
            if not os.path.lexists(cand):
                continue
            if not _inside(cand, roots):
                # e.g. a symlink that points outside the dataset folder: never read
                if outcome == "missing":
                    outcome, note = "unsafe path", f"{_short(cand)} resolves outside the dataset folder"
                continue
            if not os.path.isfile(cand):
                continue
            data, suffix, reencoded, err = _decode(cand)
            if data is None:
                outcome, note = "unreadable", f"{_short(cand)}: {err}"
                continue
            outcomes.append("found")
            outcomes.extend("not checked" for _ in entries[k + 1 :])
            notes.extend("" for _ in entries[k:])
            stored_name = os.path.splitext(os.path.basename(cand))[0] + suffix
            return {"bytes": data, "path": stored_name}, outcomes, reencoded, notes
        outcomes.append(outcome)
        notes.append(note)
    return None, outcomes, False, notes


def _short(path: str) -> str:
    """``<picture folder>/<file>``: how a candidate is named in warnings."""
    return posixpath.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _row_outcome(outcomes: list[str], none_label: str) -> str:
    if not outcomes:
        return none_label
    if "found" in outcomes:
        return "found"
    for o in ("unreadable", "unsafe path", "missing"):
        if o in outcomes:
            return o
    return none_label


class _Prober:
    """Runs _probe inline or in a process pool, always yielding results in input order."""

    def __init__(self, num_proc: int | None):
        self.num_proc = num_proc
        self._pool = None

    def map(self, tasks: list):
        n = (
            self.num_proc
            if self.num_proc is not None
            else ((os.cpu_count() or 1) if len(tasks) >= PARALLEL_MIN_TASKS else 1)
        )
        if n <= 1 or len(tasks) < 2:
            return map(_probe, tasks)
        if self._pool is None:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
            self._pool = ctx.Pool(n)
        return self._pool.imap(_probe, tasks, chunksize=16)

    def close(self):
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


# ---------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Streams rows into Parquet shards named ``<split>-XXXXX-of-YYYYY.parquet``."""

    def __init__(self, directory: Path, split: str, features: Features):
        self.dir = directory
        self.split = split
        self.schema = features.arrow_schema  # carries the features, so Image() survives loading
        self.buf: list[dict] = []
        self.buf_bytes = 0
        self.shard_bytes = 0
        self.paths: list[Path] = []
        self.writer = None
        directory.mkdir(parents=True, exist_ok=True)

    def _open(self):
        path = self.dir / f"{self.split}-{len(self.paths):05d}.parquet.part"
        self.paths.append(path)
        self.writer = pq.ParquetWriter(path, self.schema)
        self.shard_bytes = 0

    def _flush(self):
        if not self.buf:
            return
        if self.writer is None or self.shard_bytes >= MAX_SHARD_BYTES:
            if self.writer is not None:
                self.writer.close()
            self._open()
        self.writer.write_table(pa.Table.from_pylist(self.buf, schema=self.schema))
        self.shard_bytes += self.buf_bytes
        self.buf, self.buf_bytes = [], 0

    def add(self, row: dict, nbytes: int):
        self.buf.append(row)
        self.buf_bytes += nbytes
        if len(self.buf) >= ROWS_PER_ROW_GROUP or self.buf_bytes >= 32 * 1024 * 1024:
            self._flush()

    def close(self) -> list[str]:
        """Publishes the shards and returns their names: none for a split without rows (``datasets``
        cannot load a 0-row split from Parquet, with or without a row group, so convert() leaves it out)."""
        self._flush()
        if self.writer is None:
            return []
        self.writer.close()
        names = []
        for k, part in enumerate(self.paths):
            final = self.dir / f"{self.split}-{k:05d}-of-{len(self.paths):05d}.parquet"
            part.rename(final)
            names.append(final.name)
        return names


# ---------------------------------------------------------------------------------------------
# Conversion


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="row", file=sys.stderr, leave=False)


def _convert_kb(raw_dir: Path, roots: tuple[str, ...], writer: _ShardWriter, prober: _Prober, verbose: bool):
    path = raw_dir / "kb_entity.json"
    if not path.is_file():
        raise MalformedDataError(f"{path}: missing (every MIMIC-layout folder has kb_entity.json)")
    raw = _load_json_list(path)
    kb_dir = raw_dir / KB_IMAGE_DIR
    stats = {
        "source": path.name,
        "input_rows": len(raw),
        "rows": 0,
        "skipped": {r: 0 for r in KB_SKIP_REASONS},
        "images": {o: 0 for o in KB_IMAGE_OUTCOMES},
        "files": {"listed": 0, "used": 0, "missing": 0, "unreadable": 0, "unsafe path": 0, "not checked": 0},
        "reencoded": 0,
        "text_repaired": 0,
        "examples": {},
    }
    rows, tasks, where, first_row = [], [], [], {}
    for i, r in enumerate(raw):
        qid = _text(path, i, "qid", _field(path, i, r, "qid"))
        name = _text(path, i, "entity_name", _field(path, i, r, "entity_name"))
        attr = _field(path, i, r, "attr", required=False, default="")
        if isinstance(attr, list) and all(isinstance(a, str) for a in attr):
            attr = ". ".join(a.strip().rstrip(".") for a in attr if a.strip())
        attr = _text(path, i, "attr", attr, allow_none=True)
        image_list = _field(path, i, r, "image_list", required=False, default=[])
        if image_list is None:
            image_list = []
        elif isinstance(image_list, str):
            image_list = [image_list] if image_list else []
        if not isinstance(image_list, list) or not all(isinstance(x, str) for x in image_list):
            raise MalformedDataError(f"{path}: row {i}: field 'image_list' must be a list of file names")
        if not qid:
            raise MalformedDataError(f"{path}: row {i}: empty 'qid'")
        if qid in first_row:
            stats["skipped"]["duplicate qid"] += 1
            _example(stats, "duplicate qid", f"row {i}: qid {qid} (first in row {first_row[qid]})")
            continue
        first_row[qid] = i
        texts = []
        for s in (qid, unquote(name), attr, *image_list):
            s2, fixed = _repair_text(s)
            stats["text_repaired"] += fixed
            texts.append(s2)
        rows.append({"qid": texts[0], "name": texts[1], "attributes": texts[2], "image_names": texts[3:]})
        where.append(f"row {i} (qid {qid})")
        tasks.append((roots, [(n, _is_traversal(n), [str(c) for c in _kb_candidates(n, kb_dir)]) for n in image_list]))
    if not rows:
        skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items() if v)
        raise MalformedDataError(
            f"{path}: no entities" + (f" ({len(raw)} rows, all skipped: {skipped})" if raw else "")
        )
    results = prober.map(tasks)
    for row, at, task, (image, outcomes, reencoded, notes) in _progress(
        zip(rows, where, tasks, results), len(rows), "kb", verbose
    ):
        row["image"] = image
        outcome = _row_outcome(outcomes, "no image listed")
        stats["images"][outcome] += 1
        if image is None and outcomes:
            shown = "; ".join(f"{label} ({o}: {n})" for (label, _, _), o, n in zip(task[1], outcomes, notes))
            _example(stats, outcome, f"{at}: {shown}")
        stats["files"]["listed"] += len(outcomes)
        for o in outcomes:
            stats["files"]["used" if o == "found" else o] += 1
        stats["reencoded"] += reencoded
        writer.add(row, len(image["bytes"]) if image else 0)
        stats["rows"] += 1
    return stats, set(first_row)


def _convert_mentions(
    path: Path,
    split: str,
    mention_dirs: list[Path],
    roots: tuple[str, ...],
    kb_qids: set[str],
    writer: _ShardWriter,
    prober: _Prober,
    verbose: bool,
):
    raw = _load_json_list(path)
    stats = {
        "source": path.name,
        "input_rows": len(raw),
        "rows": 0,
        "skipped": {r: 0 for r in MENTION_SKIP_REASONS},
        "nil": 0,
        "images": {o: 0 for o in MENTION_IMAGE_OUTCOMES},
        "reencoded": 0,
        "text_repaired": 0,
        "repeated_ids": 0,
        "examples": {},
    }
    rows, tasks, where = [], [], []
    first_row = {}  # id -> the file row that first used it
    for i, r in enumerate(raw):
        surface = _text(path, i, "mentions", _field(path, i, r, "mentions"))
        sentence = _text(path, i, "sentence", _field(path, i, r, "sentence"), allow_none=True)
        answer = _text(path, i, "answer", _field(path, i, r, "answer"), allow_none=True)
        img_path = _text(
            path, i, "imgPath", _field(path, i, r, "imgPath", required=False, default=""), allow_none=True
        )
        mid = _text(path, i, "id", _field(path, i, r, "id", required=False, default=str(i)), allow_none=True)
        answer = answer.strip()
        if answer not in kb_qids and (answer == "" or answer.lower() == NIL_ANSWER):
            stats["nil"] += 1  # kept: NIL evaluation needs these mentions
            answer = NIL_ANSWER
        elif answer not in kb_qids:
            stats["skipped"]["answer not in KB"] += 1
            _example(stats, "answer not in KB", f"row {i} (id {mid}): answer {answer}")
            continue
        texts = []
        for s in (mid, unquote(surface), sentence, answer):
            s2, fixed = _repair_text(s)
            stats["text_repaired"] += fixed
            texts.append(s2)
        if texts[0] in first_row:  # kept (a mention), but predictions keyed by id would be ambiguous
            stats["repeated_ids"] += 1
            _example(stats, "repeated id", f"row {i} (id {mid}, as row {first_row[texts[0]]})")
        first_row.setdefault(texts[0], i)
        rows.append({"id": texts[0], "mention": texts[1], "sentence": texts[2], "answer": texts[3]})
        where.append(f"row {i} (id {mid}): {img_path}")
        if img_path.strip() == "":  # MIMIC's "no picture": counted as "no image", no warning
            tasks.append((roots, []))
        else:
            tasks.append(
                (
                    roots,
                    [
                        (
                            img_path,
                            _is_traversal(img_path),
                            [str(c) for c in _mention_candidates(img_path, mention_dirs)],
                        )
                    ],
                )
            )
    results = prober.map(tasks)
    for row, at, (image, outcomes, reencoded, notes) in _progress(
        zip(rows, where, results), len(rows), split, verbose
    ):
        row["image"] = image
        outcome = _row_outcome(outcomes, "no image")
        stats["images"][outcome] += 1
        if image is None and outcomes:
            _example(stats, outcome, f"{at} ({outcome}: {notes[0]})")
        stats["reencoded"] += reencoded
        writer.add(row, len(image["bytes"]) if image else 0)
        stats["rows"] += 1
    return stats


def _example(stats: dict, reason: str, text: str) -> None:
    """Keeps the first EXAMPLES offenders of `reason` (file row, id, picture) for the warnings and the summary."""
    kept = stats["examples"].setdefault(reason, [])
    if len(kept) < EXAMPLES:
        kept.append(_repair_text(text)[0])


def _first(s: dict, counts: dict) -> str:
    """`` First: <offender>; ...`` for the reasons in `counts` (``...`` when there are more)."""
    shown = [e for reason in counts for e in s["examples"].get(reason, [])]
    if not shown:
        return ""
    more = "; ..." if sum(counts.values()) > len(shown) else ""
    return ". First: " + "; ".join(shown) + more


def _check_counts(config: str, split: str, s: dict) -> None:
    # The promise of this converter: every input row is accounted for.
    if s["input_rows"] != s["rows"] + sum(s["skipped"].values()) or s["rows"] != sum(s["images"].values()):
        raise RuntimeError(f"internal error: counts do not add up for {config}/{split}: {s}")
    if "files" in s:
        f = s["files"]
        if f["listed"] != f["used"] + f["missing"] + f["unreadable"] + f["unsafe path"] + f["not checked"]:
            raise RuntimeError(f"internal error: file counts do not add up for {config}/{split}: {f}")


def _warn(config: str, split: str, s: dict) -> None:
    skipped = {k: v for k, v in s["skipped"].items() if v}
    bad = {k: v for k, v in s["images"].items() if k in ("missing", "unreadable", "unsafe path") and v}
    if skipped:
        logger.warning(
            "%s/%s (%s): skipped %d of %d rows: %s%s",
            config,
            split,
            s["source"],
            sum(skipped.values()),
            s["input_rows"],
            ", ".join(f"{k} {v}" for k, v in skipped.items()),
            _first(s, skipped),
        )
    if not s["rows"]:
        logger.warning(
            "%s/%s (%s): no rows (%d in the file, %d skipped): the split is left out of the converted dataset "
            "(datasets cannot load a 0-row split)",
            config,
            split,
            s["source"],
            s["input_rows"],
            sum(skipped.values()),
        )
    if s.get("nil"):
        logger.info(
            "%s/%s (%s): %d of %d rows have the answer nil (entity not in the KB), kept",
            config,
            split,
            s["source"],
            s["nil"],
            s["input_rows"],
        )
    if bad:
        logger.warning(
            "%s/%s (%s): %d rows without their picture: %s%s",
            config,
            split,
            s["source"],
            sum(bad.values()),
            ", ".join(f"{k} {v}" for k, v in bad.items()),
            _first(s, bad),
        )
    if s.get("repeated_ids"):
        logger.warning(
            "%s/%s (%s): %d rows repeat the id of an earlier row (kept; predictions name both by that id)%s",
            config,
            split,
            s["source"],
            s["repeated_ids"],
            _first(s, {"repeated id": s["repeated_ids"]}),
        )
    if s["text_repaired"]:
        logger.warning(
            "%s/%s (%s): repaired %d strings with invalid unicode (lone surrogates)",
            config,
            split,
            s["source"],
            s["text_repaired"],
        )


def _remove_abandoned_tmp(out_dir: Path) -> None:
    """Removes the work folders (``.<name>.tmp-<pid>``) that conversions to `out_dir` killed on this machine left
    behind: those whose process no longer runs. A running conversion's folder is left alone."""
    if not out_dir.parent.is_dir():
        return
    for folder in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running (or another user's process)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        logger.info("%s: removing %s, left by a conversion that was stopped", out_dir, folder.name)
        shutil.rmtree(folder, ignore_errors=True)


def _safe_to_replace(out_dir: Path) -> bool:
    return not any(out_dir.iterdir()) or (out_dir / "conversion_summary.json").is_file()


def _fsync_tree(folder: Path):
    """Flushes every file and folder under `folder` to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def convert(
    raw_dir,
    out_dir,
    *,
    name: str | None = None,
    num_proc: int | None = None,
    overwrite: bool = False,
    license: str | None = None,
    verbose: bool = True,
) -> dict:
    """Convert ``raw_dir`` (MIMIC layout) into ``out_dir``; return the summary dict.

    The output is built in a temporary sibling folder and moved into place at the end, so an
    interrupted conversion never leaves a half-written ``out_dir`` behind (run_mel caches on it).
    ``num_proc``: processes decoding pictures (default: all cores when there are many pictures).
    ``overwrite``: replace an existing ``out_dir``, but only one this function wrote (or an empty one).
    """
    raw_dir = Path(raw_dir).resolve()
    out_dir = Path(out_dir).resolve()
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: no such folder")
    if out_dir.exists():
        if not out_dir.is_dir() or (not overwrite and any(out_dir.iterdir())):
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
        if not _safe_to_replace(out_dir):
            raise FileExistsError(f"{out_dir} exists and was not written by this converter; not replacing it")
    name = name or detect_name(raw_dir)
    split_files = _split_files(raw_dir, name)
    if "train" not in split_files:
        raise MalformedDataError(f"{raw_dir}: no {name}_train.json")
    roots = tuple(
        os.path.realpath(p)
        for p in [raw_dir, raw_dir / KB_IMAGE_DIR, *(raw_dir / d for d in MENTION_IMAGE_DIRS)]
        if p.exists()
    )
    mention_dirs = [raw_dir / d for d in MENTION_IMAGE_DIRS if (raw_dir / d).is_dir()]
    if not mention_dirs:
        logger.warning("%s: no mention_image/ folder; every mention picture will count as missing", raw_dir)

    ceilings = None
    if (raw_dir / "ceilings.json").is_file():
        try:
            with open(raw_dir / "ceilings.json", encoding="utf-8") as f:
                ceilings = json.load(f)
        except (OSError, ValueError) as e:
            raise MalformedDataError(f"{raw_dir / 'ceilings.json'}: not valid JSON ({e})") from None
    if license is None:
        world = ceilings.get("world") if isinstance(ceilings, dict) else None
        license = world.get("license", "unknown") if isinstance(world, dict) else "unknown"

    _remove_abandoned_tmp(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    prober = _Prober(num_proc)
    summary = {
        "dataset": name,
        "raw_dir": str(raw_dir),
        "out_dir": str(out_dir),
        "fingerprint": fingerprint_raw_dir(raw_dir),
        "converter_version": CONVERTER_VERSION,
        "license": license,
        "mention_image_dirs": [d.name for d in mention_dirs],
        "split_files": {s: p.name for s, p in split_files.items()},
        "configs": {"mentions": {}, "kb": {}},
        "data_files": {"mentions": {}, "kb": {}},
        "ceilings_copied": ceilings is not None,
    }
    try:
        w = _ShardWriter(tmp / "data" / "kb", "train", KB_FEATURES)
        kb_stats, kb_qids = _convert_kb(raw_dir, roots, w, prober, verbose)
        summary["data_files"]["kb"]["train"] = [f"data/kb/{n}" for n in w.close()]
        summary["configs"]["kb"]["train"] = kb_stats
        for split, path in split_files.items():
            w = _ShardWriter(tmp / "data" / "mentions", split, MENTION_FEATURES)
            st = _convert_mentions(path, split, mention_dirs, roots, kb_qids, w, prober, verbose)
            names = w.close()
            if names:  # a split without rows has no file and no card entry (see _warn)
                summary["data_files"]["mentions"][split] = [f"data/mentions/{n}" for n in names]
            summary["configs"]["mentions"][split] = st
        if not summary["data_files"]["mentions"]:
            raise MalformedDataError(
                f"{raw_dir}: no mention rows in any split ("
                + ", ".join(
                    f"{st['source']}: {st['input_rows']} rows, {sum(st['skipped'].values())} skipped"
                    for st in summary["configs"]["mentions"].values()
                )
                + ")"
            )
        for config, splits in summary["configs"].items():
            for split, st in splits.items():
                _check_counts(config, split, st)
                _warn(config, split, st)
        if ceilings is not None:
            shutil.copyfile(raw_dir / "ceilings.json", tmp / "ceilings.json")
        (tmp / "README.md").write_text(dataset_card(summary, ceilings), encoding="utf-8")
        with open(tmp / "conversion_summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
            f.write("\n")
        _fsync_tree(tmp)  # on disk before the rename publishes it (a crash cannot leave renamed empty files)
        if out_dir.exists():
            trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(trash)
            tmp.rename(out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out_dir)
        fd = os.open(out_dir.parent, os.O_RDONLY)  # the rename itself, on disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        prober.close()
    if verbose:
        print(format_summary(summary))
    return summary


def cached_convert(raw_dir, cache_root, **kwargs) -> tuple[Path, dict]:
    """Convert ``raw_dir`` into ``cache_root/<name>-<fingerprint>`` unless that already exists.

    Returns (dataset folder, summary).  The folder is complete or absent (see :func:`convert`).
    """
    raw_dir = Path(raw_dir)
    name = kwargs.get("name") or detect_name(raw_dir)
    out = Path(cache_root) / f"{name}-{fingerprint_raw_dir(raw_dir)}"
    done = out / "conversion_summary.json"
    if done.is_file():
        with open(done, encoding="utf-8") as f:
            return out, json.load(f)
    return out, convert(raw_dir, out, overwrite=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# Reporting


def _table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for config in ("mentions", "kb"):
        for split, s in summary["configs"][config].items():
            im = s["images"]
            none = im.get("no image", im.get("no image listed", 0))
            reasons = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items() if v) or "-"
            rows.append(
                [
                    config,
                    split,
                    str(s["input_rows"]),
                    str(s["rows"]),
                    str(s.get("nil", "-")),
                    str(im["found"]),
                    str(none),
                    str(im["missing"]),
                    str(im["unreadable"]),
                    str(im["unsafe path"]),
                    str(s["reencoded"]),
                    str(sum(s["skipped"].values())),
                    reasons,
                ]
            )
    return rows


TABLE_HEADER = [
    "config",
    "split",
    "input",
    "rows",
    "nil",
    "img found",
    "no img",
    "missing",
    "unreadable",
    "unsafe",
    "re-encoded",
    "skipped",
    "skip reasons",
]


def format_summary(summary: dict) -> str:
    rows = [TABLE_HEADER] + _table_rows(summary)
    widths = [max(len(r[k]) for r in rows) for k in range(len(TABLE_HEADER))]
    lines = [
        "  ".join(
            c.ljust(w) if k in (0, 1, len(widths) - 1) else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    kb = summary["configs"]["kb"]["train"]["files"]
    lines.append(
        f"kb picture files: listed {kb['listed']}, used {kb['used']}, missing {kb['missing']}, "
        f"unreadable {kb['unreadable']}, unsafe {kb['unsafe path']}, not checked {kb['not checked']} "
        "(only the first usable picture of an entity is embedded)"
    )
    return "\n".join(lines)


def dataset_card(summary: dict, ceilings: dict | None = None) -> str:
    name = summary["dataset"]
    yaml = [
        "---",
        f"license: {summary['license']}",
        f"pretty_name: {name} (MIMIC layout, converted)",
        "tags:",
        "- multimodal-entity-linking",
        "- mimic-layout",
        "configs:",
    ]
    for config in ("mentions", "kb"):
        yaml.append(f"- config_name: {config}")
        if config == "mentions":
            yaml.append("  default: true")
        yaml.append("  data_files:")
        for split in summary["data_files"][config]:
            yaml += [f"  - split: {split}", f"    path: data/{config}/{split}-*.parquet"]
    yaml.append("---")
    table = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    table += ["| " + " | ".join(r) + " |" for r in _table_rows(summary)]
    kbf = summary["configs"]["kb"]["train"]["files"]
    body = f"""
# {name}

Multimodal entity linking data converted from a MIMIC "cleaned" layout folder by
`datasets_scripts/convert_mimic.py` (converter version {summary["converter_version"]}).

- Source folder: `{summary["raw_dir"]}` (input fingerprint `{summary["fingerprint"]}`)
- Split files: {", ".join(f"`{v}` -> {k}" for k, v in summary["split_files"].items())}
- Mention picture folder(s): {", ".join(f"`{d}`" for d in summary["mention_image_dirs"]) or "none"}
- Licence: `{summary["license"]}` (the terms of the source release apply; WikiMEL, RichpediaMEL and
  WikiDiverse come with their own)

```python
from datasets import load_dataset
mentions = load_dataset("path/to/this/folder", "mentions")  # {" / ".join(summary["data_files"]["mentions"])}
kb = load_dataset("path/to/this/folder", "kb")["train"]
```

## Schema

Config `mentions` (splits {", ".join(summary["data_files"]["mentions"])}):

| column | type | meaning |
|---|---|---|
| id | string | mention id from the source file |
| mention | string | surface form, URL-unquoted |
| sentence | string | context sentence (may be empty, may be long: truncate at tokenisation) |
| image | Image or None | mention picture; None when the source has none or it is unusable |
| answer | string | gold KB qid (always present in the `kb` config) |

Config `kb` (split train):

| column | type | meaning |
|---|---|---|
| qid | string | entity id (unique) |
| name | string | entity name, URL-unquoted |
| attributes | string | attribute sentences separated by periods |
| image | Image or None | first listed picture that exists and decodes |
| image_names | list of string | every picture file name listed for the entity |

Every stored picture decodes with PIL to RGB: JPEG/RGB files are stored byte for byte, others
(PNG, RGBA, greyscale, palette, CMYK, ...) re-encoded to RGB JPEG (JPEG sources) or PNG.

## Counts and dirty data

For every row: input = rows + skipped; rows = img found + no img + missing + unreadable + unsafe;
"nil": rows kept with the answer `nil` (entity not in the KB, for NIL evaluation).

{chr(10).join(table)}

KB picture files: listed {kbf["listed"]}, used {kbf["used"]}, missing {kbf["missing"]},
unreadable {kbf["unreadable"]}, unsafe path {kbf["unsafe path"]}, not checked {kbf["not checked"]}
(only the first usable picture of an entity is embedded).

Rules: a mention picture is `mention_image/<stem>.jpg` (stem = basename of `imgPath` up to its
first dot), else the exact basename; `mention_images/` is searched too; a name that is not found
as written is looked up URL-unquoted (`G%C3%B6del.jpg` -> `Gödel.jpg`).  Paths with `..`
components (as written or unquoted) or resolving outside the source folder (symlinks) are never
read ("unsafe").  An empty `imgPath` means no picture.  A split left without rows has no file
and is not listed in the configs above.  Answers `nil`/empty
are kept as `nil` (the entity is not in the KB); other answers absent from the KB are skipped;
duplicate KB qids keep the first row.
"""
    if ceilings is not None and isinstance(ceilings.get("splits"), dict):
        lines = [
            "",
            "## Perfect-reader ceilings (from the generator, `ceilings.json`)",
            "",
            "| split | reader | H@1 | MRR |",
            "|---|---|---|---|",
        ]
        for split, s in ceilings["splits"].items():
            for reader in ("name_only", "text_only", "image_only", "both"):
                if isinstance(s.get(reader), dict):
                    lines.append(f"| {split} | {reader} | {s[reader].get('h1')} | {s[reader].get('mrr')} |")
        body += "\n".join(lines) + "\n"
    return "\n".join(yaml) + "\n" + body


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Convert a MIMIC-layout MEL folder to a Parquet dataset folder.")
    p.add_argument("raw_dir")
    p.add_argument("out_dir")
    p.add_argument("--name", default=None, help="dataset name (default: from <Name>_train.json)")
    p.add_argument("--num-proc", type=int, default=None, help="processes decoding pictures")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in OUT_DIR")
    p.add_argument("--license", default=None, help="licence id for the card (default: unknown)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert(
            a.raw_dir,
            a.out_dir,
            name=a.name,
            num_proc=a.num_proc,
            overwrite=a.overwrite,
            license=a.license,
            verbose=not a.quiet,
        )
    except (MalformedDataError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
