"""Linking mentions to a KB with a trained OT-MEL: the user-facing entry point, [`OTMELLinker`] and its command line.

```python
from linking_otmel import OTMELLinker

linker = OTMELLinker.from_pretrained("outputs/demo")
linker.build_index(kb)                  # a datasets.Dataset or list of dicts: qid, name, attributes, image
linker.link([{"mention": "Ada", "sentence": "...", "image": "photo.jpg"}], top_k=5)
```

The parts live in their own modules: `index_otmel` (the entity index and its persistence),
`ranking_otmel` (encoding and ranking mentions against the index), `metrics_otmel` (gold ranks and metrics).

Command line:

    python linking_otmel.py --model DIR --kb DATASET_DIR_OR_INDEX --input mentions.jsonl --output results.jsonl \
        [--index_dir DIR] [--rebuild_index] [--index_dtype float32|float16|int8|res2] [--stage1 auto|exact|ann] \
        [--top_k 5] \
        [--strategy two_stage|exhaustive] [--candidates 50] [--assignment ot|attention] [--batch_size 64] [--threads N] \
        [--nil_threshold config|none|FLOAT] [--quantize auto|none|int8|bfloat16]

`--quantize` (default `auto`: int8 towers on the CPU, float32 elsewhere; `towers_otmel`) chooses the precision of the
CLIP towers that encode mentions (and the entities of an index built here); the scores stay within the tolerance
stated in docs/benchmarks.md ("Full-size towers"), and an index of the float32 model serves them.

Input lines: `{"mention": ..., "sentence": ..., "image": "pics/a.jpg" (optional, relative to the JSONL file), "id": ...
(optional)}`. Output lines: `{"id", "line", "mention", "candidates": [{"qid", "name", "score"}, ...]}`; when the best
score is below the NIL threshold (`--nil_threshold`, by default the model's saved `nil_threshold`), the candidates start
with `{"qid": null, "name": null, "nil": true, "score": <best score>}` ([`OTMELLinker.link`]).

Nothing is dropped silently, and one bad line never loses the others. Bad lines (not UTF-8, invalid JSON, not an
object, missing or non-string fields) are reported on stderr by line number and skipped; an unreadable, missing or
oversized picture (over PIL's decompression-bomb limit) is reported and the mention linked without it; fields other
than id / mention / sentence / image are reported once and counted; a mention whose linking fails unexpectedly is
reported and skipped, the rest of its batch linked. Results are flushed batch by batch, so a crash keeps every line
linked before it. A summary line with the counts ends every run that started linking. Exit status: 0 when the run
completed (bad lines included), 2 for a usage error or a refused run (a count below 1, a missing --input or --model,
--output equal to --input, a KB or index refused), reported before anything is written, 1 for an unexpected failure
(some mention failed to link, or a crash), 130 on Ctrl-C.
"""

import argparse
import codecs
import json
import logging
import math
import numbers
import os
import re
import sys
import time
import traceback

import torch


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .configuration_otmel import PAPER_MODELS
    from .data_otmel import load_kb
    from .index_otmel import (
        ANN_MIN_ROWS,
        INDEX_DTYPES,
        INDEX_META,
        EntityIndex,
        IndexMismatchError,
        encode_kb,
        positive_int,
    )
    from .modeling_otmel import OTMELModel
    from .processing_otmel import OTMELProcessor, read_image
    from .ranking_otmel import RankOptions, encode_mentions, mention_columns, rank_mentions
    from .towers_otmel import QUANTIZE_CHOICES, float32_heads, optimize_towers, resolve_quantize, towers_precision
except ImportError:
    from configuration_otmel import PAPER_MODELS
    from data_otmel import load_kb
    from index_otmel import (
        ANN_MIN_ROWS,
        INDEX_DTYPES,
        INDEX_META,
        EntityIndex,
        IndexMismatchError,
        encode_kb,
        positive_int,
    )
    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor, read_image
    from ranking_otmel import RankOptions, encode_mentions, mention_columns, rank_mentions
    from towers_otmel import QUANTIZE_CHOICES, float32_heads, optimize_towers, resolve_quantize, towers_precision


logger = logging.getLogger(__name__)


class OTMELLinker:
    """Links mentions against a KB with a trained OT-MEL.

    ```python
    linker = OTMELLinker.from_pretrained("outputs/demo")
    linker.build_index(load_dataset("data/synth", "kb")["train"])   # or linker.load_index("outputs/demo-index")
    linker.save_index("outputs/demo-index")
    linker.link([{"mention": "Ada Lovelace", "sentence": "...", "image": "photo.jpg"}], top_k=5)
    # -> [[{"qid": "Q7259", "name": "Ada Lovelace", "score": 0.71}, ...]]
    ```
    """

    def __init__(self, model, processor, index: EntityIndex | None = None, batch_size: int = 64):
        # A model loaded in bfloat16 / float16 links with float32 heads (the index's features are float32).
        self.model = float32_heads(model).eval()
        self.processor = processor
        self.index = index
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        model_dir_or_hub_id: str,
        trust_remote_code: bool = True,
        device=None,
        quantize: str | None = "auto",
        **kwargs,
    ):
        """Loads the model and processor: the classes of this checkout when the folder holds an OT-MEL, else through
        `AutoModel` / `AutoProcessor` with `trust_remote_code`.

        `quantize`: the precision of the CLIP towers at inference ([`~towers_otmel.optimize_towers`]): `"auto"`
        (default: `"int8"` on the CPU, float32 on other devices; [`~towers_otmel.default_towers_precision`]), `None` /
        `"none"` (float32, the model as trained), `"int8"` (dynamic quantisation of the towers' linear layers, CPU
        only) or `"bfloat16"` (for GPUs). The heads stay float32, the scores move within the tolerance stated in
        docs/benchmarks.md ("Full-size towers"), and an index built with the float32 model matches. The linker's
        model is then inference-only (it refuses `train()` and `save_pretrained()`).
        """
        precision = resolve_quantize(quantize, device if device is not None else "cpu")  # a bad value fails first
        try:
            model = OTMELModel.from_pretrained(model_dir_or_hub_id, **kwargs)
            processor = OTMELProcessor.from_pretrained(model_dir_or_hub_id)
        except (OSError, ValueError, TypeError, KeyError) as err:
            logger.info("local OT-MEL classes could not load %s (%s); trying AutoModel", model_dir_or_hub_id, err)
            from transformers import AutoModel, AutoProcessor

            model = AutoModel.from_pretrained(model_dir_or_hub_id, trust_remote_code=trust_remote_code, **kwargs)
            processor = AutoProcessor.from_pretrained(model_dir_or_hub_id, trust_remote_code=trust_remote_code)
        if device is not None:
            model = model.to(device)
        if model.dtype != torch.float32:  # loaded in bfloat16 / float16 (dtype=...): towers stay in it, heads float32
            if quantize not in ("auto", None, "none", str(model.dtype).removeprefix("torch.")):
                logger.warning("quantize=%r ignored: the model was loaded in %s", quantize, model.dtype)
            return cls(model, processor)
        return cls(optimize_towers(model, precision), processor)

    @classmethod
    def from_clip(
        cls,
        clip_dir_or_hub_id: str,
        device=None,
        max_text_length: int | None = None,
        quantize: str | None = "auto",
        **overrides,
    ):
        """A zero-shot linker from any CLIP checkpoint (`openai/clip-vit-base-patch32`, a local folder, ...), for
        users without training data: the CLIP baseline of the paper (`run_mel.py --mode clip`), untrained.

        The score of a (mention, entity) pair is the mean of the cosine similarity of their CLIP text features
        (`surface [SEP] sentence` against `name [SEP] attributes`) and of their CLIP image features: no OT-MEL head
        takes part. A missing picture contributes 0 to the image similarity (the model's learned "no image" vector is
        zeroed, being untrained here), so a mention without a picture is ranked by its text alone. Scores are on the
        cosine scale, like a trained model's, but not calibrated alike: choose a NIL threshold for this linker on its own
        (`metrics_otmel.choose_nil_threshold`).

        ```python
        linker = OTMELLinker.from_clip("openai/clip-vit-base-patch32")
        linker.build_index(kb)
        linker.link(mentions, top_k=5)
        ```

        `overrides` are further [`OTMELConfig`] settings; `max_text_length` the token budget (default the config's,
        40; CLIP reads at most 77 tokens); `quantize` the precision of the CLIP towers, as in
        [`~OTMELLinker.from_pretrained`] (`None` gives CLIP's float32 cosines exactly).
        """
        precision = resolve_quantize(quantize, device if device is not None else "cpu")
        from transformers import AutoImageProcessor, AutoTokenizer

        settings = {**PAPER_MODELS["clip"][0], **overrides}
        if max_text_length is not None:
            settings["max_text_length"] = max_text_length
        model = OTMELModel.from_clip(clip_dir_or_hub_id, **settings)
        with torch.no_grad():
            model.null_visual_global.zero_()
        processor = OTMELProcessor(
            AutoImageProcessor.from_pretrained(clip_dir_or_hub_id),
            AutoTokenizer.from_pretrained(clip_dir_or_hub_id),
            max_text_length=model.config.max_text_length,
        )
        if device is not None:
            model = model.to(device)
        return cls(optimize_towers(model, precision), processor)

    def build_index(self, kb, batch_size: int | None = None, dtype="float32", progress: bool = True) -> EntityIndex:
        """Encodes a KB (`datasets.Dataset` with the `kb` columns, or a list of dicts) into `self.index`."""
        self.index = encode_kb(self.model, self.processor, kb, batch_size or self.batch_size, progress, dtype)
        return self.index

    def save_index(self, directory: str):
        self._require_index().save(directory)

    def load_index(self, directory: str, kb=None) -> EntityIndex:
        """Loads an index; refuses one built with another model or processor (or another KB, when `kb` is given)."""
        self.index = EntityIndex.load(directory, model=self.model, processor=self.processor, kb=kb)
        return self.index

    def add_entities(self, rows: list[dict], batch_size: int | None = None, progress: bool = False) -> dict:
        """Encodes KB rows (dicts: `qid`, `name`, `attributes`, `image` = PIL image, path, bytes or None) and adds them
        to the index ([`~index_otmel.EntityIndex.add`]): a qid already in the index is replaced, new ones appended.
        Without an index, the rows become the index.

        Not safe to call while another thread runs [`~OTMELLinker.link`] on the same linker: serialise them.

        Returns:
            `{"added": int, "replaced": int}`.
        """
        rows = list(rows)
        if not rows:
            return {"added": 0, "replaced": 0}
        dtype = self.index.meta["dtype"] if self.index is not None else "float32"
        codecs = self.index.codecs if self.index is not None else None  # the index's codecs: no re-encoding on add
        new = encode_kb(
            self.model, self.processor, rows, batch_size or self.batch_size, progress, dtype, codecs=codecs
        )
        if self.index is None:
            self.index = new
            return {"added": len(new), "replaced": 0}
        return self.index.add(new)

    def remove_entities(self, qids, missing_ok: bool = False) -> int:
        """Removes the entities `qids` from the index ([`~index_otmel.EntityIndex.remove`]): the number of rows
        removed; unknown qids raise `KeyError` (nothing removed) unless `missing_ok`."""
        return self._require_index().remove(qids, missing_ok=missing_ok)

    def _require_index(self) -> EntityIndex:
        if self.index is None:
            raise RuntimeError("no entity index: call build_index(kb) or load_index(dir) first")
        return self.index

    def encode_mentions(self, mentions, progress: bool = False):
        return encode_mentions(self.model, self.processor, mentions, self.batch_size, progress)

    def link(
        self,
        mentions,
        top_k: int = 5,
        strategy: str = "two_stage",
        candidates: int = 50,
        assignment: str | None = None,
        chunk_size: int = 512,
        progress: bool = False,
        nil_threshold: float | None | str = "config",
        stage1: str = "auto",
    ) -> list[list[dict]]:
        """Links each mention (dict or `mentions` split row with `mention`, `sentence`, `image` = PIL image, path, bytes
        or None; an unreadable picture counts as none) to the KB.

        `mentions` is a list (or `datasets` split) even for one mention: a single dict or string raises a `TypeError`
        that says so, as does a mention without a string `mention` or with a non-string `sentence` (the message names
        its position); an empty `mention` raises a `ValueError` naming its position. An image of an unsupported type counts as no image, with a counted warning. `[]` gives `[]`.

        Returns, per mention, `[{"qid", "name", "score"}, ...]` best first (`top_k` entries, fewer when the KB is
        smaller; S_O scores, cosine scale). `assignment="attention"` is the KD fast path for the pairwise matching
        (module docstring).

        NIL ("not in the KB"): when the best score of a mention is below `nil_threshold`, its list starts with
        `{"qid": None, "name": None, "nil": True, "score": <best score>}`, followed by the best entities, `top_k` entries
        in all (so the list can be read either way: the answer is its first entry, the candidates stay visible).
        `nil_threshold="config"` (default) uses `model.config.nil_threshold` (chosen on validation data by `run_mel.py`;
        `None` when the checkpoint has none); a number overrides it; `None` turns NIL answers off.

        `stage1`: the stage-1 search (`ranking_otmel.RankOptions.stage1`): `"auto"` (default: exact below
        `index_otmel.ANN_MIN_ROWS` entities, approximate search (`index_otmel.AnnIndex`) with exact re-scoring from
        there on),
        `"exact"` / `"torch"`, `"faiss"` (exact) or `"ann"`.
        """
        index = self._require_index()
        for name, value in (("top_k", top_k), ("candidates", candidates), ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if len(index) == 0:
            raise ValueError("the entity index is empty: build it from a KB with at least one entity")
        surfaces, sentences, images = mention_columns(mentions)  # TypeError naming the first bad mention
        empty = [i for i, surface in enumerate(surfaces) if not surface.strip()]
        if empty:  # as the CLI and the server refuse them
            raise ValueError(f"mention(s) {', '.join(map(str, empty[:20]))} have an empty 'mention' (surface text)")
        mentions = [{"mention": m, "sentence": s, "image": i} for m, s, i in zip(surfaces, sentences, images)]
        options = RankOptions(
            strategy=strategy,
            candidates=max(candidates, top_k),
            top_k=top_k,
            assignment=assignment,
            chunk_size=chunk_size,
            stage1=stage1,
        )
        threshold = self.nil_threshold(nil_threshold)
        result = rank_mentions(
            self.model, self.processor, index, mentions, options, batch_size=self.batch_size, progress=progress
        )
        out = []
        for scores, rows in zip(result.scores.tolist(), result.indices.tolist()):
            linked = [{"qid": index.qids[r], "name": index.names[r], "score": s} for s, r in zip(scores, rows)]
            if threshold is not None and scores and scores[0] < threshold:
                linked = [{"qid": None, "name": None, "nil": True, "score": scores[0]}, *linked][:top_k]
            out.append(linked)
        return out

    def nil_threshold(self, nil_threshold: float | None | str = "config") -> float | None:
        """The NIL threshold [`~OTMELLinker.link`] applies for its `nil_threshold` argument: `"config"` gives
        `model.config.nil_threshold` (None when absent), `None` gives None, a number itself."""
        if isinstance(nil_threshold, str):
            if nil_threshold != "config":
                raise ValueError(f"nil_threshold must be a number, None or 'config', got {nil_threshold!r}")
            nil_threshold = getattr(self.model.config, "nil_threshold", None)
        if nil_threshold is not None and (
            isinstance(nil_threshold, bool)
            or not isinstance(nil_threshold, numbers.Real)
            or not math.isfinite(nil_threshold)
        ):
            raise ValueError(f"nil_threshold must be a finite number, None or 'config', got {nil_threshold!r}")
        return None if nil_threshold is None else float(nil_threshold)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


_JSON_TYPES = {
    "list": "an array",
    "str": "a string",
    "int": "a number",
    "float": "a number",
    "bool": "a boolean",
    "NoneType": "null",
}
INPUT_FIELDS = ("id", "mention", "sentence", "image")
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def _read_jsonl(path: str):
    """Yields `(line_number, record or None, error or None)` for each line that is not blank (blank lines hold nothing
    to link and are skipped).

    The file is read as bytes and each line decoded on its own, so a line that is not UTF-8 is reported with its line
    number and the others are still read; a UTF-8 byte-order mark at the start is accepted. A record keeps all its
    fields; `image` becomes an absolute path (relative ones are relative to the JSONL file) or None.
    """
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            offset = 0
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    number,
                    None,
                    (
                        f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + offset + 1}"
                        "); save the file as UTF-8"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_not_json)
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON ({err.msg} at column {err.colno})"
                continue
            except ValueError as err:  # NaN / Infinity, which Python reads but JSON does not have
                yield number, None, f"invalid JSON ({err})"
                continue
            except RecursionError:
                yield number, None, "invalid JSON (nested too deeply)"
                continue
            if not isinstance(obj, dict):
                yield number, None, f"expected a JSON object, got {_JSON_TYPES.get(type(obj).__name__, 'a value')}"
                continue
            bad = ["mention"] if not isinstance(obj.get("mention"), str) else []
            bad += ["sentence"] if obj.get("sentence") is not None and not isinstance(obj["sentence"], str) else []
            if bad:  # a sentence may be absent or null (as in the Python API and the server): ""
                yield number, None, f"missing or non-string field(s) {', '.join(bad)}"
                continue
            obj["sentence"] = obj.get("sentence") or ""
            if not obj["mention"].strip():
                yield number, None, "empty mention"
                continue
            image = obj.get("image")
            if image is not None and not isinstance(image, str):
                got = _JSON_TYPES.get(type(image).__name__, "a value")
                yield number, None, f"field image must be a path string or null, got {got}"
                continue
            try:  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 output can hold
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as err:
                surrogate = err.object[err.start : err.end]
                yield number, None, f"invalid text: unpaired surrogate {surrogate!a} (a broken \\u escape)"
                continue
            if image and not os.path.isabs(image) and not URL_PATTERN.match(image):
                image = os.path.join(base, image)
            obj["image"] = image or None
            yield number, obj, None


def _count_lines(path: str) -> int:
    """Lines of a file that are not blank (bytes, so any encoding counts)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _nil_threshold_arg(text: str):
    word = text.strip().lower()
    if word in ("config", "none"):
        return None if word == "none" else "config"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'config' or 'none', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one existing file (relative paths, symlinks and hard links included)."""
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_paths(args) -> str | None:
    """The reason to refuse the run's paths (None: fine), checked before anything is loaded or written."""
    if not os.path.exists(args.input):
        return f"--input {args.input}: no such file"
    if not os.path.isfile(args.input):
        return f"--input {args.input}: not a file (expected a JSONL file of mentions)"
    if not os.access(args.input, os.R_OK):
        return f"--input {args.input}: not readable (permission denied)"
    with open(args.input, "rb") as f:
        start = f.read(4)
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)):  # UTF-32 LE: as UTF-16 LE
        return f"--input {args.input} is UTF-16 or UTF-32 encoded (it starts with a byte-order mark): save it as UTF-8"
    if os.path.isfile(args.model):
        return f"--model {args.model} is a file: expected an OT-MEL folder (config, weights, processor) or a Hub id"
    if not os.path.exists(args.model) and not re.fullmatch(r"[\w][\w.-]*(/[\w][\w.-]*)?", args.model):
        return f"--model {args.model}: no such folder (expected an OT-MEL folder or a Hub id)"
    if args.index_dir and os.path.exists(args.index_dir) and not os.path.isdir(args.index_dir):
        return f"--index_dir {args.index_dir} is a file: expected a folder"
    if os.path.isdir(args.output):
        return f"--output {args.output} is a folder: give the path of the results file"
    for flag, path in (("--input", args.input), ("--kb", args.kb)):
        if _same_file(args.output, path):
            return (
                f"--output {args.output} is the same file as {flag} {path}: refusing to overwrite it; give "
                "another --output"
            )
    if args.index_dir and os.path.realpath(args.index_dir) == os.path.realpath(args.output):
        return f"--output {args.output} is also --index_dir: give them different paths"
    folder = os.path.dirname(os.path.abspath(args.output))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        return f"--output {args.output}: cannot create its folder {folder} ({err.strerror or err})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--output {args.output}: its folder {folder} is not writable"
    if os.path.exists(args.output) and not os.access(args.output, os.W_OK):
        return f"--output {args.output}: not writable (permission denied)"
    return None


def _line_list(numbers: list[int], most: int = 20) -> str:
    return f" (line {', '.join(map(str, numbers[:most]))}{', ...' if len(numbers) > most else ''})" if numbers else ""


def main(argv=None) -> int:
    """The linking command line (module docstring); returns the exit status.

    0: the run completed; bad lines (skipped) and unreadable pictures (linked without) are reported on stderr by line
    number and counted in the summary line. 2: a usage error or a refused run (bad argument, missing --input or
    --model, --output that is the input, KB / index refused), reported before anything is written. 1: an unexpected
    failure: a mention that could not be linked (reported by line, the others still linked) or a crash (the lines
    linked before it stay in the output, which is flushed batch by batch). The summary line is printed whenever the
    linking started, also when it stops early (130 on Ctrl-C).
    """
    parser = argparse.ArgumentParser(
        description="Link mentions (JSONL: mention, sentence, optional image path relative to the file) to a KB.",
    )
    parser.add_argument("--model", required=True, help="OT-MEL folder or Hub id (model and processor)")
    parser.add_argument(
        "--kb",
        required=True,
        help="the KB: a CSV, TSV, JSONL, JSON or Parquet file (columns qid, name, attributes, image: picture paths "
        "relative to the file, several separated by ';'), a dataset folder or Hub id with a 'kb' config, a raw "
        "MIMIC-layout folder, or an entity index folder",
    )
    parser.add_argument(
        "--kb_columns",
        default=None,
        help="map the KB's column names, e.g. qid=id,name=title,attributes=description,image=image_path",
    )
    parser.add_argument("--input", required=True, help="mentions, one JSON object per line")
    parser.add_argument("--output", required=True, help="results, one JSON object per linked mention")
    parser.add_argument("--index_dir", help="load the entity index from here if present, else build and save it here")
    parser.add_argument("--rebuild_index", action="store_true", help="overwrite an existing --index_dir")
    parser.add_argument(
        "--index_dtype",
        default=None,
        choices=INDEX_DTYPES,
        help="storage of an index built here: float32 (exact; default), float16, int8, res4 / res2 / res1 (residual "
        "codes); an index loaded keeps its own",
    )
    parser.add_argument(
        "--stage1",
        default="auto",
        choices=("auto", "exact", "ann"),
        help=f"stage-1 search: exact, ann (approximate + exact re-scoring) or auto (ann from {ANN_MIN_ROWS:,} entities on)",
    )
    parser.add_argument("--top_k", type=positive_int, default=5)
    parser.add_argument("--strategy", default="two_stage", choices=("two_stage", "exhaustive"))
    parser.add_argument("--candidates", type=positive_int, default=50)
    parser.add_argument("--assignment", default=None, choices=("ot", "attention"))
    parser.add_argument("--batch_size", type=positive_int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--quantize",
        default="auto",
        choices=QUANTIZE_CHOICES,
        help="precision of the CLIP towers: auto (int8 on the CPU, float32 elsewhere), none (float32), int8 (CPU) or "
        "bfloat16 (GPU); scores within the tolerance of docs/benchmarks.md, any index of the model matches",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice; on a busy machine 1 can be much faster)",
    )
    parser.add_argument(
        "--nil_threshold",
        type=_nil_threshold_arg,
        default="config",
        help="answer NIL (not in the KB) below this best score: a number, 'config' (the model's saved "
        "threshold, the default) or 'none' (never NIL)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse printed the usage error (status 2) or the help (0)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - an unexpected failure: its traceback, then status 1
        traceback.print_exc()
        print(f"error: unexpected failure ({type(err).__name__}: {err})", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    problem = _refuse_paths(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    start_time = time.time()
    try:
        linker = OTMELLinker.from_pretrained(args.model, quantize=None)  # towers optimised on their device, below
    except Exception as err:  # noqa: BLE001 - any loading failure is a bad --model
        where = "" if os.path.isdir(args.model) else "no such local folder, and as a Hub id: "
        print(
            f"error: --model {args.model}: could not load an OT-MEL model and processor ({where}"
            f"{type(err).__name__}: {err})",
            file=sys.stderr,
        )
        return 2
    if args.device is not None:
        try:
            linker.model = linker.model.to(args.device)
        except (RuntimeError, ValueError, AssertionError) as err:
            print(f"error: --device {args.device}: {err}", file=sys.stderr)
            return 2
    try:
        optimize_towers(linker.model, resolve_quantize(args.quantize, linker.model.device))
    except (ValueError, RuntimeError, ImportError) as err:
        print(f"error: --quantize {args.quantize}: {err}", file=sys.stderr)
        return 2
    print(f"CLIP towers: {towers_precision(linker.model)} (--quantize {args.quantize})", file=sys.stderr)
    linker.batch_size = args.batch_size
    ignored = []
    try:
        if os.path.isfile(os.path.join(args.kb, INDEX_META)):
            linker.load_index(args.kb)
            ignored += [
                f"--{k} (--kb is an index)" for k in ("index_dir", "index_dtype", "rebuild_index") if vars(args)[k]
            ]
        else:
            kb = load_kb(args.kb, columns=args.kb_columns, where="--kb")
            if args.index_dir and os.path.isfile(os.path.join(args.index_dir, INDEX_META)) and not args.rebuild_index:
                linker.load_index(args.index_dir, kb=kb)
                print(f"loaded entity index from {args.index_dir} ({len(linker.index)} entities)", file=sys.stderr)
                if args.index_dtype and args.index_dtype != linker.index.meta["dtype"]:
                    ignored.append(f"--index_dtype (the index is {linker.index.meta['dtype']}; add --rebuild_index)")
            else:
                if args.rebuild_index and not args.index_dir:
                    ignored.append("--rebuild_index (no --index_dir: the index is built anyway)")
                linker.build_index(kb, dtype=args.index_dtype or "float32")
                if args.index_dir:
                    linker.save_index(args.index_dir)
                    print(f"saved entity index to {args.index_dir}", file=sys.stderr)
    except IndexMismatchError as err:
        hint = f" (use --rebuild_index to overwrite {args.index_dir})" if args.index_dir else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {err}" if "--kb" in str(err) else f"error: --kb {args.kb}: {err}", file=sys.stderr)
        return 2
    if args.stage1 != "auto" and args.strategy == "exhaustive":
        ignored.append("--stage1 (--strategy exhaustive scores every entity)")
    for flag in ignored:
        print(f"warning: ignored {flag}", file=sys.stderr)
    n_entities = len(linker.index)
    if n_entities == 0:
        print(f"error: --kb {args.kb} holds no entities", file=sys.stderr)
        return 2
    if args.top_k > n_entities:
        print(
            f"warning: --top_k {args.top_k} is more than the {n_entities} entities of the KB; each mention gets "
            f"{n_entities} candidates",
            file=sys.stderr,
        )

    from tqdm.auto import tqdm

    total = _count_lines(args.input)
    if total == 0:
        print(f"warning: --input {args.input} holds no mentions (empty, or blank lines only)", file=sys.stderr)
    bad, failed, extra_lines, extra_fields = [], [], 0, set()
    no_image = linked = last_read = last_written = 0
    pending = []
    options = dict(
        top_k=args.top_k,
        strategy=args.strategy,
        candidates=args.candidates,
        assignment=args.assignment,
        nil_threshold=args.nil_threshold,
        stage1=args.stage1,
    )

    def flush(out):
        """Links the pending mentions and writes them (flushed: a later crash keeps them). A batch that fails is
        retried mention by mention, so one bad mention loses only itself."""
        nonlocal linked, last_written
        batch = pending[:]
        pending.clear()
        if not batch:
            return
        try:
            done = list(zip(batch, linker.link([rec for _, rec in batch], **options)))
        except Exception as err:  # noqa: BLE001 - reported and counted; the other mentions go on
            done = []
            if len(batch) > 1:
                tqdm.write(
                    f"lines {batch[0][0]}-{batch[-1][0]}: linking failed ({type(err).__name__}: {err}); "
                    "retrying them one by one",
                    file=sys.stderr,
                )
            for number, rec in batch:
                error = err
                if len(batch) > 1:
                    try:
                        done.append(((number, rec), linker.link([rec], **options)[0]))
                        continue
                    except Exception as one:  # noqa: BLE001
                        error = one
                failed.append(number)
                tqdm.write(
                    f"line {number}: linking failed ({type(error).__name__}: {error}); not linked", file=sys.stderr
                )
        for (number, rec), cands in done:
            row = {"line": number, "mention": rec["mention"], "candidates": cands}
            if "id" in rec:
                row = {"id": rec["id"], **row}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        linked += len(done)
        last_written = batch[-1][0]

    try:
        out = open(args.output, "w", encoding="utf-8")
    except OSError as err:
        print(f"error: --output {args.output}: cannot write ({err.strerror or err})", file=sys.stderr)
        return 2
    completed = False
    try:
        with out, tqdm(total=total, desc="Linking", unit="mention") as bar:
            for number, rec, error in _read_jsonl(args.input):
                bar.update(1)
                last_read = number
                if error is not None:
                    bad.append(number)
                    tqdm.write(f"line {number}: {error}; skipped", file=sys.stderr)
                    continue
                extra = set(rec) - set(INPUT_FIELDS)
                if extra:
                    if not extra_lines:
                        tqdm.write(
                            f"line {number}: field(s) {', '.join(sorted(extra))} not used (only "
                            f"{', '.join(INPUT_FIELDS)} are read; id is copied to the output); further lines "
                            "with unused fields are counted in the summary",
                            file=sys.stderr,
                        )
                    extra_lines += 1
                    extra_fields |= extra
                if rec["image"] is not None:
                    image, reason = read_image(rec["image"])
                    if image is None:
                        no_image += 1
                        tqdm.write(f"line {number}: {reason}; linked without image", file=sys.stderr)
                    rec["image"] = image
                pending.append((number, rec))
                if len(pending) >= args.batch_size:
                    flush(out)
            flush(out)
        completed = True
    finally:
        summary = f"linked {linked} mention(s), skipped {len(bad)} bad line(s){_line_list(bad)}"
        summary += f", {no_image} unreadable image(s) linked without image"
        if failed:
            summary += f", {len(failed)} mention(s) failed to link{_line_list(failed)}"
        if extra_lines:
            summary += f", {extra_lines} line(s) with unused field(s) {', '.join(sorted(extra_fields)[:10])}"
        if not completed:
            summary += f", STOPPED EARLY after line {last_read}: lines after {last_written} are not in the output"
        print(f"{summary}; {time.time() - start_time:.1f} s -> {args.output}", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["OTMELLinker", "main"]


if __name__ == "__main__":
    sys.exit(main())
