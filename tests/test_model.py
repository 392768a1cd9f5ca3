"""Model API and training behaviour: outputs, logits_to_keep, errors, meta build + loading contract, weight
init and tying, embeddings accessors, gradients, dropout, gradient checkpointing, low-precision safety."""

from __future__ import annotations

import pytest
import torch
import transformers

from qwen2.activations import ACTIVATIONS, activation
from qwen2.cache import DynamicCache
from qwen2.config import Qwen2Config
from qwen2.generation import GenerationConfig
from qwen2.heads import Qwen2ForSequenceClassification, Qwen2ForTokenClassification
from qwen2.model import Qwen2ForCausalLM, Qwen2Model
from qwen2.outputs import CausalLMOutputWithPast


def _config(**overrides) -> Qwen2Config:
    kwargs = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(_config()).eval()


def _ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length))


@torch.no_grad()
def test_output_access_like_model_output(model):
    ids = _ids()
    out = model(ids, labels=ids, output_hidden_states=True)
    assert isinstance(out, CausalLMOutputWithPast)
    assert out["logits"] is out.logits and out[1] is out.logits and out[0] is out.loss
    assert list(out.keys()) == ["loss", "logits", "cache", "hidden_states"]
    assert "past_key_values" in out and out.past_key_values is out.cache
    assert len(out.to_tuple()) == 4
    as_tuple = model(ids, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    torch.testing.assert_close(as_tuple[0], out.logits)
    with pytest.raises(TypeError):
        out.pop("logits")


@torch.no_grad()
def test_output_tuple_order_matches_transformers(model):
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**model.config.to_dict())).eval()
    hf.load_state_dict(model.state_dict())
    ids = _ids()
    mine = model(ids, labels=ids, output_hidden_states=True, return_dict=False)
    theirs = hf(ids, labels=ids, output_hidden_states=True, return_dict=False)
    assert len(mine) == len(theirs)
    torch.testing.assert_close(mine[1], theirs[1])


@torch.no_grad()
def test_logits_to_keep(model):
    ids = _ids(length=7)
    full = model(ids, use_cache=False).logits
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 64)
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full[:, -3:])
    torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]])
    per_row = torch.tensor([[1], [5]])
    torch.testing.assert_close(model(ids, logits_to_keep=per_row).logits[:, 0], full[[0, 1], [1, 5]])
    keep = torch.zeros(2, 7, dtype=torch.bool)
    keep[0, 2] = keep[1, 3] = keep[1, 6] = True
    torch.testing.assert_close(model(ids, logits_to_keep=keep).logits, full[keep])


@torch.no_grad()
def test_right_padding_leaves_real_tokens_unchanged(model):
    ids = _ids(batch=1, length=5)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, :5], model(ids).logits)


@torch.no_grad()
def test_four_d_boolean_mask_is_used_as_given(model):
    ids = _ids(length=5)
    mask2d = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask4d = torch.ones(5, 5, dtype=torch.bool).tril()[None, None] & mask2d.bool()[:, None, None, :]
    expected = model(ids, attention_mask=mask2d).logits
    torch.testing.assert_close(model(ids, attention_mask=mask4d).logits[1], expected[1])


@torch.no_grad()
def test_cache_keyword_alias(model):
    ids = _ids()
    cache = DynamicCache()
    out = model(ids, cache=cache)
    assert out.cache is cache and cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="not both"):
        model(ids, cache=cache, past_key_values=cache)


def test_input_errors(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(_ids(), inputs_embeds=torch.zeros(2, 6, 32))
    with pytest.raises(ValueError, match="hidden_act='nope'"):
        activation("nope")
    config = _config(pad_token_id=None, num_labels=3)
    classifier = Qwen2ForSequenceClassification(config).eval()
    with pytest.raises(ValueError, match="batch sizes > 1 if no padding token"):
        classifier(_ids(batch=2))
    assert classifier(_ids(batch=1)).logits.shape == (1, 3)


def test_activation_table_matches_transformers():
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 101)
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), ACT2FN[name](x), msg=name)


@pytest.mark.parametrize(
    "rope",
    [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 10000.0}],
)
@torch.no_grad()
def test_meta_build_then_assign_load_matches_eager_build(rope):
    config = _config(tie_word_embeddings=True, rope_parameters=rope)
    reference = Qwen2ForCausalLM(config).eval()
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    state = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(state, strict=False, assign=True)
    model.init_buffers()
    model.tie_weights()
    model.eval()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_init_weights_and_tying():
    torch.manual_seed(0)
    config = _config(hidden_size=256, intermediate_size=512, initializer_range=0.05, vocab_size=512)
    model = Qwen2ForCausalLM(config)
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.05) < 0.005
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.bias) == 0
    assert torch.equal(model.model.norm.weight, torch.ones(256))
    assert torch.count_nonzero(model.model.embed_tokens.weight[0]) == 0  # padding row
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    linear = torch.nn.Linear(4, 4)
    model._init_weights(linear)
    assert torch.count_nonzero(linear.bias) == 0
    tied = Qwen2ForCausalLM(_config(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert isinstance(tied.generation_config, GenerationConfig)


def test_embedding_accessors():
    model = Qwen2ForCausalLM(_config())
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    new = torch.nn.Embedding(64, 32)
    model.set_input_embeddings(new)
    assert model.model.embed_tokens is new and model.get_input_embeddings() is new
    head = torch.nn.Linear(32, 64, bias=False)
    model.set_output_embeddings(head)
    assert model.lm_head is head
    base = Qwen2Model(_config())
    assert base.get_input_embeddings() is base.embed_tokens and base.get_output_embeddings() is None


def test_gradients_flow_to_every_parameter():
    model = Qwen2ForCausalLM(_config(use_sliding_window=True, sliding_window=3, max_window_layers=1)).train()
    ids = _ids(length=8)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_dropout_is_active_in_train_and_off_in_eval():
    model = Qwen2ForCausalLM(_config(attention_dropout=0.5))
    ids = _ids()
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    classifier = Qwen2ForTokenClassification(_config(classifier_dropout=0.5, num_labels=3))
    assert classifier.dropout.p == 0.5
    classifier.train()
    assert not torch.allclose(classifier(ids).logits, classifier(ids).logits)
    classifier.eval()
    torch.testing.assert_close(classifier(ids).logits, classifier(ids).logits)
    assert Qwen2ForTokenClassification(_config()).dropout.p == 0.1  # transformers' fallback


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}])
def test_gradient_checkpointing_gives_the_same_gradients(kwargs):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_config(num_hidden_layers=3)).train()
    ids = _ids(length=8)

    def grads():
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_out, plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.is_gradient_checkpointing
    checked_out, checked = grads()
    assert checked_out.past_key_values is None  # caching is switched off under checkpointing
    torch.testing.assert_close(checked_out.loss, plain_out.loss)
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], msg=name)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eager", [False, True])
@torch.no_grad()
def test_fully_masked_padding_rows_stay_finite_in_low_precision(dtype, eager):
    """Scores of -1000 plus the dtype minimum overflow to -inf in float16; a padding query whose every key is
    masked must still give finite values, or NaN leaks into the real tokens through the padding keys."""
    model = Qwen2ForCausalLM(_config(num_key_value_heads=4)).eval()
    attention = model.model.layers[0].self_attn.to(dtype)
    q = torch.full((1, 4, 3, 8), 30.0, dtype=dtype)
    k = torch.full((1, 4, 3, 8), -30.0, dtype=dtype)  # every score is -900 * scaling
    v = torch.randn(1, 4, 3, 8).to(dtype)
    mask = torch.tensor([False, True, True])[None, None, None, :] & torch.ones(3, 3, dtype=torch.bool).tril()
    out = attention._eager(q, k, v, (mask, False), 0.0)[0] if eager else attention._sdpa(q, k, v, (mask, False), 0.0)
    assert torch.isfinite(out).all()
    reference = torch.softmax(torch.full((2,), -900.0), -1) @ v[0, 0, 1:].float()
    torch.testing.assert_close(out[0, 0, 2].float(), reference, atol=1e-2, rtol=1e-2)


@torch.no_grad()
def test_attn_implementation_switch(model):
    ids = _ids()
    sdpa = model(ids).logits
    model.set_attn_implementation("eager")
    try:
        torch.testing.assert_close(model(ids).logits, sdpa, atol=1e-5, rtol=1e-5)
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="flash"):
        model.set_attn_implementation("flash_attention_2")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
