"""Reading and checking the training files of each task, before any model is loaded.

Every record is checked whole and every problem is reported with its file, line and field, so a bad line 9,000
is found in seconds instead of after an hour of training. Formats (one JSON object a line, or CSV with a header):

- sft:      {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]?}, with at least one assistant turn
- classify: {"text": ..., "label": ..., "text_pair": ...?}  (JSONL or CSV)
- tag:      {"tokens": [...], "tags": [...]}  (the same length)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("sft", "classify", "tag")
ROLES = ("system", "user", "assistant", "tool")
_MAX_LISTED = 10  # problems named in one error; the rest are counted


class DataError(ValueError):
    """Bad training data: names every problem found (file, line, field) before training starts."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:_MAX_LISTED]
        more = len(self.problems) - len(shown)
        suffix = f"; ... and {more} more" if more else ""
        super().__init__("bad training data: " + "; ".join(shown) + suffix)


@dataclass
class Record:
    """One checked example and where it came from (for messages about it later, e.g. too long)."""

    path: str
    line: int
    fields: dict[str, Any]

    def where(self, name: str) -> str:
        return f"{self.path}:{self.line}: field {name!r}"


@dataclass
class Dataset:
    """The checked records of one file, and the label set (classify/tag) they use."""

    task: str
    records: list[Record]
    labels: list[str] = field(default_factory=list)


def _problem(path: str, line: int | None, name: str | None, text: str) -> str:
    where = f"{path}:{line}" if line is not None else path
    return f"{where}: field {name!r}: {text}" if name else f"{where}: {text}"


def _rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, problem or None) for each non-blank line or CSV row."""
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as error:
        raise OSError(f"cannot read training data {path}: {error.strerror or error}") from None
    with handle:
        try:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(handle)
                if reader.fieldnames is None:
                    return
                for row in reader:
                    extra = row.pop(None, None)  # more cells than header names
                    yield reader.line_num, row, (f"{len(extra)} cell(s) more than the header's columns"
                                                 if extra else None)
                return
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line.strip()), None
                except json.JSONDecodeError as error:
                    yield number, None, f"invalid JSON: {error.msg} at column {error.colno}"
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def _text(value: Any, name: str, required: bool = True) -> str | None:
    """The problem with a text field, or None if it is fine."""
    if value is None:
        return "missing" if required else None
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if required and not value.strip():
        return "empty"
    return None


def _check_sft(row: dict[str, Any]) -> list[tuple[str, str]]:
    messages = row.get("messages")
    if messages is None:
        return [("messages", "missing")]
    if not isinstance(messages, list) or not messages:
        return [("messages", "must be a non-empty list of {role, content} objects")]
    problems = []
    for index, message in enumerate(messages):
        name = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append((name, "must be an object with 'role' and 'content'"))
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append((f"{name}.role", f"must be one of {', '.join(ROLES)}, got {role!r}"))
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls"):
            if content is not None and not isinstance(content, str):
                problems.append((f"{name}.content", f"must be a string, got {type(content).__name__}"))
        elif (problem := _text(content, "content")) is not None:
            problems.append((f"{name}.content", problem))
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append(("messages", "no assistant turn: nothing to learn from"))
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        problems.append(("tools", "must be a list of tool objects"))
    return problems


def _label_text(value: Any) -> str | None:
    """Labels may be strings or integers in the file; they are names from here on."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _check_classify(row: dict[str, Any], labels: set[str] | None) -> list[tuple[str, str]]:
    problems = []
    if (problem := _text(row.get("text"), "text")) is not None:
        problems.append(("text", problem))
    if (problem := _text(row.get("text_pair"), "text_pair", required=False)) is not None:
        problems.append(("text_pair", problem))
    raw = row.get("label")
    label = _label_text(raw)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        problems.append(("label", "missing" if raw is None else "empty"))
    elif label is None:
        problems.append(("label", f"must be a string or an integer, got {type(raw).__name__}"))
    elif labels is not None and label not in labels:
        problems.append(("label", f"{label!r} is not in the label set ({', '.join(sorted(labels))})"))
    else:
        row["label"] = label
    if row.get("text_pair") == "":
        row["text_pair"] = None
    return problems


def _check_tag(row: dict[str, Any], labels: set[str] | None) -> list[tuple[str, str]]:
    tokens, tags = row.get("tokens"), row.get("tags")
    problems = []
    for name, value in (("tokens", tokens), ("tags", tags)):
        if value is None:
            problems.append((name, "missing"))
        elif not isinstance(value, list) or not value:
            problems.append((name, "must be a non-empty list of strings"))
        elif bad := [i for i, item in enumerate(value) if not isinstance(item, str) or not item.strip()]:
            problems.append((f"{name}[{bad[0]}]", "must be a non-empty string"))
    if problems:
        return problems
    if len(tokens) != len(tags):
        return [("tags", f"has {len(tags)} tags for {len(tokens)} tokens")]
    if labels is not None:
        unknown = [tag for tag in tags if tag not in labels]
        if unknown:
            index = tags.index(unknown[0])
            problems.append((f"tags[{index}]", f"{unknown[0]!r} is not in the label set ({', '.join(sorted(labels))})"))
    return problems


def read_dataset(path: str | Path, task: str, labels: Sequence[str] | None = None) -> Dataset:
    """Read and check one file for `task`. With `labels`, a label outside them is an error; without, the label
    set is the sorted set of labels found. Raises DataError listing the problems, or OSError."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    path = Path(path)
    if task != "classify" and path.suffix.lower() == ".csv":
        raise ValueError(f"{path}: the {task} task reads JSONL (one JSON object a line), not CSV")
    allowed = set(labels) if labels is not None else None
    records, problems = [], []
    for line, row, problem in _rows(path):
        if problem is not None:
            problems.append(_problem(str(path), line, None, problem))
            continue
        if not isinstance(row, dict):
            problems.append(_problem(str(path), line, None, f"expected a JSON object, got {type(row).__name__}"))
            continue
        found = (_check_sft(row) if task == "sft" else
                 _check_classify(row, allowed) if task == "classify" else _check_tag(row, allowed))
        problems.extend(_problem(str(path), line, name, text) for name, text in found)
        if not found:
            records.append(Record(str(path), line, row))
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([_problem(str(path), None, None, "empty file: no examples")])
    if labels is not None:
        label_set = list(labels)
    elif task == "classify":
        label_set = sorted({r.fields["label"] for r in records})
    elif task == "tag":
        label_set = sorted({tag for r in records for tag in r.fields["tags"]})
    else:
        label_set = []
    if task == "classify" and len(label_set) < 2:
        raise DataError([_problem(str(path), None, "label", f"only one label ({label_set[0]!r}): a classifier "
                                                            "needs at least two")])
    return Dataset(task, records, label_set)
