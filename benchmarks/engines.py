"""The engines bench_generate.py compares, behind one small interface, each run in its own process.

- `TorchEngine`: ours (`qwen2`) or transformers; both expose the same `from_pretrained` / forward /
  `generate` API, so one class drives both and the two are measured through exactly the same calls.
- `LlamaCppEngine`: llama.cpp through llama-cpp-python on the same GGUF, with the same thread count.

Every engine works on token ids (tokenised once by the parent), so all engines see identical inputs.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENGINES = ("ours-bf16", "ours-int8", "ours-int4", "ours-w8a8", "hf-bf16", "hf-fp32", "llamacpp")


def memory_mb() -> dict[str, float]:
    """Current and peak resident set size of this process (Linux /proc), in MB."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": fields.get("VmRSS", float("nan")), "peak_rss_mb": fields.get("VmHWM", float("nan"))}


class _FirstTokenTimer:
    """A streamer that only notes when the first generated tokens arrive (the first put is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self._puts = 0

    def put(self, value: Any) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class TorchEngine:
    """Ours or transformers, through their common from_pretrained / forward / generate API."""

    def __init__(self, name: str, gguf: Path, threads: int, group_size: int | None) -> None:
        self.name = name
        self.gguf = gguf
        self.library, variant = name.split("-")
        self.dtype = torch.float32 if variant == "fp32" else torch.bfloat16
        self.scheme = variant if variant in ("int8", "int4", "w8a8") else None
        self.group_size = group_size
        torch.set_num_threads(threads)
        self.model: Any = None
        self.eos: list[int] = []

    def load(self) -> dict[str, float]:
        start = time.perf_counter()
        if self.library == "hf":
            import transformers

            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(self.gguf.parent), gguf_file=self.gguf.name, dtype=self.dtype)
        else:
            import qwen2

            self.model = qwen2.Qwen2ForCausalLM.from_pretrained(
                str(self.gguf), dtype=self.dtype, quantization=self.scheme,
                group_size=self.group_size if self.scheme == "int4" else None)
        self.model.eval()
        info = {"load_s": time.perf_counter() - start, "load_peak_rss_mb": memory_mb()["peak_rss_mb"]}
        if self.library == "ours":
            # Compile the single-row decode step up front, as `qwen2 chat` does; several rows decode eagerly
            # (generate()'s CPU policy). Reported separately: paid once per process.
            start = time.perf_counter()
            self.model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=2, min_new_tokens=2,
                                do_sample=False, disable_compile=False)
            info["compile_s"] = time.perf_counter() - start
        eos = self.model.generation_config.eos_token_id
        self.eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        tensors = [*self.model.parameters(), *self.model.buffers()]
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.device.type != "meta"}
        info["weight_mb"] = sum(unique.values()) / 2**20
        return info

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int, stop_at_eos: bool = False,
                 time_first: bool = False, eager: bool = False) -> tuple[list[list[int]], float, float | None]:
        """(new tokens per row, total seconds, seconds to the first token if `time_first`); greedy. `eager`:
        ours without the compiled decode step."""
        ids = torch.tensor(prompts)
        timer = _FirstTokenTimer() if time_first else None
        kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
                                      pad_token_id=self.eos[0], streamer=timer)
        if eager:
            kwargs["disable_compile"] = True
        if not stop_at_eos:
            kwargs["min_new_tokens"] = new_tokens
        start = time.perf_counter()
        out = self.model.generate(ids, **kwargs)
        total = time.perf_counter() - start
        rows = [row[len(prompts[0]):].tolist() for row in out]
        if stop_at_eos:
            rows = [_cut_at(row, self.eos) for row in rows]
        return rows, total, (timer.first - start) if timer and timer.first else None

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()

    def close(self) -> None:
        self.model = None
        gc.collect()


class LlamaCppEngine:
    """llama.cpp (llama-cpp-python) on the same GGUF: its own decode loop and greedy sampler."""

    name = "llamacpp"

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        self.gguf, self.threads, self.n_ctx = gguf, threads, n_ctx
        self.llm: Any = None
        self._scoring: Any = None
        self.eos: list[int] = []

    def _open(self, **kwargs: Any) -> Any:
        from llama_cpp import Llama

        return Llama(model_path=str(self.gguf), n_threads=self.threads, n_threads_batch=self.threads,
                     verbose=False, **kwargs)

    def load(self) -> dict[str, float]:
        start = time.perf_counter()
        self.llm = self._open(n_ctx=self.n_ctx, n_batch=2048, n_ubatch=512)
        self.eos = [self.llm.token_eos()]
        return {"load_s": time.perf_counter() - start, "weight_mb": self.gguf.stat().st_size / 2**20,
                "load_peak_rss_mb": memory_mb()["peak_rss_mb"]}

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def generate(self, prompts: list[list[int]], new_tokens: int, stop_at_eos: bool = False,
                 time_first: bool = False) -> tuple[list[list[int]], float, float | None]:
        if len(prompts) != 1:
            return self._generate_batch(prompts, new_tokens)
        self.llm.reset()  # n_tokens = 0: llama-cpp-python would otherwise reuse a cached prompt prefix
        out: list[int] = []
        first = None
        start = time.perf_counter()
        for token in self.llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
            if first is None:
                first = time.perf_counter() - start
            if stop_at_eos and token in self.eos:
                break
            out.append(token)
            if len(out) == new_tokens:
                break
        return [out], time.perf_counter() - start, first

    def _generate_batch(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, None]:
        """Greedy decoding of several sequences in one llama_decode per step (llama.cpp's batched decoding,
        through the low-level API: the high-level one decodes a single sequence)."""
        import llama_cpp as lib

        n_seq, length = len(prompts), len(prompts[0])
        params = lib.llama_context_default_params()
        params.n_ctx = n_seq * (length + new_tokens + 8)
        params.n_batch = params.n_ubatch = max(512, n_seq * length)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(self.llm._model.model, params)
        batch = lib.llama_batch_init(params.n_batch, 0, n_seq)
        n_vocab = self.llm.n_vocab()
        rows = [[] for _ in prompts]

        def decode(step_tokens: list[list[int]], start: int) -> None:
            batch.n_tokens = 0
            last = []  # batch index of each sequence's last token, whose logits we read
            for seq, tokens in enumerate(step_tokens):
                for i, token in enumerate(tokens):
                    j = batch.n_tokens
                    batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, start + i, 1
                    batch.seq_id[j][0] = seq
                    batch.logits[j] = i == len(tokens) - 1
                    batch.n_tokens += 1
                last.append(batch.n_tokens - 1)
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for seq, j in enumerate(last):
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, j), shape=(n_vocab,))
                rows[seq].append(int(logits.argmax()))

        try:
            start = time.perf_counter()
            decode(prompts, 0)
            for step in range(1, new_tokens):
                decode([[row[-1]] for row in rows], length + step - 1)
            total = time.perf_counter() - start
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
        return rows, total, None

    def logits(self, ids: list[int]) -> torch.Tensor:
        if self._scoring is None:  # per-position logits need logits_all, which would slow the speed runs down
            self.llm = None
            gc.collect()
            self._scoring = self._open(n_ctx=max(1024, len(ids) + 8), n_batch=len(ids) + 8, n_ubatch=512,
                                       logits_all=True)
        self._scoring.reset()
        self._scoring.eval(ids)
        return torch.from_numpy(np.array(self._scoring.scores[:len(ids)], dtype=np.float32))

    def close(self) -> None:
        self.llm = self._scoring = None
        gc.collect()


def make_engine(name: str, gguf: Path, threads: int, group_size: int | None, n_ctx: int):
    if name == "llamacpp":
        return LlamaCppEngine(gguf, threads, n_ctx)
    if name not in ENGINES:
        raise ValueError(f"Unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return TorchEngine(name, gguf, threads, group_size)


def _cut_at(tokens: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens


def llama_cpp_available() -> str | None:
    """None if llama-cpp-python imports, else why not (the engine is then skipped with that message)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"llama-cpp-python is not installed ({err}); pip install 'qwen2[llamacpp]' (builds llama.cpp, ~20 min)"
    return None

