"""`qwen2 serve`: the OpenAI-compatible server on the serving engine. The server starts listening at once and
answers 503 while the engine loads on a worker thread; SIGTERM (or Ctrl-C) stops accepting requests, lets the
running ones finish within `--shutdown-grace` seconds, then exits. Listed in qwen2/cli/main.py's SUBCOMMANDS."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from typing import Any

logger = logging.getLogger("qwen2.serving")

DEFAULT_MODEL_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def memory_size(text: str) -> int | float:
    """--kv-cache-memory: bytes with an optional unit (`2GiB`, `512M`, `1000000`) or a fraction like `0.3`
    of the memory available."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes like 2GiB or 512MB, or a fraction like 0.3, got {text!r}")
    number, unit = float(match.group(1)), match.group(2) or ""
    if not unit and "." in match.group(1):
        if not 0 < number <= 1:
            raise argparse.ArgumentTypeError(f"a fraction of the memory must be in (0, 1], got {text!r}")
        return number
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"--kv-cache-memory must be positive, got {text!r}")
    return size


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    serve = commands.add_parser("serve", parents=[common],
                                help="an OpenAI-compatible HTTP server (needs the serve extra)")
    serve.set_defaults(run=cmd_serve)
    serve.add_argument("--model", "-m", default=None,
                       help="local directory, .gguf file or hub id (default: the embedded Qwen2.5-Coder-0.5B-Instruct)")
    serve.add_argument("--dtype", default="bfloat16", choices=("auto", "float32", "bfloat16", "float16"),
                       help="dtype of the weights and KV cache (default: bfloat16)")
    serve.add_argument("--quantization", "-q", default=None, choices=("int8", "int4", "w8a8"),
                       help="quantise the linears at load (default: none)")
    serve.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the --model argument, or the default model's id)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and tokenize routes")
    serve.add_argument("--max-num-seqs", type=_positive, default=None, help="requests decoded together at most")
    serve.add_argument("--max-num-batched-tokens", type=_positive, default=None,
                       help="tokens one step computes at most (decode rows + prefill chunks; default 512): larger "
                            "chunks prefill long prompts in fewer steps, smaller ones keep decoding rows moving")
    serve.add_argument("--max-model-len", type=_positive, default=None, help="prompt + answer tokens at most")
    serve.add_argument("--max-waiting", type=_positive, default=None,
                       help="queued requests at most; more get 429 with Retry-After")
    serve.add_argument("--kv-cache-memory", type=memory_size, default=None,
                       help="KV cache size: bytes (2GiB, 512MB) or a fraction of the available memory (0.3)")
    serve.add_argument("--speculative-ngram", type=_positive, default=None, metavar="N",
                       help="n-gram speculation: draft up to N tokens per sequence from its own text (prompt lookup)")
    serve.add_argument("--max-body-bytes", type=_positive, default=None, help="larger request bodies get 413")
    serve.add_argument("--shutdown-grace", type=float, default=30.0,
                       help="seconds running requests may take to finish after SIGTERM (default 30)")
    serve.add_argument("--replicas", type=_positive, default=None,
                       help="run N engine replicas behind Ray Serve's HTTP proxy (needs the ray extra)")
    serve.add_argument("--ray-address", default=None,
                       help="with --replicas: an existing Ray cluster's address (default: start a local one)")
    serve.add_argument("--max-queued-requests", type=_positive, default=64,
                       help="with --replicas: requests Ray queues beyond the replicas' --max-num-seqs; more get 429")
    serve.add_argument("--tensor-parallel-size", "-tp", type=_positive, default=1,
                       help="split the model over N processes on this machine (torch.distributed; gloo on the "
                            "CPU, nccl on GPUs); --threads is then per process")


def _engine_factory(args: argparse.Namespace) -> Any:
    def build() -> Any:
        import torch

        from qwen2.serving.async_engine import AsyncLLMEngine
        from qwen2.serving.engine import EngineConfig, LLMEngine

        if args.threads is not None:
            from qwen2.cli.options import clamp_threads

            torch.set_num_threads(clamp_threads(args.threads))
        options = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                   "max_num_batched_tokens": args.max_num_batched_tokens, "max_waiting": args.max_waiting,
                   "kv_cache_memory": args.kv_cache_memory, "speculative_ngram_tokens": args.speculative_ngram}
        options = {key: value for key, value in options.items() if value is not None}
        if args.tensor_parallel_size > 1:
            from qwen2.distributed.serving import LockstepAsyncEngine, lockstep_engine

            model, tokenizer = _load_rank(args)
            return LockstepAsyncEngine(lockstep_engine(model, tokenizer, EngineConfig(**options)))
        engine = LLMEngine.from_pretrained(_model_path(args), quantization=args.quantization, dtype=args.dtype,
                                           **options)
        return AsyncLLMEngine(engine)

    return build


def _model_path(args: argparse.Namespace) -> str:
    if args.model is not None:
        return args.model
    from qwen2.loading.default_model import default_model_path

    return str(default_model_path(progress=False))


def _load_rank(args: argparse.Namespace) -> tuple[Any, Any]:
    """This tensor-parallel rank's slices of the model, and the tokenizer."""
    from qwen2.auto import AutoModelForCausalLM, AutoTokenizer

    path = _model_path(args)
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", quantization=args.quantization,
                                                 dtype=args.dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _tensor_parallel_role(args: argparse.Namespace) -> int | None:
    """Under --tensor-parallel-size N: the launcher starts the N ranks; ranks > 0 run the steps rank 0 sends.
    Returns an exit code for those roles, None for a process that serves HTTP (rank 0, or no TP)."""
    if args.tensor_parallel_size == 1:
        return None
    if "RANK" not in os.environ:
        from qwen2.distributed.launch import run_job

        threads = args.threads or max(1, (os.cpu_count() or 1) // args.tensor_parallel_size)
        code = run_job(["-m", "qwen2.cli", *sys.argv[1:]], args.tensor_parallel_size, threads)
        if code < 0:  # rank 0 ended by a signal (uvicorn re-raises SIGTERM after a graceful stop): end alike
            signal.raise_signal(-code)
        return code
    if int(os.environ.get("WORLD_SIZE", "1")) != args.tensor_parallel_size:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size} differs from the launcher's "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')}")
    if int(os.environ["RANK"]) == 0:
        return None
    from qwen2.distributed.serving import run_worker

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    run_worker(_load_rank(args)[0])
    return 0


def _serve_replicas(args: argparse.Namespace) -> int:
    """--replicas N: the engine replicas on Ray Serve (qwen2.serving.ray) until SIGTERM or Ctrl-C."""
    from qwen2.serving.ray import run_replicas

    if args.tensor_parallel_size > 1:
        raise ValueError("--replicas and --tensor-parallel-size cannot be combined yet")
    options = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
               "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_memory": args.kv_cache_memory,
               "max_waiting": args.max_waiting, "threads": args.threads, "api_key": args.api_key,
               "quantization": args.quantization}
    run_replicas(_model_path(args), served_model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
                 replicas=args.replicas, host=args.host, port=args.port, address=args.ray_address,
                 max_ongoing_requests=args.max_num_seqs or 16, max_queued_requests=args.max_queued_requests,
                 dtype=args.dtype, **{key: value for key, value in options.items() if value is not None})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        return _serve_replicas(args)
    role = _tensor_parallel_role(args)
    if role is not None:
        return role
    try:
        import uvicorn

        from qwen2.serving.app import DEFAULT_MAX_BODY_BYTES, ServerState, create_app
    except ImportError as missing:  # the serve extra is not installed: say which pip command adds it
        message = str(missing) if "qwen2[serve]" in str(missing) else \
            f'{missing}; the server needs the "serve" extra: pip install "qwen2[serve]"'
        print(f"qwen2 serve: error: {message}", file=sys.stderr)
        return 1

    logging.getLogger("qwen2.serving").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    state = ServerState(model_name=name, api_key=args.api_key, shutdown_grace=args.shutdown_grace,
                        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES)
    app = create_app(state, _engine_factory(args))

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.shutting_down = True  # new requests get 503 while running ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=max(args.shutdown_grace, 0.1), lifespan="on")
    server = Server(config)

    def stop(error: BaseException) -> None:
        server.should_exit = True

    state.on_load_error = stop
    logger.info("serving %s on http://%s:%d/v1 (the model loads in the background)", name, args.host, args.port)
    server.run()
    if state.load_error is not None:
        print(f"qwen2 serve: error: {state.load_error}", file=sys.stderr)
        return 1
    return 0
