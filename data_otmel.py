"""Reading a KB and mentions in the formats people have, into the datasets the rest of OT-MEL uses.

```python
from data_otmel import load_kb, load_mention_files

kb = load_kb("entities.csv", columns="qid=id,name=title,attributes=description,image=image_path")
mentions = load_mention_files({"train": "train.jsonl", "validation": "dev.jsonl"})
```

Sources ([`load_kb`]; the command lines: `otmel-link --kb`, `otmel-train --kb`):

- a table file: `.csv`, `.tsv`, `.jsonl`, `.json` (a list of objects) or `.parquet`;
- a dataset folder with a `kb` config (made by `otmel-convert` / `datasets_scripts/convert_mimic.py`), a folder
  written by `Dataset.save_to_disk`, or a Hub dataset id (its `kb` config, else its only config);
- a raw folder in the MIMIC layout (`kb_entity.json`, `kb_image/`, ...), converted once into a cache.

KB columns: `qid` (required, unique), `name` (required), `attributes` (text; optional), `image` (optional): one
picture or several, as a list (JSON, Parquet) or `;`-separated paths (CSV, TSV), paths relative to the KB file (or
absolute); Parquet may also hold `{"bytes", "path"}` structs or raw bytes. Other column names are mapped with
`columns="qid=id,name=title,attributes=description,image=image_path"` (target=source, comma-separated).

Mention rows ([`load_mention_file`], `otmel-train --train_file/--validation_file/--test_file`): `mention`
(required), `sentence` (context; optional), `image` (path relative to the mentions file; optional), `answer` (the gold
qid; required for training), `id` (optional; default `<file name>:<line>`). Same formats and column mapping.

What comes out, the schema of a converted dataset folder:

- KB: a `datasets.Dataset` with `qid`, `name`, `attributes` (strings), `image` (`datasets.Image`, undecoded: the
  file's bytes and its path as written, or None) and `image_names` (every picture listed for the entity, as written).
  With several pictures, `image` is the first one that exists and decodes; the model uses one picture per entity.
- mentions: a `datasets.DatasetDict` of splits with `id`, `mention`, `sentence`, `image`, `answer`.

Rules: a missing required column is an error listing the columns found; a column neither used nor mapped is a warning
naming it; a row that cannot be parsed (invalid JSON, a value that is an object) is an error naming the file and line
(or row); dirty rows (empty qid, duplicate qid, empty mention, no answer) are skipped with a counted warning naming the
first lines; a picture that is missing or does not decode counts as no picture, with a counted warning naming the first
few. Nothing is dropped silently.

Built datasets are cached (the datasets cache, under `generator/`) under a fingerprint of the source file, the column
mapping and the size and modification time of every picture, so a second load of an unchanged KB reads no picture;
the warnings of the first load are repeated from a report stored with the cache.
"""

import csv
import hashlib
import json
import logging
import os
import re

import datasets
from datasets import Features, Image, List, Value


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .processing_otmel import read_image
except ImportError:
    from processing_otmel import read_image


logger = logging.getLogger(__name__)

# Bump when the output of a load changes, so cached datasets are rebuilt.
DATA_FORMAT_VERSION = 1

KB_COLUMNS = ("qid", "name", "attributes", "image")
KB_REQUIRED = ("qid", "name")
MENTION_COLUMNS = ("id", "mention", "sentence", "image", "answer")
MENTION_REQUIRED = ("mention", "answer")
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
# Columns a converted dataset has besides the KB columns; never reported as unknown.
DERIVED_KB_COLUMNS = ("image_names",)
# How many problem items a warning names.
EXAMPLES = 5

KB_FEATURES = Features(
    {
        "qid": Value("string"),
        "name": Value("string"),
        "attributes": Value("string"),
        "image": Image(),
        "image_names": List(Value("string")),
    }
)
MENTION_FEATURES = Features(
    {
        "id": Value("string"),
        "mention": Value("string"),
        "sentence": Value("string"),
        "image": Image(),
        "answer": Value("string"),
    }
)
REPORT_FILE = "otmel_load_report.json"


class DataFormatError(ValueError):
    """A KB or mention source cannot be read; the message names the file (and line or row) or the argument."""


# ----------------------------------------------------------------------------------------------------------------
# Column mapping
# ----------------------------------------------------------------------------------------------------------------


def parse_column_map(spec, allowed=KB_COLUMNS, argument: str = "--kb_columns") -> dict:
    """`"qid=id,name=title"` (or a dict) -> `{"qid": "id", "name": "title"}`: which source column feeds each field.

    Raises [`DataFormatError`] naming `argument` for an unknown field, an empty name or a field given twice."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = []
        for item in str(spec).split(","):
            if not item.strip():
                continue
            target, sep, source = item.partition("=")
            if not sep:
                raise DataFormatError(f"{argument}: {item.strip()!r} is not of the form field=column")
            pairs.append((target.strip(), source.strip()))
    mapping = {}
    for target, source in pairs:
        if target not in allowed:
            raise DataFormatError(f"{argument}: unknown field {target!r}; the fields are {', '.join(allowed)}")
        if not source:
            raise DataFormatError(f"{argument}: no column name given for {target!r}")
        if target in mapping:
            raise DataFormatError(f"{argument}: field {target!r} mapped twice")
        mapping[target] = source
    return mapping


def _resolve_columns(where: str, found: list, mapping: dict, fields, required, argument: str, kind: str):
    """Returns `{field: source column}` for the fields present; errors on missing required ones, warns on the rest."""
    found = list(found)
    columns = {}
    for field in fields:
        source = mapping.get(field, field)
        if source in found:
            columns[field] = source
        elif field in mapping:
            raise DataFormatError(
                f"{where}: column {source!r} (given for {field!r} by {argument}) not found; columns found: "
                f"{', '.join(found) or 'none'}"
            )
    missing = [f for f in required if f not in columns]
    if missing:
        raise DataFormatError(
            f"{where}: missing required {kind} column(s) {', '.join(missing)}; columns found: "
            f"{', '.join(found) or 'none'}. Rename them, or map yours with {argument} "
            f"{','.join(f'{f}=YOUR_COLUMN' for f in missing)}"
        )
    used = set(columns.values())
    for source in used:
        shared = [f for f, c in columns.items() if c == source]
        if len(shared) > 1:  # allowed (e.g. the name as attributes too), but rarely meant: say so
            logger.warning("%s: column %r feeds the fields %s (%s)", where, source, ", ".join(shared), argument)
    unknown = [c for c in found if c not in used and c not in DERIVED_KB_COLUMNS]
    if unknown:
        logger.warning(
            "%s: %d column(s) neither used nor mapped, ignored: %s (the %s fields are %s; map with %s)",
            where,
            len(unknown),
            ", ".join(unknown),
            kind,
            ", ".join(fields),
            argument,
        )
    absent = [f for f in fields if f not in columns and f not in required and f != "id"]
    if absent:
        logger.warning("%s: no %s column(s) %s; every row gets none", where, kind, ", ".join(absent))
    return columns


# ----------------------------------------------------------------------------------------------------------------
# Table files
# ----------------------------------------------------------------------------------------------------------------


def table_format(path: str) -> str | None:
    """`csv`, `tsv`, `jsonl`, `json` or `parquet` from the file name's suffix (None for anything else)."""
    return TABLE_FORMATS.get(os.path.splitext(str(path))[1].lower())


def read_table(path: str) -> tuple[list, list]:
    """Reads a table file into `(columns, rows)`; each row is `(location, dict)`, location "line N" or "row N".

    CSV / TSV values are strings (an empty cell is None); JSON values keep their types. Raises [`DataFormatError`]
    naming the file and line for invalid JSON or a row that is not an object."""
    fmt = table_format(path)
    if fmt is None:
        raise DataFormatError(f"{path}: unknown table format; use one of {', '.join(TABLE_FORMATS)}")
    if not os.path.isfile(path):
        raise DataFormatError(f"{path}: no such file")
    try:
        if fmt in ("csv", "tsv"):
            return _read_csv(path, "\t" if fmt == "tsv" else ",")
        if fmt == "jsonl":
            return _read_jsonl(path)
        if fmt == "json":
            return _read_json(path)
        return _read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err})") from None


def _read_csv(path: str, delimiter: str):
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(f"{path}: empty file, expected a header line")
        header = [h.strip() for h in header]
        duplicated = sorted({h for h in header if header.count(h) > 1})
        if duplicated:
            raise DataFormatError(f"{path}: line 1: column(s) {', '.join(duplicated)} appear more than once")
        line = reader.line_num
        for values in reader:
            start, line = line + 1, reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(header):
                raise DataFormatError(
                    f"{path}: line {start}: {len(values)} fields, the header has {len(header)} (quote values that "
                    f"contain {delimiter!r})"
                )
            row = {h: (v if v != "" else None) for h, v in zip(header, values)}
            rows.append((f"line {start}", row))
    return header, rows


def _read_jsonl(path: str):
    rows, columns = [], {}
    with open(path, encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataFormatError(
                    f"{path}: line {number}: invalid JSON ({err.msg} at column {err.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
            columns.update(dict.fromkeys(row))
            rows.append((f"line {number}", row))
    return list(columns), rows


def _read_json(path: str):
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of objects (or JSON Lines, .jsonl)")
    rows, columns = [], {}
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        columns.update(dict.fromkeys(row))
        rows.append((f"row {i}", row))
    return list(columns), rows


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - any pyarrow failure means "not a readable Parquet file"
        raise DataFormatError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    rows = [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]
    return list(table.column_names), rows


# ----------------------------------------------------------------------------------------------------------------
# Values and pictures
# ----------------------------------------------------------------------------------------------------------------


def _text(value, where: str, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value) if not (isinstance(value, float) and value.is_integer()) else str(int(value))
    raise DataFormatError(f"{where}: column {column!r} must be text, got {type(value).__name__}")


def _picture_entries(value, base: str, where: str, column: str) -> list:
    """The pictures a cell lists, in order: `(shown name, absolute path or None, inline bytes or None)`."""
    if value is None:
        return []
    if isinstance(value, str):
        items = [p.strip() for p in value.split(";")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    entries = []
    for item in items:
        if item is None or item == "":
            continue
        if isinstance(item, dict) and ("bytes" in item or "path" in item):
            data, path = item.get("bytes"), item.get("path")
            if data is not None:
                entries.append((path or "<bytes>", None, bytes(data)))
                continue
            item = path
            if item is None:
                continue
        if isinstance(item, (bytes, bytearray)):
            entries.append(("<bytes>", None, bytes(item)))
        elif isinstance(item, str):
            item = item.strip()
            if item:
                full = os.path.expanduser(item)
                entries.append((item, full if os.path.isabs(full) else os.path.join(base, full), None))
        else:
            raise DataFormatError(
                f"{where}: column {column!r} must hold picture paths (a string, a list, or ';'-separated), "
                f"got {type(item).__name__}"
            )
    return entries


def _first_picture(entries: list) -> tuple:
    """`(image dict or None, [(shown name, problem)] for the entries tried before it)`."""
    problems = []
    for name, path, data in entries:
        if data is None:
            if not os.path.isfile(path):
                problems.append((name, f"missing file {path}"))
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as err:
                problems.append((name, f"unreadable file {path} ({err})"))
                continue
        image, reason = read_image(data)
        if image is None:
            reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", reason)
            problems.append((name, f"{reason} in {path}" if path else reason))
            continue
        return {"bytes": data, "path": name}, problems
    return None, problems


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _fingerprint(kind: str, source: str, mapping: dict, entries_per_row: list) -> str:
    h = hashlib.sha256(f"otmel-data:{DATA_FORMAT_VERSION}:{kind}\n".encode())
    h.update(f"{os.path.abspath(source)}\t{_stat(source)}\n{json.dumps(mapping, sort_keys=True)}\n".encode())
    for entries in entries_per_row:
        for _, path, data in entries:
            h.update((f"{path}\t{_stat(path)}\n" if data is None else hashlib.sha256(data).hexdigest()).encode())
        h.update(b"|")
    return h.hexdigest()[:40]


class _Rows:
    """Holds the parsed rows for `Dataset.from_generator` (a list in `gen_kwargs` would be split into shards)."""

    def __init__(self, rows):
        self.rows = rows


# ----------------------------------------------------------------------------------------------------------------
# Building datasets
# ----------------------------------------------------------------------------------------------------------------


def _build(kind: str, source: str, parsed: list, features: Features, fingerprint: str, cache_dir, split: str):
    """Builds (or reuses) the dataset of `parsed` rows `(location, fields, picture entries)`; logs the picture report."""
    report = {"pictures_listed_rows": 0, "no_picture_rows": 0, "problems": 0, "examples": []}
    ran = []

    def generate(holder):
        ran.append(True)
        for location, fields, entries in holder.rows:
            image, problems = _first_picture(entries)
            if entries:
                report["pictures_listed_rows"] += 1
                report["no_picture_rows"] += image is None
            report["problems"] += len(problems)
            for name, reason in problems:
                if len(report["examples"]) < EXAMPLES:
                    report["examples"].append(f"{location}: {name} ({reason})")
            row = dict(fields)
            row["image"] = image
            if "image_names" in features:
                row["image_names"] = [name for name, _, _ in entries]
            yield row

    dataset = datasets.Dataset.from_generator(
        generate,
        features=features,
        gen_kwargs={"holder": _Rows(parsed)},
        cache_dir=cache_dir,
        fingerprint=fingerprint,
        split=split,
    )
    report_path = None
    if dataset.cache_files:
        report_path = os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), REPORT_FILE)
    dataset = dataset.cast_column("image", Image(decode=False))
    if ran and report_path is not None:
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(report, f)
    elif not ran and report_path is not None and os.path.isfile(report_path):
        with open(report_path, encoding="utf-8") as f:  # from the cache: the generator did not run
            report = json.load(f)
    if report["problems"]:
        logger.warning(
            "%s: %d picture(s) missing or unreadable, counted as no picture; %d of %d %s with pictures listed have "
            "none usable. First: %s",
            source,
            report["problems"],
            report["no_picture_rows"],
            report["pictures_listed_rows"],
            kind,
            "; ".join(report["examples"]),
        )
    return dataset


def _skip_warning(source: str, kind: str, skipped: dict, total: int) -> None:
    for reason, locations in skipped.items():
        if locations:
            logger.warning(
                "%s: skipped %d of %d %s row(s) with %s: %s%s",
                source,
                len(locations),
                total,
                kind,
                reason,
                ", ".join(locations[:EXAMPLES]),
                ", ..." if len(locations) > EXAMPLES else "",
            )


def _kb_from_rows(where: str, rows: list, use: dict, base: str, fingerprint_key: str, mapping: dict, cache_dir):
    parsed, seen = [], set()
    skipped = {"an empty qid": [], "a duplicate qid (the first row is kept)": []}
    for location, row in rows:
        at = f"{where}: {location}"
        qid = _text(row.get(use["qid"]), at, use["qid"]).strip()
        if not qid:
            skipped["an empty qid"].append(location)
            continue
        if qid in seen:
            skipped["a duplicate qid (the first row is kept)"].append(f"{location} ({qid})")
            continue
        seen.add(qid)
        fields = {
            "qid": qid,
            "name": _text(row.get(use["name"]), at, use["name"]),
            "attributes": _text(row.get(use["attributes"]), at, use["attributes"]) if "attributes" in use else "",
        }
        entries = _picture_entries(row.get(use["image"]), base, at, use["image"]) if "image" in use else []
        parsed.append((location, fields, entries))
    _skip_warning(where, "KB", skipped, len(rows))
    if not parsed:
        raise DataFormatError(f"{where}: no entities (it has {len(rows)} row(s))")
    fingerprint = _fingerprint(fingerprint_key, where, mapping, [e for _, _, e in parsed])
    return _build("entities", where, parsed, KB_FEATURES, fingerprint, cache_dir, "train")


def kb_from_table(path: str, columns=None, cache_dir: str | None = None) -> datasets.Dataset:
    """The KB `datasets.Dataset` (qid, name, attributes, image, image_names) of a CSV / TSV / JSONL / JSON / Parquet
    file; picture paths relative to the file. See the module docstring for the rules."""
    mapping = parse_column_map(columns, KB_COLUMNS, "--kb_columns")
    found, rows = read_table(path)
    use = _resolve_columns(path, found, mapping, KB_COLUMNS, KB_REQUIRED, "--kb_columns", "KB")
    base = os.path.dirname(os.path.abspath(path))
    return _kb_from_rows(path, rows, use, base, "kb", mapping, cache_dir)


def load_mention_file(
    path: str, columns=None, split: str = "train", require_answer: bool = True, cache_dir: str | None = None
) -> datasets.Dataset:
    """A mention split (id, mention, sentence, image, answer) from a CSV / TSV / JSONL / JSON / Parquet file; picture
    paths relative to the file. Without `require_answer`, `answer` may be absent (it is then "")."""
    mapping = parse_column_map(columns, MENTION_COLUMNS, "--mention_columns")
    found, rows = read_table(path)
    required = MENTION_REQUIRED if require_answer else ("mention",)
    use = _resolve_columns(path, found, mapping, MENTION_COLUMNS, required, "--mention_columns", "mention")
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    parsed = []
    skipped = {"an empty mention": [], "no answer": []}
    for location, row in rows:
        where = f"{path}: {location}"
        fields = {
            "id": _text(row.get(use["id"]), where, use["id"]) if "id" in use else "",
            "mention": _text(row.get(use["mention"]), where, use["mention"]),
            "sentence": _text(row.get(use["sentence"]), where, use["sentence"]) if "sentence" in use else "",
            "answer": _text(row.get(use["answer"]), where, use["answer"]).strip() if "answer" in use else "",
        }
        if not fields["id"]:
            fields["id"] = f"{name}:{location.split()[-1]}"
        if not fields["mention"].strip():
            skipped["an empty mention"].append(location)
            continue
        if require_answer and not fields["answer"]:
            skipped["no answer"].append(location)
            continue
        entries = _picture_entries(row.get(use["image"]), base, where, use["image"]) if "image" in use else []
        parsed.append((location, fields, entries))
    _skip_warning(path, "mention", skipped, len(rows))
    if not parsed:
        raise DataFormatError(f"{path}: no usable mentions (the file has {len(rows)} row(s))")
    first, repeated = {}, []
    for location, fields, _ in parsed:
        if fields["id"] in first:
            repeated.append(f"{location} (id {fields['id']!r}, as {first[fields['id']]})")
        first.setdefault(fields["id"], location)
    if repeated:  # kept (they are mentions), but predictions keyed by id would be ambiguous
        logger.warning(
            "%s: %d mention row(s) repeat the id of an earlier row (kept; predictions name both by that id): %s%s",
            path,
            len(repeated),
            ", ".join(repeated[:EXAMPLES]),
            ", ..." if len(repeated) > EXAMPLES else "",
        )
    fingerprint = _fingerprint(f"mentions:{split}:{require_answer}", path, mapping, [e for _, _, e in parsed])
    return _build("mentions", path, parsed, MENTION_FEATURES, fingerprint, cache_dir, split)


def load_mention_files(files: dict, columns=None, require_answer: bool = True, cache_dir: str | None = None):
    """`{"train": path, "validation": path, "test": path}` (None entries skipped) -> `datasets.DatasetDict`. Errors name
    the argument (`--train_file`, ...), the file and the line."""
    splits = {}
    for split, path in files.items():
        if not path:
            continue
        try:
            splits[split] = load_mention_file(path, columns, split, require_answer, cache_dir)
        except DataFormatError as err:
            message = str(err)
            raise DataFormatError(message if message.startswith("--") else f"--{split}_file {message}") from None
    if not splits:
        raise DataFormatError("no mention file given (--train_file, --validation_file or --test_file)")
    return datasets.DatasetDict(splits)


# ----------------------------------------------------------------------------------------------------------------
# Datasets, Hub ids, MIMIC folders
# ----------------------------------------------------------------------------------------------------------------


def load_dataset_config(path: str, config: str | None = None, **kwargs):
    """`datasets.load_dataset(path, config)`, with a cache of its own for a local folder.

    datasets 5.2 keys the cache of a local dataset folder by the folder's name and config only: a second folder of the
    same name, or a folder rewritten in place, would load the first one's data silently. A local folder is therefore
    read through a cache directory keyed by its real path and the name, size and modification time of its files.
    """
    from datasets import load_dataset

    if os.path.isdir(path) and "cache_dir" not in kwargs:
        digest = hashlib.sha256(os.path.realpath(path).encode())
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                full = os.path.join(root, name)
                stat = os.stat(full)
                digest.update(f"{os.path.relpath(full, path)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        kwargs["cache_dir"] = os.path.join(datasets.config.HF_DATASETS_CACHE, "otmel-folders", digest.hexdigest()[:16])
    return load_dataset(path, config, **kwargs)


def _is_saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    single = os.path.isfile(os.path.join(path, "dataset_info.json")) and os.path.isfile(
        os.path.join(path, "state.json")
    )
    return single or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _load_kb_config(path: str, where: str):
    """The `kb` config of a dataset folder or Hub id, else its only config; a `save_to_disk` folder as it is."""
    from datasets import DatasetDict, load_from_disk

    if os.path.isdir(path) and _is_saved_dataset(path):
        kb = load_from_disk(path)
    else:
        try:
            kb = load_dataset_config(path, "kb")
        except ValueError as err:
            if "kb" not in str(err):
                raise DataFormatError(f"{where} {path}: cannot be loaded as a dataset ({err})") from err
            try:
                kb = load_dataset_config(path)  # a dataset that is only a KB
            except Exception as inner:  # noqa: BLE001 - reported with the first error
                raise DataFormatError(
                    f"{where} {path}: no 'kb' config ({err}) and no loadable default config ({inner})"
                ) from inner
        except (FileNotFoundError, ConnectionError) as err:
            raise DataFormatError(
                f"{where} {path}: not a file, folder or reachable Hub dataset ({err}); a KB is a "
                f"{'/'.join(TABLE_FORMATS)} file, a dataset folder or Hub id with a 'kb' config, or a MIMIC-layout folder"
            ) from err
    if isinstance(kb, DatasetDict):
        if len(kb) != 1:
            raise DataFormatError(f"{where} {path}: expected one split in the KB, found {', '.join(kb)}")
        kb = next(iter(kb.values()))
    return kb


def kb_from_dataset(
    kb: datasets.Dataset, columns=None, where: str = "KB", base: str | None = None
) -> datasets.Dataset:
    """A loaded KB dataset with its columns mapped and checked: qid, name, attributes, image (undecoded), image_names.

    An `image` column that is not a `datasets.Image` (paths as strings, e.g. a CSV dataset) is read like a table file's,
    relative to `base` (default: the working directory)."""
    mapping = parse_column_map(columns, KB_COLUMNS, "--kb_columns")
    use = _resolve_columns(where, kb.column_names, mapping, KB_COLUMNS, KB_REQUIRED, "--kb_columns", "KB")
    image_column = use.get("image")
    if image_column is not None and not isinstance(kb.features[image_column], Image):
        rows = [(f"row {i}", row) for i, row in enumerate(kb.select_columns(list(use.values())))]
        key = f"kb-dataset:{kb._fingerprint}"
        return _kb_from_rows(where, rows, use, base or os.getcwd(), key, mapping, None)
    keep = list(use.values()) + [c for c in DERIVED_KB_COLUMNS if c in kb.column_names and c not in use.values()]
    kb = kb.select_columns(keep)
    renames = {source: field for field, source in use.items() if source != field}
    if renames:
        kb = kb.rename_columns(renames)
    if "attributes" not in kb.column_names:
        kb = kb.add_column("attributes", [""] * len(kb))
    if "image" in kb.column_names:
        kb = kb.cast_column("image", Image(decode=False))
    return kb


def load_kb(source: str, columns=None, cache_dir: str | None = None, where: str = "--kb") -> datasets.Dataset:
    """The KB of `source`: a table file, a dataset folder, a `save_to_disk` folder, a Hub dataset id or a raw
    MIMIC-layout folder (converted into `cache_dir`, default `~/.cache/otmel/converted`). `columns` maps other column
    names ([`parse_column_map`]). Images come undecoded (`datasets.Image(decode=False)`)."""
    source = os.fspath(source)
    if table_format(source) is not None:
        try:
            return kb_from_table(source, columns, cache_dir=None)
        except DataFormatError as err:  # the message names the file; name the argument too
            message = str(err)
            raise DataFormatError(message if message.startswith("--") else f"{where} {message}") from None
    if os.path.isfile(source):
        raise DataFormatError(f"{where} {source}: unknown file type; a KB file is one of {', '.join(TABLE_FORMATS)}")
    path = source
    if os.path.isdir(source):
        try:  # the converter is part of the checkout, not of a checkpoint's remote code (Hub users lack it)
            from datasets_scripts.convert_mimic import cached_convert, is_mimic_layout
        except ImportError:
            if os.path.isfile(os.path.join(source, "kb_entity.json")):
                raise DataFormatError(
                    f"{where} {source}: a raw MIMIC-layout folder needs datasets_scripts/convert_mimic.py (the otmel "
                    "checkout) to be converted; convert it there first and give the converted folder"
                ) from None
            cached_convert = is_mimic_layout = None
        if is_mimic_layout is not None and is_mimic_layout(source):
            cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "otmel", "converted")
            converted, _ = cached_convert(source, cache_dir)
            logger.info("Raw MIMIC-layout folder %s is read from its conversion at %s", source, converted)
            path = str(converted)
        elif not os.path.isfile(os.path.join(source, "README.md")) and not _is_saved_dataset(source):
            if os.path.isfile(os.path.join(source, "config.json")) and any(
                n.endswith((".safetensors", ".bin")) for n in os.listdir(source)
            ):
                raise DataFormatError(f"{where} {source}: a model folder, not a KB (the KB is a file or dataset)")
            tables = sorted(n for n in os.listdir(source) if table_format(n) is not None)
            if tables:  # a folder holding the KB file (and its pictures), not a dataset folder
                raise DataFormatError(
                    f"{where} {source}: a folder, not a dataset (no README.md with a 'kb' config, not saved with "
                    f"save_to_disk, not the MIMIC layout); give the KB file itself, e.g. "
                    f"{where} {os.path.join(source, tables[0])}"
                )
    kb = _load_kb_config(path, where)
    base = path if os.path.isdir(path) else None
    return kb_from_dataset(kb, columns, where=f"{where} {source}", base=base)


__all__ = [
    "load_dataset_config",
    "DataFormatError",
    "KB_COLUMNS",
    "KB_FEATURES",
    "MENTION_COLUMNS",
    "MENTION_FEATURES",
    "kb_from_dataset",
    "kb_from_table",
    "load_kb",
    "load_mention_file",
    "load_mention_files",
    "parse_column_map",
    "read_table",
    "table_format",
]
