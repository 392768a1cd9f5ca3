"""The model API transformers users call beside forward/generate, run through transformers (the oracle) and
through qwen2 on the same tiny random weights: resize_token_embeddings, get_memory_footprint, base_model,
main_input_name, mlp.act_fn hooks, config._attn_implementation, name_or_path, prepare_inputs_for_generation,
compute_transition_scores."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import qwen2
from qwen2.heads import Qwen2ForQuestionAnswering, Qwen2ForSequenceClassification, Qwen2ForTokenClassification

ATOL = 1e-4
TINY = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    rope_theta=10000.0,
)


def _pair(hf_cls=transformers.Qwen2ForCausalLM, ours_cls=qwen2.Qwen2ForCausalLM, **overrides):
    config = {**TINY, **overrides}
    torch.manual_seed(0)
    hf = hf_cls(transformers.Qwen2Config(**config)).eval()
    ours = ours_cls(qwen2.Qwen2Config(**config)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def _ids(length=7):
    return torch.randint(3, TINY["vocab_size"], (2, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "args", [dict(new_num_tokens=110), dict(new_num_tokens=110, mean_resizing=False), dict(new_num_tokens=80),
             dict(new_num_tokens=101, pad_to_multiple_of=16), dict(pad_to_multiple_of=64), dict()],
    ids=["grow_mean", "grow_init", "shrink", "pad_to_multiple", "pad_only", "nothing"])
def test_resize_token_embeddings_matches_transformers(tied, args):
    ours, hf = _pair(tie_word_embeddings=tied)
    torch.manual_seed(11)
    expected = hf.resize_token_embeddings(**args)
    torch.manual_seed(11)
    got = ours.resize_token_embeddings(**args)
    assert got is ours.get_input_embeddings()
    assert got.weight.shape == expected.weight.shape and got.num_embeddings == expected.num_embeddings
    assert ours.config.vocab_size == hf.config.vocab_size == ours.vocab_size
    assert got.padding_idx == expected.padding_idx
    torch.testing.assert_close(got.weight, expected.weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, atol=ATOL, rtol=0)
    assert (ours.lm_head.weight is ours.get_input_embeddings().weight) == tied
    ids = _ids() % ours.config.vocab_size
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
    assert set(ours.state_dict()) == set(hf.state_dict())


def test_resize_on_a_head_without_lm_head_and_bad_arguments():
    ours, hf = _pair(transformers.Qwen2ForSequenceClassification,
                     Qwen2ForSequenceClassification)
    torch.manual_seed(2)
    hf.resize_token_embeddings(120)
    torch.manual_seed(2)
    ours.resize_token_embeddings(120)
    torch.testing.assert_close(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight, atol=ATOL, rtol=0)
    for bad in (dict(new_num_tokens=0), dict(new_num_tokens=10, pad_to_multiple_of=2.5)):
        with pytest.raises(ValueError):
            ours.resize_token_embeddings(**bad)


def test_memory_footprint_base_model_and_main_input_name():
    for ours_cls, hf_cls in [(qwen2.Qwen2ForCausalLM, transformers.Qwen2ForCausalLM),
                             (Qwen2ForQuestionAnswering, transformers.Qwen2ForQuestionAnswering),
                             (Qwen2ForSequenceClassification, transformers.Qwen2ForSequenceClassification),
                             (Qwen2ForTokenClassification, transformers.Qwen2ForTokenClassification),
                             (qwen2.Qwen2Model, transformers.Qwen2Model)]:
        ours, hf = _pair(hf_cls, ours_cls)
        assert ours.get_memory_footprint() == hf.get_memory_footprint()
        assert ours.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)
        assert ours.main_input_name == hf.main_input_name == "input_ids"
        assert ours.loss_type == hf.loss_type  # Trainer counts num_items_in_batch by it
        assert type(ours.base_model).__name__ == type(hf.base_model).__name__
        assert set(ours.base_model.state_dict()) == set(hf.base_model.state_dict())


def test_act_fn_is_a_module_hooks_see_what_transformers_hooks_see():
    ours, hf = _pair()
    seen = {}
    for name, model in (("ours", ours), ("hf", hf)):
        act_fn = model.model.layers[1].mlp.act_fn
        assert isinstance(act_fn, torch.nn.Module)
        act_fn.register_forward_hook(lambda module, args, output, name=name: seen.setdefault(name, output))
        model(_ids())
    torch.testing.assert_close(seen["ours"], seen["hf"], atol=ATOL, rtol=0)
    assert set(ours.state_dict()) == set(hf.state_dict())  # the module adds no state


def test_attn_implementation_default_and_name_or_path(tmp_path):
    ours, hf = _pair()
    assert ours.config._attn_implementation == hf.config._attn_implementation == "sdpa"
    hf.save_pretrained(tmp_path / "hf")
    loaded_hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    loaded = qwen2.Qwen2ForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config._attn_implementation == loaded_hf.config._attn_implementation
    assert loaded.name_or_path == loaded_hf.name_or_path == loaded.config._name_or_path
    assert loaded.__dict__["name_or_path"] == loaded_hf.__dict__["name_or_path"]  # where peft reads it
    assert loaded.config.to_dict()["_name_or_path"] == loaded_hf.config.to_dict()["_name_or_path"]
    loaded.save_pretrained(tmp_path / "ours")
    loaded_hf.save_pretrained(tmp_path / "hf2")
    saved = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "hf2")]
    assert ("_name_or_path" in saved[0]) == ("_name_or_path" in saved[1])  # transformers 5.24 leaves it out


@pytest.mark.parametrize("case", ["prefill", "decode", "embeds_first", "positions_and_extras"])
def test_prepare_inputs_for_generation_matches_transformers(case):
    ours, hf = _pair()
    ids = _ids(6)
    mask = torch.ones_like(ids)
    embeds = torch.randn(2, 6, TINY["hidden_size"])
    kwargs = {
        "prefill": dict(attention_mask=mask, is_first_iteration=True),
        "decode": dict(attention_mask=mask, next_sequence_length=1, use_cache=True),
        "embeds_first": dict(inputs_embeds=embeds, is_first_iteration=True, next_sequence_length=4),
        "positions_and_extras": dict(position_ids=torch.arange(6)[None].expand(2, -1), next_sequence_length=2,
                                     labels=ids, output_attentions=True, logits_to_keep=1),
    }[case]
    got = ours.prepare_inputs_for_generation(ids, **kwargs)
    expected = hf.prepare_inputs_for_generation(ids, **kwargs)
    assert set(got) == set(expected)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, atol=0, rtol=0)
        else:
            assert got[key] == value


@pytest.mark.parametrize("options", [dict(do_sample=False), dict(do_sample=True, top_k=5, temperature=0.7),
                                     dict(num_beams=3, num_return_sequences=2, length_penalty=0.5)],
                         ids=["greedy", "sampling", "beams"])
@pytest.mark.parametrize("normalize", [False, True])
def test_compute_transition_scores_matches_transformers(options, normalize):
    ours, hf = _pair()
    ids = _ids(5)
    results = []
    for model in (ours, hf):
        torch.manual_seed(21)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=0, eos_token_id=[7, 9], **options)
        scores = model.compute_transition_scores(out.sequences, out.scores, getattr(out, "beam_indices", None),
                                                 normalize_logits=normalize)
        results.append((out.sequences, scores))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=ATOL, rtol=0)


def test_activation_checkpointing_every_n_layers_with_offload_keeps_gradients():
    ours, hf = _pair(num_hidden_layers=3)
    ids = _ids()
    results = []
    for model in (ours, hf, ours):
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.activation_checkpointing_enable(every_n_layers=2, offload=True)
    assert ours.is_activation_checkpointing
    for name in results[0]:
        torch.testing.assert_close(results[2][name], results[0][name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(results[0][name], results[1][name], atol=ATOL, rtol=0, msg=name)
    ours.activation_checkpointing_disable()
    assert not ours.is_activation_checkpointing
    with pytest.raises(ValueError, match="every_n_layers"):
        ours.activation_checkpointing_enable(every_n_layers=0)
