"""C++ of the several-row decode kernels (`kernels.bf16_rows`, `kernels.int8_rows`), built into the extension
of `kernels` after its own source (it uses that source's `load_floats`).

Both read each weight row once for up to 8 activation rows, NB weight rows at a time, with the NB x 8
accumulators in registers: a 32-element chunk of a weight row is loaded once and multiplied into 8 of them
(`vdpbf16ps` for bf16, `vpdpwssd` for int8 weights times int16 rows). The accumulators are summed together at the
end of a row (`sum16`: 16 vectors into one vector of their 16 sums by whole-vector shuffles and adds, about 3
instructions per accumulator instead of a ~10-instruction horizontal sum each, on a dependent chain), and the
weight is prefetched ~2 KB ahead, which the hardware prefetcher alone did not keep up with at several rows
(measured: ~1.5-2x on the default model's shapes). Where the rows do not fit half of L1 (down_proj's 8 rows of
K = 4864 bf16 or int16 are 78 KB, re-read from L2 for every weight row pair: 18 GB/s against gate_proj's 31),
K is taken in blocks that do, the accumulators (int8: the int64 totals) kept between blocks, so each lane adds
the same products in the same order as without blocks: a row's bits depend neither on K's blocking nor on
the other rows in the call (speculative verification and the serving engine rely on it). The NB x MB outputs
of a pass are scaled, biased and rounded as one vector, then written lane by lane. Up to 16 rows: the rows
beyond 8 re-read an L2-sized tile of weight rows. The N weight rows are split across torch's threads.

bf16: products of bf16 pairs are exact in float32; vdpbf16ps adds them into float32 lanes (denormals flushed),
so a sum differs from the exact one by float32 rounding over K / 16 additions per lane, then one bf16 rounding.
int8: the rows are quantised to int16 inside (int8.quantize_rows's formula: the same codes), the products summed
exactly (int32 chunks of 512, then int64), then scaled in float32 in the order of the torch operations they
replace: bit-identical to them (the extension is built with -ffp-contract=off: no fused multiply-adds).
"""

ROWS_SOURCE = r"""
#define QWEN2_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

static inline __m512 add_ps(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
static inline __m512 add_epi32(__m512 a, __m512 b) {  // int32 lanes carried in float vectors (shuffles move bits)
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}

// One vector of the 16 sums of 16 vectors' lanes: lane i is the sum of v[4 * (i % 4) + i / 4] (a 4x4 transposed
// order; `transposed` gives it). Three levels of whole-vector shuffles and adds.
template <__m512 (*Add)(__m512, __m512)>
static inline __m512 sum16(const __m512* v) {
  __m512 h[8], q[4];
  for (int i = 0; i < 8; ++i)
    h[i] = Add(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    q[i] = Add(_mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0x88), _mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0xDD));
  const __m512 ef = Add(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
  const __m512 gh = Add(_mm512_unpacklo_ps(q[2], q[3]), _mm512_unpackhi_ps(q[2], q[3]));
  return Add(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ef), _mm512_castps_pd(gh))),
             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ef), _mm512_castps_pd(gh))));
}

static constexpr int transposed(int s) { return 4 * (s % 4) + s / 4; }
static constexpr int64_t PREFETCH_BYTES = 2048;
static constexpr int MAX_ROWS_PER_PASS = 8;
static constexpr int64_t X_BLOCK_BYTES = 16 << 10;  // half of L1d: the rest streams the weight

// Columns per K block for MB rows of 2-byte x (a multiple of `multiple`): K itself while the rows fit in
// X_BLOCK_BYTES, else as many columns as do (down_proj's 8 rows of 4864 are 78 KB: without blocks, each pass
// over a weight row re-read them from L2).
static int64_t k_block(int MB, int64_t K, int64_t multiple) {
  const int64_t fit = std::max<int64_t>(multiple, X_BLOCK_BYTES / (2 * MB) / multiple * multiple);
  return K <= fit ? K : fit;
}

// A pass over NB weight rows for MB x rows ends with MB * NB (<= 16) outputs in the lanes of one vector: lane l is
// weight row n + l / MB, x row l % MB. Built (by_weight_row, by_x_row), rounded to T and written lane-wise, so
// that each output sees the scalar float32 operations it would alone.
template <int MB, int NB>
static inline __m512i lane_index(bool weight_row) {
  static_assert(MB * NB <= 16, "one vector of outputs per pass");
  alignas(64) int32_t index[16];
  for (int l = 0; l < 16; ++l) index[l] = l < MB * NB ? (weight_row ? l / MB : l % MB) : 0;
  return _mm512_load_si512(index);
}

template <int Count>
static inline __m512 load_first(const float* p) { return _mm512_maskz_loadu_ps((__mmask16)((1u << Count) - 1), p); }
template <int Count>
static inline __m512 load_first(const at::BFloat16* p) {
  const __m256i h = _mm256_maskz_loadu_epi16((__mmask16)((1u << Count) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// lane l: float(v[n + l / MB]); zeros if v is null
template <int MB, int NB, typename T>
static inline __m512 by_weight_row(const T* v, int64_t n) {
  return v ? _mm512_permutexvar_ps(lane_index<MB, NB>(true), load_first<NB>(v + n)) : _mm512_setzero_ps();
}

// lane l: v[l % MB]
template <int MB, int NB>
static inline __m512 by_x_row(const float* v) {
  return _mm512_permutexvar_ps(lane_index<MB, NB>(false), load_first<MB>(v));
}

static inline __m512 round_to(__m512 v, const float*) { return v; }
static inline __m512 round_to(__m512 v, const at::BFloat16*) {  // float(at::BFloat16(v)) in each lane
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}

template <int MB, int NB, typename T>
static inline void write_lanes(T* out, int64_t N, int64_t n, __m512 v) {
  alignas(64) T lanes[16];
  store_floats(lanes, v);
  for (int l = 0; l < MB * NB; ++l) out[(l % MB) * N + n + l / MB] = lanes[l];
}

// Runs block(rows, x rows, out rows, weight rows t0..t1) over N split across threads, in tiles of weight rows
// that stay in L2 while each group of up to 8 rows reads them.
template <typename Block>
static void over_tiles(int64_t M, int64_t N, int64_t row_bytes, const Block& block) {
  const int64_t tile = std::max<int64_t>(16, (int64_t(256) << 10) / row_bytes) & ~int64_t(15);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tile)
      for (int64_t m = 0; m < M; m += MAX_ROWS_PER_PASS)
        block(std::min<int64_t>(MAX_ROWS_PER_PASS, M - m), m, t0, std::min(end, t0 + tile));
  });
}

// Calls f.template operator()<MB>() for MB = rows (1..8): the kernels are unrolled over the rows.
template <typename F>
static void with_rows(int64_t rows, const F& f) {
  switch (rows) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    case 4: f.template operator()<4>(); break;
    case 5: f.template operator()<5>(); break;
    case 6: f.template operator()<6>(); break;
    case 7: f.template operator()<7>(); break;
    default: f.template operator()<8>(); break;
  }
}

// ---- bf16 rows times a bf16 weight (AVX512-BF16; called only where the CPU has it)

// out[j, n] = bf16(sum_k x[j, k] w[n, k] + bias[n]) for MB rows of x and weight rows n0..n1, NB at a time, over
// columns k0..k1 (k0 % 32 == 0; Blocked unless they are all of K). The accumulators start from zero at k0 == 0,
// else from `carry` (MB vectors per weight row from n0), and go back there unless k1 == K, where they are summed
// and written: the same additions in the same order however K is blocked. A last chunk of K shorter than 32 is
// read with masked loads.
template <int MB, int NB, bool Blocked>
QWEN2_BF16 static void bf16_rows_block(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* bias,
                                       at::BFloat16* out, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0,
                                       int64_t k1, __m512* carry) {
  const __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);  // the last chunk's columns, if K % 32 != 0
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const at::BFloat16* r = w + n * K;
    // whole rows: 2 KB ahead along the NB rows (adjacent in memory); a block of columns: the next NB rows' block
    const char* pf = reinterpret_cast<const char*>(r) + (Blocked ? 2 * NB * K : PREFETCH_BYTES);
    const int64_t pf_k = Blocked ? 1 : NB, pf_i = Blocked ? K : 32;
    __m512* kept = Blocked ? carry + (n - n0) * MB : nullptr;
    __m512 acc[16];
    for (int c = 0; c < 16; ++c) acc[c] = !Blocked || k0 == 0 || c >= MB * NB ? _mm512_setzero_ps() : kept[c];
    for (int64_t k = k0; k < k1; k += 32) {
      const __mmask32 mask = k + 32 <= K ? ~__mmask32(0) : tail;
      __m512bh wv[NB];
      for (int i = 0; i < NB; ++i) {
        _mm_prefetch(pf + (k * pf_k + i * pf_i) * 2, _MM_HINT_T0);
        wv[i] = (__m512bh)_mm512_maskz_loadu_epi16(mask, r + i * K + k);
      }
      for (int j = 0; j < MB; ++j) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + j * K + k);
        for (int i = 0; i < NB; ++i) acc[i * MB + j] = _mm512_dpbf16_ps(acc[i * MB + j], wv[i], xv);
      }
    }
    if (Blocked && k1 < K) {
      for (int c = 0; c < MB * NB; ++c) kept[c] = acc[c];
      continue;
    }
    __m512 t[16];
    for (int s = 0; s < 16; ++s) t[s] = acc[transposed(s)];
    write_lanes<MB, NB>(out, N, n, _mm512_add_ps(sum16<add_ps>(t), by_weight_row<MB, NB>(bias, n)));
  }
  if (NB > 1 && n < n1) bf16_rows_block<MB, 1, Blocked>(x, w, bias, out, N, K, n, n1, k0, k1,
                                                          Blocked ? carry + (n - n0) * MB : nullptr);
}

// x (M, K) bf16 . w (N, K) bf16 (+ bias (N)) -> (M, N) bf16, as F.linear; 2 weight rows per pass at 5-8 rows
// (16 accumulators), 4 at 1-4.
QWEN2_BF16 at::Tensor bf16_rows(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_rows: bf16 x and w expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "bf16_rows: x (M, K) and w (N, K) expected");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->numel() == w.size(0)),
              "bf16_rows: a bf16 bias of N elements expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const int64_t M = xc.size(0), N = wc.size(0), K = wc.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  const at::BFloat16* bp = bias ? bc.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  if (M == 0 || N == 0) return out;
  if (K == 0) return bias ? bc.expand({M, N}).contiguous() : out.zero_();
  over_tiles(M, N, 2 * K, [&](int64_t rows, int64_t m, int64_t t0, int64_t t1) {
    with_rows(rows, [&]<int MB>() {
      constexpr int NB = MB <= 4 ? 4 : 2;
      const int64_t kb = k_block(MB, K, 32);
      if (kb == K) return bf16_rows_block<MB, NB, false>(xp + m * K, wp, bp, op + m * N, N, K, t0, t1, 0, K, nullptr);
      std::vector<__m512> carry((t1 - t0) * MB);
      for (int64_t k0 = 0; k0 < K; k0 += kb)
        bf16_rows_block<MB, NB, true>(xp + m * K, wp, bp, op + m * N, N, K, t0, t1, k0, std::min(K, k0 + kb),
                                      carry.data());
    });
  });
  return out;
}

// ---- int8 weights times rows quantised to int16 (AVX512-VNNI)

// codes = round_half_even(x / s), s = max(max|x|, FLT_MIN) / qmax per row: int8.quantize_rows's float32 steps.
template <typename T>
static void quantize_rows_int16(const T* x, int16_t* codes, float* scales, int64_t M, int64_t K, float qmax) {
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_floats(row + k)));
    const float scale = std::max(_mm512_reduce_max_ps(vmax), std::numeric_limits<float>::min()) / qmax;
    scales[m] = scale;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load_floats(row + k), vscale),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_si256((__m256i*)(codes + m * K + k), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(q)));
    }
  }
}

// out[j, n] = T(T(float(sum_k codes[j, k] w[n, k]) * row_scales[j] * scales[n]) + bias[n]) for MB rows and weight
// rows n0..n1, NB at a time (K % 32 == 0), over columns k0..k1 (k0 % 512 == 0; Blocked unless all of K), the
// int64 totals carried in `carry` between blocks as bf16_rows_block carries its accumulators. The int32 lanes
// are summed every 512 columns (a chunk's total is below 512 * 128 * 32767 < 2^31) into exact int64 totals.
template <int MB, int NB, bool Blocked, typename T>
static void int8_rows_block(const int16_t* x, const int8_t* w, const float* rs, const T* cs, const T* bias, T* out,
                            int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t kb0, int64_t kb1,
                            int64_t* carry) {
  const __m512 row_scales = by_x_row<MB, NB>(rs);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    const int8_t* r = w + n * K;
    const char* pf = reinterpret_cast<const char*>(r) + (Blocked ? NB * K : PREFETCH_BYTES);  // as bf16_rows_block
    const int64_t pf_k = Blocked ? 1 : NB;
    int64_t* kept = Blocked ? carry + (n - n0) * MB : nullptr;
    alignas(64) int64_t totals[16] = {};
    if (Blocked && kb0 > 0)
      for (int c = 0; c < MB * NB; ++c) totals[c] = kept[c];
    for (int64_t k0 = kb0; k0 < kb1; k0 += 512) {
      const int64_t k1 = std::min<int64_t>(kb1, k0 + 512);
      __m512i acc[16];
      for (int c = 0; c < 16; ++c) acc[c] = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 32) {
        if (Blocked)
          for (int i = 0; i < NB; ++i) _mm_prefetch(pf + i * K + k, _MM_HINT_T0);
        else
          _mm_prefetch(pf + k * pf_k, _MM_HINT_T0);
        __m512i wv[NB];
        for (int i = 0; i < NB; ++i) wv[i] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r + i * K + k)));
        for (int j = 0; j < MB; ++j) {
          const __m512i xv = _mm512_loadu_si512(x + j * K + k);
          for (int i = 0; i < NB; ++i) acc[i * MB + j] = _mm512_dpwssd_epi32(acc[i * MB + j], wv[i], xv);
        }
      }
      __m512 t[16];
      for (int s = 0; s < 16; ++s) t[s] = _mm512_castsi512_ps(acc[transposed(s)]);
      const __m512i s32 = _mm512_castps_si512(sum16<add_epi32>(t));
      __m512i* tot = reinterpret_cast<__m512i*>(totals);
      tot[0] = _mm512_add_epi64(tot[0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(s32)));
      tot[1] = _mm512_add_epi64(tot[1], _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s32, 1)));
    }
    if (Blocked && kb1 < K) {
      for (int c = 0; c < MB * NB; ++c) kept[c] = totals[c];
      continue;
    }
    const __m512i* tot = reinterpret_cast<const __m512i*>(totals);  // int64 -> float32 as static_cast rounds
    const __m512 exact = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(tot[0])),
                                            _mm512_cvtepi64_ps(tot[1]), 1);
    const __m512 product = round_to(_mm512_mul_ps(_mm512_mul_ps(exact, row_scales), by_weight_row<MB, NB>(cs, n)), out);
    write_lanes<MB, NB>(out, N, n, bias ? _mm512_add_ps(product, by_weight_row<MB, NB>(bias, n)) : product);
  }
  if (NB > 1 && n < n1)
    int8_rows_block<MB, 1, Blocked>(x, w, rs, cs, bias, out, N, K, n, n1, kb0, kb1,
                                    Blocked ? carry + (n - n0) * MB : nullptr);
}

template <typename T>
static void int8_rows_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                           const at::Tensor* bias, at::Tensor& out, double qmax) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  at::Tensor codes = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor row_scales = at::empty({M}, x.options().dtype(at::kFloat));
  quantize_rows_int16(x.data_ptr<T>(), codes.data_ptr<int16_t>(), row_scales.data_ptr<float>(), M, K,
                      static_cast<float>(qmax));
  const int16_t* xp = codes.data_ptr<int16_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* rp = row_scales.data_ptr<float>();
  const T* cp = scales.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  over_tiles(M, N, K, [&](int64_t rows, int64_t m, int64_t t0, int64_t t1) {
    with_rows(rows, [&]<int MB>() {
      constexpr int NB = MB <= 4 ? 4 : 2;
      const int64_t kb = k_block(MB, K, 512);
      if (kb == K)
        return int8_rows_block<MB, NB, false, T>(xp + m * K, wp, rp + m, cp, bp, op + m * N, N, K, t0, t1, 0, K,
                                                 nullptr);
      std::vector<int64_t> carry((t1 - t0) * MB);
      for (int64_t k0 = 0; k0 < K; k0 += kb)
        int8_rows_block<MB, NB, true, T>(xp + m * K, wp, rp + m, cp, bp, op + m * N, N, K, t0, t1, k0,
                                         std::min(K, k0 + kb), carry.data());
    });
  });
}

// x (M, K) float32 or bf16 quantised to int16 codes per row (qmax 32767; 127 gives W8A8's int8 codes) . w (N, K)
// int8, scaled by the rows' and w's scales (N, x's dtype), plus bias (N): Int8WeightOnlyLinear's decoding rows.
at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, double qmax) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_rows: a 2-D float32 or bfloat16 x expected");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.size(1) == x.size(1) && w.size(1) % 32 == 0,
              "int8_rows: an int8 w (N, K) with K % 32 == 0 expected");
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.numel() == w.size(0),
              "int8_rows: scales of N elements in x's dtype expected");
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->numel() == w.size(0)),
              "int8_rows: a bias of N elements in x's dtype expected");
  TORCH_CHECK(qmax >= 1 && qmax <= 32767, "int8_rows: qmax in 1..32767 expected");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), sc = scales.contiguous();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (out.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat)
    int8_rows_impl<float>(xc, wc, sc, bias ? &bc : nullptr, out, qmax);
  else
    int8_rows_impl<at::BFloat16>(xc, wc, sc, bias ? &bc : nullptr, out, qmax);
  return out;
}

TORCH_LIBRARY(qwen2_rows, m) {
  m.def("bf16_rows(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("int8_rows(Tensor x, Tensor w, Tensor scales, Tensor? bias, float qmax) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen2_rows, CPU, m) {
  m.impl("bf16_rows", &bf16_rows);
  m.impl("int8_rows", &int8_rows);
}
"""
