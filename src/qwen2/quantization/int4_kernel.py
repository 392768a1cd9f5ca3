"""An AVX512-VNNI kernel for int4 decoding rows (bf16): the int4 codes times the rows quantised to int8, with
integer dot products, the way llama.cpp's Q4 x Q8 dot products work.

Why: torch's packed int4 kernel (`_weight_int4pack_mm_for_cpu`) converts every code to float and multiplies in
float32, which makes it compute-bound at ~2/3 of the int4 decode step; an earlier row kernel that widened the
codes and the rows to int16 for `vpdpwssd` did twice the work and was slower still. Here one `vpdpbusd` takes
64 unsigned 4-bit codes (unpacked in registers with an `and` and a shift) against 4 int8 activations
broadcast to 16 output rows, so one instruction does 64 of the multiply-adds.

- The activations: each input row is quantised per block of 32 columns, `d = max(|x|) / 127`,
  `q = round_half_even(x / d)` (llama.cpp's Q8_0). Its error, at most d / 2 per element, is about bf16's own
  rounding of the row; `quantize_activations` gives the same codes, for tests and the reference.
- The weight: a code c of group g in row n stands for `(c - 8) * s[g, n] + z[g, n]` (int4.py), so for a block
  b of 32 columns the row's product is `s * d_b * (sum c * q - 8 * sum q) + z * d_b * sum q`: integer sums,
  then float32 for the scales. The kernel reads `scales_and_zeros` as the module holds it (bf16 pairs: the
  scale's float32 is the pair shifted left by 16 bits, the zero's the pair with its low half cleared).
- The layout (`int4.to_vnni_layout`), chosen for the kernel: per block of 16 output rows, per 8 columns, 64
  bytes: byte 4 * i + j holds row i's column j in its low nibble and column j + 4 in its high one. One 64-byte
  load then gives two `vpdpbusd` operands of 16 rows x 4 columns, whose int32 lanes are the 16 rows' sums:
  the per-group scaling is vertical, with no horizontal reduction until the output is written.
- Each call runs the output rows' blocks across the threads (`at::parallel_for`), 4 blocks (64 rows) at a time
  for one input row (independent accumulator chains; 2 blocks for 2-4 rows), and each row's arithmetic is the
  same whatever the block or row count, so results do not depend on how many rows are multiplied together.

Built by `torch.utils.cpp_extension` on first use (as `kernels.py`'s int8 kernels, with the same rules): on a
CPU without AVX512-VNNI, or where the build fails (a warning names the compiler's error), `load()` returns
False and int4 keeps torch's packed kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qwen2.quantization.kernels import _cpu_has_vnni, build_extension

BLOCK = 32  # columns per activation scale
ROWS = 16  # output rows per layout block (one zmm of int32 lanes)
DTYPE = torch.bfloat16  # the activations and scales the kernel reads

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

static inline __m512 load_bf16(const at::BFloat16* p) {  // 16 bf16 -> float32: a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline void store_bf16(at::BFloat16* p, __m512 v) {  // float32 -> bf16, round half to even
  __m512i bits = _mm512_castps_si512(v);
  __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// One input row quantised per block of 32 columns: codes q, scale d, 8 * sum(q) per block, and per group
// zsum = sum over its blocks of d * sum(q) (the factor of the zeros).
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d, zsum;
  std::vector<int32_t> offset;
};

static void quantize_row(const at::BFloat16* x, int64_t K, int64_t group, int8_t* q, float* d, int32_t* offset,
                         float* zsum) {
  const int64_t blocks = K / 32, per_group = group / 32;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 lo = load_bf16(x + 32 * b), hi = load_bf16(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float scale = std::max(amax, std::numeric_limits<float>::min()) / 127.0f;
    const __m512 vs = _mm512_set1_ps(scale);
    const int rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(lo, vs), rounding));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_div_ps(hi, vs), rounding));
    _mm_storeu_si128((__m128i*)(q + 32 * b), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128((__m128i*)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(qhi));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    d[b] = scale;
    offset[b] = 8 * sum;
    if (b % per_group == 0) zsum[b / per_group] = 0.0f;
    zsum[b / per_group] += scale * static_cast<float>(sum);
  }
}

// Output rows of T blocks (16 rows each, starting at block r) for M input rows: out[m, n] (float32 sums).
template <int M, int T>
static void tile(const uint8_t* codes, const uint32_t* sz, const int8_t* const* q, const float* const* d,
                 const int32_t* const* offset, const float* const* zsum, int64_t N, int64_t K, int64_t group,
                 int64_t r, __m512 (&acc)[M][T]) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i high_half = _mm512_set1_epi32((int)0xFFFF0000u);
  const int64_t per_group = group / 32, groups = K / group, block_bytes = 8 * K;
  for (int m = 0; m < M; ++m)
    for (int t = 0; t < T; ++t) acc[m][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s[T], z[T];
    for (int t = 0; t < T; ++t) {  // 16 (scale, zero) bf16 pairs: one 64-byte load
      const __m512i pair = _mm512_loadu_si512(sz + g * N + (r + t) * 16);
      s[t] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      z[t] = _mm512_castsi512_ps(_mm512_and_si512(pair, high_half));
    }
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m512i sums[M][T];
      for (int m = 0; m < M; ++m)
        for (int t = 0; t < T; ++t) sums[m][t] = _mm512_setzero_si512();
      for (int64_t c = 4 * b; c < 4 * b + 4; ++c) {  // 8 columns per step
        for (int t = 0; t < T; ++t) {
          const uint8_t* p = codes + (r + t) * block_bytes + 64 * c;
          _mm_prefetch((const char*)(p + 1024), _MM_HINT_T0);
          const __m512i w = _mm512_loadu_si512(p);
          const __m512i lo = _mm512_and_si512(w, low);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
          for (int m = 0; m < M; ++m) {
            const int32_t* x4 = (const int32_t*)(q[m] + 8 * c);
            sums[m][t] = _mm512_dpbusd_epi32(sums[m][t], lo, _mm512_set1_epi32(x4[0]));
            sums[m][t] = _mm512_dpbusd_epi32(sums[m][t], hi, _mm512_set1_epi32(x4[1]));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m512i off = _mm512_set1_epi32(offset[m][b]);
        const __m512 db = _mm512_set1_ps(d[m][b]);
        for (int t = 0; t < T; ++t)
          acc[m][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[m][t], off)),
                                      _mm512_mul_ps(s[t], db), acc[m][t]);
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m512 zs = _mm512_set1_ps(zsum[m][g]);
      for (int t = 0; t < T; ++t) acc[m][t] = _mm512_fmadd_ps(z[t], zs, acc[m][t]);
    }
  }
}

template <int M, int T>
static void run_tile(const uint8_t* codes, const uint32_t* sz, const Activations* a, int64_t m0,
                     const at::BFloat16* bias, at::BFloat16* out, int64_t N, int64_t K, int64_t group, int64_t r) {
  const int8_t* q[M];
  const float* d[M];
  const int32_t* offset[M];
  const float* zsum[M];
  for (int m = 0; m < M; ++m) {
    q[m] = a->q.data() + (m0 + m) * K;
    d[m] = a->d.data() + (m0 + m) * (K / 32);
    offset[m] = a->offset.data() + (m0 + m) * (K / 32);
    zsum[m] = a->zsum.data() + (m0 + m) * (K / group);
  }
  __m512 acc[M][T];
  tile<M, T>(codes, sz, q, d, offset, zsum, N, K, group, r, acc);
  for (int t = 0; t < T; ++t) {
    const int64_t n = (r + t) * 16;
    const __m512 b = bias ? load_bf16(bias + n) : _mm512_setzero_ps();
    for (int m = 0; m < M; ++m) store_bf16(out + (m0 + m) * N + n, _mm512_add_ps(acc[m][t], b));
  }
}

// Blocks r0..r1 of output rows for input rows m0..m0+M-1.
template <int M, int T>
static void run_blocks(const uint8_t* codes, const uint32_t* sz, const Activations* a, int64_t m0,
                       const at::BFloat16* bias, at::BFloat16* out, int64_t N, int64_t K, int64_t group,
                       int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + T <= r1; r += T) run_tile<M, T>(codes, sz, a, m0, bias, out, N, K, group, r);
  for (; r < r1; ++r) run_tile<M, 1>(codes, sz, a, m0, bias, out, N, K, group, r);
}

}  // namespace

// x (M, K) bf16 . int4 codes (N, K) in the kernel layout, scales_and_zeros (K / group, N, 2) bf16 -> (M, N) bf16.
at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_and_zeros, int64_t group,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "qwen2_int4.linear: a 2-D bfloat16 x expected");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "qwen2_int4.linear: uint8 codes (N, K / 2) expected");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  TORCH_CHECK(group >= 32 && group % 32 == 0 && K % group == 0 && N % 16 == 0 && codes.size(1) * 2 == K,
              "qwen2_int4.linear: K a multiple of the group size (a multiple of 32), N a multiple of 16 and codes ",
              "(N, K / 2) expected; got x ", x.sizes(), ", codes ", codes.sizes(), ", group ", group);
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.dim() == 3 &&
              scales_and_zeros.size(0) == K / group && scales_and_zeros.size(1) == N && scales_and_zeros.size(2) == 2,
              "qwen2_int4.linear: bfloat16 scales_and_zeros (K / group, N, 2) expected, got ", scales_and_zeros.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->numel() == N),
              "qwen2_int4.linear: a bfloat16 bias of N elements expected");
  const at::Tensor xc = x.contiguous(), cc = codes.contiguous(), sc = scales_and_zeros.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  Activations a;
  a.q.resize(M * K);
  a.d.resize(M * (K / 32));
  a.offset.resize(M * (K / 32));
  a.zsum.resize(M * (K / group));
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xp + m * K, K, group, a.q.data() + m * K, a.d.data() + m * (K / 32), a.offset.data() + m * (K / 32),
                 a.zsum.data() + m * (K / group));
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  const uint32_t* sp = reinterpret_cast<const uint32_t*>(sc.data_ptr<at::BFloat16>());
  const at::BFloat16* bp = bias.has_value() ? bc.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 16, 4, [&](int64_t r0, int64_t r1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) run_blocks<4, 2>(cp, sp, &a, m, bp, op, N, K, group, r0, r1);
    switch (M - m) {
      case 3: run_blocks<3, 2>(cp, sp, &a, m, bp, op, N, K, group, r0, r1); break;
      case 2: run_blocks<2, 2>(cp, sp, &a, m, bp, op, N, K, group, r0, r1); break;
      case 1: run_blocks<1, 4>(cp, sp, &a, m, bp, op, N, K, group, r0, r1); break;
      default: break;
    }
  });
  return out;
}

// The activation codes the kernel multiplies: (int8 codes (M, K), float32 block scales (M, K / 32)).
std::vector<at::Tensor> quantize_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0,
              "qwen2_int4.quantize_activations: a 2-D bfloat16 x with columns a multiple of 32 expected");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, K / 32}, x.options().dtype(at::kFloat));
  std::vector<int32_t> offset(K / 32);
  std::vector<float> zsum(K / 32);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(xc.data_ptr<at::BFloat16>() + m * K, K, 32, q.data_ptr<int8_t>() + m * K,
                 d.data_ptr<float>() + m * (K / 32), offset.data(), zsum.data());
  return {q, d};
}

TORCH_LIBRARY(qwen2_int4, m) {
  m.def("linear(Tensor x, Tensor codes, Tensor scales_and_zeros, int group, Tensor? bias) -> Tensor");
  m.def("quantize_activations(Tensor x) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(qwen2_int4, CPU, m) {
  m.impl("linear", &linear);
  m.impl("quantize_activations", &quantize_activations);
}
"""

_loaded = False
_build_error: str | None = None


def build_error() -> str | None:
    """Why `load()` could not build the kernel on a CPU with AVX512-VNNI (None if it did or was not called)."""
    return _build_error


@functools.cache
def load() -> bool:
    """Build (once per machine) and register the kernel; whether it can be used. Called when a module packs its
    weight, so before `torch.compile` traces the layer."""
    global _loaded, _build_error
    if not _cpu_has_vnni():
        return False
    _build_error = build_extension("qwen2_int4", [_SOURCE], lambda: linear(
        torch.zeros(1, 32, dtype=DTYPE), torch.zeros(64, 16, dtype=torch.uint8), torch.zeros(1, 64, 2, dtype=DTYPE), 32),
        "int4 (torch's packed kernel)")
    if _build_error:
        return False

    @torch.library.register_fake("qwen2_int4::linear")
    def _(x: Tensor, codes: Tensor, scales_and_zeros: Tensor, group: int, bias: Tensor | None) -> Tensor:
        return x.new_empty(x.shape[0], codes.shape[0])

    _loaded = True
    return True


def takes(in_features: int, out_features: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies such a layer (builds it on the first call): bf16, and shapes it reads."""
    return (dtype == DTYPE and group_size % BLOCK == 0 and in_features % group_size == 0
            and out_features % ROWS == 0 and load())


def linear(x: Tensor, codes: Tensor, scales_and_zeros: Tensor, group_size: int, bias: Tensor | None = None) -> Tensor:
    """bf16 x (M, K) times the int4 weight (codes in the kernel layout), plus bias: (M, N) bf16. A C++
    operator, so a compiled graph calls it without going through Python."""
    return torch.ops.qwen2_int4.linear(x, codes, scales_and_zeros, group_size, bias)


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's int8 codes (M, K) and float32 scales (M, K // 32) of bf16 rows x: `x ~= codes * scales`."""
    codes, scales = torch.ops.qwen2_int4.quantize_activations(x)
    return codes, scales
