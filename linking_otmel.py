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
        [--index_dir DIR] [--rebuild_index] [--index_dtype float32|float16] [--top_k 5] \
        [--strategy two_stage|exhaustive] [--candidates 50] [--assignment ot|attention] [--batch_size 64] [--threads N]

Input lines: `{"mention": ..., "sentence": ..., "image": "pics/a.jpg" (optional, relative to the JSONL file), "id": ...
(optional)}`. Output lines: `{"id", "line", "mention", "candidates": [{"qid", "name", "score"}, ...]}`. Bad lines
(invalid JSON, missing or non-string fields) are reported on stderr by line number and skipped; an unreadable picture
is reported and the mention linked without it; a summary line ends the run.
"""

import argparse
import json
import logging
import os
import sys
import time

import torch


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .index_otmel import INDEX_META, EntityIndex, IndexMismatchError, encode_kb
    from .modeling_otmel import OTMELModel
    from .processing_otmel import OTMELProcessor, read_image
    from .ranking_otmel import RankOptions, encode_mentions, rank_mentions
except ImportError:
    from index_otmel import INDEX_META, EntityIndex, IndexMismatchError, encode_kb
    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor, read_image
    from ranking_otmel import RankOptions, encode_mentions, rank_mentions


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
        self.model = model.eval()
        self.processor = processor
        self.index = index
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, model_dir_or_hub_id: str, trust_remote_code: bool = True, device=None, **kwargs):
        """Loads the model and processor: the classes of this checkout when the folder holds an OT-MEL, else through
        `AutoModel` / `AutoProcessor` with `trust_remote_code`."""
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
        return cls(model, processor)

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
    ) -> list[list[dict]]:
        """Links each mention (dict or `mentions` split row with `mention`, `sentence`, `image` = PIL image, path, bytes
        or None; an unreadable picture counts as none) to the KB.

        Returns, per mention, `[{"qid", "name", "score"}, ...]` best first (`top_k` entries; S_O scores, cosine scale).
        `assignment="attention"` is the KD fast path for the pairwise matching (module docstring).
        """
        index = self._require_index()
        options = RankOptions(strategy=strategy, candidates=max(candidates, top_k), top_k=top_k, assignment=assignment,
                              chunk_size=chunk_size)  # fmt: skip
        result = rank_mentions(self.model, self.processor, index, mentions, options, batch_size=self.batch_size,
                               progress=progress)  # fmt: skip
        return [
            [{"qid": index.qids[r], "name": index.names[r], "score": s} for s, r in zip(scores, rows)]
            for scores, rows in zip(result.scores.tolist(), result.indices.tolist())
        ]


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def _load_kb_dataset(path: str):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    try:
        kb = load_dataset(path, "kb")
    except Exception as err:  # noqa: BLE001 - fall back to a saved Dataset
        try:
            kb = load_from_disk(path)
        except Exception:  # noqa: BLE001
            raise ValueError(f"--kb {path}: neither an entity index nor a dataset with a 'kb' config ({err})") from err
    if isinstance(kb, DatasetDict):
        if len(kb) != 1:
            raise ValueError(f"--kb {path}: expected one split in the 'kb' config, found {list(kb)}")
        kb = next(iter(kb.values()))
    if not isinstance(kb, Dataset):
        raise ValueError(f"--kb {path}: not a dataset")
    return kb


def _read_jsonl(path: str):
    """Yields `(line_number, record or None, error or None)`; blank lines are skipped silently."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, None, f"invalid JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(obj, dict):
                yield number, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            missing = [k for k in ("mention", "sentence") if not isinstance(obj.get(k), str)]
            if missing:
                yield number, None, f"missing or non-string field(s) {', '.join(missing)}"
                continue
            if not obj["mention"].strip():
                yield number, None, "empty mention"
                continue
            image = obj.get("image")
            if image is not None and not isinstance(image, str):
                yield number, None, f"field image must be a path string or null, got {type(image).__name__}"
                continue
            if image:
                image = image if os.path.isabs(image) else os.path.join(base, image)
            obj["image"] = image or None
            yield number, obj, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Link mentions (JSONL: mention, sentence, optional image path relative to the file) to a KB.",
    )
    parser.add_argument("--model", required=True, help="OT-MEL folder or Hub id (model and processor)")
    parser.add_argument("--kb", required=True, help="dataset folder with a 'kb' config, or an entity index folder")
    parser.add_argument("--input", required=True, help="mentions, one JSON object per line")
    parser.add_argument("--output", required=True, help="results, one JSON object per linked mention")
    parser.add_argument("--index_dir", help="load the entity index from here if present, else build and save it here")
    parser.add_argument("--rebuild_index", action="store_true", help="overwrite an existing --index_dir")
    parser.add_argument("--index_dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--strategy", default="two_stage", choices=("two_stage", "exhaustive"))
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--assignment", default=None, choices=("ot", "attention"))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a busy machine 1 can be much faster)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start_time = time.time()
    linker = OTMELLinker.from_pretrained(args.model, device=args.device)
    linker.batch_size = args.batch_size
    try:
        if os.path.isfile(os.path.join(args.kb, INDEX_META)):
            linker.load_index(args.kb)
        else:
            kb = _load_kb_dataset(args.kb)
            if args.index_dir and os.path.isfile(os.path.join(args.index_dir, INDEX_META)) and not args.rebuild_index:
                linker.load_index(args.index_dir, kb=kb)
                print(f"loaded entity index from {args.index_dir} ({len(linker.index)} entities)", file=sys.stderr)
            else:
                linker.build_index(kb, dtype=args.index_dtype)
                if args.index_dir:
                    linker.save_index(args.index_dir)
                    print(f"saved entity index to {args.index_dir}", file=sys.stderr)
    except IndexMismatchError as err:
        print(f"error: {err} (use --rebuild_index to overwrite {args.index_dir})", file=sys.stderr)
        return 2

    from tqdm.auto import tqdm

    with open(args.input, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    bad, no_image, linked = [], 0, 0
    pending = []

    def flush(out):
        nonlocal linked
        if not pending:
            return
        results = linker.link([rec for _, rec in pending], top_k=args.top_k, strategy=args.strategy,
                              candidates=args.candidates, assignment=args.assignment)  # fmt: skip
        for (number, rec), cands in zip(pending, results):
            row = {"line": number, "mention": rec["mention"], "candidates": cands}
            if "id" in rec:
                row = {"id": rec["id"], **row}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        linked += len(pending)
        pending.clear()

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as out, tqdm(total=total, desc="Linking", unit="mention") as bar:
        for number, rec, error in _read_jsonl(args.input):
            bar.update(1)
            if error is not None:
                bad.append(number)
                tqdm.write(f"line {number}: {error}; skipped", file=sys.stderr)
                continue
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
    summary = f"linked {linked} mention(s), skipped {len(bad)} bad line(s)"
    if bad:
        summary += f" (line {', '.join(map(str, bad[:20]))}{', ...' if len(bad) > 20 else ''})"
    summary += f", {no_image} unreadable image(s) linked without image; {time.time() - start_time:.1f} s -> {args.output}"
    print(summary, file=sys.stderr)
    return 0


__all__ = ["OTMELLinker", "main"]


if __name__ == "__main__":
    sys.exit(main())
