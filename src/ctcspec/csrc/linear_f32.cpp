// y = x W^T (+ bias) in fp32 for the few-row products of speculative decoding, on AVX-512 CPUs.
//
// Weights are read from a packed copy, blocks of four output rows interleaved sixteen columns at a time:
// packed[b][j][i][l] = W[4b + i][16j + l] (zero past the matrix), so one pass over a block is one sequential
// stream of memory, which the hardware prefetcher follows at close to the memory bandwidth: a one-token
// forward of a small model is bound by reading every weight once.
//
// Invariant: every output y[r][o] is reduced in one fixed order that depends on `in` alone, never on how many
// rows come with it, where its row sits, which tile computes it or how many threads run. Lane l of one 16-wide
// accumulator sums x[r][k] * W[o][k] for k = l, l + 16, ... in increasing k (past `in`, zeros), the 16 lanes are
// added in _mm512_reduce_add_ps's fixed tree, then the bias. So a row of a tree verification is bit for bit
// the one-row product of the same input.
#include <immintrin.h>

namespace {

constexpr int kBlockRows = 4;   // output rows interleaved in one packed block
constexpr long kLanes = 16;     // fp32 lanes of one AVX-512 register
constexpr long kRowTile = 4;    // rows of x served by one pass over a block (more would spill the accumulators)

// The outputs of one packed block (the first `valid` of its four are real) for R rows of x: one pass over the
// block serves all R rows.
template <int R>
inline __attribute__((always_inline)) void tile(const float* block, long in, long next_block, const float* x, float* y,
                                                long out, const float* bias, long valid) {
  constexpr int O = kBlockRows;
  __m512 acc[O][R];
  for (int o = 0; o < O; o++)
    for (int r = 0; r < R; r++) acc[o][r] = _mm512_setzero_ps();
  long k = 0;
  const float* w = block;
  for (; k + kLanes <= in; k += kLanes, w += kBlockRows * kLanes) {
    __m512 xv[R];
    for (int r = 0; r < R; r++) xv[r] = _mm512_loadu_ps(x + r * in + k);
    if (R > 1)  // several rows' arithmetic outpaces the hardware prefetcher: fetch the next block (0: the last) now
      for (int o = 0; o < O; o++) _mm_prefetch(reinterpret_cast<const char*>(w + next_block + o * kLanes), _MM_HINT_T0);
    for (int o = 0; o < O; o++) {
      const __m512 wv = _mm512_loadu_ps(w + o * kLanes);
      for (int r = 0; r < R; r++) acc[o][r] = _mm512_fmadd_ps(wv, xv[r], acc[o][r]);
    }
  }
  if (k < in) {  // the last, partial chunk: x masked to zero past `in` (the packed weight is zero there)
    const __mmask16 m = static_cast<__mmask16>((1u << (in - k)) - 1);
    __m512 xv[R];
    for (int r = 0; r < R; r++) xv[r] = _mm512_maskz_loadu_ps(m, x + r * in + k);
    for (int o = 0; o < O; o++) {
      const __m512 wv = _mm512_loadu_ps(w + o * kLanes);
      for (int r = 0; r < R; r++) acc[o][r] = _mm512_fmadd_ps(wv, xv[r], acc[o][r]);
    }
  }
  float sums[O][R];  // reduced in registers first, so the accumulators never live in memory
  for (int o = 0; o < O; o++)
    for (int r = 0; r < R; r++) sums[o][r] = _mm512_reduce_add_ps(acc[o][r]);
  for (int o = 0; o < O && o < valid; o++)
    for (int r = 0; r < R; r++) y[r * out + o] = bias ? sums[o][r] + bias[o] : sums[o][r];
}

// One to four rows (n): the whole block in one pass.
inline void row_tile(long n, const float* block, long in, long next_block, const float* x, float* y, long out,
                     const float* bias, long valid) {
  switch (n) {
    case 1: tile<1>(block, in, next_block, x, y, out, bias, valid); break;
    case 2: tile<2>(block, in, next_block, x, y, out, bias, valid); break;
    case 3: tile<3>(block, in, next_block, x, y, out, bias, valid); break;
    default: tile<4>(block, in, next_block, x, y, out, bias, valid); break;
  }
}

}  // namespace

extern "C" {

// x: rows x in, packed: the packed copy of an out x in weight (ceil(out / 4) * ceil(in / 16) * 64 floats), bias:
// out or null, y: rows x out; fp32, contiguous. Rows go four at a time (the last group 1-4); blocks of four outputs
// are shared among `threads` OpenMP threads (the runtime torch already loaded), a small product's not.
void ctcspec_linear_f32(const float* x, long rows, long in, const float* packed, long out, const float* bias,
                        float* y, int threads) {
  const long blocks = (out + kBlockRows - 1) / kBlockRows;
  const long block_floats = ((in + kLanes - 1) / kLanes) * kBlockRows * kLanes;
  const bool parallel = threads > 1 && blocks * in * rows >= (1L << 16);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (long b = 0; b < blocks; b++) {
    const long first = b * kBlockRows;
    const long valid = out - first;
    for (long r = 0; r < rows; r += kRowTile) {
      const long n = rows - r < kRowTile ? rows - r : kRowTile;
      row_tile(n, packed + b * block_floats, in, b + 1 < blocks ? block_floats : 0, x + r * in,
               y + r * out + first, out, bias ? bias + first : nullptr, valid);
    }
  }
}

}
