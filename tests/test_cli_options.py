"""The command line's options, as a user meets them: usage errors from the installed `qwen2` command (no
model is loaded for any of them), and what the sampling options ask generate() for."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2.cli.main import build_parser
from qwen2.cli.options import GROUP_SIZES, Sampling

QWEN2 = str(Path(sys.executable).parent / "qwen2")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QWEN2, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--temperature", "-1"], "argument --temperature: must be at least 0"),
    (["generate", "hi", "--top-p", "2"], "argument --top-p: must be in (0, 1], got 2"),
    (["chat", "--min-p", "5"], "argument --min-p: must be in [0, 1], got 5"),
    (["chat", "--top-k", "-3"], "argument --top-k: must be at least 0"),
    (["generate", "hi", "--repetition-penalty", "0"], "argument --repetition-penalty: must be greater than 0"),
    (["generate", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["generate", "hi", "--temperature", "warm"], "argument --temperature: expected a number, got 'warm'"),
    (["generate", "hi", "--group-size", "48"], "argument --group-size: invalid choice: 48"),
])
def test_bad_values_are_usage_errors_of_their_subcommand(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.startswith(f"usage: qwen2 {args[0]}")


def test_unknown_option_prints_the_subcommands_usage():
    result = run("generate", "hi", "--foo")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: qwen2 generate") and "unrecognized arguments: --foo" in result.stderr


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.split()[:2] == ["qwen2", importlib.metadata.version("qwen2")]
    assert f"torch {importlib.metadata.version('torch')}" in result.stdout


def test_verbose_is_accepted_after_the_subcommand(tmp_path):
    """-v shows the traceback of an error; before or after the subcommand alike."""
    missing = str(tmp_path / "missing.gguf")
    quiet = run("info", missing)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr and len(quiet.stderr.splitlines()) == 1
    for args in (["-v", "info", missing], ["info", missing, "-v"], ["info", "--verbose", missing]):
        assert "Traceback" in run(*args).stderr, args


def test_greedy_with_sampling_options_is_refused():
    result = run("generate", "hi", "--greedy", "--temperature", "0.5", "--top-k", "3")
    assert result.returncode == 1
    assert result.stderr.strip() == ("qwen2 generate: error: --greedy cannot be combined with --temperature, "
                                     "--top-k: drop one or the other")


def test_group_size_help_and_choices_are_the_libraries():
    from qwen2.quantization.int4 import GROUP_SIZES as LIBRARY_GROUP_SIZES

    assert GROUP_SIZES == LIBRARY_GROUP_SIZES
    assert "{32,64,128,256}" in run("generate", "--help").stdout


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            assert action.help, f"qwen2 {name} {action.option_strings or action.dest} has no help"


def _sampling(*argv: str) -> Sampling:
    args = build_parser().parse_args(["generate", "x", *argv])
    return Sampling.from_args(args)


@pytest.mark.parametrize("argv, expected", [
    ([], {}),  # the model's generation config decides
    (["--greedy"], {"do_sample": False}),
    (["--temperature", "0"], {"do_sample": False}),
    (["--temperature", "0", "--repetition-penalty", "1.2"], {"do_sample": False, "repetition_penalty": 1.2}),
    (["--temperature", "1.5"], {"do_sample": True, "temperature": 1.5}),
    (["--top-p", "0.9", "--top-k", "0", "--min-p", "0.05"], {"do_sample": True, "top_p": 0.9, "top_k": 0,
                                                             "min_p": 0.05}),
    (["--repetition-penalty", "1.1"], {"repetition_penalty": 1.1}),  # not a sampling option: greedy stays greedy
])
def test_what_the_options_ask_generate_for(argv, expected):
    kwargs = _sampling(*argv).generate_kwargs()
    assert kwargs.pop("max_new_tokens") == 512
    assert kwargs == expected


def test_seed_samples_with_one_generator_per_session():
    import torch

    sampling = _sampling("--seed", "5")
    kwargs = sampling.generate_kwargs()
    assert kwargs["do_sample"] is True
    assert torch.equal(torch.rand(4, generator=kwargs["generator"]), torch.rand(4, generator=torch.Generator()
                                                                                .manual_seed(5)))
    assert sampling.generate_kwargs()["generator"] is kwargs["generator"]  # the session's stream goes on


def test_set_in_the_chat_switches_between_greedy_and_sampling():
    sampling = _sampling("--greedy")
    sampling.set("temperature", "0.2")
    assert sampling.generate_kwargs()["do_sample"] is True
    sampling.set("temperature", "0")
    assert sampling.generate_kwargs()["do_sample"] is False
    sampling.set("top_k", "5")  # sampling again, at the model's temperature (0 cannot sample)
    assert sampling.generate_kwargs() == {"max_new_tokens": 512, "do_sample": True, "top_k": 5}
    sampling.set("max_new_tokens", "7")
    assert sampling.generate_kwargs()["max_new_tokens"] == 7
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        sampling.set("top_p", "1.5")
