"""KV caches: incremental decoding equals the full forward (static and dynamic, padding, past the sliding
window, chunked prefill), in-place static buffers, bounded sliding layers, and the cache editing API."""

from __future__ import annotations

import pytest
import torch

from qwen2.cache import DynamicCache, StaticCache
from qwen2.config import Qwen2Config
from qwen2.model import Qwen2ForCausalLM

WINDOW = 3


def _config(**overrides) -> Qwen2Config:
    kwargs = dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, use_sliding_window=True,
        sliding_window=WINDOW, max_window_layers=2,
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(_config()).eval()


def _inputs(batch: int = 2, length: int = 12, left_pad: int = 0):
    ids = torch.randint(3, 96, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    if left_pad:
        mask[0, :left_pad] = 0
        ids[0, :left_pad] = 0
    return ids, mask


CACHES = {
    "dynamic": lambda config, batch: DynamicCache(),
    "dynamic_config": lambda config, batch: DynamicCache(config=config),
    "static": lambda config, batch: StaticCache(config, max_batch_size=batch, max_cache_len=16),
    "static_f32": lambda config, batch: StaticCache(config, batch, 16, device="cpu", dtype=torch.float32),
}


@pytest.mark.parametrize("kind", sorted(CACHES))
@pytest.mark.parametrize("left_pad", [0, 3])
@pytest.mark.parametrize("eager", [False, True])
@torch.no_grad()
def test_prefill_then_token_by_token_equals_full_forward(model, kind, left_pad, eager):
    ids, mask = _inputs(left_pad=left_pad)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = CACHES[kind](model.config, 2)
    steps = [model(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, output_attentions=eager).logits]
    for t in range(4, ids.shape[1]):  # runs well past the window of 3
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                    output_attentions=eager)
        assert out.past_key_values is cache
        steps.append(out.logits)
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[valid], full[valid], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("kind", sorted(CACHES))
@torch.no_grad()
def test_chunked_prefill_equals_full_forward(model, kind):
    ids, mask = _inputs(left_pad=2)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = CACHES[kind](model.config, 2)
    chunks = [(0, 5), (5, 7), (7, 12)]
    logits = [
        model(ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache).logits for a, b in chunks
    ]
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[valid], full[valid], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_explicit_cache_position_and_position_ids(model):
    ids, _ = _inputs(batch=1, length=8)
    full = model(ids, use_cache=False).logits
    cache = StaticCache(model.config, 1, 8)
    model(ids[:, :5], past_key_values=cache, cache_position=torch.arange(5))
    for t in range(5, 8):
        out = model(ids[:, t : t + 1], past_key_values=cache, cache_position=torch.tensor([t]),
                    position_ids=torch.tensor([[t]]))
        torch.testing.assert_close(out.logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_static_cache_writes_in_place_and_has_static_shapes(model):
    cache = StaticCache(model.config, max_batch_size=1, max_cache_len=10, dtype=torch.float32)
    pointers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    shapes = [tuple(layer.keys.shape) for layer in cache.layers]
    assert shapes[0] == (1, 2, 10, 8) and shapes[-1] == (1, 2, WINDOW, 8)  # full layer / sliding ring
    ids, _ = _inputs(batch=1, length=10)
    model(ids[:, :4], past_key_values=cache)
    for t in range(4, 10):
        model(ids[:, t : t + 1], past_key_values=cache)
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == pointers
    assert [tuple(layer.keys.shape) for layer in cache.layers] == shapes
    assert cache.get_seq_length() == 10 and cache.get_max_cache_shape() == 10
    with pytest.raises(ValueError, match="max_cache_len=10"):
        model(ids[:, :1], past_key_values=cache)


@torch.no_grad()
def test_static_cache_without_dtype_follows_the_model(model):
    bf16 = Qwen2ForCausalLM(model.config).to(torch.bfloat16).eval()
    cache = StaticCache(model.config, 1, 8)
    out = bf16(torch.randint(3, 96, (1, 3)), past_key_values=cache)
    assert cache.layers[0].keys.dtype == torch.bfloat16 and out.logits.dtype == torch.bfloat16


@torch.no_grad()
def test_dynamic_cache_sliding_layers_stay_bounded_and_full_layers_grow_amortised(model):
    cache = DynamicCache()
    ids, _ = _inputs(batch=1, length=200)
    model(ids[:, :1], past_key_values=cache)
    reallocations, pointer = 0, cache.layers[0].keys.data_ptr()
    for t in range(1, 200):
        model(ids[:, t : t + 1], past_key_values=cache)
        if cache.layers[0].keys.data_ptr() != pointer:
            reallocations, pointer = reallocations + 1, cache.layers[0].keys.data_ptr()
    assert reallocations <= 3  # capacity doubles: 64 -> 128 -> 256
    assert cache.layers[0].keys.shape[2] >= 200
    assert [layer._keys.shape[2] for layer in cache.layers[2:]] == [WINDOW, WINDOW]  # the ring buffers
    assert cache.is_sliding == [False, False, True, True]


@torch.no_grad()
def test_use_cache_creates_a_dynamic_cache(model):
    ids, _ = _inputs(batch=1, length=5)
    out = model(ids, use_cache=True)
    assert isinstance(out.past_key_values, DynamicCache) and out.past_key_values.get_seq_length() == 5
    assert out["past_key_values"] is out.cache
    assert model(ids, use_cache=False).past_key_values is None


@torch.no_grad()
def test_reorder_cache_matches_reordered_inputs(model):
    ids, _ = _inputs(batch=3, length=9)
    order = torch.tensor([2, 0, 0])
    expected = model(ids[order], use_cache=False).logits[:, -1]
    for cache in (DynamicCache(), StaticCache(model.config, 3, 12)):
        model(ids[:, :8], past_key_values=cache)
        cache.reorder_cache(order)
        out = model(ids[order][:, 8:], past_key_values=cache)
        torch.testing.assert_close(out.logits[:, -1], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batch_repeat_interleave_and_select(model):
    ids, _ = _inputs(batch=2, length=7)
    cache = DynamicCache()
    model(ids[:, :6], past_key_values=cache)
    cache.batch_repeat_interleave(2)
    repeated = ids.repeat_interleave(2, dim=0)
    out = model(repeated[:, 6:], past_key_values=cache)
    expected = model(repeated, use_cache=False).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], expected, atol=1e-5, rtol=1e-5)
    cache.batch_select_indices(torch.tensor([3]))
    assert cache.layers[0].keys.shape[0] == 1


@pytest.mark.parametrize("kind", ["dynamic", "static"])
@torch.no_grad()
def test_crop_then_continue_equals_fresh_run(kind):
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(_config(use_sliding_window=False)).eval()
    ids, _ = _inputs(batch=1, length=10)
    other = torch.randint(3, 96, (1, 3))
    cache = CACHES[kind](model.config, 1)
    model(ids, past_key_values=cache)
    cache.crop(6)
    assert cache.get_seq_length() == 6
    out = model(other, past_key_values=cache)
    expected = model(torch.cat([ids[:, :6], other], 1), use_cache=False).logits[:, 6:]
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    cache.crop(-2)
    assert cache.get_seq_length() == 7


@torch.no_grad()
def test_crop_past_the_window_is_refused(model):
    cache = DynamicCache()
    model(torch.randint(3, 96, (1, 8)), past_key_values=cache)
    with pytest.raises(ValueError, match="sliding-window"):
        cache.crop(4)


@torch.no_grad()
def test_reset_allows_reuse(model):
    ids, _ = _inputs(batch=1, length=6)
    cache = StaticCache(model.config, 1, 8)
    first = model(ids, past_key_values=cache).logits
    cache.reset()
    assert cache.get_seq_length() == 0
    torch.testing.assert_close(model(ids, past_key_values=cache).logits, first)


def test_update_api_directly():
    cache = DynamicCache()
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    keys, values = cache.update(k, v, 0)
    assert torch.equal(keys, k) and torch.equal(values, v)
    keys, _ = cache.update(k[:, :, :1], v[:, :, :1], 0, {"cache_position": torch.tensor([3])})
    assert keys.shape == (1, 2, 4, 4) and torch.equal(keys[:, :, 3], k[:, :, 0])
    assert cache.get_seq_length(0) == 4 and cache.get_seq_length(5) == 0
    assert cache.get_max_cache_shape() == -1


@torch.no_grad()
def test_static_cache_allocates_lazily_without_batch_or_dtype(model):
    cache = StaticCache(config=model.config, max_cache_len=8)  # transformers 5.x call shape
    assert cache.layers[0].keys is None
    model(torch.randint(3, 96, (3, 2)), past_key_values=cache)
    assert cache.layers[0].keys.shape == (3, 2, 8, 8) and cache.layers[-1].keys.shape == (3, 2, WINDOW, 8)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer max_cache_len"):
            StaticCache(model.config, 1, bad)


@torch.no_grad()
def test_static_cache_decode_step_compiles_once_without_graph_breaks(model):
    """Static shapes + no python-int guards: one graph serves every decode step (the fast-path contract)."""
    import torch._dynamo

    ids, mask = _inputs(batch=2, length=12, left_pad=2)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = StaticCache(model.config, max_batch_size=2, max_cache_len=12)
    model(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache)

    def step(token, position, attention_mask):
        return model(token, attention_mask=attention_mask, past_key_values=cache, cache_position=position,
                     position_ids=position[None].expand(2, 1)).logits

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        logits = [compiled(ids[:, t : t + 1], torch.tensor([t]), mask) for t in range(4, 12)]
    valid = mask[:, 4:].bool()
    torch.testing.assert_close(torch.cat(logits, 1)[valid], full[:, 4:][valid], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 12


@torch.no_grad()
def test_returned_dynamic_cache_holds_what_transformers_default_cache_holds(model):
    """model(ids, use_cache=True).past_key_values: keys/values of the tokens seen (sliding layers: the last
    window - 1) with transformers' shapes and values, after the prompt and after each new token."""
    import transformers

    theirs = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**model.config.to_dict())).eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    ids, _ = _inputs(batch=2, length=7)
    ours_cache = model(ids[:, :5], use_cache=True).past_key_values
    their_cache = theirs(ids[:, :5], use_cache=True).past_key_values
    for t in range(5, 8):
        assert len(ours_cache.layers) == len(their_cache.layers)
        for mine, reference in zip(ours_cache.layers, their_cache.layers):
            assert mine.keys.shape == reference.keys.shape
            torch.testing.assert_close(mine.keys, reference.keys, atol=1e-5, rtol=0)
            torch.testing.assert_close(mine.values, reference.values, atol=1e-5, rtol=0)
        assert ours_cache.get_seq_length() == their_cache.get_seq_length() == t
        if t < 7:
            ours_cache = model(ids[:, t:t + 1], past_key_values=ours_cache, use_cache=True).past_key_values
            their_cache = theirs(ids[:, t:t + 1], past_key_values=their_cache, use_cache=True).past_key_values
