"""Nothing silent in linking: the CLI of linking_otmel (bad lines, pictures, arguments, paths, failures) and the input
checks of OTMELLinker.link / ranking_otmel.mention_columns / RankOptions / processing_otmel.read_image. A random tiny
CLIP and an 8-entity KB: these tests check what the user sees, not linking quality."""

import json
import os
import sys
import warnings

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image as PILImage  # noqa: E402


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from datasets import Dataset  # noqa: E402
from tiny_worlds import noise_png as _png  # noqa: E402
from transformers import AutoImageProcessor, AutoTokenizer  # noqa: E402

import index_otmel as ix  # noqa: E402
import linking_otmel as lk  # noqa: E402
import ranking_otmel as rk  # noqa: E402
from modeling_otmel import OTMELModel  # noqa: E402
from processing_otmel import OTMELProcessor, read_image  # noqa: E402
from tiny_clip import build_tiny_clip  # noqa: E402


NAMES = "ada smith|bob jones|cyd brown|dan smith|eve jones|fay brown|gus smith|hal jones".split("|")
JOBS = "doctor singer painter writer actor pilot chef judge".split()


def _kb_rows():
    return [
        {
            "qid": f"Q{100 + i}",
            "name": name,
            "attributes": f"works as a {JOBS[i]}.",
            "image": {"bytes": _png(i), "path": None} if i % 2 else None,
        }
        for i, name in enumerate(NAMES)
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("linking_cli")
    rows = _kb_rows()
    texts = [f"{r['name']} [SEP] {r['attributes']}" for r in rows] + ["the doctor was seen in paris yesterday"]
    clip_dir = build_tiny_clip(str(root / "clip"), texts * 3, vocab_size=200)
    processor = OTMELProcessor(AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir))
    model = OTMELModel.from_clip(clip_dir, hidden_size=32).eval()
    model_dir = str(root / "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    index = ix.encode_kb(model, processor, rows, batch_size=8, progress=False)
    index_dir = str(root / "index")
    index.save(index_dir)
    # A 20000 x 20000 1-bit PNG: about 90 KB on disk, 400M pixels (over twice PIL's decompression-bomb limit).
    bomb = root / "bomb.png"
    PILImage.new("1", (20000, 20000)).save(bomb, optimize=True)
    return {
        "root": root,
        "model": model,
        "processor": processor,
        "model_dir": model_dir,
        "index": index,
        "index_dir": index_dir,
        "bomb": str(bomb),
    }


def _line(mention, image=None, **extra):
    return json.dumps({"mention": mention, "sentence": f"{mention} works as a doctor", "image": image, **extra})


def _run(world, tmp_path, lines, *extra, output=None, batch_size="2"):
    """Runs the CLI on `lines` (str lines joined by newlines, or bytes as is); returns (status, output rows)."""
    src = tmp_path / "mentions.jsonl"
    if isinstance(lines, bytes):
        src.write_bytes(lines)
    else:
        src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = output or tmp_path / "out" / "results.jsonl"
    args = [
        "--model",
        world["model_dir"],
        "--kb",
        world["index_dir"],
        "--input",
        str(src),
        "--output",
        str(out),
        "--top_k",
        "3",
        "--candidates",
        "4",
        "--batch_size",
        batch_size,
        *extra,
    ]
    status = lk.main(args)
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] if os.path.isfile(out) else None
    return status, rows


# ----------------------------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------------------------


def test_read_image_refuses_decompression_bombs_without_warning(world, tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither DecompressionBombError nor DecompressionBombWarning escapes
        image, reason = read_image(world["bomb"])
        assert image is None and reason.startswith("oversized image (") and "MAX_IMAGE_PIXELS" in reason
        with open(world["bomb"], "rb") as f:
            assert read_image(f.read())[1].startswith("oversized image")
        # Between the limit and twice the limit PIL only warns and decodes: refused too.
        monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 40 * 52 - 100)
        image, reason = read_image(_png(1))
        assert image is None and reason.startswith("oversized image")
        monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", None)  # the user's way to accept any size
        assert read_image(_png(1))[0].size == (52, 40)


def test_read_image_reasons(tmp_path):
    assert read_image(3.5) == (None, "unsupported image type float (expected a PIL image, path, bytes or None)")
    assert read_image({"url": "http://x/a.jpg"})[1].startswith("unsupported image dict with keys url")
    assert read_image({"bytes": None, "path": None}) == (None, None)
    assert read_image(str(tmp_path)) == (None, f"missing file: {tmp_path} is not a file")
    assert read_image(str(tmp_path / "nope.png")) == (None, f"missing file {tmp_path / 'nope.png'}")
    assert read_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)[1].startswith("unreadable image (")


def test_cli_links_a_line_with_a_bomb_picture_without_it(world, tmp_path, capsys):
    shutil_copy = tmp_path / "pics"
    shutil_copy.mkdir()
    (shutil_copy / "bomb.png").write_bytes(open(world["bomb"], "rb").read())
    (shutil_copy / "ok.png").write_bytes(_png(3))
    lines = [_line("ada smith", "pics/ok.png"), _line("bob jones", "pics/bomb.png"), _line("cyd brown")]
    # float32 towers: int8 ones (the CPU default) scale activations per batch, so a line's scores would also depend on
    # the lines batched with it (within towers_otmel's tolerance), and this compares a batch of 3 with a line alone.
    status, rows = _run(world, tmp_path, lines, "--quantize", "none", batch_size="64")
    err = capsys.readouterr().err
    assert status == 0, err
    assert [r["line"] for r in rows] == [1, 2, 3] and all(len(r["candidates"]) == 3 for r in rows)
    assert "line 2: oversized image (" in err and "; linked without image" in err
    assert "linked 3 mention(s), skipped 0 bad line(s), 1 unreadable image(s) linked without image" in err
    # Linked without its picture: the same candidates as the same line with no picture.
    status, alone = _run(world, tmp_path, [_line("bob jones")], "--quantize", "none")
    assert alone[0]["candidates"] == rows[1]["candidates"]


# ----------------------------------------------------------------------------------------------------------------
# Failures while linking: isolated, counted, and the lines already linked stay written
# ----------------------------------------------------------------------------------------------------------------


def test_cli_a_failing_mention_loses_only_itself(world, tmp_path, capsys, monkeypatch):
    original = lk.OTMELLinker.link

    def link(self, mentions, **kw):
        if any(m["mention"] == "boom" for m in mentions):
            raise RuntimeError("kaboom")
        return original(self, mentions, **kw)

    monkeypatch.setattr(lk.OTMELLinker, "link", link)
    lines = [_line("ada smith"), _line("bob jones"), _line("boom"), _line("cyd brown"), _line("dan smith")]
    status, rows = _run(world, tmp_path, lines)
    err = capsys.readouterr().err
    assert status == 1  # an unexpected failure, though the run went on
    assert [r["line"] for r in rows] == [1, 2, 4, 5]
    assert "lines 3-4: linking failed (RuntimeError: kaboom); retrying them one by one" in err
    assert "line 3: linking failed (RuntimeError: kaboom); not linked" in err
    assert (
        "linked 4 mention(s), skipped 0 bad line(s), 0 unreadable image(s) linked without image, "
        "1 mention(s) failed to link (line 3)" in err
    )
    # One mention per batch: nothing to retry, the same lines (scores may differ in the last bits: other padding).
    status, single = _run(world, tmp_path, lines, batch_size="1")
    assert status == 1 and [r["line"] for r in single] == [1, 2, 4, 5]
    err = capsys.readouterr().err
    assert "line 3: linking failed (RuntimeError: kaboom); not linked" in err and "retrying" not in err


def test_cli_output_is_written_batch_by_batch(world, tmp_path, capsys, monkeypatch):
    original, seen = lk.OTMELLinker.link, []
    out = tmp_path / "out" / "results.jsonl"

    def link(self, mentions, **kw):
        seen.append(out.read_text().splitlines() if out.exists() else None)
        if len(seen) == 3:
            raise KeyboardInterrupt  # a crash no handler catches
        return original(self, mentions, **kw)

    monkeypatch.setattr(lk.OTMELLinker, "link", link)
    lines = [_line(n) for n in NAMES[:6]]
    status, rows = _run(world, tmp_path, lines, output=out)
    err = capsys.readouterr().err
    assert status == 130
    assert seen[0] == [] and len(seen[1]) == 2 and len(seen[2]) == 4  # on disk before the next batch runs
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert "linked 4 mention(s)" in err and "STOPPED EARLY after line 6: lines after 4 are not in the output" in err


def test_cli_unexpected_crash_exits_1_with_the_summary(world, tmp_path, capsys, monkeypatch):
    original = lk._read_jsonl

    def read(path):
        for i, item in enumerate(original(path)):
            if i == 3:
                raise OSError("input device gone")
            yield item

    monkeypatch.setattr(lk, "_read_jsonl", read)
    status, rows = _run(world, tmp_path, [_line(n) for n in NAMES[:5]])
    err = capsys.readouterr().err
    assert status == 1 and [r["line"] for r in rows] == [1, 2]
    assert "error: unexpected failure (OSError: input device gone)" in err and "linked 2 mention(s)" in err


# ----------------------------------------------------------------------------------------------------------------
# Input lines
# ----------------------------------------------------------------------------------------------------------------


def test_cli_reports_a_line_that_is_not_utf8_and_links_the_rest(world, tmp_path, capsys):
    latin1 = '{"mention": "café", "sentence": "a chef"}'.encode("latin-1")
    bom = b"\xef\xbb\xbf"
    data = bom + _line("ada smith").encode() + b"\n" + latin1 + b"\r\n" + _line("bob jones").encode() + b"\n"
    status, rows = _run(world, tmp_path, data)
    err = capsys.readouterr().err
    assert status == 0 and [r["line"] for r in rows] == [1, 3]  # a byte-order mark on line 1 is fine
    column = latin1.index(b"\xe9") + 1
    assert f"line 2: not valid UTF-8 (byte 0xe9 at column {column}); save the file as UTF-8; skipped" in err
    assert "linked 2 mention(s), skipped 1 bad line(s) (line 2)" in err


def test_cli_odd_lines(world, tmp_path, capsys):
    lines = [
        json.dumps(["an", "array"]),
        _line("ada smith", answer="Q100", note=1),
        '{"mention": "\\ud800", "sentence": "a broken escape"}',
        "  ",
        json.dumps({"mention": "bob jones", "sentence": 7}),
        json.dumps({"mention": "cyd brown", "sentence": "x", "image": 5}),
        "[" * 100_000,
        _line("dan smith", answer="Q103"),
        json.dumps({"mention": "  ", "sentence": "x"}),
        json.dumps({"mention": "eve smith"}),  # no sentence: linked on the mention (and picture) alone
    ]
    status, rows = _run(world, tmp_path, lines)
    err = capsys.readouterr().err
    assert status == 0 and [r["line"] for r in rows] == [2, 8, 10]
    assert "line 1: expected a JSON object, got an array; skipped" in err
    assert "line 3: invalid text: unpaired surrogate '\\ud800'" in err
    assert "line 5: missing or non-string field(s) sentence; skipped" in err
    assert "line 6: field image must be a path string or null, got a number; skipped" in err
    assert "line 7: invalid JSON" in err and "line 9: empty mention" in err
    assert "line 2: field(s) answer, note not used" in err and "line 8:" not in err  # warned once, then counted
    assert "linked 3 mention(s), skipped 6 bad line(s) (line 1, 3, 5, 6, 7, 9)" in err
    assert "2 line(s) with unused field(s) answer, note" in err


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_cli_input_without_mentions(world, tmp_path, capsys, content):
    src = tmp_path / "empty.jsonl"
    src.write_text(content)
    out = tmp_path / "o.jsonl"
    status = lk.main(
        ["--model", world["model_dir"], "--kb", world["index_dir"], "--input", str(src), "--output", str(out)]
    )
    err = capsys.readouterr().err
    assert status == 0 and out.read_text() == ""
    assert f"warning: --input {src} holds no mentions (empty, or blank lines only)" in err
    assert "linked 0 mention(s), skipped 0 bad line(s)" in err


# ----------------------------------------------------------------------------------------------------------------
# Arguments and paths: refused before anything is loaded or written
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--top_k", "0", "must be a positive integer (1 or more), got 0"),
        ("--top_k", "-3", "must be a positive integer (1 or more), got -3"),
        ("--top_k", "five", "expected a positive integer, got 'five'"),
        ("--candidates", "0", "must be a positive integer (1 or more), got 0"),
        ("--batch_size", "0", "must be a positive integer (1 or more), got 0"),
        ("--threads", "0", "must be a positive integer (1 or more), got 0"),
    ],
)
def test_cli_refuses_non_positive_counts(world, tmp_path, capsys, flag, value, message):
    src = tmp_path / "m.jsonl"
    src.write_text(_line("ada smith") + "\n")
    args = [
        "--model",
        world["model_dir"],
        "--kb",
        world["index_dir"],
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o.jsonl"),
        flag,
        value,
    ]
    assert lk.main(args) == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_refuses_output_that_is_the_input(world, tmp_path, capsys, monkeypatch):
    src = tmp_path / "m.jsonl"
    content = _line("ada smith") + "\n"
    src.write_text(content)
    (tmp_path / "link.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for output in (str(src), "../m.jsonl", "./../sub/../m.jsonl", str(tmp_path / "link.jsonl"), "../hard.jsonl"):
        args = ["--model", world["model_dir"], "--kb", world["index_dir"], "--input", str(src), "--output", output]
        assert lk.main(args) == 2, output
        err = capsys.readouterr().err
        assert f"error: --output {output} is the same file as --input {src}: refusing to overwrite it" in err
        assert src.read_text() == content


def test_cli_refuses_bad_paths(world, tmp_path, capsys):
    src = tmp_path / "m.jsonl"
    src.write_text(_line("ada smith") + "\n")
    (tmp_path / "afile").write_text("x")
    base = {
        "--model": world["model_dir"],
        "--kb": world["index_dir"],
        "--input": str(src),
        "--output": str(tmp_path / "o.jsonl"),
    }
    nested = tmp_path / "afile" / "sub" / "o.jsonl"
    cases = [
        ({"--input": str(tmp_path / "missing.jsonl")}, f"error: --input {tmp_path / 'missing.jsonl'}: no such file"),
        ({"--input": str(tmp_path)}, f"error: --input {tmp_path}: not a file"),
        ({"--output": str(tmp_path)}, f"error: --output {tmp_path} is a folder"),
        ({"--output": str(nested)}, f"error: --output {nested}: cannot create its folder {nested.parent}"),
        ({"--model": str(tmp_path / "no_model")}, f"error: --model {tmp_path / 'no_model'}: no such folder"),
        (
            {"--model": "no_such_org/no_such_model"},
            "error: --model no_such_org/no_such_model: could not load an OT-MEL model and processor (no such local folder, "
            "and as a Hub id: ",
        ),
        ({"--model": str(tmp_path / "afile")}, f"error: --model {tmp_path / 'afile'} is a file"),
        ({"--kb": str(tmp_path / "no_kb")}, f"error: --kb {tmp_path / 'no_kb'}"),
        ({"--index_dir": str(tmp_path / "afile")}, f"error: --index_dir {tmp_path / 'afile'} is a file"),
    ]
    for change, message in cases:
        args = [x for k, v in {**base, **change}.items() for x in (k, v)]
        assert lk.main(args) == 2, change
        err = capsys.readouterr().err
        assert message in err, (change, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_warns_when_top_k_exceeds_the_kb(world, tmp_path, capsys):
    status, rows = _run(world, tmp_path, [_line("ada smith")], "--top_k", "20")
    assert status == 0 and len(rows[0]["candidates"]) == len(NAMES)
    assert f"warning: --top_k 20 is more than the {len(NAMES)} entities of the KB" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------------------------


def test_link_says_what_a_mention_is(world):
    linker = lk.OTMELLinker(world["model"], world["processor"], world["index"], batch_size=4)
    one = {"mention": "ada smith", "sentence": "a doctor"}
    for bad in ("ada smith", one, None, 5):
        with pytest.raises(TypeError, match="pass a list of mention dicts"):
            linker.link(bad)
    with pytest.raises(TypeError, match=r"mention 1 is str 'ada smith': pass a list of mention dicts"):
        linker.link([one, "ada smith"])
    with pytest.raises(TypeError, match="mention 1 has a 'sentence' of type int"):
        linker.link([one, {"mention": "x", "sentence": 5}])
    with pytest.raises(TypeError, match="mention 0 has no 'mention'"):
        linker.link([{"sentence": "x"}])
    with pytest.raises(TypeError, match="mention 0 has 'mention' of type list"):
        linker.link([{"mention": ["x"]}])
    with pytest.raises(TypeError, match="has no 'mention' column"):
        linker.link(Dataset.from_dict({"text": ["x"]}))
    assert linker.link([]) == []
    # A generator is read once; a missing or None sentence is an empty one.
    assert linker.link(m for m in [one]) == linker.link([one])
    assert linker.link([{"mention": "ada smith", "sentence": None}]) == linker.link([{"mention": "ada smith"}])


def test_link_counts_an_unsupported_image_as_none(world, caplog):
    linker = lk.OTMELLinker(world["model"], world["processor"], world["index"], batch_size=4)
    plain = {"mention": "ada smith", "sentence": "a doctor"}
    with caplog.at_level("WARNING", logger="processing_otmel"):
        results = linker.link([{**plain, "image": 3.5}, {**plain, "image": [1, 2]}, plain], top_k=3)
    assert results[0] == results[2] and results[1] == results[2]
    assert "2 of 3 images treated as 'no image': 2 unsupported" in caplog.text


def test_link_and_rank_options_check_counts(world):
    linker = lk.OTMELLinker(world["model"], world["processor"], world["index"], batch_size=4)
    mention = [{"mention": "ada smith", "sentence": "a doctor"}]
    for kw, name in [
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": "5"}, "top_k"),
        ({"candidates": 0}, "candidates"),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            linker.link(mention, **kw)
    linker.batch_size = 0
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        linker.link(mention)
    linker.batch_size = 4
    assert len(linker.link(mention, top_k=np.int64(2))[0]) == 2
    assert rk.RankOptions(top_k=np.int64(3), candidates=torch.tensor(5).item()).top_k == 3
    assert type(rk.RankOptions(candidates=np.int32(7)).candidates) is int
    for kw in ({"top_k": True}, {"candidates": False}, {"chunk_size": 2.0}, {"stage1_budget": 0}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            rk.RankOptions(**kw)


def test_cli_more_refusals(world, tmp_path, capsys):
    src = tmp_path / "m.jsonl"
    src.write_text(_line("ada smith") + "\n")
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes((_line("ada smith") + "\n").encode("utf-16"))
    (tmp_path / "empty_model").mkdir()
    out = str(tmp_path / "o.jsonl")
    base = {"--model": world["model_dir"], "--kb": world["index_dir"], "--input": str(src), "--output": out}
    cases = [
        (
            {"--input": str(utf16)},
            f"error: --input {utf16} is UTF-16 or UTF-32 encoded (it starts with a byte-order mark): save it as UTF-8",
        ),
        ({"--index_dir": out}, f"error: --output {out} is also --index_dir"),
        ({"--device": "no_such_device"}, "error: --device no_such_device: "),
        (
            {"--model": str(tmp_path / "empty_model")},
            f"error: --model {tmp_path / 'empty_model'}: could not load an OT-MEL model and processor (",
        ),
    ]
    for change, message in cases:
        args = [x for k, v in {**base, **change}.items() for x in (k, v)]
        assert lk.main(args) == 2, change
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (change, err)
    assert not os.path.exists(out)


def test_cli_nan_and_url_lines(world, tmp_path, capsys):
    lines = ['{"mention": "ada smith", "sentence": "x", "id": NaN}', _line("bob jones", "https://example.org/a.jpg")]
    status, rows = _run(world, tmp_path, lines)
    err = capsys.readouterr().err
    assert status == 0 and [r["line"] for r in rows] == [2]
    assert "line 1: invalid JSON (NaN is not a JSON value); skipped" in err
    assert (
        "line 2: unsupported image URL https://example.org/a.jpg (only local files are read: download it first); "
        "linked without image" in err
    )


def test_link_refuses_a_dataframe(world):
    import pandas as pd

    linker = lk.OTMELLinker(world["model"], world["processor"], world["index"], batch_size=4)
    with pytest.raises(TypeError, match=r"pandas DataFrame: pass df.to_dict\('records'\)"):
        linker.link(pd.DataFrame([{"mention": "ada smith", "sentence": "x"}]))


def test_cli_nil_threshold(world, tmp_path, capsys):
    lines = [_line("ada smith"), _line("bob jones")]
    status, rows = _run(world, tmp_path, lines, "--nil_threshold", "2.0")  # above any cosine score: always NIL
    assert status == 0 and all(
        r["candidates"][0] == {"qid": None, "name": None, "nil": True, "score": r["candidates"][1]["score"]}
        for r in rows
    )
    assert all(len(r["candidates"]) == 3 for r in rows)
    status, plain = _run(world, tmp_path, lines, "--nil_threshold", "none")
    assert status == 0 and not any(c.get("nil") for r in plain for c in r["candidates"])
    assert [r["candidates"][1:] for r in rows] == [r["candidates"][:2] for r in plain]
    capsys.readouterr()
    assert _run(world, tmp_path, lines, "--nil_threshold", "high")[0] == 2
    assert "argument --nil_threshold: expected a number, 'config' or 'none', got 'high'" in capsys.readouterr().err


def test_cli_warns_about_flags_it_ignores(world, tmp_path, capsys):
    extra = ("--index_dtype", "res2", "--index_dir", str(tmp_path / "unused"), "--strategy", "exhaustive")
    status, rows = _run(world, tmp_path, [_line("ada smith")], *extra, "--stage1", "exact")
    err = capsys.readouterr().err
    assert status == 0 and len(rows) == 1
    assert "warning: ignored --index_dir (--kb is an index)" in err
    assert "warning: ignored --index_dtype (--kb is an index)" in err
    assert "warning: ignored --stage1 (--strategy exhaustive scores every entity)" in err
    assert not os.path.exists(tmp_path / "unused")


def test_small_inputs_odd_pictures_and_stage1_names(world, tmp_path, caplog):
    from datasets import DatasetDict

    from data_otmel import DataFormatError, load_kb

    batch = world["processor"].process_mentions([], [], images=[])
    assert batch["input_ids"].shape == (0, 0) and batch["pixel_values"].shape[0] == 0
    assert read_image("") == (None, None)  # the MIMIC layout's "no picture"
    image, reason = read_image(b"not a picture")
    assert image is None and "of 13 bytes" in reason and "BytesIO" not in reason
    assert rk.RankOptions(stage1="exact").stage1 == "torch"
    with pytest.raises(ValueError, match="stage1 must be one of auto, exact, ann"):
        rk.RankOptions(stage1="fast")
    rows = {"qid": ["Q1", "Q2"], "name": ["ada smith", "bob jones"], "attributes": ["", ""]}
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert list(load_kb(str(tmp_path / "dd"))["qid"]) == ["Q1", "Q2"]
    with pytest.raises(DataFormatError, match="a model folder, not a KB"):
        load_kb(world["model_dir"])
    (tmp_path / "kb.csv").write_text("qid,name\nQ1,ada smith\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="data_otmel"):
        kb = load_kb(str(tmp_path / "kb.csv"), columns="attributes=name")
    assert kb[0]["attributes"] == "ada smith" and "column 'name' feeds the fields name, attributes" in caplog.text
    linker = lk.OTMELLinker(world["model"], world["processor"], world["index"])
    with pytest.raises(ValueError, match=r"mention\(s\) 1 have an empty 'mention'"):
        linker.link([{"mention": "ada smith"}, {"mention": "  ", "sentence": "a doctor"}])


def test_read_image_turns_pictures_upright_by_their_exif_orientation(tmp_path):
    """A phone JPEG stored sideways with EXIF Orientation 6 ("rotate 90° clockwise to display") is read as displayed,
    as transformers' load_image and datasets read it, from a path, bytes, a datasets dict or an opened PIL image."""
    from PIL import ImageOps

    stored = PILImage.new("RGB", (128, 64), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 64, 64))  # left half blue
    exif = stored.getexif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif)
    with PILImage.open(path) as opened:
        displayed = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    assert displayed.shape[:2] == (128, 64)  # upright: taller than wide, blue on top
    for source in (str(path), path.read_bytes(), {"bytes": path.read_bytes(), "path": None}, PILImage.open(path)):
        image, reason = read_image(source)
        assert reason is None and image.size == (64, 128), type(source)
        np.testing.assert_array_equal(np.asarray(image), displayed)
    # No orientation tag, or the upright one: pixels as stored.
    plain = tmp_path / "plain.png"
    stored.save(plain)
    assert read_image(str(plain))[0].size == (128, 64)


def test_read_image_reads_file_urls_as_local_paths(tmp_path):
    folder = tmp_path / "with space"
    folder.mkdir()
    path = folder / "pic é.png"
    PILImage.new("RGB", (20, 10), (0, 128, 0)).save(path)
    from urllib.parse import quote

    for url in (path.as_uri(), "file://" + quote(str(path)), "file://localhost" + quote(str(path))):
        image, reason = read_image(url)
        assert reason is None and image.size == (20, 10), url
    assert read_image(path.as_uri() + ".missing") == (None, f"missing file {path}.missing")
    # Other URLs (a file:// URL of another host included) stay refused: only local files are read.
    for url in ("https://example.org/a.jpg", "file://server/share/a.png"):
        assert read_image(url) == (None, f"unsupported image URL {url} (only local files are read: download it first)")
