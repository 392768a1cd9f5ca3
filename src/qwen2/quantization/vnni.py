"""Single-row int8-weight products with AVX512-VNNI integer dot products, for compiled int8 decoding on the CPU.

Why: as a float multiply-sum (`row_linear.row_matvec`), converting each int8 weight to float32 costs as much
as reading it, so int8 decoding streamed 15-25 GB/s against bf16's ~30. `vpdpwssd` multiplies int16 pairs and
accumulates in int32 in one instruction, which keeps the loop bound by memory (28-33 GB/s on the default
model's shapes, 2 threads; decode 44 -> 50 tok/s, measured). The activation row is quantised to int16 with one
scale per row: its error, at most max|x| / 65534 per element, is below bf16's own rounding for all but the
row's smallest elements (the products come out within ~3e-5 relative on random data).

The kernel is compiled on first use by `torch.utils.cpp_extension` (a C++ compiler and ninja; inductor needs
the compiler too) and cached by torch per machine. Without AVX512-VNNI (read from /proc/cpuinfo: the
instructions would kill the process, not raise) or if the build fails, `load()` returns False and callers
keep the float reduction.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

K_MULTIPLE = 32  # the kernel reads 32 int8 weights per step
INT16_MAX = 32767

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// out[n] = sum_k x[k] * w[n, k] for int16 x (K,) and int8 w (N, K), K % 32 == 0. The int32 partial sums go to
// float32 every 256 products, before they can overflow (127 * 32767 * 256 < 2^31).
at::Tensor rowdot(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kShort && w.scalar_type() == at::kChar, "rowdot: int16 x and int8 w expected");
  TORCH_CHECK(x.dim() == 1 && w.dim() == 2 && x.size(0) == w.size(1) && w.size(1) % 32 == 0,
              "rowdot: x (K,) and w (N, K) with K % 32 == 0 expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1);
  at::Tensor out = at::empty({N}, x.options().dtype(at::kFloat));
  const int16_t* xp = xc.data_ptr<int16_t>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = wp + n * K;
      __m512 total = _mm512_setzero_ps();
      for (int64_t k0 = 0; k0 < K; k0 += 256) {
        const int64_t k1 = std::min<int64_t>(K, k0 + 256);
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();  // two chains: loads overlap
        int64_t k = k0;
        for (; k + 64 <= k1; k += 64) {
          a0 = _mm512_dpwssd_epi32(a0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(row + k))),
                                   _mm512_loadu_si512(xp + k));
          a1 = _mm512_dpwssd_epi32(a1, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(row + k + 32))),
                                   _mm512_loadu_si512(xp + k + 32));
        }
        for (; k < k1; k += 32)
          a0 = _mm512_dpwssd_epi32(a0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(row + k))),
                                   _mm512_loadu_si512(xp + k));
        total = _mm512_add_ps(total, _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)));
      }
      op[n] = _mm512_reduce_add_ps(total);
    }
  });
  return out;
}

TORCH_LIBRARY(qwen2_vnni, m) { m.def("rowdot(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(qwen2_vnni, CPU, m) { m.impl("rowdot", &rowdot); }
"""

_loaded = False


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags and " avx512bw" in flags


@functools.cache
def load() -> bool:
    """Build (once per machine) and register the kernel; whether `rowdot` can be used. Call it before
    `torch.compile` traces a model: layers choose their path while being traced."""
    global _loaded
    if not _cpu_has_vnni():
        return False
    threads = torch.get_num_threads()
    try:
        from torch.utils.cpp_extension import load_inline

        load_inline("qwen2_vnni", cpp_sources=_SOURCE, is_python_module=False,
                    extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                    extra_ldflags=["-fopenmp"])
        # The kernel's first parallel region initialises OpenMP in the extension; done inside a compiled
        # graph it reset torch's thread count to 1 (measured), so it runs here, once, and the count is restored.
        torch.ops.qwen2_vnni.rowdot(torch.zeros(K_MULTIPLE, dtype=torch.int16),
                                    torch.zeros(64, K_MULTIPLE, dtype=torch.int8))
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: keep the float path
        logger.warning("The AVX512-VNNI int8 kernel could not be built (%s: %s); int8 decoding keeps the float "
                       "reduction.", type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    finally:
        torch.set_num_threads(threads)

    @torch.library.register_fake("qwen2_vnni::rowdot")
    def _(x: Tensor, weight: Tensor) -> Tensor:
        return x.new_empty(weight.shape[0], dtype=torch.float32)

    _loaded = True
    return True


def usable(weight: Tensor) -> bool:
    """Whether `rowdot` takes this weight (decided while tracing; `load()` must have run before)."""
    return (_loaded and weight.device.type == "cpu" and weight.dtype == torch.int8 and weight.dim() == 2
            and weight.shape[1] % K_MULTIPLE == 0)


def quantize_row_int16(x: Tensor) -> tuple[Tensor, Tensor]:
    """(int16 codes (K,), float32 scale ()) with `x ~= codes * scale`, for a single row x (1, K)."""
    x = x.reshape(-1).float()
    scale = x.abs().amax().clamp(min=torch.finfo(torch.float32).tiny) / INT16_MAX
    return torch.round(x / scale).to(torch.int16), scale


def rowdot(x: Tensor, weight: Tensor) -> Tensor:
    """float32 (N,) = int16 x (K,) . each int8 row of weight (N, K), exactly up to the float32 sum of
    256-product int32 partials. A C++ operator: the compiled graph calls it without going through Python."""
    return torch.ops.qwen2_vnni.rowdot(x, weight)
