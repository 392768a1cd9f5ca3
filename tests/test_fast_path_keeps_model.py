"""generate() leaves the model the user holds as it was, whatever path it decoded on (eager or compiled, every
dtype and quantisation scheme): the same modules, parameters and state dict, and every later call (dtype
moves, training, an optimizer, peft, save_pretrained) behaves as on a model that never generated. And a
generate() after the weights changed uses the new weights: its logits are checked against a plain forward of
the same model (the oracle: no cache, no fast path), never against an earlier generate()."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from safetensors.torch import load_file

import qwen2
from qwen2.generation import fast
from qwen2.quantization import quantize_model

TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
)
SCHEMES = ["float32", "bfloat16", "int8", "int4", "w8a8"]
FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT = torch.tensor([[5, 17, 33, 8, 61], [9, 9, 40, 71, 3]])


def tiny_model(scheme: str, seed: int = 0) -> qwen2.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(**TINY)).eval()
    model.to(FLOAT.get(scheme, torch.bfloat16))
    if scheme not in FLOAT:
        quantize_model(model, scheme)
    return model


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "modules": [(name, type(m), sorted(vars(m))) for name, m in model.named_modules()],
        "parameters": list(model.named_parameters()),
        "state": {key: value.clone() for key, value in model.state_dict().items()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    assert [(name, type(m), sorted(vars(m))) for name, m in model.named_modules()] == before["modules"]
    params = list(model.named_parameters())
    assert [name for name, _ in params] == [name for name, _ in before["parameters"]]
    assert all(p is q for (_, p), (_, q) in zip(params, before["parameters"])), "a parameter was replaced"
    state = model.state_dict()
    assert list(state) == list(before["state"])
    for key, value in before["state"].items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def generate_all_ways(model: torch.nn.Module, compiled: bool) -> None:
    """Greedy single row, a left-padded batch, sampling, beam search: every loop that decodes."""
    mask = torch.ones_like(PROMPT)
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=4, disable_compile=not compiled, pad_token_id=0)
    model.generate(PROMPT[:1], do_sample=False, **kwargs)
    if not compiled:
        model.generate(PROMPT, attention_mask=mask, do_sample=True, seed=1, **kwargs)
        model.generate(PROMPT[:1], num_beams=2, do_sample=False, **kwargs)


def outcome(fn):
    """fn()'s result, or the type and message of what it raised: a fresh model and a model that generated
    must agree on both."""
    try:
        return "ok", fn()
    except Exception as err:  # noqa: BLE001 - compared, not swallowed
        return "raised", type(err), str(err)


def assert_same_outcome(got, expected) -> None:
    assert got[0] == expected[0], (got, expected)
    if got[0] == "raised":
        assert got[1:] == expected[1:]
        return
    for a, b in zip(torch.utils._pytree.tree_leaves(got[1]), torch.utils._pytree.tree_leaves(expected[1])):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def forward_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def train_step(model: torch.nn.Module) -> tuple:
    """One AdamW step on the causal-LM loss; the loss, every gradient and the updated state dict."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(PROMPT, labels=PROMPT).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    model.eval()
    return loss.detach(), len(optimizer.param_groups[0]["params"]), grads, dict(model.state_dict())


def peft_forward(model: torch.nn.Module) -> tuple:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        return trainable, peft_model(input_ids=PROMPT).logits


@pytest.mark.parametrize("scheme", SCHEMES)
def test_generate_leaves_the_model_as_it_was(scheme):
    model = tiny_model(scheme)
    before = snapshot(model)
    count = model.num_parameters()
    for _ in range(2):
        generate_all_ways(model, compiled=False)
        assert_unchanged(model, before)
    assert model.num_parameters() == count


@pytest.mark.parametrize("scheme", SCHEMES)
def test_after_generate_the_model_moves_trains_saves_and_wraps_as_a_fresh_one(scheme, tmp_path):
    model = tiny_model(scheme)
    fresh = copy.deepcopy(model)
    generate_all_ways(model, compiled=False)

    model.save_pretrained(tmp_path / "used")
    fresh.save_pretrained(tmp_path / "fresh")
    saved, expected = load_file(tmp_path / "used" / "model.safetensors"), load_file(tmp_path / "fresh" / "model.safetensors")
    assert list(saved) == list(expected) and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert (tmp_path / "used" / "config.json").read_text() == (tmp_path / "fresh" / "config.json").read_text()

    for convert in (lambda m: m.half(), lambda m: m.float(), lambda m: m.to(FLOAT.get(scheme, torch.bfloat16))):
        assert_same_outcome(outcome(lambda: forward_logits(convert(model))),
                            outcome(lambda: forward_logits(convert(fresh))))
    assert_same_outcome(outcome(lambda: train_step(model)), outcome(lambda: train_step(fresh)))
    if scheme in FLOAT:  # peft's LoRA wraps nn.Linear, not our quantised modules
        assert_same_outcome(outcome(lambda: peft_forward(model)), outcome(lambda: peft_forward(fresh)))


def assert_generate_uses_current_weights(model: torch.nn.Module, compiled: bool, previous: torch.Tensor) -> torch.Tensor:
    """generate()'s per-step logits equal a plain forward over the sequence it produced (teacher forcing),
    and differ from `previous` (the logits before the weights changed) by far more than that tolerance."""
    out = model.generate(PROMPT[:1], max_new_tokens=5, do_sample=False, disable_compile=not compiled,
                         return_dict_in_generate=True, output_logits=True)
    got = torch.stack(out.logits, 1)[0].float()  # (steps, V)
    with torch.no_grad():
        expected = model(out.sequences).logits[0, PROMPT.shape[1] - 1:-1].float()
    scale = expected.abs().max()
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 and not getattr(model.config, "quantization_config", None) else 3e-2
    assert (got - expected).abs().max() <= tol * scale
    if previous is not None:
        assert (got[0] - previous[0]).abs().max() > 10 * tol * scale, "the change did not move the logits"
    return got


def change_by_optimizer(model: torch.nn.Module) -> None:
    torch.manual_seed(5)
    params = [p for p in model.parameters() if p.is_floating_point()]
    for p in params:
        p.grad = torch.randn_like(p)
    torch.optim.SGD(params, lr=0.5).step()


def change_by_load_state_dict(model: torch.nn.Module, scheme: str, assign: bool = False) -> None:
    """Another model's weights: copied into the tensors held, or (assign=True) as the new tensors."""
    model.load_state_dict(tiny_model(scheme, seed=8 if assign else 7).state_dict(), assign=assign)


def change_by_lora_merge(model: torch.nn.Module) -> torch.nn.Module:
    """peft's merge adds B @ A to `weight.data` in place (no version bump the step could watch)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(6)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, config).merge_and_unload()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_generate_after_the_weights_changed_uses_the_new_weights(scheme):
    model = tiny_model(scheme)
    logits = assert_generate_uses_current_weights(model, False, None)
    for change in (change_by_optimizer, lambda m: change_by_load_state_dict(m, scheme),
                   lambda m: change_by_load_state_dict(m, scheme, assign=True)):
        change(model)
        logits = assert_generate_uses_current_weights(model, False, logits)
    if scheme in FLOAT:
        model = change_by_lora_merge(model)
        assert type(model) is qwen2.Qwen2ForCausalLM
        assert_generate_uses_current_weights(model, False, logits)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compiled_generate_leaves_the_model_and_follows_its_weights(scheme):
    """One compiled step per scheme: the model is unchanged after it, and it reads the weights as they are
    after an optimizer step (in place), a load_state_dict with assign=True (new tensors) and, for float
    models, a LoRA merge and a dtype change."""
    model = tiny_model(scheme)
    before = snapshot(model)
    logits = assert_generate_uses_current_weights(model, True, None)
    assert not fast.compiled_step(model).failed
    assert_unchanged(model, before)
    change_by_optimizer(model)
    logits = assert_generate_uses_current_weights(model, True, logits)
    change_by_load_state_dict(model, scheme, assign=True)
    logits = assert_generate_uses_current_weights(model, True, logits)
    if scheme in FLOAT:
        model = change_by_lora_merge(model)
        logits = assert_generate_uses_current_weights(model, True, logits)
    assert not fast.compiled_step(model).failed


def test_the_compiled_step_does_not_keep_the_model_alive():
    model = tiny_model("float32")
    model.generate(PROMPT[:1], max_new_tokens=3, do_sample=False, disable_compile=False)
    assert fast.compiled_step(model) is not None
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.slow
def test_real_model_after_generate_half_trains_wraps_and_generates_with_new_weights(default_gguf):
    """The default model (bf16, eager: the compiled path is held to the same on tiny models above): unchanged
    by generate(); then .half(), a training step and a LoRA merge each change the weights, and each later
    generate() matches a plain forward of the model as it now is (teacher forcing over its own tokens) far
    more closely than it matches the logits from before the change."""
    from peft import LoraConfig, get_peft_model

    model = qwen2.Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.bfloat16).eval()
    prompt = torch.tensor([[151644, 872, 198, 3838, 374, 264, 3460, 4128, 1614, 30, 151645, 198, 151644, 77091, 198]])
    count = model.num_parameters()
    before = snapshot(model)

    def generate_and_check(previous):
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, disable_compile=True,
                             return_dict_in_generate=True, output_logits=True)
        got = torch.stack(out.logits, 1)[0].float()
        with torch.no_grad():
            expected = model(out.sequences).logits[0, prompt.shape[1] - 1:-1].float()
        error = (got - expected).abs().max()
        assert error <= 3e-2 * expected.abs().max()
        if previous is not None:
            assert (got[0] - previous[0]).abs().max() > 5 * error, "generate() did not follow the new weights"
        return got

    logits = generate_and_check(None)
    assert_unchanged(model, before)
    del before
    assert model.num_parameters() == count and type(model.lm_head) is torch.nn.Linear

    model.half()
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    generate_and_check(None)
    model.to(torch.bfloat16)

    model.train()
    loss = model(prompt, labels=prompt).loss
    loss.backward()
    assert sum(p.grad is not None for p in model.parameters()) == len(list(model.parameters()))
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.zero_grad(set_to_none=True)
    model.eval()
    logits = generate_and_check(logits)

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=256, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    assert peft_model.get_nb_trainable_parameters()[0] == 24 * 8 * (896 + 896 + 896 + 128)
    model = peft_model.merge_and_unload()
    generate_and_check(logits)
