"""run_mel.py end to end on a small synthetic world: outputs, metrics, resume, and the multi-process paths (gloo, CPU)."""

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = ["--tiny_hidden_size", "32", "--tiny_vocab_size", "600", "--hidden_size", "16", "--report_to", "none"]
SCHEDULE = [
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "64",
    "--kb_batch_size",
    "64",
    "--learning_rate",
    "2e-3",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "2",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from datasets_scripts.make_synthetic import generate

    raw = tmp_path_factory.mktemp("world")
    generate(raw, entities=120, mentions=260, seed=1, workers=1)
    return str(raw)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from tiny_clip import build_tiny_clip

    texts = [f"name {i} attribute {i} sentence about {i} things" for i in range(20)]
    return build_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")), texts, vocab_size=300, hidden_size=32)


def run(args, cache, env_extra=None, launcher=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "run_mel.py"), "--data_cache_dir", cache, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_eval_predict_outputs(world, tmp_path):
    out = tmp_path / "run"
    cache = str(tmp_path / "cache")
    run(
        [
            "--dataset_name",
            world,
            "--output_dir",
            str(out),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--num_train_epochs",
            "2",
            "--eval_every_epochs",
            "1",
            *TINY,
            *SCHEDULE,
        ],
        cache,
    )
    results = json.loads((out / "all_results.json").read_text())
    for split in ("eval", "test"):
        for key in ("hits@1", "hits@3", "hits@5", "hits@10", "hits@20", "mrr", "stage1_recall@50"):
            assert 0.0 <= results[f"{split}_{key}"] <= 1.0
        assert results[f"{split}_hits@1"] <= results[f"{split}_hits@3"] <= results[f"{split}_hits@20"]
    rows = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == results["test_n"] and rows
    for row in rows:
        assert set(row) == {"id", "gold", "rank", "predictions"} and len(row["predictions"]) == 10
        scores = [p["score"] for p in row["predictions"]]
        assert scores == sorted(scores, reverse=True)
        if row["rank"] <= 10:
            assert row["predictions"][row["rank"] - 1]["qid"] == row["gold"] or any(
                p["qid"] == row["gold"] for p in row["predictions"]
            )
    hits1 = sum(r["predictions"][0]["qid"] == r["gold"] for r in rows) / len(rows)
    assert hits1 == pytest.approx(results["test_hits@1"])
    # Every loss term reached the logs.
    state = json.loads((out / "trainer_state.json").read_text())
    logged = set().union(*[entry.keys() for entry in state["log_history"]])
    assert {"loss", "loss_o", "loss_f", "loss_t", "loss_v", "loss_r", "eval_mrr"} <= logged
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "MRR" in card
    # The saved folder loads through the Auto classes in a fresh process outside the repository.
    code = (
        "import sys; from transformers import AutoModel, AutoProcessor; "
        "m = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True); print(type(m).__name__, type(p).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd="/",
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.stdout.split() == ["OTMELModel", "OTMELProcessor"], proc.stderr[-2000:]
    assert (out / "sinkhorn_otmel.py").is_file()  # the solver module travels with the remote code


def test_resume_matches_uninterrupted(world, tmp_path):
    cache = str(tmp_path / "cache")
    common = [
        "--dataset_name",
        world,
        "--do_train",
        "--do_eval",
        "--max_steps",
        "6",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--save_total_limit",
        "5",
        "--load_best_model_at_end",
        "false",
        *TINY,
        *SCHEDULE,
    ]
    full = tmp_path / "full"
    run(common + ["--output_dir", str(full)], cache)
    interrupted = tmp_path / "interrupted"
    run(common + ["--output_dir", str(interrupted)], cache)
    # Simulate a crash after the first checkpoint: drop everything written later, then resume.
    for name in os.listdir(interrupted):
        if name != "checkpoint-3":
            path = interrupted / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(
        common + ["--output_dir", str(interrupted), "--resume_from_checkpoint", str(interrupted / "checkpoint-3")],
        cache,
    )
    a = json.loads((full / "all_results.json").read_text())
    b = json.loads((interrupted / "all_results.json").read_text())
    for key in ("eval_hits@1", "eval_hits@5", "eval_mrr"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(interrupted / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world_size, port, batch, expected, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = torch.load(batch["model_path"], weights_only=False)
        model.train()
        size = batch["mention_input_ids"].shape[0] // world_size
        local = {k: v[rank * size : (rank + 1) * size] for k, v in batch.items() if k != "model_path"}
        out = model(**local, gather_across_processes=True)
        losses = [torch.zeros(()) for _ in range(world_size)]
        torch.distributed.all_gather(losses, out.loss.detach())
        queue.put((rank, float(torch.stack(losses).mean()), expected))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("pairwise_negatives", [0, 3])
def test_in_batch_negatives_gathered_across_processes(tiny_clip_dir, tmp_path, pairwise_negatives):
    """Two gloo processes, each with half the batch, give the loss of one process holding the whole batch."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from modeling_otmel import OTMELModel
    from processing_otmel import OTMELProcessor

    torch.manual_seed(0)
    model = OTMELModel.from_clip(tiny_clip_dir, hidden_size=16, pairwise_negatives=pairwise_negatives)
    processor = OTMELProcessor(
        AutoImageProcessor.from_pretrained(tiny_clip_dir), AutoTokenizer.from_pretrained(tiny_clip_dir)
    )
    n = 8
    images = [Image.new("RGB", (40, 40), (30 * i, 255 - 20 * i, 90)) if i % 3 else None for i in range(n)]
    m = processor.process_mentions(
        [f"name {i}" for i in range(n)], [f"sentence about {i} things" * (i % 3 + 1) for i in range(n)], images
    )
    e = processor.process_entities(
        [f"name {i % 6}" for i in range(n)], [f"attribute {i % 6}" for i in range(n)], images[::-1]
    )
    pad = processor.max_text_length
    batch = {}
    for side, inputs in (("mention", m), ("entity", e)):
        ids = torch.full((n, pad), processor.tokenizer.pad_token_id)
        mask = torch.zeros((n, pad), dtype=torch.long)
        ids[:, : inputs["input_ids"].shape[1]] = inputs["input_ids"]
        mask[:, : inputs["attention_mask"].shape[1]] = inputs["attention_mask"]
        batch.update(
            {
                f"{side}_input_ids": ids,
                f"{side}_attention_mask": mask,
                f"{side}_pixel_values": inputs["pixel_values"],
                f"{side}_has_image": inputs["has_image"],
            }
        )
    batch["entity_ids"] = torch.tensor([i % 6 for i in range(n)])  # duplicates across the two halves
    model.train()
    expected = model(**batch).loss.item()
    path = str(tmp_path / "model.pt")
    torch.save(model, path)
    batch["model_path"] = path
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    torch.multiprocessing.start_processes(
        _gather_worker, args=(2, _free_port(), batch, expected, queue), nprocs=2, start_method="spawn"
    )
    results = [queue.get() for _ in range(2)]
    for _, gathered, single in results:
        assert gathered == pytest.approx(single, rel=1e-5, abs=1e-5)


def test_whole_kb_evaluation_split_across_processes(world, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) evaluates with the metrics of a single process."""
    cache = str(tmp_path / "cache")
    trained = tmp_path / "trained"
    run(
        [
            "--dataset_name",
            world,
            "--output_dir",
            str(trained),
            "--do_train",
            "--max_steps",
            "2",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
            *TINY,
            *SCHEDULE,
        ],
        cache,
    )
    evaluate = [
        "--dataset_name",
        world,
        "--model_name_or_path",
        str(trained),
        "--do_eval",
        "--do_predict",
        "--report_to",
        "none",
        "--kb_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "16",
    ]
    single = tmp_path / "single"
    run(evaluate + ["--output_dir", str(single)], cache)
    double = tmp_path / "double"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    run(evaluate + ["--output_dir", str(double)], cache, launcher=torchrun)
    a = json.loads((single / "all_results.json").read_text())
    b = json.loads((double / "all_results.json").read_text())
    for key in ("eval_hits@1", "eval_hits@10", "eval_mrr", "test_hits@1", "test_mrr", "test_n"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    ranks_a = [json.loads(line)["rank"] for line in (single / "predictions_test.jsonl").read_text().splitlines()]
    ranks_b = [json.loads(line)["rank"] for line in (double / "predictions_test.jsonl").read_text().splitlines()]
    assert ranks_a == ranks_b


# ---------------------------------------------------------------------------------------------------------------
# Nothing silent: a command line that cannot do what it says is refused, a default never contradicts a flag the user
# gave, and what the script decides for the user (resume, smaller batch, CPU) is said.
# ---------------------------------------------------------------------------------------------------------------


def usage_error(argv, capsys) -> str:
    """Runs the `otmel-train` entry point in-process; it must refuse with status 2. Returns what it printed."""
    import run_mel

    try:
        status = getattr(run_mel, "console_main", run_mel.main)(argv)  # (run_mel.py before the entry point: main)
    except SystemExit as exit:  # argparse
        status = exit.code
    assert status == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def converted(world, tmp_path_factory):
    """The world as a converted dataset folder, and the cache (with its tiny CLIP) the in-process runs share."""
    from run_mel import load_mel_dataset

    cache = str(tmp_path_factory.mktemp("cache"))
    _, _, path = load_mel_dataset(world, cache)
    return path, cache


def write_dataset(folder, mentions: dict, kb):
    """A dataset folder in the converted layout (parquet files and a README whose configs are mentions and kb)."""
    lines = ["---", "configs:"]
    for config, splits in (("mentions", mentions), ("kb", {"train": kb})):
        lines += [f"- config_name: {config}", "  data_files:"]
        os.makedirs(folder / "data" / config)
        for split, data in splits.items():
            data.to_parquet(str(folder / "data" / config / f"{split}.parquet"))
            lines += [f"  - split: {split}", f"    path: data/{config}/{split}.parquet"]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))
    return str(folder)


def in_process(argv, cache):
    import run_mel

    return run_mel.main([*TINY, *SCHEDULE, "--data_cache_dir", cache, *argv])  # argv last: its flags win


OUT = ["--output_dir", "/nonexistent/otmel-out"]  # never written: every command below is refused first


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset_name", "x", "--do_train"], "--output_dir is required"),
        (["--dataset_name", "x", *OUT, "--do_train", "--mode", "otx"], "invalid choice: 'otx'"),
        (["--dataset_name", "x", *OUT], "nothing to do: pass --do_train, --do_eval and/or --do_predict"),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--num_train_epochs", "0"],
            "--num_train_epochs 0 trains nothing",
        ),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--num_train_epochs", "-2"],
            "--num_train_epochs -2 trains nothing",
        ),
        (["--dataset_name", "x", *OUT, "--do_train", "--candidates", "0"], "--candidates 0: must be a positive"),
        (["--dataset_name", "x", *OUT, "--do_train", "--max_train_samples", "0"], "--max_train_samples 0: must be"),
        (["--dataset_name", "x", *OUT, "--do_train", "--eval_every_epochs", "0"], "--eval_every_epochs 0: must be"),
        (["--dataset_name", "x", *OUT, "--do_train", "--predict_top_k", "0"], "--predict_top_k 0: must be"),
        (["--dataset_name", "x", *OUT, "--do_train", "--learning_rate", "0"], "--learning_rate 0.0: must be > 0"),
        (["--dataset_name", "x", *OUT, "--do_train", "--strategy", "fast"], "--strategy 'fast' is invalid"),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--lerning_rate", "1"],
            "not used by the HfArgumentParser: ['--lerning_rate'",
        ),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--fusion_assignment", "otx"],
            "fusion_assignment='otx' is invalid",
        ),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--clip_model", "a", "--model_name_or_path", "b"],
            "exclude each other",
        ),
        (
            ["--dataset_name", "x", *OUT, "--do_predict"],
            "--do_predict without --do_train or --model_name_or_path would rank with an untrained model",
        ),
        (["--dataset_name", "x", *OUT, "--do_eval", "--do_predict"], "--do_eval and --do_predict without --do_train"),
        (
            ["--dataset_name", "x", *OUT, "--do_eval", "--model_name_or_path", "/nonexistent/model"],
            "--model_name_or_path /nonexistent/model: no OT-MEL checkpoint there",
        ),
        (
            [
                "--dataset_name",
                "x",
                *OUT,
                "--do_train",
                "--eval_strategy",
                "steps",
                "--save_strategy",
                "epoch",
                "--load_best_model_at_end",
                "true",
            ],
            "--load_best_model_at_end requires the save and eval strategy to match",
        ),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--per_device_train_batch_size", "1"],
            "a batch needs at least 2 mentions",
        ),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--resume_from_checkpoint", "/nonexistent/checkpoint-3"],
            "--resume_from_checkpoint /nonexistent/checkpoint-3: no such folder",
        ),
        (
            ["--dataset_name", "x", *OUT, "--do_train", "--clip_model", "/nonexistent/clip"],
            "--clip_model /nonexistent/clip: no CLIP checkpoint there (OSError",
        ),
    ],
)
def test_refused_before_anything_is_loaded(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def test_untrained_model_refusal_names_the_ways_out(capsys):
    err = usage_error(["--dataset_name", "x", *OUT, "--do_predict"], capsys)
    for flag in ("--model_name_or_path", "--do_train", "--clip_model", "--mode clip", "--allow_untrained"):
        assert flag in err


def test_a_clip_checkpoint_is_not_an_otmel_one(tiny_clip_dir, capsys):
    err = usage_error(["--dataset_name", "x", *OUT, "--do_eval", "--model_name_or_path", tiny_clip_dir], capsys)
    assert "is a 'clip' checkpoint, not an OT-MEL one" in err and "--clip_model" in err


def test_dataset_that_is_not_there_is_not_looked_up_on_the_hub(tmp_path, capsys):
    expected = "Expected a dataset id on the Hub, a folder made by datasets_scripts/convert_mimic.py"
    missing = tmp_path / "data" / "nope"
    err = usage_error(["--dataset_name", str(missing), *OUT, "--do_train"], capsys)
    assert f"no such folder ({missing})" in err and expected in err and "Couldn't reach" not in err
    # Relative, first folder present here: a local path, not a Hub id.
    (tmp_path / "data").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        err = usage_error(["--dataset_name", "data/nope", *OUT, "--do_train"], capsys)
    finally:
        os.chdir(cwd)
    assert f"no such folder ({missing})" in err and "Couldn't reach" not in err
    # A folder that is neither a converted dataset nor a MIMIC-layout folder.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    err = usage_error(["--dataset_name", str(tmp_path / "notes"), *OUT, "--do_train"], capsys)
    assert f"the folder {tmp_path / 'notes'} is not a dataset this script reads" in err and expected in err
    err = usage_error(["--dataset_name", str(tmp_path / "notes" / "a.txt"), *OUT, "--do_train"], capsys)
    assert "is a file, not a dataset" in err


def test_entry_point_exits_2_with_the_message_and_no_traceback(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "run_mel.py"), "--dataset_name", "x", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "nothing to do" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_only_with_the_same_settings(converted, tmp_path, caplog):
    """A finished run in --output_dir: the same command resumes it (said at WARNING), other settings are refused,
    --overwrite_output_dir trains afresh."""
    from safetensors.torch import load_file

    path, cache = converted
    out = tmp_path / "run"
    # (--load_best_model_at_end false: needless now, but lets run_mel.py before this check reach the resume.)
    argv = [
        "--dataset_name",
        path,
        "--output_dir",
        str(out),
        "--do_train",
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--load_best_model_at_end",
        "false",
    ]
    in_process(argv, cache)
    first = load_file(str(out / "model.safetensors"))

    with pytest.raises(ValueError) as refused:  # run_mel.UsageError
        in_process(argv + ["--mode", "att", "--learning_rate", "5e-5"], cache)
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["learning_rate"] == 2e-3 and settings["mode"] == "ot" and settings["total_train_batch_size"] == 16
    message = str(refused.value)
    for part in (
        f"--output_dir {out} holds checkpoints of a run with other settings",
        "learning_rate: 0.002 there, 5e-05 now",
        "mode: 'ot' there, 'att' now",
        "fusion_assignment: 'ot' there, 'attention' now",
        "step 2 of 2",
        "--overwrite_output_dir",
        f"--resume_from_checkpoint {out / 'checkpoint-2'}",
    ):
        assert part in message
    assert json.loads((out / "run_settings.json").read_text()) == settings  # nothing written

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        in_process(argv, cache)
    resumed = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Resuming" in r.getMessage()]
    assert resumed and f"from {out / 'checkpoint-2'} (step 2 of 2; that run is complete" in resumed[0]
    # Nothing trained: transformers alone would train a third step past the schedule (and save checkpoint-3).
    assert any("is complete (step 2 of 2): no step is trained" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        in_process(argv + ["--mode", "att", "--learning_rate", "5e-5", "--overwrite_output_dir"], cache)
    assert any("--overwrite_output_dir: training afresh" in r.getMessage() for r in caplog.records)
    assert not any("Resuming" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "run_settings.json").read_text())["mode"] == "att"
    assert json.loads((out / "config.json").read_text())["fusion_assignment"] == "attention"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and any(
        entry.get("step") == 2 and "loss" in entry for entry in state["log_history"]
    )
    second = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first if k in second)


def _fake_checkpoint(folder, step, damage=None):
    """A checkpoint folder as Trainer leaves it, as far as run_mel checks: trainer_state.json and model.safetensors.
    `damage`: "weights" (truncated model.safetensors), "optimizer" (truncated optimizer.pt), "empty" (no file)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if damage == "empty":
        return str(folder)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 100}))
    save_file({"w": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    torch.save({"lr": 1.0}, str(folder / "optimizer.pt"))
    if damage:
        damaged = folder / {"weights": "model.safetensors", "optimizer": "optimizer.pt"}[damage]
        whole = damaged.read_bytes()
        damaged.write_bytes(whole[: len(whole) // 2])
    return str(folder)


def _settings_of(argv, mentions=None, kb=None):
    import run_mel

    model_args, data_args, training_args, _, _ = run_mel.parse_arguments(argv)
    return training_args, run_mel.run_settings(model_args, data_args, training_args, mentions, kb)


def test_damaged_checkpoints_are_skipped_or_refused(tmp_path, caplog, capsys):
    """Resuming on its own, run_mel skips (with a warning naming each and why) the checkpoints Trainer could not load
    and resumes from the newest whole one; with none whole it trains afresh, saying so. A damaged checkpoint given with
    --resume_from_checkpoint is refused."""
    import run_mel

    out = tmp_path / "run"
    training_args, settings = _settings_of(["--dataset_name", "x", "--output_dir", str(out), "--do_train", *TINY])
    good = _fake_checkpoint(out / "checkpoint-2", 2)
    truncated = _fake_checkpoint(out / "checkpoint-4", 4, damage="weights")
    empty = _fake_checkpoint(out / "checkpoint-6", 6, damage="empty")
    (out / run_mel.RUN_SETTINGS_NAME).write_text(json.dumps(settings))  # as the run that wrote them
    with caplog.at_level(logging.WARNING):
        assert run_mel.resume_point(training_args, settings) == good
    said = [r.getMessage() for r in caplog.records]
    assert any(f"Skipping {empty}: it cannot be resumed from (no trainer_state.json" in m for m in said)
    assert any(
        f"Skipping {truncated}: it cannot be resumed from (model.safetensors is unreadable (SafetensorError" in m
        for m in said
    )
    assert any(f"Resuming the run in {out} from {good} (step 2 of 100)" in m for m in said)
    # When training starts, the skipped ones are moved aside (kept, out of Trainer's rotation and the next search).
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_mel.start_run(training_args, settings, good)
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == [
            "checkpoint-2",
            "damaged-checkpoint-4",
            "damaged-checkpoint-6",
        ]
        assert run_mel.resume_point(training_args, settings) == good
    said = [r.getMessage() for r in caplog.records]
    assert f"Moved {truncated} aside to {out / 'damaged-checkpoint-4'}" in said and not any(
        "Skipping" in m for m in said
    )
    shutil.move(out / "damaged-checkpoint-4", truncated)
    _fake_checkpoint(out / "checkpoint-6", 6, damage="empty")

    err = usage_error(
        ["--dataset_name", "x", "--output_dir", str(out), "--do_train", "--resume_from_checkpoint", truncated], capsys
    )
    assert err.startswith(f"error: --resume_from_checkpoint {truncated}: not a checkpoint to resume from (")
    assert "model.safetensors is unreadable" in err and len(err.strip().splitlines()) == 1

    shutil.rmtree(good)
    _fake_checkpoint(out / "checkpoint-2", 2, damage="optimizer")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run_mel.resume_point(training_args, settings) is None
    said = [r.getMessage() for r in caplog.records]
    assert any(
        f"Skipping {good}: it cannot be resumed from (optimizer.pt is not a whole torch file" in m for m in said
    )
    assert any(f"None of the 3 checkpoint(s) in {out} can be resumed from: training afresh" in m for m in said)


def test_resume_compares_effective_settings(tmp_path):
    """A setting given at its default compares equal to one left out, also with a run_settings.json written when only
    the given settings were recorded; another value differs."""
    import run_mel

    out = tmp_path / "run"
    argv = ["--dataset_name", "x", "--output_dir", str(out), "--do_train", "--report_to", "none"]
    training_args, settings = _settings_of(argv)
    _, explicit = _settings_of(argv + ["--pooling", "softpool", "--hidden_size", "32", "--ot_epsilon", "0.1"])
    assert explicit == settings and settings["pooling"] == "softpool" and settings["hidden_size"] == 32
    # As run_mel.py wrote it before: the model settings neither given nor set by --mode left out.
    old = {k: v for k, v in settings.items() if k not in ("pooling", "hidden_size", "ot_epsilon", "kd_weight")}
    out.mkdir()
    (out / "run_settings.json").write_text(json.dumps(old))
    before = run_mel._read_run_settings(str(out))
    assert run_mel._settings_differences(before, explicit) == ""
    _, other = _settings_of(argv + ["--pooling", "mean"])
    assert run_mel._settings_differences(before, other) == "pooling: 'softpool' there, 'mean' now"
    _fake_checkpoint(out / "checkpoint-2", 2)
    assert run_mel.resume_point(training_args, explicit) == str(out / "checkpoint-2")
    with pytest.raises(run_mel.UsageError, match="pooling: 'softpool' there, 'mean' now"):
        run_mel.resume_point(training_args, other)


def test_resume_refused_when_the_data_changed(converted, tmp_path, monkeypatch):
    """The run's settings hold a fingerprint of the training data and KB: the same data loaded again compares equal,
    data rewritten with fewer mentions is refused, naming it."""
    import datasets

    import run_mel

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    path, cache = converted
    mentions, kb, _ = run_mel.load_mel_dataset(path, cache)
    data = write_dataset(tmp_path / "data", dict(mentions), kb)
    out = tmp_path / "run"
    argv = ["--dataset_name", data, "--output_dir", str(out), "--do_train", *TINY]
    before = run_mel.load_mel_dataset(data, cache)[:2]
    training_args, settings = _settings_of(argv, *before)
    assert _settings_of(argv, *run_mel.load_mel_dataset(data, cache)[:2])[1] == settings
    run_mel.start_run(training_args, settings)
    checkpoint = _fake_checkpoint(out / "checkpoint-2", 2)
    assert run_mel.resume_point(training_args, settings) == checkpoint

    shutil.rmtree(data)  # the same folder, rewritten unchanged (new files and times: other datasets fingerprints)
    write_dataset(tmp_path / "data", dict(mentions), kb)
    again = run_mel.load_mel_dataset(data, cache)[:2]
    assert again[1]._fingerprint != before[1]._fingerprint or again[1].cache_files != before[1].cache_files
    assert _settings_of(argv, *again)[1] == settings
    assert run_mel.resume_point(training_args, settings) == checkpoint

    shutil.rmtree(data)  # the same folder, rewritten in place with 70 training mentions
    write_dataset(tmp_path / "data", {**mentions, "train": mentions["train"].select(range(70))}, kb)
    changed_mentions, changed_kb, _ = run_mel.load_mel_dataset(data, cache)
    assert len(changed_mentions["train"]) == 70
    _, changed = _settings_of(argv, changed_mentions, changed_kb)
    assert {k for k in settings if settings[k] != changed[k]} == {"data_content"}
    with pytest.raises(run_mel.UsageError) as refused:
        run_mel.resume_point(training_args, changed)
    message = str(refused.value)
    assert f"--output_dir {out} holds checkpoints of a run with other settings (data_content: " in message
    assert "its training mentions or KB have changed since" in message
    # A run_settings.json of an earlier run_mel.py holds a key of the files' names and times: not compared.
    legacy = {**settings, "data_fingerprint": "0123456789abcdef"}
    legacy.pop("data_content")
    assert run_mel._settings_differences(legacy, settings) == ""

    # The offline tiny CLIP's tokenizer is trained on the new text, not taken from the cache of the old.
    import tiny_clip

    def fake_build(path, texts, **kwargs):
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write(str(len(texts)))

    monkeypatch.setattr(tiny_clip, "build_tiny_clip", fake_build)
    model_args = run_mel.parse_arguments(argv)[0]
    old_clip = run_mel.tiny_clip_for(*before, model_args, 0, str(tmp_path / "clips"))
    new_clip = run_mel.tiny_clip_for(changed_mentions, changed_kb, model_args, 0, str(tmp_path / "clips"))
    assert old_clip != new_clip and run_mel.tiny_clip_for(*before, model_args, 0, str(tmp_path / "clips")) == old_clip


def test_no_validation_split_with_do_eval_says_so(converted, tmp_path, capsys):
    import datasets

    path, cache = converted
    mentions = datasets.load_dataset(path, "mentions")
    kb = datasets.load_dataset(path, "kb")["train"]
    no_dev = write_dataset(tmp_path / "no_dev", {"train": mentions["train"], "test": mentions["test"]}, kb)
    argv = [*TINY, "--data_cache_dir", cache, "--dataset_name", no_dev, "--output_dir", str(tmp_path / "o")]
    err = usage_error(argv + ["--do_train", "--do_eval", "--eval_strategy", "no"], capsys)
    assert "has no 'validation' split (has: train, test); --do_eval needs it: drop --do_eval, or add the split" in err
    assert "pass --eval_strategy no" not in err
    err = usage_error(argv + ["--do_train", "--do_eval"], capsys)
    assert "--do_eval needs it: drop --do_eval and pass --eval_strategy no to train without evaluation" in err
    err = usage_error(argv + ["--do_train"], capsys)
    assert "has no 'validation' split (has: train, test); pass --eval_strategy no to train without evaluation" in err


def test_small_training_split_shrinks_the_batch(converted, tmp_path, caplog):
    import run_mel

    path, cache = converted
    argv = [
        "--dataset_name",
        path,
        "--do_train",
        "--num_train_epochs",
        "2",
        "--eval_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
    ]
    with caplog.at_level(logging.WARNING):
        metrics = in_process(argv + ["--output_dir", str(tmp_path / "a"), "--max_train_samples", "10"], cache)
    assert any("Only 10 training mentions, fewer than one batch of 16" in r.getMessage() for r in caplog.records)
    state = json.loads((tmp_path / "a" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and metrics["train_loss"] > 0  # one batch of 10 per epoch
    with pytest.raises(run_mel.UsageError, match="1 training mention"):
        in_process(argv + ["--output_dir", str(tmp_path / "b"), "--max_train_samples", "1"], cache)


def test_one_evaluation_flag_sets_the_saving_to_match(converted, tmp_path):
    """`--eval_strategy steps --eval_steps 2` alone: the default save_strategy (epoch) and load_best_model_at_end
    follow, instead of contradicting it."""
    path, cache = converted
    out = tmp_path / "run"
    in_process(
        [
            "--dataset_name",
            path,
            "--output_dir",
            str(out),
            "--do_train",
            "--max_steps",
            "4",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
        ],
        cache,
    )
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_mrr" in e] == [2, 4]
    assert sorted(os.listdir(out / "checkpoint-2")) and (out / "checkpoint-4").is_dir()
    assert state["best_model_checkpoint"] in (str(out / "checkpoint-2"), str(out / "checkpoint-4"))


def test_explicit_strategies_that_differ_turn_load_best_off(tmp_path):
    from run_mel import parse_arguments

    model_args, data_args, args, given, notes = parse_arguments(
        [
            "--dataset_name",
            "x",
            "--output_dir",
            str(tmp_path),
            "--do_train",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "3",
            "--save_strategy",
            "epoch",
        ]
    )
    assert not args.load_best_model_at_end and args.eval_strategy == "steps" and args.save_strategy == "epoch"
    assert any(level == logging.WARNING and "--load_best_model_at_end false" in note for level, note in notes)
    # --save_strategy steps alone: evaluation follows, at the same steps.
    _, _, args, _, _ = parse_arguments(
        [
            "--dataset_name",
            "x",
            "--output_dir",
            str(tmp_path),
            "--do_train",
            "--save_strategy",
            "steps",
            "--save_steps",
            "6",
        ]
    )
    assert (args.eval_strategy, args.eval_steps, args.save_steps, args.load_best_model_at_end) == ("steps", 6, 6, True)
    # Without --do_train nothing is evaluated unless asked (the epoch default turned --do_eval on).
    _, _, args, _, _ = parse_arguments(["--dataset_name", "x", "--output_dir", str(tmp_path), "--do_predict"])
    assert not args.do_eval and args.eval_strategy == "no"
    # The same from a JSON file of settings.
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "dataset_name": "x",
                "output_dir": str(tmp_path),
                "do_train": True,
                "eval_strategy": "steps",
                "eval_steps": 4,
            }
        )
    )
    _, _, args, given, _ = parse_arguments([str(settings)])
    assert (args.save_strategy, args.save_steps, args.load_best_model_at_end) == ("steps", 4, True)
    settings.write_text(json.dumps({"dataset_name": "x", "do_train": True}))
    with pytest.raises(SystemExit):
        parse_arguments([str(settings)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only set-up")
def test_bf16_on_a_cpu_only_machine_runs_on_the_cpu(converted, tmp_path, caplog):
    path, cache = converted
    with caplog.at_level(logging.INFO, logger="run_mel"):
        metrics = in_process(
            [
                "--dataset_name",
                path,
                "--output_dir",
                str(tmp_path),
                "--do_train",
                "--max_steps",
                "1",
                "--eval_strategy",
                "no",
                "--bf16",
                "--log_level",
                "info",
            ],
            cache,
        )
    assert any(
        "--bf16 without a bf16 GPU: running in bfloat16 on the CPU (--use_cpu true)" in r.getMessage()
        for r in caplog.records
    )
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0


def test_dirty_dataset_folders(converted, tmp_path, caplog, monkeypatch):
    """A KB without pictures trains, with a counted warning; a missing answer column or an empty validation split is
    refused with a message naming the dataset."""
    import datasets

    import run_mel

    # datasets 5.2 caches a local folder under its base name, whatever its path and content: a cache of its own.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    path, cache = converted
    mentions = datasets.load_dataset(path, "mentions")
    kb = datasets.load_dataset(path, "kb")["train"]
    common = ["--do_train", "--max_steps", "1", "--eval_strategy", "no", "--load_best_model_at_end", "false"]

    no_pictures = write_dataset(tmp_path / "no_pictures", dict(mentions), kb.remove_columns(["image"]))
    with caplog.at_level(logging.WARNING):
        in_process(["--dataset_name", no_pictures, "--output_dir", str(tmp_path / "a"), *common], cache)
    assert any(
        f"KB has no image column: all {len(kb)} entities without picture" in r.getMessage() for r in caplog.records
    )

    no_answer = write_dataset(
        tmp_path / "no_answer", {k: v.remove_columns(["answer"]) for k, v in mentions.items()}, kb
    )
    with pytest.raises(
        run_mel.UsageError,
        match=r"no_answer: the 'train' mentions lack\(s\) the column\(s\) answer; "
        r"columns found: id, mention, sentence, image",
    ):
        in_process(["--dataset_name", no_answer, "--output_dir", str(tmp_path / "b"), *common], cache)

    # Every validation answer absent from the KB: the split is empty once those are skipped.
    unlinkable = mentions["validation"].map(lambda row: {"answer": "Q-not-in-the-KB"})
    empty = write_dataset(tmp_path / "empty_validation", {**mentions, "validation": unlinkable}, kb)
    with pytest.raises(
        run_mel.UsageError, match="the 'validation' split has no mention left to use; pass --eval_strategy no"
    ):
        in_process(
            ["--dataset_name", empty, "--output_dir", str(tmp_path / "c"), "--do_train", "--max_steps", "1"], cache
        )


def test_ignored_flags_and_replaced_checkpoint_settings_are_said(converted, tmp_path, caplog, monkeypatch):
    """Flags that change nothing in this run, checkpoint settings the command line replaces, and KB rows repeating a
    qid are warned about."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    path, cache = converted
    kb = datasets.load_dataset(path, "kb")["train"]
    mentions = datasets.load_dataset(path, "mentions")
    doubled = write_dataset(
        tmp_path / "doubled_kb", dict(mentions), datasets.concatenate_datasets([kb, kb.select(range(3))])
    )
    trained = tmp_path / "trained"
    with caplog.at_level(logging.WARNING):
        in_process(
            [
                "--dataset_name",
                doubled,
                "--output_dir",
                str(trained),
                "--do_train",
                "--max_steps",
                "1",
                "--eval_strategy",
                "no",
                "--load_best_model_at_end",
                "false",
                "--eval_every_epochs",
                "2",
                "--strategy",
                "exhaustive",
                "--candidates",
                "20",
            ],
            cache,
        )
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert "--eval_every_epochs 2 is ignored: it applies to --eval_strategy epoch, not no" in said
    assert "--candidates 20 is ignored: --strategy exhaustive scores every entity" in said
    assert f"KB: 3 row(s) repeat the qid of an earlier row (e.g. {kb[0]['qid']!r})" in said
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        in_process(
            [
                "--dataset_name",
                path,
                "--output_dir",
                str(tmp_path / "eval"),
                "--do_eval",
                "--model_name_or_path",
                str(trained),
                "--mode",
                "att",
                "--pairwise_negatives",
                "3",
            ],
            cache,
        )
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert f"--model_name_or_path {trained}: these settings of its config are replaced" in said
    assert "fusion_assignment 'ot' -> 'attention'" in said and "pairwise_negatives 15 -> 3" in said


def test_zero_shot_clip_baseline_is_allowed_and_evaluates_only_what_is_asked(
    converted, tiny_clip_dir, tmp_path, caplog
):
    path, cache = converted
    with caplog.at_level(logging.WARNING):
        metrics = in_process(
            [
                "--dataset_name",
                path,
                "--output_dir",
                str(tmp_path),
                "--do_predict",
                "--clip_model",
                tiny_clip_dir,
                "--mode",
                "clip",
            ],
            cache,
        )
    assert any(
        "Zero-shot evaluation: --do_predict ranks with the pretrained CLIP" in r.getMessage() for r in caplog.records
    )
    assert "test_mrr" in metrics and not any(k.startswith("eval_") for k in metrics)
    assert (tmp_path / "predictions_test.jsonl").is_file()


def test_damaged_run_settings_is_an_error_unless_overwriting(tmp_path):
    import run_mel

    out = tmp_path / "run"
    argv = ["--dataset_name", "x", "--output_dir", str(out), "--do_train", "--report_to", "none"]
    training_args, settings = _settings_of(argv)
    out.mkdir()
    _fake_checkpoint(out / "checkpoint-2", 2)
    (out / "run_settings.json").write_text('{"pooling": "softp')
    with pytest.raises(run_mel.UsageError, match=r"run_settings.json: unreadable \(.*--overwrite_output_dir"):
        run_mel.resume_point(training_args, settings)
    (out / "run_settings.json").write_text("[1, 2]")
    with pytest.raises(run_mel.UsageError, match="a JSON list, not an object"):
        run_mel.resume_point(training_args, settings)
    overwrite, settings = _settings_of(argv + ["--overwrite_output_dir"])
    assert run_mel.resume_point(overwrite, settings) is None
