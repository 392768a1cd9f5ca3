"""Tokenizer throughput: our pure-Python and `tokenizers`-backed Qwen2 tokenizers beside transformers'.

    python benchmarks/bench_tokenizer.py [--texts 20000] [--chats 1000] [--reference-python PATH]

Encodes a large generated text corpus (one `encode` call per text, then one batched call), a corpus of
mostly unseen words (where BPE caches rarely help), and renders and tokenizes 1,000 chat prompts, on the real Qwen2.5 vocabulary from the embedded default GGUF.
Prints tokens/s and the ratios against transformers, and checks every tokenizer produced the same ids.

transformers 5 has no pure-Python Qwen2 tokenizer (Qwen2Tokenizer and Qwen2TokenizerFast are the same
`tokenizers`-backed class). The slow reference is therefore transformers 4's pure-Python
Qwen2Tokenizer, run in a subprocess from an interpreter that has `transformers<5` installed, e.g.
`python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install "transformers==4.57.1"`, then
`--reference-python /tmp/tf4/bin/python`. Without it that row is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tokenizer_corpus import corpus, pieces, write_real_tokenizer_files  # noqa: E402

# Runs inside the transformers-4 interpreter: same files, same inputs, same timing loop.
_REFERENCE_SCRIPT = r"""
import hashlib, json, sys, time
from transformers import Qwen2Tokenizer
spec = json.load(open(sys.argv[1], encoding="utf-8"))
start = time.perf_counter()
tok = Qwen2Tokenizer.from_pretrained(spec["dir"])
load = time.perf_counter() - start
out = {"load": load, "version": __import__("transformers").__version__}
start = time.perf_counter()
ids = [tok.encode(t) for t in spec["texts"]]
out["encode"] = (time.perf_counter() - start, sum(map(len, ids)), hashlib.sha256(json.dumps(ids).encode()).hexdigest())
start = time.perf_counter()
ids = [tok.encode(t) for t in spec["fresh"]]
out["unseen"] = (time.perf_counter() - start, sum(map(len, ids)), hashlib.sha256(json.dumps(ids).encode()).hexdigest())
start = time.perf_counter()
chat = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in spec["chats"]]
out["chat"] = (time.perf_counter() - start, sum(map(len, chat)), hashlib.sha256(json.dumps(chat).encode()).hexdigest())
print(json.dumps(out))
"""


def _digest(rows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def fresh_corpus(count: int, seed: int = 2) -> list[str]:
    """Text of mostly unseen words (random syllables in several scripts), so BPE caches rarely hit."""
    rng = random.Random(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyz", "абвгдежзийклмнопрстуфхцчшщыэюя", "αβγδεζηθικλμνξοπρστυφχψω",
                 "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年", "あいうえおかきくけこさしすせそ"]
    texts = []
    for _ in range(count):
        words = []
        for _ in range(rng.randint(5, 40)):
            letters = rng.choice(alphabets)
            words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 12))))
            if rng.random() < 0.1:
                words.append(str(rng.randint(0, 10**rng.randint(1, 12))))
        texts.append(" ".join(words) + rng.choice([".", "!", "\n", "?\n\n"]))
    return texts


def chat_prompts(count: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    base = pieces()
    prompts = []
    for _ in range(count):
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choice(base) for _ in range(rng.randint(3, 12)))})
            if turn < 2 and rng.random() < 0.6:
                messages.append({"role": "assistant", "content": " ".join(rng.choice(base) for _ in range(4))})
        if messages[-1]["role"] == "assistant":
            messages.append({"role": "user", "content": rng.choice(base)})
        prompts.append(messages)
    return prompts


def _time(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(name: str, tokenizer, texts: list[str], fresh: list[str], chats: list, batched: bool) -> dict:
    row = {"name": name}
    seconds, ids = _time(lambda: [tokenizer.encode(t) for t in texts])
    row["encode"] = (seconds, sum(map(len, ids)), _digest(ids))
    seconds, ids = _time(lambda: [tokenizer.encode(t) for t in fresh])
    row["unseen"] = (seconds, sum(map(len, ids)), _digest(ids))
    if batched:
        seconds, batch = _time(lambda: tokenizer(texts)["input_ids"])
        row["batch"] = (seconds, sum(map(len, batch)), _digest(batch))
    seconds, chat = _time(lambda: [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats
    ])
    row["chat"] = (seconds, sum(map(len, chat)), _digest(chat))
    return row


def reference_slow(python: str, directory: Path, texts: list[str], fresh: list[str], chats: list) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"dir": str(directory), "texts": texts, "fresh": fresh, "chats": chats}),
                        encoding="utf-8")
        script = Path(tmp) / "reference.py"
        script.write_text(_REFERENCE_SCRIPT, encoding="utf-8")
        done = subprocess.run([python, str(script), str(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"reference interpreter failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"name": f"transformers {result['version']} slow", "load": result["load"],
            "encode": tuple(result["encode"]), "unseen": tuple(result["unseen"]), "chat": tuple(result["chat"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=20000, help="number of corpus strings to encode")
    parser.add_argument("--chats", type=int, default=1000, help="number of chat prompts to render and encode")
    parser.add_argument("--reference-python", help="interpreter with transformers<5, for its pure-Python tokenizer")
    parser.add_argument("--gguf", help="GGUF whose vocabulary to use (default: the embedded default model)")
    args = parser.parse_args()

    import transformers

    from qwen2.loading.default_model import cache_dir, default_model_path
    from qwen2.tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast

    gguf = Path(args.gguf) if args.gguf else default_model_path(progress=False)
    directory = write_real_tokenizer_files(gguf, cache_dir() / "bench_tokenizer" / gguf.stem)
    texts = corpus(args.texts, seed=1)
    fresh = fresh_corpus(args.texts // 10)
    chats = chat_prompts(args.chats)
    print(f"corpus: {len(texts)} texts, {sum(map(len, texts)):,} characters (varied, repetitive pieces); "
          f"{len(fresh)} texts, {sum(map(len, fresh)):,} characters of mostly unseen words; {len(chats)} chat prompts")
    print(f"python {sys.version.split()[0]}, transformers {transformers.__version__}")

    rows = []
    for name, load in (
        ("qwen2 slow (pure Python)", lambda: Qwen2Tokenizer.from_pretrained(directory)),
        ("qwen2 fast (tokenizers)", lambda: Qwen2TokenizerFast.from_pretrained(directory)),
        (f"transformers {transformers.__version__} (tokenizers)", lambda: transformers.AutoTokenizer.from_pretrained(str(directory))),
    ):
        seconds, tokenizer = _time(load)
        row = measure(name, tokenizer, texts, fresh, chats, batched=True)
        row["load"] = seconds
        rows.append(row)
    if args.reference_python:
        reference = reference_slow(args.reference_python, directory, texts, fresh, chats)
        if reference is not None:
            rows.append(reference)

    keys = ("encode", "batch", "unseen", "chat")
    print(f"\n{'tokenizer (tokens/s)':<40} {'load s':>7} {'encode':>11} {'batch':>11} {'unseen':>11} {'chat':>11}")
    for row in rows:
        rate = {k: f"{row[k][1] / row[k][0]:,.0f}" if k in row else "-" for k in keys}
        print(f"{row['name']:<40} {row['load']:>7.2f} " + " ".join(f"{rate[k]:>11}" for k in keys))
    digests = {k: {row[k][2] for row in rows if k in row} for k in keys}
    digests["encode"] |= digests.pop("batch")
    same = all(len(d) == 1 for d in digests.values())
    print(f"\nall tokenizers produced identical ids: {same}")

    def ratio(a: dict, b: dict, key: str) -> str:
        return f"{(a[key][1] / a[key][0]) / (b[key][1] / b[key][0]):.2f}x"

    ours_slow, ours_fast, hf_fast = rows[0], rows[1], rows[2]
    print("our fast / transformers fast: " + ", ".join(f"{k} {ratio(ours_fast, hf_fast, k)}" for k in keys))
    if len(rows) > 3:
        print("our slow / transformers slow: " + ", ".join(
            f"{k} {ratio(ours_slow, rows[3], k)}" for k in keys if k != "batch"))
    if not same:
        sys.exit("tokenizers disagree on ids")


if __name__ == "__main__":
    main()
