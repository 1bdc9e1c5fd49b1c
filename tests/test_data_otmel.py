"""Own data (data_otmel): a KB and mentions as CSV / JSONL / JSON / Parquet files with mapped columns and pictures
relative to the files, linked with the CLI from another working directory and trained on with --train_file; errors
that list the columns found, warnings for unknown columns and unusable pictures; the other KB sources (converted
folder, save_to_disk folder, raw MIMIC-layout folder)."""

import csv
import json
import logging
import os
import sys

import pytest
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data_otmel as dx  # noqa: E402


FIRST = "ada bob cyd dan eve fay gus hal ivy jon kim lea max ned ora pat rex sue tom uma".split()
JOBS = "doctor singer painter writer actor pilot chef judge nurse baker".split()
CITIES = "paris london rome oslo lima cairo".split()
N_ENTITIES = 20
MISSING_ROW, UNREADABLE_ROW, TWO_PICTURES_ROW = 3, 7, 5  # KB rows with a missing picture, a bad one, two pictures


def _colour(i: int) -> tuple:
    return (37 * i % 256, 91 * i % 256, 53 * i % 256)


def _picture(path, i: int, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new("RGB", (24, 20), _colour(i))
    image.paste((255 - _colour(i)[0], 0, 0), (4, 4, 12 + i % 8, 14))
    image.save(path, format=fmt)


def _entity(i: int) -> dict:
    return {
        "entity_id": f"E{i:03d}",
        "title": f"{FIRST[i]} {'smith' if i % 2 else 'jones'}",
        "description": f"works as a {JOBS[i % 10]}. lives in {CITIES[i % 6]}.",
    }


def _write_kb(folder, fmt: str = "csv") -> str:
    """A 20-entity KB with other column names, pictures under pics/ (relative paths), an unused column `popularity`,
    one missing picture, one unreadable picture, and one entity listing two pictures (the first missing)."""
    rows = []
    for i in range(N_ENTITIES):
        row = _entity(i)
        if i % 4 == 0:
            pictures = []  # no picture listed
        elif i == MISSING_ROW:
            pictures = ["pics/nowhere.png"]
        elif i == UNREADABLE_ROW:
            pictures = ["pics/broken.jpg"]
        elif i == TWO_PICTURES_ROW:
            pictures = ["pics/gone.png", f"pics/e{i}.png"]
        else:
            pictures = [f"pics/e{i}.png"]
        for p in pictures:
            if "nowhere" not in p and "gone" not in p and "broken" not in p:
                _picture(os.path.join(folder, p), i)
        row["picture"] = pictures
        row["popularity"] = i * 10
        rows.append(row)
    os.makedirs(os.path.join(folder, "pics"), exist_ok=True)
    with open(os.path.join(folder, "pics", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a picture")
    path = os.path.join(folder, f"entities.{fmt}")
    if fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["entity_id", "title", "description", "picture", "popularity"])
            for r in rows:
                writer.writerow(
                    [r["entity_id"], r["title"], r["description"], ";".join(r["picture"]), r["popularity"]]
                )
    elif fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "json":
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


KB_MAP = "qid=entity_id,name=title,attributes=description,image=picture"


def _write_mentions(folder, name: str, indices, with_answer=True) -> str:
    """Mentions of the given entities; every other one with a picture under imgs/ (path relative to the file)."""
    path = os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for k, i in enumerate(indices):
            e = _entity(i)
            row = {
                "mention": e["title"] if k % 3 else e["title"].split()[0],
                "sentence": f"the {JOBS[i % 10]} was seen in {CITIES[i % 6]} yesterday",
            }
            if k % 2 == 0:
                row["image"] = f"imgs/m{k}.jpg"
                _picture(os.path.join(folder, row["image"]), i, fmt="JPEG")
            if with_answer:
                row["answer"] = e["entity_id"]
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer

    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor
    from tiny_clip import build_tiny_clip

    root = tmp_path_factory.mktemp("own_data_model")
    texts = [f"{e['title']} {e['description']}" for e in map(_entity, range(N_ENTITIES))] * 3
    clip_dir = build_tiny_clip(str(root / "clip"), texts, vocab_size=300, hidden_size=32)
    torch.manual_seed(0)
    model = OTMELModel.from_clip(clip_dir, hidden_size=16)
    processor = OTMELProcessor(AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir))
    model.save_pretrained(str(root / "model"))
    processor.save_pretrained(str(root / "model"))
    return str(root / "model")


def _messages(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "data_otmel")


# ----------------------------------------------------------------------------------------------------------------
# KB files
# ----------------------------------------------------------------------------------------------------------------


def test_csv_kb_mapped_columns_pictures_and_warnings(tmp_path, caplog):
    path = _write_kb(str(tmp_path / "data"))
    with caplog.at_level(logging.WARNING, logger="data_otmel"):
        kb = dx.load_kb(path, columns=KB_MAP)
    assert kb.column_names == ["qid", "name", "attributes", "image", "image_names"]
    assert kb["qid"] == [f"E{i:03d}" for i in range(N_ENTITIES)]
    assert kb["name"][1] == "bob smith" and kb["attributes"][1] == "works as a singer. lives in london."
    assert not kb.features["image"].decode  # undecoded: bytes and path
    for i, row in enumerate(kb):
        image = row["image"]
        if i % 4 == 0 or i in (MISSING_ROW, UNREADABLE_ROW):
            assert image is None, i
        else:
            assert image["path"] == f"pics/e{i}.png"
            with open(os.path.join(tmp_path, "data", "pics", f"e{i}.png"), "rb") as f:
                assert image["bytes"] == f.read()
    assert kb[TWO_PICTURES_ROW]["image_names"] == ["pics/gone.png", f"pics/e{TWO_PICTURES_ROW}.png"]
    assert kb[0]["image_names"] == []
    log = _messages(caplog)
    assert "popularity" in log and "neither used nor mapped" in log
    # 3 unusable pictures (missing, unreadable, the missing first of two), 2 entities left without one.
    assert "3 picture(s) missing or unreadable" in log and "2 of 15 entities" in log
    assert "pics/nowhere.png" in log and "pics/broken.jpg" in log and "pics/gone.png" in log


def test_same_kb_from_every_table_format(tmp_path):
    loaded = {}
    for fmt in ("csv", "jsonl", "json", "parquet"):
        kb = dx.load_kb(_write_kb(str(tmp_path / fmt), fmt), columns=KB_MAP)
        loaded[fmt] = [(r["qid"], r["name"], r["attributes"], r["image"] and r["image"]["bytes"]) for r in kb]
    assert loaded["csv"] == loaded["jsonl"] == loaded["json"] == loaded["parquet"]


def test_missing_required_column_lists_the_columns_found(tmp_path):
    path = _write_kb(str(tmp_path / "data"))
    with pytest.raises(dx.DataFormatError) as err:
        dx.load_kb(path)  # no mapping: qid and name are absent
    message = str(err.value)
    assert path in message and "qid, name" in message
    assert "columns found: entity_id, title, description, picture, popularity" in message
    with pytest.raises(dx.DataFormatError, match="column 'label' .*not found; columns found: entity_id"):
        dx.load_kb(path, columns="qid=entity_id,name=label")
    with pytest.raises(dx.DataFormatError, match="--kb_columns: unknown field 'title'"):
        dx.load_kb(path, columns="qid=entity_id,title=name")


def test_bad_rows_are_errors_or_counted(tmp_path, caplog):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"qid": "Q1", "name": "a"}\n{"qid": "Q2", "name": \n')
    with pytest.raises(dx.DataFormatError, match=r"bad\.jsonl: line 2: invalid JSON"):
        dx.load_kb(str(bad_json))
    dirty = tmp_path / "dirty.csv"
    dirty.write_text("qid,name\nQ1,one\n,no id\nQ1,again\nQ2,two\n")
    with caplog.at_level(logging.WARNING, logger="data_otmel"):
        kb = dx.load_kb(str(dirty))
    assert kb["qid"] == ["Q1", "Q2"] and kb["attributes"] == ["", ""]
    log = _messages(caplog)
    assert "skipped 1 of 4 KB row(s) with an empty qid: line 3" in log
    assert "duplicate qid" in log and "line 4 (Q1)" in log
    assert "no KB column(s) attributes, image" in log


def test_cached_kb_is_rebuilt_when_a_picture_changes(tmp_path, caplog):
    path = _write_kb(str(tmp_path / "data"))
    first = dx.load_kb(path, columns=KB_MAP)
    with caplog.at_level(logging.WARNING, logger="data_otmel"):
        again = dx.load_kb(path, columns=KB_MAP)  # from the cache; the picture report is repeated
    assert again._fingerprint == first._fingerprint
    assert "3 picture(s) missing or unreadable" in _messages(caplog)
    with open(tmp_path / "data" / "pics" / "e1.png", "wb") as f:
        f.write(b"garbage")  # a changed picture: the KB is read again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_otmel"):
        changed = dx.load_kb(path, columns=KB_MAP)
    assert changed[1]["image"] is None and first[1]["image"] is not None
    assert "4 picture(s) missing or unreadable" in _messages(caplog)


def test_other_kb_sources(tmp_path):
    from datasets import load_dataset

    from datasets_scripts.make_synthetic import generate

    raw = tmp_path / "raw"
    generate(raw, entities=30, mentions=20, seed=2, image_size=32, workers=1)
    with open(raw / "kb_entity.json", encoding="utf-8") as f:
        expected = [r["qid"] for r in json.load(f)]
    from_raw = dx.load_kb(str(raw), cache_dir=str(tmp_path / "converted"))
    assert from_raw["qid"] == expected and not from_raw.features["image"].decode
    converted = next((tmp_path / "converted").iterdir())
    from_folder = dx.load_kb(str(converted))
    assert from_folder["qid"] == expected
    saved = tmp_path / "saved"
    load_dataset(str(converted), "kb")["train"].rename_columns({"qid": "id"}).save_to_disk(str(saved))
    from_disk = dx.load_kb(str(saved), columns="qid=id")
    assert from_disk["qid"] == expected and from_disk["image"][1] == from_folder["image"][1]
    csv_folder = tmp_path / "csv_kb"
    _write_kb(str(csv_folder))
    with pytest.raises(
        dx.DataFormatError, match="a folder, not a dataset .*give the KB file itself, e.g. --kb .*entities.csv"
    ):
        dx.load_kb(str(csv_folder))
    with pytest.raises(dx.DataFormatError, match="--kb .*entities.xlsx: unknown file type|--kb .*not a file"):
        (tmp_path / "entities.xlsx").write_bytes(b"x")
        dx.load_kb(str(tmp_path / "entities.xlsx"))


def test_mention_files(tmp_path, caplog):
    folder = str(tmp_path / "data")
    os.makedirs(folder)
    path = _write_mentions(folder, "train.jsonl", [1, 2, 3, 4])
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"mention": "  ", "sentence": "x", "answer": "E001"}) + "\n")
        f.write(json.dumps({"mention": "ada", "sentence": "x"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="data_otmel"):
        splits = dx.load_mention_files({"train": path, "validation": None})
    assert list(splits) == ["train"]
    train = splits["train"]
    assert train.column_names == ["id", "mention", "sentence", "image", "answer"]
    assert train["id"] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3", "train.jsonl:4"]
    assert train["answer"] == ["E001", "E002", "E003", "E004"]
    assert train[0]["image"]["path"] == "imgs/m0.jpg" and train[1]["image"] is None
    log = _messages(caplog)
    assert "an empty mention: line 5" in log and "no answer: line 6" in log
    with pytest.raises(dx.DataFormatError, match=r"--validation_file .*dev\.jsonl: missing required mention column"):
        bad = os.path.join(folder, "dev.jsonl")
        with open(bad, "w") as f:
            f.write(json.dumps({"text": "ada", "gold": "E000"}) + "\n")
        dx.load_mention_files({"train": path, "validation": bad})
    mapped = dx.load_mention_files({"validation": bad}, columns="mention=text,answer=gold")["validation"]
    assert mapped["mention"] == ["ada"] and mapped["answer"] == ["E000"] and mapped["sentence"] == [""]
    twice = os.path.join(folder, "twice.jsonl")
    with open(twice, "w") as f:
        for mention in ("ada", "bob", "cyd"):
            f.write(
                json.dumps({"id": "m1" if mention != "bob" else "m2", "mention": mention, "answer": "E000"}) + "\n"
            )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_otmel"):
        kept = dx.load_mention_files({"test": twice})["test"]
    assert kept["id"] == ["m1", "m2", "m1"]
    assert (
        "1 mention row(s) repeat the id of an earlier row (kept; predictions name both by that id): line 3 (id 'm1', as line 1)"
        in _messages(caplog)
    )


# ----------------------------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------------------------


def test_cli_links_every_line_with_a_csv_kb_from_another_directory(tmp_path, model_dir, monkeypatch, capsys):
    import linking_otmel

    data = tmp_path / "data"
    kb_path = _write_kb(str(data / "kb"))
    mentions = _write_mentions(str(data / "in"), "mentions.jsonl", range(0, N_ENTITIES, 2), with_answer=False)
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    rel = os.path.relpath
    code = linking_otmel.main(
        [
            "--model",
            model_dir,
            "--kb",
            rel(kb_path),
            "--kb_columns",
            KB_MAP,
            "--input",
            rel(mentions),
            "--output",
            "out/links.jsonl",
            "--top_k",
            "3",
            "--candidates",
            "6",
            "--batch_size",
            "4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    rows = [json.loads(line) for line in (elsewhere / "out" / "links.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, N_ENTITIES // 2 + 1))
    qids = {f"E{i:03d}" for i in range(N_ENTITIES)}
    for row in rows:
        assert len(row["candidates"]) == 3 and {c["qid"] for c in row["candidates"]} <= qids
        scores = [c["score"] for c in row["candidates"]]
        assert scores == sorted(scores, reverse=True)
    assert f"linked {N_ENTITIES // 2} mention(s)" in err and "0 unreadable image(s)" in err

    # Without the mapping: exit status 2, the message lists the columns the file has; nothing written.
    code = linking_otmel.main(
        ["--model", model_dir, "--kb", rel(kb_path), "--input", rel(mentions), "--output", "out/none.jsonl"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--kb" in err and "columns found: entity_id, title, description, picture, popularity" in err
    assert not (elsewhere / "out" / "none.jsonl").exists()


TINY = ["--tiny_hidden_size", "32", "--tiny_vocab_size", "400", "--hidden_size", "16", "--report_to", "none"]
SCHEDULE = [
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "32",
    "--kb_batch_size",
    "32",
    "--learning_rate",
    "2e-3",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "1",
    "--seed",
    "3",
]


def test_train_on_own_files(tmp_path, monkeypatch, capsys):
    import run_mel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    kb_path = _write_kb(str(data / "kb"))
    train = _write_mentions(str(data / "mentions"), "train.jsonl", [i % N_ENTITIES for i in range(33)])
    dev = _write_mentions(str(data / "mentions"), "dev.jsonl", range(1, N_ENTITIES, 2))
    with open(dev, "a", encoding="utf-8") as f:  # a mention whose answer is not in the KB: skipped, counted
        f.write(json.dumps({"mention": "nobody", "sentence": "", "answer": "E999"}) + "\n")
    out = tmp_path / "run"
    args = [
        "--train_file",
        train,
        "--validation_file",
        dev,
        "--kb",
        kb_path,
        "--kb_columns",
        KB_MAP,
        "--output_dir",
        str(out),
        "--data_cache_dir",
        str(tmp_path / "cache"),
        "--do_train",
        "--do_eval",
        "--num_train_epochs",
        "1",
        "--eval_every_epochs",
        "1",
        *TINY,
        *SCHEDULE,
        "--report_to",  # after TINY's "none"
        "tensorboard",
    ]
    assert run_mel.console_main(args) == 0
    # TensorBoard (a declared dependency) received the run's scalars.
    assert list(out.glob("runs/*/events.out.tfevents.*"))
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 33 and results["epoch"] == pytest.approx(1.0)
    assert results["eval_n"] == N_ENTITIES // 2  # the E999 mention is not linkable
    assert 0.0 < results["eval_mrr"] <= 1.0 and 0.0 <= results["eval_hits@1"] <= results["eval_hits@10"] <= 1.0
    assert (out / "model.safetensors").is_file() and "train.jsonl" in (out / "README.md").read_text()

    # A missing --kb is a usage error (exit status 2) naming the arguments.
    capsys.readouterr()
    assert run_mel.console_main(["--train_file", train, "--output_dir", str(tmp_path / "x"), "--do_train"]) == 2
    assert "need --kb" in capsys.readouterr().err


def test_dataset_folders_of_the_same_name_are_not_mixed_up(tmp_path):
    """datasets keys a local folder's cache by its name and config: two folders called `same`, or a folder rewritten in
    place, must still load their own rows."""
    from datasets import Dataset

    card = "---\nconfigs:\n- config_name: kb\n  data_files:\n  - split: train\n    path: data/train-*\n---\n"

    def write(folder, n):
        os.makedirs(folder / "data", exist_ok=True)
        rows = {"qid": [f"Q{i}" for i in range(n)], "name": [f"e{i}" for i in range(n)]}
        Dataset.from_dict(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
        (folder / "README.md").write_text(card)

    first, second = tmp_path / "a" / "same", tmp_path / "b" / "same"
    write(first, 3)
    write(second, 7)
    assert len(dx.load_dataset_config(str(first), "kb")["train"]) == 3
    assert len(dx.load_dataset_config(str(second), "kb")["train"]) == 7
    write(first, 5)  # rewritten in place
    assert len(dx.load_dataset_config(str(first), "kb")["train"]) == 5
    assert len(dx.load_kb(str(second))) == 7
