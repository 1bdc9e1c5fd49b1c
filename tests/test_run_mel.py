"""run_mel.py end to end on a small synthetic world: outputs, metrics, resume, and the multi-process paths (gloo, CPU)."""

import json
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
SCHEDULE = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "64", "--kb_batch_size", "64",
            "--learning_rate", "2e-3", "--warmup_steps", "0", "--logging_steps", "2", "--seed", "3"]  # fmt: skip


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
    run(["--dataset_name", world, "--output_dir", str(out), "--do_train", "--do_eval", "--do_predict",
         "--num_train_epochs", "2", "--eval_every_epochs", "1", *TINY, *SCHEDULE], cache)  # fmt: skip
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
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd="/", env={**env, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)  # fmt: skip
    assert proc.stdout.split() == ["OTMELModel", "OTMELProcessor"], proc.stderr[-2000:]
    assert (out / "sinkhorn_otmel.py").is_file()  # the solver module travels with the remote code


def test_resume_matches_uninterrupted(world, tmp_path):
    cache = str(tmp_path / "cache")
    common = ["--dataset_name", world, "--do_train", "--do_eval", "--max_steps", "6", "--eval_strategy", "no",
              "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "5",
              "--load_best_model_at_end", "false", *TINY, *SCHEDULE]  # fmt: skip
    full = tmp_path / "full"
    run(common + ["--output_dir", str(full)], cache)
    interrupted = tmp_path / "interrupted"
    run(common + ["--output_dir", str(interrupted)], cache)
    # Simulate a crash after the first checkpoint: drop everything written later, then resume.
    for name in os.listdir(interrupted):
        if name != "checkpoint-3":
            path = interrupted / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run(common + ["--output_dir", str(interrupted), "--resume_from_checkpoint", str(interrupted / "checkpoint-3")], cache)
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
        local = {k: v[rank * size:(rank + 1) * size] for k, v in batch.items() if k != "model_path"}
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
    processor = OTMELProcessor(AutoImageProcessor.from_pretrained(tiny_clip_dir), AutoTokenizer.from_pretrained(tiny_clip_dir))
    n = 8
    images = [Image.new("RGB", (40, 40), (30 * i, 255 - 20 * i, 90)) if i % 3 else None for i in range(n)]
    m = processor.process_mentions([f"name {i}" for i in range(n)], [f"sentence about {i} things" * (i % 3 + 1) for i in range(n)], images)
    e = processor.process_entities([f"name {i % 6}" for i in range(n)], [f"attribute {i % 6}" for i in range(n)], images[::-1])
    pad = processor.max_text_length
    batch = {}
    for side, inputs in (("mention", m), ("entity", e)):
        ids = torch.full((n, pad), processor.tokenizer.pad_token_id)
        mask = torch.zeros((n, pad), dtype=torch.long)
        ids[:, : inputs["input_ids"].shape[1]] = inputs["input_ids"]
        mask[:, : inputs["attention_mask"].shape[1]] = inputs["attention_mask"]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask,
                      f"{side}_pixel_values": inputs["pixel_values"], f"{side}_has_image": inputs["has_image"]})  # fmt: skip
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
    run(["--dataset_name", world, "--output_dir", str(trained), "--do_train", "--max_steps", "2",
         "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false", *TINY, *SCHEDULE], cache)  # fmt: skip
    evaluate = ["--dataset_name", world, "--model_name_or_path", str(trained), "--do_eval", "--do_predict",
                "--report_to", "none", "--kb_batch_size", "16", "--per_device_eval_batch_size", "16"]  # fmt: skip
    single = tmp_path / "single"
    run(evaluate + ["--output_dir", str(single)], cache)
    double = tmp_path / "double"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    run(evaluate + ["--output_dir", str(double)], cache, launcher=torchrun)
    a = json.loads((single / "all_results.json").read_text())
    b = json.loads((double / "all_results.json").read_text())
    for key in ("eval_hits@1", "eval_hits@10", "eval_mrr", "test_hits@1", "test_mrr", "test_n"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    ranks_a = [json.loads(line)["rank"] for line in (single / "predictions_test.jsonl").read_text().splitlines()]
    ranks_b = [json.loads(line)["rank"] for line in (double / "predictions_test.jsonl").read_text().splitlines()]
    assert ranks_a == ranks_b
