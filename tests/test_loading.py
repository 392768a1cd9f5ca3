"""Checkpoint loading and saving against transformers on tiny random models: both directions, sharded and
pickle checkpoints, dtype and device_map handling, and the errors for broken or mismatched files."""

from __future__ import annotations

import json
import os
import logging
import shutil
import struct

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from qwen2 import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model
from qwen2.loading.hub import ModelNotFoundError, resolve_model_dir
from qwen2.loading.safetensors import CheckpointError

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
INPUT_IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60], [1, 2, 3, 4, 5, 6, 7]])


def _hf_model(cls=transformers.Qwen2ForCausalLM, **overrides):
    torch.manual_seed(0)
    return cls(transformers.Qwen2Config(**{**TINY, **overrides})).eval()


@torch.no_grad()
def _logits(model):
    return model(INPUT_IDS).logits.float()


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny untied transformers checkpoint, saved by transformers."""
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


@pytest.mark.parametrize("tied", [False, True])
def test_load_transformers_checkpoint_and_save_back(tmp_path, tied):
    hf = _hf_model(tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "hf")
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    assert not ours.training and ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    torch.testing.assert_close(_logits(ours), _logits(hf), rtol=0, atol=1e-5)
    assert ours.num_parameters() == hf.num_parameters()

    ours.save_pretrained(tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (not tied)
        assert set(f.keys()) == set(hf.state_dict()) - ({"lm_head.weight"} if tied else set())
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForCausalLM"] and saved["dtype"] == "float32"
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "ours") == hf.generation_config
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back), _logits(hf), rtol=0, atol=1e-5)


def test_sharded_save_is_exactly_transformers_layout(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="30KB")
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="30KB")
    theirs_index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    ours_index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert ours_index == theirs_index
    assert len(set(ours_index["weight_map"].values())) > 2
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(back), _logits(hf), rtol=0, atol=1e-5)

    # Saving again unsharded into the same directory leaves no stale shards or index behind.
    ours.save_pretrained(tmp_path / "ours", max_shard_size=10**9)
    assert sorted(p.name for p in (tmp_path / "ours").glob("model*")) == ["model.safetensors"]


def test_pickle_checkpoints_single_and_sharded(tmp_path, hf_dir):
    directory, hf = hf_dir
    (directory / "model.safetensors").unlink()
    torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    torch.testing.assert_close(_logits(Qwen2ForCausalLM.from_pretrained(directory)), _logits(hf), rtol=0, atol=1e-5)

    ours = Qwen2ForCausalLM.from_pretrained(directory)
    ours.save_pretrained(tmp_path / "bin", safe_serialization=False, max_shard_size="30KB")
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").is_file()
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "bin").eval()
    torch.testing.assert_close(_logits(back), _logits(hf), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(Qwen2ForCausalLM.from_pretrained(tmp_path / "bin")), _logits(hf),
                               rtol=0, atol=1e-5)


class _Payload:
    """Unpickling this would call print: weights_only=True must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(hf_dir):
    directory, hf = hf_dir
    (directory / "model.safetensors").unlink()
    torch.save({**hf.state_dict(), "evil": _Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        Qwen2ForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("dtype_kwargs, expected", [
    ({}, torch.bfloat16),  # transformers 5: "auto" = the checkpoint's dtype
    ({"dtype": "auto"}, torch.bfloat16),
    ({"dtype": torch.float32}, torch.float32),
    ({"dtype": "float16"}, torch.float16),
    ({"torch_dtype": torch.float16}, torch.float16),
    ({"torch_dtype": "float32", "device_map": "auto"}, torch.float32),
])
def test_dtype_matches_transformers(tmp_path, dtype_kwargs, expected):
    hf = _hf_model().to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = Qwen2ForCausalLM.from_pretrained(tmp_path, **dtype_kwargs)
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, **dtype_kwargs)
    assert ours.dtype == theirs.dtype == expected
    assert ours.config.dtype == theirs.config.dtype == expected
    theirs_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs_state[name]), name


def test_auto_dtype_without_config_dtype_reads_the_tensors(tmp_path):
    hf = _hf_model().to(torch.float16)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Qwen2ForCausalLM.from_pretrained(tmp_path).dtype == torch.float16


@pytest.mark.parametrize("device_map", [None, "cpu", "auto", torch.device("cpu"), {"": "cpu"}])
def test_device_map_on_cpu(hf_dir, device_map):
    directory, hf = hf_dir
    ours = Qwen2ForCausalLM.from_pretrained(directory, device_map=device_map)
    assert {p.device.type for p in ours.parameters()} | {b.device.type for b in ours.buffers()} == {"cpu"}
    torch.testing.assert_close(_logits(ours), _logits(hf), rtol=0, atol=1e-5)


def test_bad_dtype_and_device_map_are_named(hf_dir):
    directory, _ = hf_dir
    with pytest.raises(ValueError, match="float99"):
        Qwen2ForCausalLM.from_pretrained(directory, dtype="float99")
    with pytest.raises(ValueError, match="int8"):
        Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.int8)
    with pytest.raises(ValueError, match="nowhere"):
        Qwen2ForCausalLM.from_pretrained(directory, device_map="nowhere")


def test_config_overrides_and_head_initialisation(hf_dir, caplog):
    directory, hf = hf_dir
    with caplog.at_level(logging.WARNING):
        ours = Qwen2ForSequenceClassification.from_pretrained(directory, num_labels=3, pad_token_id=0)
    assert ours.config.num_labels == 3 and ours.score.weight.shape == (3, TINY["hidden_size"])
    assert "score.weight" in caplog.text and "lm_head.weight" in caplog.text  # missing, then unexpected
    assert ours.score.weight.abs().sum() > 0 and not ours.score.weight.is_meta
    torch.testing.assert_close(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    with_their_config = Qwen2ForCausalLM.from_pretrained(directory, config=transformers.Qwen2Config(**TINY))
    assert isinstance(with_their_config.config, Qwen2Config)
    with pytest.raises(TypeError, match="not_an_option"):
        Qwen2ForCausalLM.from_pretrained(directory, not_an_option=1)


def test_base_model_and_head_checkpoints_load_into_each_other(tmp_path, hf_dir):
    directory, hf = hf_dir
    base = Qwen2Model.from_pretrained(directory)
    theirs = transformers.Qwen2Model.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(INPUT_IDS).last_hidden_state, theirs(INPUT_IDS).last_hidden_state,
                                   rtol=0, atol=1e-5)
    base.save_pretrained(tmp_path / "base")
    with safe_open(tmp_path / "base" / "model.safetensors", "pt") as f:
        assert "embed_tokens.weight" in f.keys()  # a bare model is saved without the "model." prefix
    lm, info = Qwen2ForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == ["lm_head.weight"] and info["unexpected_keys"] == []
    torch.testing.assert_close(lm.model.layers[1].mlp.up_proj.weight, hf.model.layers[1].mlp.up_proj.weight)


def test_missing_unexpected_and_ignored_tensors_reported(tmp_path, hf_dir, caplog):
    directory, hf = hf_dir
    state = {k: v.clone() for k, v in hf.state_dict().items() if k != "model.layers.1.self_attn.k_proj.bias"}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    state["model.extra.weight"] = torch.ones(2)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        ours, info = Qwen2ForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == ["model.layers.1.self_attn.k_proj.bias"]
    assert info["unexpected_keys"] == ["model.extra.weight"]
    assert "model.layers.1.self_attn.k_proj.bias" in caplog.text and "model.extra.weight" in caplog.text
    assert "inv_freq" not in caplog.text
    assert torch.count_nonzero(ours.model.layers[1].self_attn.k_proj.bias) == 0  # initialised like transformers
    # The loaded half of that module is untouched by the re-initialisation of its missing bias.
    torch.testing.assert_close(ours.model.layers[1].self_attn.k_proj.weight, hf.model.layers[1].self_attn.k_proj.weight)


def test_wrong_shape_is_named_or_reinitialised(hf_dir, caplog):
    directory, hf = hf_dir
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(48, TINY["hidden_size"])
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        Qwen2ForCausalLM.from_pretrained(directory)
    message = str(info.value)
    assert "model.layers.0.mlp.up_proj.weight" in message and "(48, 32)" in message and "(64, 32)" in message
    with caplog.at_level(logging.WARNING):
        ours = Qwen2ForCausalLM.from_pretrained(directory, ignore_mismatched_sizes=True)
    assert ours.model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    assert "model.layers.0.mlp.up_proj.weight" in caplog.text


def test_truncated_and_corrupt_safetensors_name_the_file(hf_dir):
    directory, _ = hf_dir
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        Qwen2ForCausalLM.from_pretrained(directory)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Qwen2ForCausalLM.from_pretrained(directory)
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + data[8:])
    with pytest.raises(CheckpointError, match="model.safetensors.*header"):
        Qwen2ForCausalLM.from_pretrained(directory)


def test_shard_missing_from_index_is_named(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_no_weights_or_config_is_a_clear_error(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(OSError, match="config.json.*gguf_file='model.gguf'"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)
    Qwen2Config(**TINY).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Qwen2ForCausalLM.from_pretrained(tmp_path)


def test_generation_config_is_loaded(hf_dir):
    directory, _ = hf_dir
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8], "temperature": 0.3,
                                                                  "do_sample": True}))
    ours = Qwen2ForCausalLM.from_pretrained(directory)
    assert ours.generation_config.eos_token_id == [7, 8] and ours.generation_config.temperature == 0.3


def test_offline_hub_id_error_names_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        Qwen2ForCausalLM.from_pretrained("someone/not-cached-model", cache_dir=tmp_path)
    message = str(info.value)
    assert "someone/not-cached-model" in message and "local" in message and "directory" in message


def test_local_paths_are_not_sent_to_the_hub(tmp_path, hf_dir):
    directory, _ = hf_dir
    assert resolve_model_dir(directory) == directory
    assert resolve_model_dir(str(directory)) == directory
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_dir(directory / "config.json")
    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        resolve_model_dir(directory, gguf_file="missing.gguf")


def test_hub_id_served_from_the_hugging_face_cache_offline(tmp_path, hf_dir, monkeypatch):
    directory, hf = hf_dir
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-qwen2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    directory.rename(repo / "snapshots" / commit)  # the layout huggingface_hub writes
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = Qwen2ForCausalLM.from_pretrained("someone/tiny-qwen2", cache_dir=tmp_path / "cache")
    torch.testing.assert_close(_logits(ours), _logits(hf), rtol=0, atol=1e-5)
    assert ours.config.name_or_path == "someone/tiny-qwen2"


def test_device_map_over_several_devices_is_refused(hf_dir):
    directory, _ = hf_dir
    with pytest.raises(ValueError, match="one device"):
        Qwen2ForCausalLM.from_pretrained(directory, device_map={"model": "cpu", "lm_head": "meta"})


def test_quantized_checkpoint_reloads_without_requantising(tmp_path, hf_dir):
    from qwen2.quantization import is_quantized, quantize_model

    directory, _ = hf_dir
    model = quantize_model(Qwen2ForCausalLM.from_pretrained(directory), "int8")
    model.save_pretrained(tmp_path / "int8")
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "int8")
    assert is_quantized(reloaded) and reloaded.config.quantization_config == model.config.quantization_config
    assert torch.equal(_logits(reloaded), _logits(model))


@pytest.mark.parametrize("scheme, group_size", [("int8", None), ("int4", 32)])
def test_quantization_at_load_equals_transformers_on_the_dequantised_weights(hf_dir, scheme, group_size):
    """The reference for a weight-only quantised model: transformers running on its dequantised weights."""
    from qwen2.quantization import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    directory, _ = hf_dir
    ours = Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32, quantization=scheme, group_size=group_size)
    assert ours.config.quantization_config["scheme"] == scheme
    quantised = {name: m for name, m in ours.named_modules() if isinstance(m, (Int8WeightOnlyLinear, Int4WeightOnlyLinear))}
    assert "lm_head" in quantised and "model.layers.0.self_attn.q_proj" in quantised
    reference = transformers.Qwen2ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    state = reference.state_dict()
    for name, module in quantised.items():
        state[f"{name}.weight"] = module.dequantize(torch.float32)
    reference.load_state_dict(state)
    ids = torch.randint(0, reference.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=2e-4, rtol=1e-3)


def test_group_size_without_int4_is_refused(hf_dir):
    directory, _ = hf_dir
    with pytest.raises(ValueError, match="group_size"):
        Qwen2ForCausalLM.from_pretrained(directory, group_size=64)
    with pytest.raises(ValueError, match="int8"):
        Qwen2ForCausalLM.from_pretrained(directory, quantization="int8", group_size=64)
    with pytest.raises(ValueError, match="int3"):
        Qwen2ForCausalLM.from_pretrained(directory, quantization="int3")


# ------------------------------------------------------------------------------------- the real default model

# Loads in a fresh interpreter and reports its peak resident memory (VmHWM, which counts mapped file pages
# too), the bytes of its parameters, a sha256 per state-dict tensor and the last position's logits.
_LOAD_SCRIPT = """
import hashlib, json, sys, torch, qwen2
source, dtype, out = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
model = qwen2.Qwen2ForCausalLM.from_pretrained(source, dtype=dtype)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
with torch.no_grad():
    logits = model(torch.tensor([list(range(1000, 1016))])).logits[0, -1]
torch.save({"peak": int(status["VmHWM"].split()[0]) * 1024,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "hashes": {name: hashlib.sha256(t.detach().reshape(-1).view(torch.uint8).numpy()).hexdigest()
                       for name, t in model.state_dict().items()},
            "logits": logits}, out)
"""
_PROMPT = torch.tensor([list(range(1000, 1016))])


def _load_in_fresh_process(source, dtype: torch.dtype, tmp_path) -> dict:
    import subprocess
    import sys

    out = tmp_path / f"result-{str(dtype)[6:]}.pt"
    subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(source), str(dtype)[6:], str(out)], check=True,
                   timeout=600)
    return torch.load(out, weights_only=True)


def _sha256(tensor: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _reference_model(state_dict: dict[str, torch.Tensor], config: Qwen2Config) -> Qwen2ForCausalLM:
    """The model holding exactly `state_dict`, assembled by hand (meta build + assign), not by the loader."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.load_state_dict(state_dict, assign=True, strict=True)
    model.init_buffers()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_gguf_load_peak_memory_weights_and_logits(default_gguf, tmp_path, dtype):
    """Loading the default GGUF peaks at <= 1.3x its parameter bytes (the whole process: interpreter and
    torch included), and gives exactly gguf-py's dequantised values cast to `dtype` (`load_gguf_state_dict`,
    bitwise gguf-py's per test_gguf), so the same logits as a model holding those."""
    from qwen2.loading.gguf import gguf_config, load_gguf_state_dict

    result = _load_in_fresh_process(default_gguf, dtype, tmp_path)
    print(f"{dtype}: peak {result['peak'] / 1e6:.0f} MB for {result['param_bytes'] / 1e6:.0f} MB of parameters")
    assert result["peak"] <= 1.3 * result["param_bytes"]
    expected = load_gguf_state_dict(default_gguf, dtype)
    assert result["hashes"] == {name: _sha256(t) for name, t in expected.items()}
    model = _reference_model(expected, gguf_config(default_gguf))
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], model(_PROMPT).logits[0, -1], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_real_safetensors_directory_load_peak_memory(default_gguf, tmp_path):
    """A sharded bfloat16 copy loads with the same bound, in bfloat16 and converted to float32 on the way."""
    directory = tmp_path / "bf16"
    Qwen2ForCausalLM.from_pretrained(default_gguf, dtype=torch.bfloat16).save_pretrained(directory,
                                                                                       max_shard_size="400MB")
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    with safe_open(directory / "model-00001-of-00004.safetensors", "pt") as f:
        name = next(iter(f.keys()))
        first = f.get_tensor(name)
    for dtype in (torch.bfloat16, torch.float32):
        result = _load_in_fresh_process(directory, dtype, tmp_path)
        print(f"{dtype}: peak {result['peak'] / 1e6:.0f} MB for {result['param_bytes'] / 1e6:.0f} MB of parameters")
        assert result["peak"] <= 1.3 * result["param_bytes"]
        assert result["hashes"][name] == _sha256(first.to(dtype))
    shutil.rmtree(directory)  # 1.3 GB: not left for pytest to keep with its last runs


_HEAP_SCRIPT = """
import ctypes, sys, torch
from qwen2.loading.heap import reuse_large_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert reuse_large_blocks()
mapped = libc.mallinfo2().hblkhd
layer = [torch.empty(5 << 20, dtype=torch.uint8) for _ in range(4)]  # a prompt's activations in one layer
mapped_while_live = libc.mallinfo2().hblkhd - mapped
del layer
print(mapped_while_live >> 20, libc.mallinfo2().arena >> 20)
"""


def test_heap_keeps_activation_sized_blocks():
    """After `reuse_large_blocks` (from_pretrained on CPU calls it) 5 MB blocks come from the heap and stay there
    once freed, ready for the next layer; glibc's default maps each afresh (and faults its pages in again),
    which made elementwise ops in a 512-token prefill ~2.4x slower whenever its adaptive threshold had not grown."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    result = {mode: [int(v) for v in subprocess.run([sys.executable, "-c", _HEAP_SCRIPT, mode], check=True, env=env,
                                                     capture_output=True, text=True).stdout.split()]
              for mode in ("default", "tuned")}
    assert result["default"][0] == 20  # the baseline: four fresh mappings
    mapped_while_live, heap_after_free = result["tuned"]
    assert mapped_while_live == 0 and heap_after_free >= 20
