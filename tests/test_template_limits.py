"""Runaway chat templates (issue 20) fail fast with `ChatTemplateLimitError` (a ValueError) instead of
running until memory or patience runs out, while real templates render exactly as before (transformers'
rendering is the oracle for those)."""

from __future__ import annotations

import threading
import time

import pytest
import transformers

from qwen2.tokenizer import template_limits
from qwen2.tokenizer.chat import render_conversations
from qwen2.tokenizer.template_limits import ChatTemplateLimitError

CHAT = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]

RUNAWAY = {
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested ranges printing": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "three nested ranges": "{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}"
                           "{% endfor %}{% endfor %}{% endfor %}",
    "10 GB string": "{{ 'a' * 10000000000 }}",
    "list times a billion": "{{ ([1] * 1000000000)|length }}",
    "doubling a string": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                         "{% endfor %}{{ ns.s|length }}",
    "str.center": "{{ 'x'.center(10000000000) }}",
    "center filter": "{{ 'x'|center(10000000000) }}",
    "indent filter": "{{ 'a\nb\nc'|indent(1000000000) }}",
    "%-format width": "{{ '%10000000000s' % 'x' }}",
    "%-format star width": "{{ '%*s' % (10000000000, 'x') }}",
    "format filter": "{{ '%.10000000000f'|format(1.5) }}",
    "str.format width": "{{ '{:>10000000000}'.format('x') }}",
    "huge power": "{{ 7 ** 100000000 }}",
    "endless recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential recursion": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}"
                             "{{ f(0) }}",
    "loop over a huge join": "{{ range(100000)|join(',' * 200) }}",
}


@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_runaway_templates_fail_fast_with_a_clear_error(name):
    start = time.monotonic()
    with pytest.raises(ChatTemplateLimitError):
        render_conversations(RUNAWAY[name], CHAT)
    assert time.monotonic() - start < template_limits.MAX_RENDER_SECONDS


def test_the_time_bound_applies_on_its_own(monkeypatch):
    monkeypatch.setattr(template_limits, "MAX_TEMPLATE_STEPS", 10**12)
    monkeypatch.setattr(template_limits, "MAX_RENDER_SECONDS", 0.3)
    with pytest.raises(ChatTemplateLimitError, match="took more than 0.3 s"):
        render_conversations(RUNAWAY["nested ranges"], CHAT)


def test_budgets_are_per_render_and_per_thread():
    """A server renders many prompts: one render's work does not count against another's."""
    template = "{% for i in range(100000) %}{% for j in range(20) %}{% endfor %}{% endfor %}ok"  # 2.1M steps
    results = []

    def render() -> None:
        results.append(render_conversations(template, CHAT)[0])

    threads = [threading.Thread(target=render) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["ok"] * 3
    assert render_conversations(template, CHAT * 2) == ["ok", "ok"]


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
    "{{ '%5d|%-4s|%.3f' % (42, 'ab', 3.14159) }}{{ '{:>6}|{:08.2f}'.format('x', 2.5) }}",
    "{{ range(5)|list }}{{ range(10)|length }}{{ range(2, 20, 3)|join(',') }}{{ range(100000)|sum }}",
    "{{ 'ab' * 3 }}{{ [1, 2] * 2 }}{{ 2 ** 10 }}{{ 'x'|center(9) }}{{ messages|map(attribute='role')|join(' ') }}",
    "{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(20) }}",
    "{{ messages[0].content|tojson }}{{ {'a': 12345678901}|tojson }}{{ 98765432109876 }}",
])
def test_ordinary_templates_render_as_transformers_renders_them(template):
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=_backend())
    expected = tokenizer.apply_chat_template(CHAT[0], chat_template=template, tokenize=False)
    assert render_conversations(template, CHAT) == [expected]


def _backend():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
