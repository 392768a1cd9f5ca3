"""`qwen2 finetune` end to end on a tiny model directory: bad data refused before the model is touched, an
adapter and a merged model written, and the same command under torchrun (2 processes, gloo, half the batch
each) giving the loss curve of one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
import transformers
from finetune_harness import arithmetic_chats, number_tag_rows, sentiment_rows, tiny_model, write_jsonl
from finetune_harness import one_thread  # noqa: F401 (an autouse fixture)

import qwen2
from qwen2.cli.main import main
from qwen2.training.adapters import ALL_LINEAR



@pytest.fixture(scope="module")
def model_dir(both, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_finetune_model")
    tiny_model(qwen2.Qwen2ForCausalLM, both[1]).save_pretrained(directory)
    both[1].save_pretrained(directory)
    return directory


def test_bad_data_is_refused_before_loading_the_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [*arithmetic_chats(2), {"messages": [{"role": "user", "content": "?"}]}])
    status = main(["finetune", "sft", "--model", str(tmp_path / "no-such-model"), "--data", str(data),
                   "--output", str(tmp_path / "out")])
    assert status == 1
    assert f"{data}:3: field 'messages': no assistant turn" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sft_writes_an_adapter_and_a_merged_model(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", arithmetic_chats(8))
    out = tmp_path / "out"
    status = main(["finetune", "sft", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data),
                   "--output", str(out), "--max-steps", "3", "--save-steps", "2", "--lr", "1e-2", "--lora-r", "4",
                   "--merge", "--no-progress", "--bf16", "--gradient-checkpointing"])
    assert status == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == sorted(ALL_LINEAR)  # not lm_head
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]
    ids = torch.tensor([[3, 1000, 2000, 151643]])
    with torch.no_grad():
        ours = qwen2.Qwen2ForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
        theirs = transformers.Qwen2ForCausalLM.from_pretrained(out / "merged").eval()(ids).logits
        base = qwen2.Qwen2ForCausalLM.from_pretrained(model_dir).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert (ours - base).abs().max() > 1e-3  # the merged weights are the trained ones


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_classifier_heads_from_a_causal_lm_checkpoint(task, model_dir, tmp_path):
    rows = sentiment_rows(["film", "meal"]) if task == "classify" else number_tag_rows(8, seed=1)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    extra = ["--merge"] if task == "classify" else ["--full", "--pack"]
    assert main(["finetune", task, "--model", str(model_dir), "--data", str(data), "--eval-data", str(data),
                 "--output", str(out), "--max-steps", "2", "--no-progress", *extra]) == 0
    model_out = out / "merged" if task == "classify" else out
    labels = ["neg", "pos"] if task == "classify" else ["B-NUM", "I-NUM", "O"]
    config = json.loads((model_out / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}
    assert config["architectures"] == [f"Qwen2For{'Sequence' if task == 'classify' else 'Token'}Classification"]


def _history(out):
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    return [(h["step"], h["loss"], h["grad_norm"]) for h in state["history"]]


def test_torchrun_two_processes_match_one(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", arithmetic_chats(16))
    common = ["sft", "--model", str(model_dir), "--data", str(data), "--max-steps", "3", "--save-steps", "3",
              "--lr", "1e-2", "--full", "--no-progress", "--seed", "5"]
    assert main(["finetune", *common, "--output", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "qwen2.cli", "finetune", *common, "--output", str(tmp_path / "two"),
                          "--batch-size", "2", "--threads", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    assert [s for s, _, _ in two] == [1, 2, 3]
    torch.testing.assert_close([x[1:] for x in two], [x[1:] for x in one], rtol=1e-5, atol=1e-6)
    saved = torch.load(tmp_path / "two/checkpoints/checkpoint-3/training.pt", weights_only=True)
    assert len(saved["rng"]) == 2  # each process' generator state, written by rank 0 alone


def test_sigterm_saves_a_checkpoint_and_resume_finishes(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", arithmetic_chats(8))
    out = tmp_path / "out"
    command = ["sft", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--no-progress",
               "--batch-size", "2", "--logging-steps", "1", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "qwen2.cli", "finetune", *command, "--max-steps", "100000"],
                               env=env, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, process.kill)  # never hang on a run that does not get to step 2
    watchdog.start()
    try:
        for line in process.stderr:
            if "step 2/100000" in line:
                process.send_signal(signal.SIGTERM)
                break
        rest = process.stderr.read()
        assert process.wait(timeout=60) == 130
    finally:
        watchdog.cancel()
        process.kill()
    assert "continue with --resume" in rest
    (saved,) = (out / "checkpoints").iterdir()
    step = int(saved.name.split("-")[1])
    assert step >= 2 and json.loads((saved / "trainer_state.json").read_text())["step"] == step
    assert main(["finetune", *command, "--max-steps", str(step + 2), "--resume"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
