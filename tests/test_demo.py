"""demo.py's care of the user's folders (it replaces only its own output and writes a world only where it may) and its
summary, with run_mel.py replaced by a stand-in (the real demo trains for minutes; `make demo` runs it)."""

import json
import os
import subprocess
import sys

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import demo  # noqa: E402
from datasets_scripts.make_synthetic import generate  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "world"
    generate(path, entities=14, mentions=40, seed=2, image_size=16, workers=1)
    return path


@pytest.fixture
def commands(monkeypatch):
    """Runs of make_synthetic.py and run_mel.py recorded, not run: run_mel.py's stand-in writes the results the demo
    reads; the check that the model loads does nothing."""
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        if argv[1].endswith("run_mel.py"):
            out = argv[argv.index("--output_dir") + 1]
            os.makedirs(out, exist_ok=True)
            results = {f"test_{k}": 0.5 for k in ("hits@1", "hits@3", "hits@5", "mrr")}
            with open(os.path.join(out, "all_results.json"), "w") as f:
                json.dump({**results, "test_n": 6}, f)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    return calls


def run_demo(monkeypatch, *args):
    """`python demo.py ARGS`: its exit status."""
    monkeypatch.setattr(sys, "argv", ["demo.py", *map(str, args)])
    return demo.main()


def test_refuses_to_delete_a_folder_it_did_not_write(world, tmp_path, capsys, monkeypatch, commands):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert run_demo(monkeypatch, "--world_dir", world, "--output_dir", out) == 2
    assert commands == []
    assert f"error: --output_dir {out} is not empty and was not written by the demo" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    # Its own earlier output may be replaced; so may a folder written by a demo before the marker (its run settings
    # name the world); another run's folder may not.
    demo.check_output_dir(str(out), str(world), overwrite=True)
    (out / demo.DEMO_MARKER).write_text("{}")
    demo.check_output_dir(str(out), str(world))
    (out / demo.DEMO_MARKER).unlink()
    (out / "run_settings.json").write_text(json.dumps({"dataset_name": str(world) + os.sep}))
    demo.check_output_dir(str(out), str(world))
    (out / "run_settings.json").write_text(json.dumps({"dataset_name": "org/wikimel"}))
    with pytest.raises(ValueError, match="not written by the demo"):
        demo.check_output_dir(str(out), str(world))


def test_refuses_to_write_a_world_into_someone_elses_folder(tmp_path, capsys, monkeypatch, commands):
    data = tmp_path / "my_mimic_data"
    data.mkdir()
    (data / "kb_entity.json").write_text("[]")
    assert run_demo(monkeypatch, "--world_dir", data, "--output_dir", tmp_path / "out") == 2
    assert commands == []
    assert f"error: {data} is not empty and holds no world of make_synthetic.py" in capsys.readouterr().err
    assert sorted(os.listdir(data)) == ["kb_entity.json"] and (data / "kb_entity.json").read_text() == "[]"
    assert not (tmp_path / "out").exists()


def test_existing_world_settings_and_real_kb_size(world, tmp_path, monkeypatch, capsys, commands):
    """An existing world is used as it is: --entities / --mentions / --seed that differ are named in a warning, and
    the summary gives the size of the KB ranked, not --entities."""
    out = tmp_path / "out"
    args = ["--entities", 50, "--mentions", 40, "--world_dir", world, "--output_dir", out]
    code = run_demo(monkeypatch, *args, "--", "--max_steps", 1)
    captured = capsys.readouterr()
    assert "ignoring --entities 50 (the world has 14)" in captured.err
    assert "--mentions" not in captured.err  # the same as the world's: nothing to say
    kb_size = len(json.loads((world / "kb_entity.json").read_text()))
    assert f"ranked against the whole KB ({kb_size} entities)" in captured.out
    assert not any(argv[1].endswith("make_synthetic.py") for argv in commands)  # the world was not regenerated
    assert commands[0][-2:] == ["--max_steps", "1"]
    assert code == 0 and (out / demo.DEMO_MARKER).is_file()
    # The demo's own output is replaced by the next demo without --overwrite.
    assert run_demo(monkeypatch, *args) == 0
