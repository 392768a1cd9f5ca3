"""Load on OpenAI-compatible servers: ours (`qwen2 serve`) and, when installed, llama.cpp's through
llama-cpp-python (`python -m llama_cpp.server`) on the same GGUF with the same thread count.

One command, one run: each server is started in its own subprocess on a free loopback port, given a seeded
synthetic workload (random prompts of --input-len tokens, --output-len tokens out, EOS ignored where the server
allows it) at each --concurrency, through an async `openai` client streaming /v1/completions, then stopped.
Metrics follow vLLM's benchmark_serving definitions:

- TTFT: request sent -> first streamed token; E2E: request sent -> last token;
- TPOT: (E2E - TTFT) / (output tokens - 1) per request; ITL: gaps between successive streamed chunks;
- output tok/s: all output tokens / wall time of the level; failed: requests that raised or returned non-200.

llama.cpp's server runs with `--interrupt_requests False` (else a new request ends the streaming one early) and
`--logits_all False` (else it computes the logits of every prompt position); it has no `ignore_eos`, so its
requests ban the special tokens by `logit_bias` instead. Its requests queue and run one at a time.

    python benchmarks/bench_serve.py                                   # every server, concurrency 1/4/16/32
    python benchmarks/bench_serve.py --servers ours-int8 --concurrency 1 4 --num-prompts 8 --output-len 32
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVERS = ("ours-bf16", "ours-int8", "ours-w8a8", "llamacpp")
MODEL_NAME = "bench-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    extra_body: dict = field(default_factory=dict)  # how this server is told to ignore EOS
    process: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float) -> None:
        import httpx

        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited while starting:\n" + "".join(self.log[-20:]))
            try:
                if httpx.get(self.base_url + "/models", timeout=2).status_code == 200 and self._ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s")

    def _ready(self) -> bool:
        import httpx

        if not self.name.startswith("ours"):
            return True
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_server(name: str, gguf: Path, threads: int, max_len: int, budget: int | None) -> Server | None:
    port = free_port()
    if name.startswith("ours"):
        variant = name.split("-", 1)[1]
        command = [sys.executable, "-m", "qwen2.cli", "serve", "--model", str(gguf), "--port", str(port),
                   "--served-model-name", MODEL_NAME, "--threads", str(threads), "--max-num-seqs", "32",
                   "--max-model-len", str(max_len), "--max-waiting", "1024"]
        command += ["--dtype", "bfloat16"] + (["--quantization", variant] if variant != "bf16" else [])
        command += ["--max-num-batched-tokens", str(budget)] if budget else []
        return Server(name, command, port, {"ignore_eos": True})
    if importlib.util.find_spec("llama_cpp") is None:
        print(f"[skip] {name}: llama-cpp-python is not installed (pip install 'llama-cpp-python[server]')")
        return None
    # interrupt_requests off: by default a new request cuts the streaming one short ([DONE] mid-answer), which
    # would shorten its answers under concurrency; its requests then queue, one at a time, as they do anyway.
    # logits_all off: its default keeps every prompt position's logits (for echo logprobs), several times its
    # prefill's cost; llama.cpp's own server never does that.
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--host",
               "127.0.0.1", "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx",
               str(max_len), "--model_alias", MODEL_NAME, "--interrupt_requests", "False", "--logits_all", "False"]
    # llama-cpp-python has no ignore_eos, and its min_tokens bans only the GGUF's one EOS token, while Qwen2.5 ends
    # on either of two (the answers stopped at a few tokens): ban every special token instead (ids from the first
    # added token up; the prompts hold none either).
    return Server(name, command, port, {"logit_bias": {str(i): -100 for i in special_token_ids(gguf)}})


def special_token_ids(gguf: Path) -> list[int]:
    from qwen2 import AutoTokenizer

    return sorted(AutoTokenizer.from_pretrained(str(gguf)).added_tokens_decoder)


def workload(gguf: Path, count: int, input_len: tuple[int, int], seed: int) -> list[str]:
    """Seeded random prompts: random ordinary tokens of the model's own vocabulary, decoded to text."""
    from qwen2 import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf))
    rng = random.Random(seed)
    ordinary = min(tokenizer.added_tokens_decoder)  # ids below the first added token are plain BPE tokens
    return [tokenizer.decode([rng.randrange(1000, ordinary) for _ in range(rng.randint(*input_len))])
            for _ in range(count)]


def longest_prompt(gguf: Path, prompts: list[str]) -> int:
    from qwen2 import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf))
    return max(len(tokenizer.encode(p)) for p in prompts)


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)


async def one_request(client, prompt: str, output_len: int, extra_body: dict) -> Result:
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    finish = None
    try:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=output_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra_body)
        async for chunk in stream:
            if chunk.choices:  # a chunk may carry no text (special tokens are not shown), yet tokens came
                stamps.append(time.perf_counter())
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as error:  # noqa: BLE001 - a failed request is a measurement
        print(f"  request failed: {error!r}"[:200])
        return Result(ok=False)
    if not stamps:
        return Result(ok=False)
    if not tokens:  # no usage chunk (llama-cpp-python streams none): "length" means max_tokens tokens came
        tokens = output_len if finish == "length" else len(stamps)
    if tokens != output_len:
        print(f"  short answer: {tokens} of {output_len} tokens (finish_reason {finish!r})")
    return Result(ok=True, ttft=stamps[0] - start, e2e=stamps[-1] - start, output_tokens=tokens,
                  itl=[b - a for a, b in zip(stamps, stamps[1:])])


async def run_level(server: Server, prompts: list[str], concurrency: int, output_len: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)

    async def limited(prompt: str) -> Result:
        async with gate:
            return await one_request(client, prompt, output_len, server.extra_body)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in prompts))
    wall = time.perf_counter() - start
    await client.close()
    return {**summarise(results, wall, concurrency), "load": os.getloadavg()[0]}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarise(results: list[Result], wall: float, concurrency: int) -> dict:
    ok = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok),
        "wall_s": wall, "output_tok_s": out / wall, "request_s": len(ok) / wall,
        "ttft_ms": {k: v * 1000 for k, v in _percentiles([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * 1000 for k, v in _percentiles(tpot).items()},
        "itl_ms": {k: v * 1000 for k, v in _percentiles([g for r in ok for g in r.itl]).items()},
        "e2e_s": _percentiles([r.e2e for r in ok]),
    }


def table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| server | conc | reqs | failed | out tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p99 ms "
             "| ITL p50 / p99 ms | load |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows:
        t, p, i = m["ttft_ms"], m["tpot_ms"], m["itl_ms"]
        lines.append(f"| {name} | {m['concurrency']} | {m['requests']} | {m['failed']} | {m['output_tok_s']:.1f} "
                     f"| {t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | {p['p50']:.1f} / {p['p99']:.1f} "
                     f"| {i['p50']:.1f} / {i['p99']:.1f} | {m['load']:.1f} |")
    return "\n".join(lines)


def ratios(rows: list[tuple[str, dict]], peer: str = "llamacpp") -> str:
    """Each of our servers against the peer at each concurrency both ran: output tok/s (x the peer's; the goal
    at 16 is >= 3x) and p50 TTFT (x the peer's; the goal at 1 is <= 1x)."""
    theirs = {m["concurrency"]: m for n, m in rows if n == peer}
    lines = [f"| server | conc | out tok/s vs {peer} | p50 TTFT vs {peer} |", "|---|---|---|---|"]
    for name, m in rows:
        other = theirs.get(m["concurrency"])
        if name != peer and other is not None and other["output_tok_s"] > 0:
            lines.append(f"| {name} | {m['concurrency']} | {m['output_tok_s'] / other['output_tok_s']:.2f}x "
                         f"| {m['ttft_ms']['p50'] / other['ttft_ms']['p50']:.2f}x |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF to serve (default: the embedded model)")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per level, at least the level's "
                        "concurrency (default: 2x concurrency, at least 8); the same prompts for every server")
    parser.add_argument("--input-len", nargs=2, type=int, default=[100, 1000], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="our servers' step budget (default: the engine's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args()

    gguf = args.gguf
    if gguf is None:
        from qwen2.loading.default_model import default_model_path

        gguf = default_model_path()
    levels = {}  # concurrency -> (warm-up prompt, measured prompts), the same for every server
    for concurrency in args.concurrency:
        count = max(args.num_prompts, concurrency) if args.num_prompts else max(8, 2 * concurrency)
        # warm-up (one-off costs) on a prompt of its own: a measured prompt seen before would be served from a
        # prefix cache (ours) or the previous prompt's KV (llama.cpp)
        levels[concurrency] = (workload(gguf, 1, tuple(args.input_len), args.seed - concurrency),
                               workload(gguf, count, tuple(args.input_len), args.seed + concurrency))
    # random ids decoded to text encode back to a few more tokens at times: the context fits the longest
    max_len = longest_prompt(gguf, [p for warm, prompts in levels.values() for p in warm + prompts])
    max_len += args.output_len + 16
    rows: list[tuple[str, dict]] = []
    for name in args.servers:
        server = make_server(name, gguf, args.threads, max_len, args.max_num_batched_tokens)
        if server is None:
            continue
        print(f"[{name}] starting: {' '.join(server.command)}", flush=True)
        started = time.perf_counter()
        try:
            server.start(args.start_timeout)
            print(f"[{name}] ready in {time.perf_counter() - started:.1f} s", flush=True)
            for concurrency, (warm, prompts) in levels.items():
                asyncio.run(run_level(server, warm, 1, 4))
                metrics = asyncio.run(run_level(server, prompts, concurrency, args.output_len))
                rows.append((name, metrics))
                print(table([(name, metrics)]).splitlines()[-1], flush=True)
        except RuntimeError as error:
            print(f"[{name}] {error}")
        finally:
            server.stop()
    print()
    print(f"workload: input {args.input_len[0]}-{args.input_len[1]} tokens, output {args.output_len} tokens, "
          f"seed {args.seed}, {args.threads} threads")
    print(table(rows))
    print()
    print(ratios(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([{"server": n, **m} for n, m in rows], indent=2))


if __name__ == "__main__":
    main()
