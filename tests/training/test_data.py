"""Bad training data is refused before training, each problem named by file, line and field."""

from __future__ import annotations

import pytest
from finetune_harness import write_jsonl

from qwen2.training.data import DataError, read_dataset

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _problems(path, task, labels=None):
    with pytest.raises(DataError) as error:
        read_dataset(path, task, labels)
    return error.value.problems


def test_sft_problems_named_by_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        GOOD_CHAT,
        '{"messages": [',
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"text": "no messages"},
        {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
        {"messages": []},
        "[1, 2]",
    ])
    assert _problems(path, "sft") == [
        f"{path}:2: invalid JSON: Expecting value at column 15",
        f"{path}:3: field 'messages': no assistant turn: nothing to learn from",
        f"{path}:4: field 'messages': missing",
        f"{path}:5: field 'messages[0].content': empty",
        f"{path}:6: field 'messages[0].role': must be one of system, user, assistant, tool, got 'robot'",
        f"{path}:7: field 'messages': must be a non-empty list of {{role, content}} objects",
        f"{path}:8: expected a JSON object, got list",
    ]


def test_classify_labels_checked_against_the_given_set(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngreat film,pos\n,neg\nawful,\nmeh,neutral\nfine,pos,extra\n")
    assert _problems(path, "classify", ["pos", "neg"]) == [
        f"{path}:3: field 'text': empty",
        f"{path}:4: field 'label': empty",
        f"{path}:5: field 'label': 'neutral' is not in the label set (neg, pos)",
        f"{path}:6: 1 cell(s) more than the header's columns",
    ]
    jsonl = write_jsonl(tmp_path / "r.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0},
                                               {"text": "c", "label": True}, {"label": 0}])
    assert _problems(jsonl, "classify") == [f"{jsonl}:3: field 'label': must be a string or an integer, got bool",
                                            f"{jsonl}:4: field 'text': missing"]


def test_classify_label_set_and_single_label(tmp_path):
    data = read_dataset(write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "b"}, {"text": "y", "label": "a"},
                                                           {"text": "z", "label": "b", "text_pair": "w"}]),
                        "classify")
    assert data.labels == ["a", "b"] and len(data.records) == 3
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": "b"}])
    assert _problems(one, "classify") == [f"{one}: field 'label': only one label ('b'): a classifier needs at least two"]


def test_tag_problems(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"tokens": ["a", "b"], "tags": ["O", "B-X"]},
        {"tokens": ["a", "b"], "tags": ["O"]},
        {"tokens": ["a", ""], "tags": ["O", "O"]},
        {"tokens": [], "tags": []},
        {"tokens": ["a"], "tags": ["B-Y"]},
    ])
    assert _problems(path, "tag", ["O", "B-X"]) == [
        f"{path}:2: field 'tags': has 1 tags for 2 tokens",
        f"{path}:3: field 'tokens[1]': must be a non-empty string",
        f"{path}:4: field 'tokens': must be a non-empty list of strings",
        f"{path}:4: field 'tags': must be a non-empty list of strings",
        f"{path}:5: field 'tags[0]': 'B-Y' is not in the label set (B-X, O)",
    ]


def test_empty_missing_and_wrong_kind_of_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert _problems(empty, "sft") == [f"{empty}: empty file: no examples"]
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    assert _problems(header_only, "classify") == [f"{header_only}: empty file: no examples"]
    with pytest.raises(OSError, match="cannot read training data"):
        read_dataset(tmp_path / "missing.jsonl", "sft")
    with pytest.raises(ValueError, match="reads JSONL"):
        read_dataset(header_only, "tag")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_dataset(binary, "classify")


def test_many_problems_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", ["{"] * 25)
    with pytest.raises(DataError, match=r"many.jsonl:10: invalid JSON.*\.\.\. and 15 more$"):
        read_dataset(path, "sft")
