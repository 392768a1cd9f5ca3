"""Options shared by the subcommands that run a model: which model, and how to sample.

Every numeric option is checked where it is parsed, by the same function that checks `/set NAME VALUE` in
the chat, so a bad value is one message naming the option, never an error from deep inside generate().
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
GROUP_SIZES = (32, 64, 128, 256)  # qwen2.quantization.int4.GROUP_SIZES (a test keeps them equal)


def _number(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def _checked(kind: type, test: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = _number(kind, text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "at least 1")
# name -> (parse, help): the sampling parameters of the command line and of `/set NAME VALUE`.
SAMPLING_PARAMETERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "temperature": (_checked(float, lambda v: v >= 0, "at least 0 (0 decodes greedily)"),
                    "divides the logits before sampling: lower is more focused, 0 decodes greedily"),
    "top_p": (_checked(float, lambda v: 0 < v <= 1, "in (0, 1]"),
              "sample from the smallest set of tokens whose probabilities add up to this (1 keeps all)"),
    "top_k": (_checked(int, lambda v: v >= 0, "at least 0 (0 keeps every token)"),
              "sample from the k most likely tokens (0 keeps all)"),
    "min_p": (_checked(float, lambda v: 0 <= v <= 1, "in [0, 1]"),
              "drop tokens less likely than this fraction of the most likely one"),
    "repetition_penalty": (_checked(float, lambda v: v > 0, "greater than 0 (1 is no penalty)"),
                           "divides the scores of tokens already in the text (>1 discourages repeats; "
                           "applies to greedy decoding too)"),
    "seed": (_checked(int, lambda v: v >= 0, "at least 0"),
             "seed of the sampler's random generator, for reproducible answers"),
    "max_new_tokens": (positive_int, "stop after this many new tokens"),
}
# Setting any of these asks for sampling (a model's defaults may be greedy).
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "seed")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=None,
                       help="local directory, .gguf file or hub id (default: the embedded "
                            "Qwen2.5-Coder-0.5B-Instruct, with the hub model's sampling defaults)")
    group.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    group.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                       help="weight dtype; 'auto' keeps the checkpoint's (default: bfloat16)")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice, one per core)")
    group.add_argument("--quantization", "-q", default=None, choices=("int8", "int4", "w8a8"),
                       help="quantisation applied at load: int8/int4 weight-only, or w8a8 (int8 weights and "
                            "activations: faster long prompts) (default: none)")
    group.add_argument("--group-size", type=int, default=None, choices=GROUP_SIZES,
                       help="int4 only: input columns sharing one scale (default: 32)")


def add_sampling_options(parser: argparse.ArgumentParser, compile_default: str) -> None:
    group = parser.add_argument_group(
        "sampling", "Unset options take the model's generation config (the embedded model samples with "
                    "temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05; a .gguf file decodes "
                    "greedily). Any of --temperature/--top-p/--top-k/--min-p/--seed turns sampling on.")
    group.add_argument("--max-new-tokens", type=positive_int, default=512,
                       help="stop after this many new tokens (default: 512)")
    group.add_argument("--greedy", action="store_true",
                       help="always take the most likely token (same as --temperature 0)")
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
        parse, meaning = SAMPLING_PARAMETERS[name]
        group.add_argument("--" + name.replace("_", "-"), type=parse, default=None,
                           help=f"{meaning} (default: the model's)" if name != "seed" else
                           f"{meaning} (default: random)")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help=f"torch.compile the decode step: ~1.5x faster decoding (default: {compile_default})")


@dataclass
class Sampling:
    """The sampling settings of a session, turned into generate() arguments for each answer."""

    max_new_tokens: int = 512
    greedy: bool = False
    values: dict[str, Any] = field(default_factory=dict)  # the SAMPLING_PARAMETERS the user set
    generator: Any = None  # torch.Generator seeded from `seed`: one stream over a whole session

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sampling:
        values = {name: getattr(args, name) for name in SAMPLING_PARAMETERS
                  if name != "max_new_tokens" and getattr(args, name) is not None}
        greedy = args.greedy or values.get("temperature") == 0
        if args.greedy:
            clash = [f"--{name.replace('_', '-')}" for name in ("temperature", "top_p", "top_k", "min_p")
                     if name in values and not (name == "temperature" and values[name] == 0)]
            if clash:
                raise ValueError(f"--greedy cannot be combined with {', '.join(clash)}: drop one or the other")
        sampling = cls(max_new_tokens=args.max_new_tokens, greedy=greedy, values=values)
        sampling.reseed()
        return sampling

    def set(self, name: str, text: str) -> None:
        """`/set NAME VALUE`: parse and apply one parameter (ValueError naming it if the value is bad)."""
        try:
            value = SAMPLING_PARAMETERS[name][0](text)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"{name} {err}") from None
        if name == "max_new_tokens":
            self.max_new_tokens = value
            return
        self.values[name] = value
        if name in _SAMPLING_ONLY:
            self.greedy = name == "temperature" and value == 0
            if not self.greedy and self.values.get("temperature") == 0:
                del self.values["temperature"]  # sampling again: back to the model's temperature
        if name == "seed":
            self.reseed()

    def reseed(self) -> None:
        seed = self.values.get("seed")
        if seed is not None:
            import torch

            self.generator = torch.Generator().manual_seed(seed)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if "repetition_penalty" in self.values:
            kwargs["repetition_penalty"] = self.values["repetition_penalty"]
        if self.greedy:
            kwargs["do_sample"] = False
            return kwargs
        kwargs.update((name, value) for name, value in self.values.items() if name != "seed")
        if any(name in self.values for name in _SAMPLING_ONLY):
            kwargs["do_sample"] = True
        if self.generator is not None:
            kwargs["generator"] = self.generator
        return kwargs

    def describe(self) -> str:
        mode = "greedy" if self.greedy else "sampling" if any(n in self.values for n in _SAMPLING_ONLY) \
            else "the model's defaults"
        shown = ", ".join(f"{name} {value}" for name, value in self.values.items())
        return f"{mode}; max_new_tokens {self.max_new_tokens}" + (f"; {shown}" if shown else "")


def model_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """The (path or id, gguf_file) to load: the embedded default model, as the hub id's stand-in, if none."""
    if args.model is None:
        from qwen2.loading.default_model import default_model_dir

        return str(default_model_dir()), None
    return args.model, args.gguf_file


def clamp_threads(wanted: int) -> int:
    """`--threads`, clamped to the cores this process may run on: more threads than cores only contend."""
    if wanted < 1:
        raise ValueError(f"--threads must be at least 1, got {wanted}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if wanted > cores:
        logger.warning("--threads %d is more than the %d core(s) available; using %d", wanted, cores, cores)
        return cores
    return wanted


MODEL_OPTIONS = ("model", "gguf_file", "dtype", "quantization", "group_size")  # what `load_weights` reads


def load_weights(args: argparse.Namespace) -> Any:
    """The model the model options in `args` name (no tokenizer)."""
    from qwen2 import AutoModelForCausalLM

    source, gguf_file = model_source(args)
    return AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=args.dtype,
                                                quantization=args.quantization, group_size=args.group_size)


def load_model(args: argparse.Namespace) -> tuple[Any, Any, float]:
    """(model, tokenizer, seconds it took) for the model options in `args`."""
    started = time.perf_counter()
    import torch

    from qwen2 import AutoTokenizer

    if args.threads is not None:
        torch.set_num_threads(clamp_threads(args.threads))
    if args.group_size is not None and args.quantization != "int4":
        raise ValueError("--group-size applies only with --quantization int4")
    source, gguf_file = model_source(args)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = load_weights(args)
    return model, tokenizer, time.perf_counter() - started
