"""Decode attention that reads the paged KV cache where it lies: a C++ operator, built on first use.

The torch path (`attention.decode_attention`) gathers every decoding row's blocks into a fresh tensor each
step and layer, then runs SDPA once per row: at 16 rows that is 16 SDPA calls and a copy of every context
per layer, several milliseconds per layer, more than the layer's linears (profiled on the default model).
This kernel does one pass per (row, KV head): the scores of the head's query group against each key where
its block lies, a float32 softmax, and the weighted sum of the values, the (row, KV head) pairs spread over
the threads. Plain C++ that the compiler vectorises, with AVX2 and FMA where the CPU has them (about twice
as fast as without, measured), float32 or bfloat16.

Built by `torch.utils.cpp_extension` and cached by torch per machine; if the build fails the engine keeps
the torch path and `load()` logs why, once.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename T>
static void paged_decode_impl(const T* q, const T* keys, const T* values, const int64_t* tables,
                              const int64_t* lengths, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                              int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t G = H / Hkv;
  const int64_t token_stride = Hkv * D, block_stride = block_size * Hkv * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores, kf(D), vf(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv, length = lengths[b];
      for (int64_t j = 0; j < G; ++j)
        for (int64_t d = 0; d < D; ++d) qf[j * D + d] = float(q[(b * H + g * G + j) * D + d]) * scale;
      scores.assign(G * length, 0.f);
      for (int64_t t = 0; t < length; ++t) {
        const T* k = keys + tables[b * max_blocks + t / block_size] * block_stride + (t % block_size) * token_stride + g * D;
        for (int64_t d = 0; d < D; ++d) kf[d] = float(k[d]);
        for (int64_t j = 0; j < G; ++j) {
          float s = 0.f;
          const float* qj = qf.data() + j * D;
#pragma omp simd reduction(+:s)
          for (int64_t d = 0; d < D; ++d) s += qj[d] * kf[d];
          scores[j * length + t] = s;
        }
      }
      for (int64_t j = 0; j < G; ++j) {
        float* row = scores.data() + j * length;
        const float top = *std::max_element(row, row + length);
        float sum = 0.f;
        for (int64_t t = 0; t < length; ++t) { row[t] = std::exp(row[t] - top); sum += row[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < length; ++t) row[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < length; ++t) {
        const T* v = values + tables[b * max_blocks + t / block_size] * block_stride + (t % block_size) * token_stride + g * D;
        for (int64_t d = 0; d < D; ++d) vf[d] = float(v[d]);
        for (int64_t j = 0; j < G; ++j) {
          const float p = scores[j * length + t];
          float* a = acc.data() + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
        }
      }
      for (int64_t j = 0; j < G; ++j)
        for (int64_t d = 0; d < D; ++d) out[(b * H + g * G + j) * D + d] = T(acc[j * D + d]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& tables, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes(), "paged_decode: q (B, H, D), "
              "keys/values (blocks, block_size, Hkv, D) expected");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "paged_decode: q, keys and values of one dtype, float32 or bfloat16");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong && tables.dim() == 2 &&
              tables.size(0) == q.size(0) && lengths.numel() == q.size(0), "paged_decode: int64 tables (B, n) "
              "and lengths (B,) expected");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "paged_decode: contiguous key/value blocks expected");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = keys.size(2), block_size = keys.size(1);
  TORCH_CHECK(keys.size(3) == D && H % Hkv == 0, "paged_decode: head sizes disagree");
  const at::Tensor qc = q.contiguous(), tc = tables.contiguous(), lc = lengths.contiguous();
  const int64_t* len = lc.data_ptr<int64_t>();
  const int64_t* table = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 1 && len[b] <= tc.size(1) * block_size, "paged_decode: a length beyond its table");
    for (int64_t i = 0; i < (len[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(table[b * tc.size(1) + i] >= 0 && table[b * tc.size(1) + i] < keys.size(0),
                  "paged_decode: a block id outside the pool");
  }
  at::Tensor out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat)
    paged_decode_impl(qc.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(), tc.data_ptr<int64_t>(),
                      len, out.data_ptr<float>(), B, H, Hkv, D, block_size, tc.size(1), float(scale));
  else
    paged_decode_impl(qc.data_ptr<at::BFloat16>(), keys.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>(),
                      tc.data_ptr<int64_t>(), len, out.data_ptr<at::BFloat16>(), B, H, Hkv, D, block_size,
                      tc.size(1), float(scale));
  return out;
}

TORCH_LIBRARY(qwen2_paged, m) {
  m.def("paged_decode(Tensor q, Tensor keys, Tensor values, Tensor tables, Tensor lengths, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwen2_paged, CPU, m) { m.impl("paged_decode", &paged_decode); }
"""


def _vector_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= flags else []


@functools.cache
def load() -> bool:
    """Build (once per machine) and register the operator; whether it can be used."""
    threads = torch.get_num_threads()
    try:
        from torch.utils.cpp_extension import _get_build_directory
        from torch.utils.cpp_extension import load as build

        directory = Path(_get_build_directory("qwen2_paged", verbose=False))
        if not any(directory.glob("qwen2_paged*.so")):
            logger.info("Building the paged decode attention kernel with the C++ compiler (once per machine).")
        # A source file of our own rather than load_inline, which prepends torch/extension.h (pybind11 and
        # all of torch's C++ API: ~4x the build time of the two headers the kernel needs).
        source = directory / "paged_decode.cpp"
        if not source.is_file() or source.read_text() != _SOURCE:
            source.write_text(_SOURCE)
        # Flags named from this CPU's (not -march=native): they are part of the build's cache key, so a home
        # directory shared with another CPU rebuilds rather than loading instructions that CPU lacks.
        build("qwen2_paged", [str(source)], is_python_module=False,
              extra_cflags=["-O3", "-fopenmp", *_vector_flags()], extra_ldflags=["-fopenmp"])
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, a failed build: keep the torch path
        logger.warning("The paged decode attention kernel could not be built (%s: %s); the engine gathers the "
                       "blocks with torch operations instead, slower.", type(err).__name__,
                       str(err).splitlines()[0][:200] if str(err) else "")
        return False
    finally:
        torch.set_num_threads(threads)  # the extension's OpenMP start-up may reset torch's thread count
    return True


def paged_decode(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, lengths: Tensor, scale: float) -> Tensor:
    """One query per row, q (B, H, D), over the first `lengths[b]` positions of row b's blocks
    (`tables` (B, n) into keys/values (blocks, block_size, Hkv, D)) -> (B, H, D)."""
    return torch.ops.qwen2_paged.paged_decode(q, keys, values, tables, lengths, scale)
