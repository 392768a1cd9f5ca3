"""Tokenized training examples against transformers' tokenizer on the same files (the oracle): the assistant
mask of sft (role spans on Qwen2.5's own template, generation blocks on a marked one) equals transformers'
return_assistant_tokens_mask token by token; tag labels follow its word_ids() (first sub-token labelled)."""

from __future__ import annotations

import pytest
from finetune_harness import generation_template, write_jsonl

from qwen2.training.data import DataError, read_dataset
from qwen2.training.encode import IGNORE, encode_dataset

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}]},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3, in words?"},
                  {"role": "assistant", "content": "six  \n"}]},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "21 °C in Paris — sunny."}]},
    {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "18"}, {"role": "tool", "content": "25"},
        {"role": "assistant", "content": "Paris 18, Rome 25."}]},
]


def _oracle(hf, conversation, template):
    out = hf.apply_chat_template(conversation["messages"], tools=conversation.get("tools"), chat_template=template,
                                 return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _learned(example):
    """The positions whose token is learned (targets are shifted: target t is token t+1)."""
    return [0] + [int(t != IGNORE) for t in example.targets[:-1]]


@pytest.mark.parametrize("marked", [False, True], ids=["role-spans", "generation-blocks"])
def test_assistant_mask_equals_transformers(marked, both, hf, tmp_path):
    template = generation_template(hf.chat_template)
    data = read_dataset(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS), "sft")
    for ours in both:
        if marked:
            ours = type(ours).from_pretrained(hf.name_or_path, chat_template=template)
        examples = encode_dataset(ours, data, max_length=4096)
        for conversation, example in zip(CONVERSATIONS, examples):
            ids, mask = _oracle(hf, conversation, template)
            assert example.input_ids == ids  # the marked template renders the same text
            assert sum(mask) > 0
            assert _learned(example) == mask
            assert [t for t in example.targets if t != IGNORE] == [i for i, m in zip(ids, mask) if m]


def test_truncation_is_counted_or_refused(both, tmp_path, caplog):
    long = {"messages": [{"role": "user", "content": "Count."},
                         {"role": "assistant", "content": " ".join(str(i) for i in range(60))}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATIONS[0], long, CONVERSATIONS[1], long])
    data = read_dataset(path, "sft")
    ours = both[1]
    whole = encode_dataset(ours, data, max_length=4096)
    full = [len(e.input_ids) for e in whole]
    limit = max(full[0], full[2]) + 5  # two conversations fit, two do not
    assert full[1] > limit + 5
    with caplog.at_level("WARNING"):
        cut = encode_dataset(ours, data, max_length=limit)
    assert [len(e.input_ids) for e in cut] == [min(n, limit) for n in full]
    assert "2 of 4 examples were longer than --max-length" in caplog.text
    assert all(e.targets[-1] == IGNORE for e in cut)
    with pytest.raises(DataError) as refused:
        encode_dataset(ours, data, max_length=limit, too_long="refuse")
    lines = [i + 1 for i, n in enumerate(full) if n > limit]
    for line in lines:
        assert f"{path}:{line}: field 'messages': {full[line - 1]} tokens, more than --max-length {limit}" \
            in str(refused.value)
    with pytest.raises(DataError, match="chat.jsonl:1: field 'messages': nothing left to learn"):
        # cut just before the first answer token: the prompt alone is left
        encode_dataset(ours, data, max_length=_learned(whole[0]).index(1))


TAGGED = [
    {"tokens": ["John", "Smith", "lives", "in", "New", "York", "."], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC",
                                                                            "I-LOC", "O"]},
    {"tokens": ["Übermäßig", "naïve", "twenty-one", "señores", "🙂", "x"], "tags": ["O", "O", "B-NUM", "O", "O", "O"]},
]


def test_tag_labels_follow_transformers_word_ids(both, hf, tmp_path):
    data = read_dataset(write_jsonl(tmp_path / "tags.jsonl", TAGGED), "tag")
    names = data.labels
    for ours in both:
        for row, example in zip(TAGGED, encode_dataset(ours, data, max_length=512)):
            encoded = hf(row["tokens"], is_split_into_words=True, add_special_tokens=False)
            expected, previous = [], None
            for word in encoded.word_ids():
                expected.append(-100 if word is None or word == previous else names.index(row["tags"][word]))
                previous = word
            assert example.input_ids == encoded["input_ids"]
            assert example.targets == expected
            assert sum(t != IGNORE for t in example.targets) == len(row["tokens"])


def test_classify_pairs_tokenize_like_transformers(both, hf, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('text,text_pair,label\n"Is it, really?",Yes it is,entail\nNo,"",contradict\n')
    data = read_dataset(path, "classify")
    assert data.labels == ["contradict", "entail"]
    for ours in both:
        first, second = encode_dataset(ours, data, max_length=64)
        assert first.input_ids == hf("Is it, really?", "Yes it is", add_special_tokens=False)["input_ids"]
        assert second.input_ids == hf("No", add_special_tokens=False)["input_ids"]
        assert (first.label, second.label) == (1, 0)
