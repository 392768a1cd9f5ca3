"""AVX-512 kernels for int8 on the CPU, compiled on first use: the products of int8 decoding and the per-token
quantisation and rescaling around W8A8's integer GEMMs.

- `rowdot`: int8 weight rows . int16 activation rows with VNNI integer dot products, for decoding (one row
  compiled, a few rows eager: each weight load feeds up to 8 rows). As a float multiply-sum
  (`row_linear.row_matvec`), converting each int8 weight to float32 costs as much as reading it, so int8
  decoding streamed 15-25 GB/s against bf16's ~30; `vpdpwssd` multiplies int16 pairs and accumulates in int32
  in one instruction, which keeps the loop bound by memory (28-33 GB/s on the default model's shapes, 2
  threads; decode 44 -> 50 tok/s, measured). The activation row is quantised to int16 with one scale per row:
  its error, at most max|x| / 65534 per element, is below bf16's own rounding for all but the row's smallest
  elements (the products come out within ~3e-5 relative on random data). At 8 rows it is 2-3x faster than
  `torch._weight_int8pack_mm` on the default model's shapes (3.5x on the head; measured).
- `int8_rows` and `bf16_rows`: eager decoding of up to 16 rows (generate()'s batches, the serving engine's
  steps) in one call per linear, each weight row read once per 8 rows (C++ and measurements in
  `rows_source`). `int8_rows` quantises the rows to int16, multiplies, scales and adds the bias, which as
  torch operations around `rowdot` took ~40% of a 16-row int8 step; `bf16_rows` (AVX512-BF16) is F.linear on
  the weight as it is, about as fast as oneDNN on a packed copy of it (which would double the weights' memory).
- `quantize_rows` and `scale_products`: the two memory-bound passes either side of `torch._int_mm` in W8A8
  prefill, each one read and one write. As chains of eager torch operations they took 10-13 passes and ~15%
  of a 512-token prefill (measured). Both give the same bits as those operations (`int8.quantize_rows` and
  `int8.Int8DynamicActivationLinear`): the same float32 operations in the same order, round half to even.

Built by `torch.utils.cpp_extension` (a C++ compiler and ninja; inductor needs the compiler too) and cached by
torch per machine. Without AVX512-VNNI and -DQ (read from /proc/cpuinfo: the instructions would kill the process, not
raise) or if the build fails, `load()` returns False and callers keep the torch operations; a failed build logs a
warning naming the compiler's error (`build_error()`), and the tests fail on it where the CPU and a compiler
could have built the kernels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from qwen2.quantization.rows_source import ROWS_SOURCE

logger = logging.getLogger(__name__)

K_MULTIPLE = 32  # rowdot reads 32 int8 weights per step
ROWS_PER_WEIGHT_PASS = 8  # rowdot's rows of x per pass over the weight (its C++ `rowdot` below)
ROW_DTYPES = (torch.float32, torch.bfloat16)  # what quantize_rows reads and scale_products writes
MAX_ROWS = 16  # bf16_rows' rows; beyond, GEMM kernels (oneDNN) do better

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

// out[m, n] = sum_k x[m, k] * w[n, k] for MB rows of int16 x and weight rows n0..n1 of int8 w (N, K),
// K % 32 == 0: each weight load feeds MB dot products. The int32 partial sums go to float32 every 256
// products, before they can overflow (127 * 32767 * 256 < 2^31).
template <int MB>
static void rowdot_block(const int16_t* x, const int8_t* w, float* out, int64_t N, int64_t K, int64_t n0,
                         int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = w + n * K;
    __m512 total[MB];
    for (int j = 0; j < MB; ++j) total[j] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 256) {
      const int64_t k1 = std::min<int64_t>(K, k0 + 256);
      __m512i acc[MB], acc2 = _mm512_setzero_si512();
      for (int j = 0; j < MB; ++j) acc[j] = _mm512_setzero_si512();
      int64_t k = k0;
      if (MB == 1) {  // a second chain, so that one row's loads overlap
        for (; k + 64 <= k1; k += 64) {
          acc[0] = _mm512_dpwssd_epi32(acc[0], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(row + k))),
                                       _mm512_loadu_si512(x + k));
          acc2 = _mm512_dpwssd_epi32(acc2, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(row + k + 32))),
                                     _mm512_loadu_si512(x + k + 32));
        }
      }
      for (; k < k1; k += 32) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(row + k)));
        for (int j = 0; j < MB; ++j) acc[j] = _mm512_dpwssd_epi32(acc[j], wv, _mm512_loadu_si512(x + j * K + k));
      }
      acc[0] = _mm512_add_epi32(acc[0], acc2);
      for (int j = 0; j < MB; ++j) total[j] = _mm512_add_ps(total[j], _mm512_cvtepi32_ps(acc[j]));
    }
    for (int j = 0; j < MB; ++j) out[j * N + n] = _mm512_reduce_add_ps(total[j]);
  }
}

// x (M, K) int16 . w (N, K) int8 -> (M, N) float32, up to 8 rows of x per pass over the weight.
at::Tensor rowdot(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kShort && w.scalar_type() == at::kChar, "rowdot: int16 x and int8 w expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && w.size(1) % 32 == 0,
              "rowdot: x (M, K) and w (N, K) with K % 32 == 0 expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = xc.size(0), N = wc.size(0), K = wc.size(1);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int16_t* xp = xc.data_ptr<int16_t>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += 8) {
      const int16_t* xm = xp + m * K;
      float* om = op + m * N;
      switch (std::min<int64_t>(8, M - m)) {
        case 1: rowdot_block<1>(xm, wp, om, N, K, n0, n1); break;
        case 2: rowdot_block<2>(xm, wp, om, N, K, n0, n1); break;
        case 3: rowdot_block<3>(xm, wp, om, N, K, n0, n1); break;
        case 4: rowdot_block<4>(xm, wp, om, N, K, n0, n1); break;
        case 5: rowdot_block<5>(xm, wp, om, N, K, n0, n1); break;
        case 6: rowdot_block<6>(xm, wp, om, N, K, n0, n1); break;
        case 7: rowdot_block<7>(xm, wp, om, N, K, n0, n1); break;
        default: rowdot_block<8>(xm, wp, om, N, K, n0, n1); break;
      }
    }
  });
  return out;
}

static inline __m512 load_floats(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_floats(const at::BFloat16* p) {  // bf16 -> float32 is a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// (int8 codes (M, K), float32 scales (M, 1)): per row, scale = max(max|x|, FLT_MIN) / 127 and
// codes = round_half_even(x / scale), as int8.quantize_rows computes them.
template <typename T>
static void quantize_rows_impl(const T* x, int8_t* codes, float* scales, int64_t M, int64_t K) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * K;
      int8_t* out = codes + m * K;
      __m512 vmax = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_floats(row + k)));
      float amax = _mm512_reduce_max_ps(vmax);
      for (int64_t t = k; t < K; ++t) amax = std::max(amax, std::fabs(static_cast<float>(row[t])));
      const float scale = std::max(amax, std::numeric_limits<float>::min()) / 127.0f;
      scales[m] = scale;
      const __m512 vscale = _mm512_set1_ps(scale);
      for (k = 0; k + 16 <= K; k += 16) {
        __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load_floats(row + k), vscale),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i*)(out + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
      }
      for (; k < K; ++k) out[k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(row[k]) / scale));
    }
  });
}

std::vector<at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "quantize_rows: a 2-D float32 or bfloat16 x expected");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor codes = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({M, 1}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat)
    quantize_rows_impl(xc.data_ptr<float>(), codes.data_ptr<int8_t>(), scales.data_ptr<float>(), M, K);
  else
    quantize_rows_impl(xc.data_ptr<at::BFloat16>(), codes.data_ptr<int8_t>(), scales.data_ptr<float>(), M, K);
  return {codes, scales};
}

// float32 -> the bits of bf16 in 32-bit lanes as at::BFloat16 rounds: half to even, a NaN to 0x7FC0
static inline __m512i bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
static inline void store_floats(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store_floats(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(bf16_bits(v)));
}

// out (M, N) = float(products) * row_scales[m] * col_scales[n] in float32, then the output dtype.
template <typename T>
static void scale_products_impl(const int32_t* p, const float* rs, const float* cs, T* out, int64_t M, int64_t N) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* prow = p + m * N;
      T* orow = out + m * N;
      const __m512 vrs = _mm512_set1_ps(rs[m]);
      int64_t n = 0;
      for (; n + 16 <= N; n += 16) {
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(prow + n)), vrs);
        store_floats(orow + n, _mm512_mul_ps(v, _mm512_loadu_ps(cs + n)));
      }
      for (; n < N; ++n) orow[n] = static_cast<T>(static_cast<float>(prow[n]) * rs[m] * cs[n]);
    }
  });
}

at::Tensor scale_products(const at::Tensor& products, const at::Tensor& row_scales, const at::Tensor& col_scales,
                          at::ScalarType dtype) {
  TORCH_CHECK(products.dim() == 2 && products.scalar_type() == at::kInt, "scale_products: 2-D int32 products expected");
  TORCH_CHECK(row_scales.scalar_type() == at::kFloat && row_scales.numel() == products.size(0) &&
              col_scales.scalar_type() == at::kFloat && col_scales.numel() == products.size(1),
              "scale_products: float32 row scales (M) and column scales (N) expected");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "scale_products: float32 or bfloat16 output expected");
  const at::Tensor pc = products.contiguous(), rc = row_scales.contiguous(), cc = col_scales.contiguous();
  const int64_t M = pc.size(0), N = pc.size(1);
  at::Tensor out = at::empty({M, N}, products.options().dtype(dtype));
  if (dtype == at::kFloat)
    scale_products_impl(pc.data_ptr<int32_t>(), rc.data_ptr<float>(), cc.data_ptr<float>(), out.data_ptr<float>(), M, N);
  else
    scale_products_impl(pc.data_ptr<int32_t>(), rc.data_ptr<float>(), cc.data_ptr<float>(),
                        out.data_ptr<at::BFloat16>(), M, N);
  return out;
}

TORCH_LIBRARY(qwen2_int8, m) {
  m.def("rowdot(Tensor x, Tensor w) -> Tensor");
  m.def("quantize_rows(Tensor x) -> Tensor[]");
  m.def("scale_products(Tensor products, Tensor row_scales, Tensor col_scales, ScalarType dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen2_int8, CPU, m) {
  m.impl("rowdot", &rowdot);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("scale_products", &scale_products);
}
"""

_loaded = False
_bf16_loaded = False  # and the CPU has AVX512-BF16 (`bf16_rows`): plain flags, which a compiled graph's trace reads
_build_error: str | None = None


def _describe(err: Exception) -> str:
    """The exception's type and first line, and the compiler's first `error:` line: a failed build's first
    line is only ninja's command."""
    lines = str(err).splitlines() or [""]
    compiler = next((line.strip() for line in lines[1:] if "error:" in line), None)
    return f"{type(err).__name__}: {lines[0][:200]}" + (f" ... {compiler}" if compiler else "")


def build_error() -> str | None:
    """Why `load()` could not build the kernels on a CPU that has AVX512-VNNI (None if it did, or has not
    been called): the warning's text, for tests and bug reports."""
    return _build_error


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_has_vnni() -> bool:
    return all(f" {flag}" in _cpu_flags() for flag in ("avx512_vnni", "avx512bw", "avx512dq"))


def _cpu_has_bf16() -> bool:
    return " avx512_bf16" in _cpu_flags()


def build_extension(name: str, sources: list[str], first_call: Callable[[], object], what: str) -> str | None:
    """Build (once per machine: torch caches it) and load the C++ extension `name` with AVX512-VNNI flags, then
    run `first_call`; None if that worked, else the error described (logged as a warning saying `what` keeps
    torch's operations). The first call runs the extension's first parallel region, which initialises its
    OpenMP: done inside a compiled graph that reset torch's thread count to 1 (measured), so it runs here,
    once, and the count is restored."""
    threads = torch.get_num_threads()
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        if not any(Path(_get_build_directory(name, verbose=False)).glob(f"{name}*.so")):
            logger.info("Building the AVX-512 kernels %s with the C++ compiler: about a minute on 2 cores, "
                        "once per machine.", name)
        load_inline(name, cpp_sources=sources, is_python_module=False,
                    # no fused multiply-adds the source did not write: the row kernels' bits must not depend on it
                    extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                  "-mavx512dq", "-mavx512vnni"],
                    extra_ldflags=["-fopenmp"])
        first_call()
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: keep torch's operations
        error = _describe(err)
        logger.warning("The AVX-512 kernels %s could not be built (%s); %s keeps torch's operations, slower.",
                       name, error, what)
        return error
    finally:
        torch.set_num_threads(threads)
    return None


@functools.cache
def load() -> bool:
    """Build (once per machine) and register the kernels; whether they can be used. Call it before
    `torch.compile` traces a model: layers choose their path while being traced."""
    global _loaded, _bf16_loaded, _build_error
    if not _cpu_has_vnni():
        return False
    _build_error = build_extension(
        "qwen2_int8", [_SOURCE, ROWS_SOURCE],
        lambda: torch.ops.qwen2_int8.rowdot(torch.zeros(1, K_MULTIPLE, dtype=torch.int16),
                                            torch.zeros(64, K_MULTIPLE, dtype=torch.int8)),
        "int8 (and w8a8)")
    if _build_error:
        return False

    @torch.library.register_fake("qwen2_int8::rowdot")
    def _(x: Tensor, weight: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("qwen2_rows::bf16_rows")
    def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    _loaded = True
    _bf16_loaded = _cpu_has_bf16()
    return True


def usable(weight: Tensor) -> bool:
    """Whether `rowdot` takes this weight (decided while tracing; `load()` must have run before)."""
    return (_loaded and weight.device.type == "cpu" and weight.dtype == torch.int8 and weight.dim() == 2
            and weight.shape[1] % K_MULTIPLE == 0)


def eager_usable(x: Tensor) -> bool:
    """Whether `quantize_rows` / `scale_products` take x (or write its dtype) in an eager call; builds the
    kernels on the first call. False while tracing: inductor fuses the torch operations itself."""
    return (x.device.type == "cpu" and x.dtype in ROW_DTYPES and not torch.compiler.is_compiling()
            and load())


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`int8.quantize_rows` in one pass over x (2-D, float32 or bfloat16): the same codes and scales."""
    codes, scales = torch.ops.qwen2_int8.quantize_rows(x)
    return codes, scales


def scale_products(products: Tensor, row_scales: Tensor, col_scales: Tensor, dtype: torch.dtype) -> Tensor:
    """`(products.float() * row_scales * col_scales).to(dtype)` in one pass: int32 products (M, N), float32
    row scales (M, 1) and column scales (N,), dtype float32 or bfloat16."""
    return torch.ops.qwen2_int8.scale_products(products, row_scales, col_scales, dtype)


def rowdot(x: Tensor, weight: Tensor) -> Tensor:
    """float32 (M, N) = int16 x (M, K) . each int8 row of weight (N, K), exactly up to the float32 sum of
    256-product int32 partials; the weight is read once per 8 rows of x. A C++ operator: the compiled graph
    calls it without going through Python."""
    return torch.ops.qwen2_int8.rowdot(x, weight)


def bf16_rows_usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `bf16_rows` takes this F.linear: bf16 on a CPU with AVX512-BF16, 1 to `MAX_ROWS` rows, a
    contiguous weight. Eager calls build the kernels on the first call; while tracing (where a build must not
    happen) only a `load()` made before counts."""
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and weight.is_contiguous() and 0 < x.numel() <= MAX_ROWS * x.shape[-1]
            and (_bf16_loaded if torch.compiler.is_compiling() else load() and _cpu_has_bf16()))


def bf16_rows(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) for bf16 x (..., K) of a few rows, weight (N, K), bias (N) or None: float32
    sums of exact products (`rows_source`), rounded to bf16 once."""
    out = torch.ops.qwen2_rows.bf16_rows(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def int8_rows(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None, qmax: int) -> Tensor:
    """`((rowdot(codes, weight) * row_scales * scales.float()).to(x.dtype) + bias` in one call, for 2-D x of
    decoding rows (float32 or bf16; scales and bias in its dtype, K % 32 == 0), where `codes, row_scales =
    int8.quantize_rows(x, int16)` with the codes' range +-qmax (32767; W8A8's int8 codes: 127). The dot products
    are exact."""
    return torch.ops.qwen2_rows.int8_rows(x, weight, scales, bias, float(qmax))
