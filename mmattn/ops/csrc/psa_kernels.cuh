// Polarized Self-Attention (arXiv 2107.00782), paper form with the 1x1 convolutions folded
// away (Eq. 1-5; the folding is derived in mmattn/ops/psa.py): the four passes over the feature
// map x, as CUDA kernels. The C-sized work between the passes (merging the split partial
// reductions, the small matrix-vector chain) is psa_glue.cuh. mmattn/ops/psa.py has a
// pure-PyTorch implementation of each with the same contract (the CPU path and the reference
// these kernels are tested against).
//
//   forward   reduce: l_p = w_q . x_p ; online softmax over p: per split, max M,
//                     sum Z = sum e^{l-M}, s_c = sum_p e^{l_p-M} x_cp ; m_c = sum_p x_cp
//                                                                             (1 read of x)
//             apply:  S_p = sigmoid(u . x_p + b) ; y_cp = x_cp (a_c + S_p) or x_cp a_c S_p
//                                                                             (1 read, 1 write)
//   backward  reduce: g = G (.) x ; d_s_p = sum_c g_cp (a_c or 1) ; d_t = d_s S (1 - S) ;
//                     da_c = sum_p g_cp (S_p or 1) ; du_c = sum_p x_cp d_t_p ; sum_p d_t_p
//                                                                             (2 reads)
//             apply:  pi_p = e^{l_p-M} / Z (the merged state) ;
//                     d_l_p = pi_p (dsv . x_p - beta) ; gwq_c = sum_p x_cp d_l_p ;
//                     dx_cp = G_cp (a_c + S_p | a_c S_p) + u_c d_t_p + dm_c + dsv_c pi_p
//                             + wq_c d_l_p                                    (2 reads, 1 write)
//
// Each thread block stages a tile of TP pixels x all C channels of x (and of G) in shared memory
// as the accumulation type, row p at offset p * (C + 1) (C is even, so the odd row stride makes
// both the pixel-major and the channel-major accesses free of bank conflicts for float). Global
// loads and stores move 16 bytes a thread where the layout allows (VEC elements consecutive in
// memory: pixels of a channel for NCHW, channels of a pixel for channels_last), else single
// elements; either way coalesced. The reductions over the pixels are split over `splits` blocks
// per image (partials merged by the glue kernels) so that large H*W fill the GPU. The glue
// kernels (a team of blocks per image) touch nothing per pixel: the forward keeps the logits l and
// their softmax's merged state (M, Z), from which the backward apply pass forms pi, and the
// backward reduction gives each split's sum of d_t.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <tuple>
#include <type_traits>

#include "device_math.cuh"
#include "psa_dispatch.h"
#include "vector.cuh"

// needs the launch interface: cuda_launch.cuh (GPU) or the tests' CPU emulation

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Resident blocks per SM the register allocation is made for (__launch_bounds__): 4, so 64
// registers a thread. A block's shared memory (about 35-39 KB at C=256) would let an H100/H200
// SM hold 5-6 (an A100 SM 4), but fewer registers spill once two 16-byte loads per thread are
// in flight (kLoadBatch; bf16 spilled up to 112 bytes at 48-64 registers with four). Without
// any bound, ptxas's own choice for bwd_reduce was 48 registers and 40 bytes of spills (sm_90).
// The build warns on any spill (tests/ops/test_build.py fails on it, sm_80 and sm_90).
constexpr int kMinBlocks = 4;
// Steps of tile_loop whose loads are issued together: 2 x 16 bytes a thread, so up to 32 KB in
// flight per SM in the forward passes (64 KB in bwd_reduce, which reads x and G), above
// bandwidth x latency (estimated at 700 ns: ~18 KB per SM on an H100, ~25 KB on an H200).
constexpr int kLoadBatch = 2;
constexpr int kMaxTile = 32;                  // pixels per tile (a power of two)
static_assert(kMaxTile <= 32, "fwd_reduce_kernel and value_apply_kernel: a tile in a warp");
constexpr size_t kDefaultSmem = 48 * 1024;    // without the opt-in attribute

struct Geometry {
  int C;           // channels
  int P;           // pixels, H * W
  int64_t sN;      // strides of x (and of G, y, dx: the host code checks they match)
  int64_t sC;
  int64_t sP;
  bool pix_contig;  // NCHW (pixels contiguous); else channels_last (channels contiguous)
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}


template <typename T>
__device__ __forceinline__ T op_sigmoid(T v) { return T(1) / (T(1) + op_exp(-v)); }

template <typename T>
__device__ __forceinline__ T op_max(T a, T b) { return a > b ? a : b; }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The release's PSA_p gates a pixel with S_p = sigmoid(sig_p), sig = softmax_p(t): its passes
// get the logits t (N, P) and the online-softmax states of the reduction that computed them
// (per split: max, sum of exponentials), and merge those states per image (the forward apply
// pass with the whole block, block_merge_softmax; the backward gets them merged).
// `t == nullptr`: the paper's gate, S_p = sigmoid(u . x_p + b).
template <typename acc_t>
struct PixelSoftmax {
  const acc_t* t;
  const acc_t* max;
  const acc_t* sum;
  int splits;
};

template <typename acc_t>
struct SoftmaxNorm {
  acc_t top, total;
  __device__ __forceinline__ acc_t operator()(acc_t logit) const {
    return op_exp(logit - top) / total;
  }
};

// `count` online-softmax states (maximum mx[i stride], sum of exponentials sum[i stride])
// merged into one, in the calling thread.
template <typename acc_t>
__device__ __forceinline__ SoftmaxNorm<acc_t> merge_states(const acc_t* mx, const acc_t* sum,
                                                           int count, int stride) {
  acc_t top = -INFINITY, total = 0;
#pragma unroll 1
  for (int s = 0; s < count; ++s) top = op_max(top, mx[s * stride]);
#pragma unroll 1
  for (int s = 0; s < count; ++s) total += sum[s * stride] * op_exp(mx[s * stride] - top);
  return {top, total};
}

template <typename acc_t>
__device__ __forceinline__ SoftmaxNorm<acc_t> merge_softmax(const PixelSoftmax<acc_t>& sm, int n) {
  const int64_t o = static_cast<int64_t>(n) * sm.splits;
  return merge_states(sm.max + o, sm.sum + o, sm.splits, 1);
}

// Two online-softmax states merged into (top, total); an empty state is (-inf, 0).
template <typename T>
__device__ __forceinline__ void merge_state(T& top, T& total, T other_top, T other_total) {
  const T m = op_max(top, other_top);
  if (m == -INFINITY) return;  // both empty
  total = total * op_exp(top - m) + other_total * op_exp(other_top - m);
  top = m;
}

// The warp-wide merge of one state per lane, by shuffles; every lane gets the result.
template <typename T>
__device__ __forceinline__ void warp_merge(T& top, T& total) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T other_top = __shfl_xor_sync(0xffffffffu, top, o);
    const T other_total = __shfl_xor_sync(0xffffffffu, total, o);
    merge_state(top, total, other_top, other_total);
  }
}

// The block-wide merge of one state per thread (warps by shuffles, then the warps' states in
// warp order); every thread gets the result. `scratch`: 2 kWarps values of shared memory.
template <typename T>
__device__ __forceinline__ SoftmaxNorm<T> block_merge(T top, T total, T* scratch) {
  warp_merge(top, total);
  __syncthreads();  // an earlier merge has read scratch
  if ((threadIdx.x & 31) == 0) {
    scratch[threadIdx.x >> 5] = top;
    scratch[kWarps + (threadIdx.x >> 5)] = total;
  }
  __syncthreads();
  top = scratch[0];
  total = scratch[kWarps];
  for (int w = 1; w < kWarps; ++w) merge_state(top, total, scratch[w], scratch[kWarps + w]);
  return {top, total};
}

// Image n's split states merged by the whole block, each thread a strided share of the splits
// (merge_softmax's result up to rounding, in a fixed order): a few loads per thread instead of
// a chain of 2 S dependent ones. `scratch`: 2 kWarps values.
template <typename acc_t>
__device__ __forceinline__ SoftmaxNorm<acc_t> block_merge_softmax(const PixelSoftmax<acc_t>& sm,
                                                                  int n, acc_t* scratch) {
  const int64_t o = static_cast<int64_t>(n) * sm.splits;
  acc_t top = -INFINITY, total = 0;
  for (int s = threadIdx.x; s < sm.splits; s += kThreads)
    merge_state(top, total, sm.max[o + s], sm.sum[o + s]);
  return block_merge(top, total, scratch);
}

// The forward apply pass's softmax state of the gate logits: the release's PSA_p, image n's
// splits merged by the whole block (block_merge_softmax), also written to norm_out (2, N), if
// given, by the image's first block (the backward's one split); the paper's gate: none.
template <typename acc_t>
__device__ __forceinline__ SoftmaxNorm<acc_t> gate_softmax(const PixelSoftmax<acc_t>& psm, int n,
                                                          acc_t* scratch, acc_t* norm_out) {
  if (psm.t == nullptr) return {0, 1};
  const SoftmaxNorm<acc_t> norm = block_merge_softmax(psm, n, scratch);
  if (norm_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    norm_out[n] = norm.top;
    norm_out[gridDim.y + n] = norm.total;
  }
  return norm;
}

// A tile of `tp` (<= tile_p) pixels x C channels is moved in vectors of VEC elements that lie
// consecutively in memory: (c + k dc, p + k dp), k < VEC, with (dc, dp) = (0, 1) for NCHW (pixels
// of a channel) and (1, 0) for channels_last (channels of a pixel), so one access moves each. A
// thread walks its vectors in steps; step s is vector (c, p), or none past the tile. The order
// makes a warp's global accesses coalesced and its shared-memory accesses to element k of its
// vectors (tile[p][c], row stride C + 1, so bank p + c + k when C % 32 == 0) free of conflicts:
//   NCHW: consecutive threads take consecutive vectors of a channel's TP pixels, then the next
//         channel (a warp: 32 VEC / TP channels x TP / VEC vectors);
//   channels_last: a warp takes VEC pixels x 32 / VEC vectors of channels (32 channels).
// VEC > 1 needs tile_p % VEC == 0 (NCHW) or C % VEC == 0 (channels_last): the host checks.
template <int VEC, bool PIX>
__device__ __forceinline__ bool tile_vector(const Geometry& g, int log2_vpc, int cblocks, int tp,
                                            int s, int& c, int& p) {
  if (PIX) {
    const int idx = threadIdx.x + s * kThreads;
    c = idx >> log2_vpc;
    p = (idx & ((1 << log2_vpc) - 1)) * VEC;
  } else {
    const int lane = threadIdx.x & 31, unit = (threadIdx.x >> 5) + s * kWarps;
    p = unit / cblocks * VEC + lane % VEC;
    c = unit % cblocks * 32 + lane / VEC * VEC;
  }
  return c < g.C && p < tp;
}

// For every vector of the tile: use(c, p, dc, dp, load(c, p)), element k of the vector at
// (c + k dc, p + k dp); dc and dp are Int<0> or Int<1>. The loads of BATCH steps are all
// issued before their first use, so that several are in flight per thread.
template <int VEC, bool PIX, int BATCH, typename Load, typename Use>
__device__ __forceinline__ void tile_walk(const Geometry& g, int log2_tile, int tp, Load& load,
                                          Use& use) {
  static_assert(VEC == 1 || VEC == 2 || VEC == 4 || VEC == 8, "VEC: a power of two up to 8");
  constexpr int kLog2Vec = VEC == 8 ? 3 : VEC == 4 ? 2 : VEC == 2 ? 1 : 0;
  const int log2_vpc = log2_tile - kLog2Vec;  // vectors per channel of the tile (NCHW)
  const int cblocks = (g.C + 31) / 32;        // 32-channel blocks (channels_last)
  const int steps = PIX ? ((g.C << log2_vpc) + kThreads - 1) / kThreads
                        : ((tp + VEC - 1) / VEC * cblocks + kWarps - 1) / kWarps;
  for (int s0 = 0; s0 < steps; s0 += BATCH) {
    decltype(load(0, 0)) v[BATCH];
    int cs[BATCH], ps[BATCH];
    bool ok[BATCH];
#pragma unroll
    for (int b = 0; b < BATCH; ++b) {
      ok[b] = s0 + b < steps &&
              tile_vector<VEC, PIX>(g, log2_vpc, cblocks, tp, s0 + b, cs[b], ps[b]);
      if (ok[b]) v[b] = load(cs[b], ps[b]);
    }
#pragma unroll
    for (int b = 0; b < BATCH; ++b)  // (the steps dc, dp as types: see smem_run)
      if (ok[b]) use(cs[b], ps[b], Int<PIX ? 0 : 1>{}, Int<PIX ? 1 : 0>{}, v[b]);
  }
}

template <int VEC, int BATCH = kLoadBatch, typename Load, typename Use>
__device__ __forceinline__ void tile_loop(const Geometry& g, int log2_tile, int tp, Load&& load,
                                          Use&& use) {
  if (g.pix_contig)
    tile_walk<VEC, true, BATCH>(g, log2_tile, tp, load, use);
  else
    tile_walk<VEC, false, BATCH>(g, log2_tile, tp, load, use);
}

// The `load` of a tile_loop that reads nothing (a pass that only writes).
struct NoLoad {
  __device__ __forceinline__ int operator()(int, int) const { return 0; }
};

// The forward apply pass and the backward reduction lay their shared-memory vectors of
// per-pixel or per-channel values out after the block's tiles (which stay at the start of the
// shared memory: their accesses need no base register), the tiles and each vector `pad16` values
// long, so that each vector starts on a 16-byte boundary and a tile vector's values can be read
// in 16-byte accesses (smem_run, pixel_runs). (The forward reduction keeps its exponentials
// first; the backward apply pass reads its vectors a value at a time: see docs/kernels.md.)
template <typename T>
__host__ __device__ constexpr int pad16(int n) {
  return (n + kPack16<T> - 1) / kPack16<T> * kPack16<T>;
}

// The values arr[i + k STEP], k < VEC, of a shared-memory vector laid out as pad16 says, for
// the elements of a tile vector (tile_walk's dc or dp as STEP): STEP 0, one value read once;
// STEP 1, VEC consecutive values (i a multiple of VEC) in reads of up to 16 bytes, where the
// elements one at a time took a read each (in the SASS, sm_90: 8 LDS a vector and factor, bf16).
template <int VEC, int STEP, typename T>
__device__ __forceinline__ Pack<T, VEC> smem_run(const T* arr, int i) {
  static_assert(STEP == 0 || STEP == 1, "smem_run: STEP 0 or 1");
  Pack<T, VEC> out;
  if (STEP == 0) {
    const T v = arr[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = v;
  } else {
    constexpr int W = VEC < kPack16<T> ? VEC : kPack16<T>;
#pragma unroll
    for (int j = 0; j < VEC; j += W) {
      const Pack<T, W> part = load_pack<W>(arr + i + j);
#pragma unroll
      for (int k = 0; k < W; ++k) out.v[j + k] = part.v[k];
    }
  }
  return out;
}

// body(p, f) for p < tp in order, f[i] = vecs[i][p]: N per-pixel vectors (laid out as pad16
// says) read in 16-byte runs, the same for every thread (broadcasts), where a thread's loop
// over its channel's pixels read each value alone.
template <int N, typename T, typename F>
__device__ __forceinline__ void pixel_runs(int tp, const T* const (&vecs)[N], F&& body) {
  constexpr int kE = kPack16<T>;
  int p = 0;
  for (; p + kE <= tp; p += kE) {
    Pack<T, kE> run[N];
#pragma unroll
    for (int i = 0; i < N; ++i) run[i] = load_pack<kE>(vecs[i] + p);
#pragma unroll
    for (int k = 0; k < kE; ++k) {
      T f[N];
#pragma unroll
      for (int i = 0; i < N; ++i) f[i] = run[i].v[k];
      body(p + k, f);
    }
  }
  for (; p < tp; ++p) {
    T f[N];
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = vecs[i][p];
    body(p, f);
  }
}

// One round of halving_butterfly: M sums a lane, exchanged at lane offset O; then the next
// round (the rounds as templates, so that each round's loop has a constant count and unrolls:
// nvcc left the runtime form of the loops of a 16-sum butterfly as a loop over the array, read
// and written through chains of predicated moves, sm_90).
template <int M, int O, int R, typename T>
__device__ __forceinline__ void halving_round(T (&v)[R], int lane) {
  if constexpr (M > 1) {
    const bool upper = (lane & O) != 0;
#pragma unroll
    for (int i = 0; i < M / 2; ++i) {
      const T keep = upper ? v[i + M / 2] : v[i];
      const T send = upper ? v[i] : v[i + M / 2];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    halving_round<M / 2, O / 2>(v, lane);
  }
}

// R sums per lane (R a power of two up to 32) halved in log2 R butterfly rounds, at lane offsets
// 16, 8, ..., 32 / R: in each, the lanes with that bit set keep the upper half of their sums
// and send the lower half, the others the reverse, and each adds what it gets. Then v[0] holds
// the sum, over the 2^(log2 R) lanes that differ only in those bits, of the sums number j, j's
// bits being the lane's bits 4, 3, ... (its top bit lane bit 4): j = lane / (32 / R).
template <int R, typename T>
__device__ __forceinline__ void halving_butterfly(T (&v)[R], int lane) {
  static_assert(R >= 1 && R <= 32 && (R & (R - 1)) == 0, "R: a power of two up to 32");
  halving_round<R, 16>(v, lane);
}

// emit(p, sum_c tile[p][c] * vec[c]) for every pixel p < tp of the tile. A warp takes ROWS
// pixels together (warp w: w + j kWarps, j < ROWS, then the next ROWS kWarps pixels): a lane
// loads vec[c] once for them all, and the ROWS sums are reduced in one butterfly whose first
// rounds halve the sums a lane carries (6 shuffles for 4 pixels, where a warp a pixel took 20).
// A warp a pixel, as until 2026-11-27, also paid its loop's set-up for each pixel: in the SASS
// (sm_90, bf16, C = 256) about 117 instructions a pixel and lane, of which 24 in the loop.
// Lane j (32 / ROWS) ends with the sum of the group's pixel j and emits it (ROWS lanes of a warp
// emit at once; a pixel p is always emitted by the same lane). Rows past tp read row tp - 1
// (nothing outside the tile) and emit nothing.
template <int ROWS = kMaxTile / kWarps, typename T, typename F>
__device__ __forceinline__ void pixel_dots(const T* tile, int ld, int C, int tp, const T* vec,
                                           F&& emit) {
  constexpr int kSpan = 32 / ROWS;  // the lanes that end with one pixel's sum
  const int lane = threadIdx.x & 31;
  for (int p0 = threadIdx.x >> 5; p0 < tp; p0 += ROWS * kWarps) {  // (warp-uniform)
    const T* rows[ROWS];
    T acc[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      rows[j] = tile + min(p0 + j * kWarps, tp - 1) * ld;
      acc[j] = T(0);
    }
    for (int c = lane; c < C; c += 32) {
      const T w = vec[c];
#pragma unroll
      for (int j = 0; j < ROWS; ++j) acc[j] += rows[j][c] * w;
    }
    halving_butterfly(acc, lane);  // then a plain butterfly over the lanes of each pixel
#pragma unroll
    for (int o = kSpan / 2; o > 0; o >>= 1) acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], o);
    const int p = p0 + lane / kSpan * kWarps;
    if (lane % kSpan == 0 && p < tp) emit(p, acc[0]);
    if (ROWS * kWarps >= kMaxTile) break;  // (tp <= kMaxTile: no loop to keep registers for)
  }
}

template <typename T>
__device__ __forceinline__ void load_vec(T* dst, const T* src, int count) {
  for (int i = threadIdx.x; i < count; i += kThreads) dst[i] = src[i];
}

// body(i) for i < count, spread over the whole grid (a (x, y) grid of kThreads-thread blocks).
template <typename Body>
__device__ __forceinline__ void grid_stride(int64_t count, Body&& body) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * gridDim.y * kThreads;
  for (int64_t i = (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * kThreads +
                   threadIdx.x;
       i < count; i += stride)
    body(i);
}

// Zeroes `count` values at `buf` (none when null), spread over the whole grid: the first kernel
// of a backward clears the buffer that its later kernels add the weight gradients into with
// atomics (the stream orders them), so that no launch is spent on clearing it.
template <typename T>
__device__ __forceinline__ void zero_grid(T* buf, int64_t count) {
  if (buf != nullptr) grid_stride(count, [&](int64_t i) { buf[i] = T(0); });
}

// w v in T: an element of W_v' diag(A), PSA_s's value-GEMM weight. Its forward glue and its
// backward's first kernel (scale_columns_grid) both form it, so the backward recomputes the
// forward's value map bit for bit (psa_release_s.cuh).
template <typename T, typename acc_t>
__device__ __forceinline__ T scaled_weight(acc_t w, acc_t v) {
  return static_cast<T>(w * v);
}

// out[n][r][c] = w[r][c] v[n][c] for n < N, r < R, c < C (none when out is null), in out's
// dtype, spread over the whole grid like zero_grid: PSA_s's value-GEMM weight W_v' diag(A),
// formed for its backward by the first kernel (psa_release_s.cuh), which no launch then costs.
template <typename T, typename acc_t>
__device__ __forceinline__ void scale_columns_grid(T* out, const acc_t* w, const acc_t* v, int N,
                                                   int R, int C) {
  if (out == nullptr) return;
  const int64_t per_image = static_cast<int64_t>(R) * C;
  grid_stride(N * per_image, [&](int64_t i) {
    const int64_t n = i / per_image;
    out[i] = scaled_weight<T>(w[i - n * per_image], v[n * C + i % C]);
  });
}

__device__ __forceinline__ int64_t at_cp(const Geometry& g, int c, int64_t p) {
  return c * g.sC + p * g.sP;
}

// tile[p][c] = src[c, pt + p] for the tile's pixels, in the accumulation type (src: one image
// of x, laid out as g says).
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(const Geometry& g, int log2_tile, int tp,
                                          const scalar_t* src, int pt, acc_t* tile, int ld) {
  tile_loop<VEC>(
      g, log2_tile, tp, [&](int c, int p) { return load_pack<VEC>(src + at_cp(g, c, pt + p)); },
      [&](int c, int p, int dc, int dp, const Pack<scalar_t, VEC>& v) {
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          tile[(p + k * dp) * ld + c + k * dc] = static_cast<acc_t>(v.v[k]);
      });
}

// The tiles of x and of G (.) x (the backward reductions'): tile_x[p][c] = x[c, pt + p],
// tile_gx[p][c] = grad[c, pt + p] x[c, pt + p] (x, grad: one image, laid out as g says).
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tiles_gx(const Geometry& g, int log2_tile, int tp,
                                              const scalar_t* x, const scalar_t* grad, int pt,
                                              acc_t* tile_x, acc_t* tile_gx, int ld) {
  tile_loop<VEC>(
      g, log2_tile, tp,
      [&](int c, int p) {
        const int64_t i = at_cp(g, c, pt + p);
        return Pair<Pack<scalar_t, VEC>>{load_pack<VEC>(x + i), load_pack<VEC>(grad + i)};
      },
      [&](int c, int p, int dc, int dp, const Pair<Pack<scalar_t, VEC>>& xg) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int at = (p + k * dp) * ld + c + k * dc;
          const acc_t xk = static_cast<acc_t>(xg.first.v[k]);
          tile_x[at] = xk;
          tile_gx[at] = static_cast<acc_t>(xg.second.v[k]) * xk;
        }
      });
}

// ---------------------------------------------------------------- forward, pass 1: reductions
// (the kernel's body: fwd_reduce_kernel below, and the first phase of fwd_reduce_apply_kernel)
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void fwd_reduce_body(
    const scalar_t* __restrict__ x, Geometry g, int tile_p, int log2_tile, int chunk, int splits,
    const acc_t* __restrict__ wq, int64_t wq_stride, acc_t* __restrict__ logits,
    acc_t* __restrict__ pmax, acc_t* __restrict__ psum, acc_t* __restrict__ ps,
    acc_t* __restrict__ pm) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1;
  // the logits' exponentials (16-byte aligned: read in vectors below); the block's own shared
  // memory (MMATTN_BLOCK_SHARED: the emulation runs a cooperative launch's blocks at once)
  acc_t* s_e = reinterpret_cast<acc_t*>(MMATTN_BLOCK_SHARED(smem_raw));
  acc_t* tile = s_e + tile_p;
  acc_t* s_w = tile + tile_p * ld;  // the tile's logits
  acc_t* s_wq = s_w + tile_p;
  acc_t* acc_s = s_wq + g.C;
  acc_t* acc_m = acc_s + g.C;

  const int n = blockIdx.y, split = blockIdx.x;
  const scalar_t* xn = x + n * g.sN;
  load_vec(s_wq, wq + n * wq_stride, g.C);
  for (int c = threadIdx.x; c < g.C; c += kThreads) acc_s[c] = acc_m[c] = acc_t(0);

  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  acc_t run_max = -INFINITY, run_sum = 0;
  for (int pt = p_begin; pt < p_end; pt += tile_p) {
    const int tp = min(tile_p, p_end - pt);
    __syncthreads();  // the previous tile is consumed; s_wq is visible
    load_tile<VEC>(g, log2_tile, tp, xn, pt, tile, ld);
    __syncthreads();
    pixel_dots(tile, ld, g.C, tp, s_wq, [&](int p, acc_t v) {
      s_w[p] = v;
      logits[static_cast<int64_t>(n) * g.P + pt + p] = v;
    });
    __syncthreads();
    // The tile's softmax state, in every warp at once, a lane a pixel (tp <= kMaxTile = 32):
    // shuffles, where every thread had walked the tp logits twice (a third of the kernel's
    // instructions in the SASS, sm_90, bf16)
    const int lane = threadIdx.x & 31;
    const acc_t l = lane < tp ? s_w[lane] : acc_t(-INFINITY);
    const acc_t new_max = op_max(run_max, warp_max(l));
    const acc_t alpha = op_exp(run_max - new_max);  // 0 on the first tile (run_max = -inf)
    const acc_t e = lane < tp ? op_exp(l - new_max) : acc_t(0);
    run_sum = run_sum * alpha + warp_sum(e);
    run_max = new_max;
    if (threadIdx.x < tp) s_e[lane] = e;  // (warp 0's; s_w, which the others read, stays)
    __syncthreads();
    for (int c = threadIdx.x; c < g.C; c += kThreads) {  // a thread owns its channels
      const acc_t* const runs[] = {s_e};
      acc_t s = 0, m = 0;
      pixel_runs(tp, runs, [&](int p, const acc_t (&e)[1]) {
        const acc_t v = tile[p * ld + c];
        s += v * e[0];
        m += v;
      });
      acc_s[c] = acc_s[c] * alpha + s;
      acc_m[c] += m;
    }
  }
  const int64_t o = static_cast<int64_t>(n) * splits + split;
  if (threadIdx.x == 0) {
    pmax[o] = run_max;
    psum[o] = run_sum;
  }
  for (int c = threadIdx.x; c < g.C; c += kThreads) {
    ps[o * g.C + c] = acc_s[c];
    pm[o * g.C + c] = acc_m[c];
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
fwd_reduce_kernel(const scalar_t* __restrict__ x, Geometry g, int tile_p, int log2_tile,
                  int chunk, int splits, const acc_t* __restrict__ wq, int64_t wq_stride,
                  acc_t* __restrict__ logits,
                  acc_t* __restrict__ pmax, acc_t* __restrict__ psum, acc_t* __restrict__ ps,
                  acc_t* __restrict__ pm) {
  fwd_reduce_body<scalar_t, acc_t, VEC>(x, g, tile_p, log2_tile, chunk, splits, wq, wq_stride,
                                        logits, pmax, psum, ps, pm);
}

// ---------------------------------------------------------------- forward, pass 2: gating
// (the kernel's body: fwd_apply_kernel below, and the second phase of fwd_reduce_apply_kernel;
// the blocks loop over the image's tiles, gridDim.x apart)
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void fwd_apply_body(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g, int tile_p,
    int log2_tile, const acc_t* __restrict__ a, const acc_t* __restrict__ u,
    const acc_t* __restrict__ bias, PixelSoftmax<acc_t> psm, acc_t* __restrict__ s_mask,
    acc_t* __restrict__ norm_out, bool sequential) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1;
  acc_t* tile = reinterpret_cast<acc_t*>(MMATTN_BLOCK_SHARED(smem_raw));
  acc_t* s_s = tile + pad16<acc_t>(tile_p * ld);  // the vectors (pad16)
  acc_t* s_a = s_s + pad16<acc_t>(tile_p);
  acc_t* s_u = s_a + pad16<acc_t>(g.C);
  acc_t* s_merge = s_u + pad16<acc_t>(g.C);  // block_merge's 2 kWarps values

  const int n = blockIdx.y;
  const scalar_t* xn = x + n * g.sN;
  scalar_t* yn = y + n * g.sN;
  const int64_t np = static_cast<int64_t>(n) * g.P;
  load_vec(s_a, a + static_cast<int64_t>(n) * g.C, g.C);
  const bool release = psm.t != nullptr;  // the gate from given logits: no dot products
  if (!release) load_vec(s_u, u + static_cast<int64_t>(n) * g.C, g.C);
  const acc_t b = release ? acc_t(0) : bias[n];
  // (S splits' states: by the whole block, not a 2 S-long chain of loads in every thread)
  const SoftmaxNorm<acc_t> norm = gate_softmax(psm, n, s_merge, norm_out);
  const int tiles = (g.P + tile_p - 1) / tile_p;
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int pt = t * tile_p, tp = min(tile_p, g.P - pt);
    __syncthreads();
    load_tile<VEC>(g, log2_tile, tp, xn, pt, tile, ld);
    if (release && threadIdx.x < tp) {
      const acc_t sg = op_sigmoid(norm(psm.t[np + pt + threadIdx.x]));
      s_s[threadIdx.x] = sg;
      s_mask[np + pt + threadIdx.x] = sg;
    }
    __syncthreads();
    if (!release) {
      pixel_dots(tile, ld, g.C, tp, s_u, [&](int p, acc_t v) {
        const acc_t sg = op_sigmoid(v + b);
        s_s[p] = sg;
        s_mask[np + pt + p] = sg;
      });
      __syncthreads();
    }
    tile_loop<VEC>(g, log2_tile, tp, NoLoad{}, [&](int c, int p, auto dc, auto dp, int) {
      const Pack<acc_t, VEC> sa = smem_run<VEC, decltype(dc)::value>(s_a, c);
      const Pack<acc_t, VEC> ss = smem_run<VEC, decltype(dp)::value>(s_s, p);
      Pack<scalar_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int ck = c + k * dc, pk = p + k * dp;
        const acc_t gate = sequential ? sa.v[k] * ss.v[k] : sa.v[k] + ss.v[k];
        out.v[k] = static_cast<scalar_t>(tile[pk * ld + ck] * gate);
      }
      store_pack(yn + at_cp(g, c, pt + p), out);
    });
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
fwd_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g, int tile_p,
                 int log2_tile, const acc_t* __restrict__ a, const acc_t* __restrict__ u,
                 const acc_t* __restrict__ bias, PixelSoftmax<acc_t> psm,
                 acc_t* __restrict__ s_mask, acc_t* __restrict__ norm_out, bool sequential) {
  fwd_apply_body<scalar_t, acc_t, VEC>(x, y, g, tile_p, log2_tile, a, u, bias, psm, s_mask,
                                       norm_out, sequential);
}

// The release's PSA_p forward after its glue, in one cooperative launch (all blocks resident;
// grid (splits, N)): the reduction with the spatial logit weights u (N, C) per image (the
// logits t and their splits' softmax states), a grid-wide barrier, the apply pass gating with
// S = sigmoid(softmax_p(t)) (each block merges its image's states; norm_out their merge).
// Shared-memory tiles: the two passes' tile widths and their log2 (each its own plan).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
fwd_reduce_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                        int reduce_tile_p, int reduce_log2_tile, int apply_tile_p,
                        int apply_log2_tile, int chunk, const acc_t* __restrict__ u,
                        const acc_t* __restrict__ a, acc_t* __restrict__ t,
                        acc_t* __restrict__ pmax, acc_t* __restrict__ psum,
                        acc_t* __restrict__ ps, acc_t* __restrict__ pm,
                        acc_t* __restrict__ s_mask, acc_t* __restrict__ norm_out) {
  const int splits = static_cast<int>(gridDim.x);
  fwd_reduce_body<scalar_t, acc_t, VEC>(x, g, reduce_tile_p, reduce_log2_tile, chunk, splits, u,
                                        g.C, t, pmax, psum, ps, pm);
  launch::grid_sync();
  fwd_apply_body<scalar_t, acc_t, VEC>(x, y, g, apply_tile_p, apply_log2_tile, a, nullptr,
                                       nullptr, PixelSoftmax<acc_t>{t, pmax, psum, splits},
                                       s_mask, norm_out, false);
}

// ---------------------------------------------------------------- backward, pass 1: reductions
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
bwd_reduce_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x, Geometry g,
                  int tile_p, int log2_tile, int chunk, int splits, const acc_t* __restrict__ a,
                  const acc_t* __restrict__ s_mask, PixelSoftmax<acc_t> psm,
                  acc_t* __restrict__ d_t, acc_t* __restrict__ pdt, acc_t* __restrict__ pda,
                  acc_t* __restrict__ pdu, acc_t* __restrict__ pr, bool sequential,
                  acc_t* __restrict__ zero, int64_t zero_count, scalar_t* __restrict__ wa,
                  const acc_t* __restrict__ wv2, int wa_rows) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1;
  const int vp = pad16<acc_t>(tile_p), vc = pad16<acc_t>(g.C);  // the vectors (pad16)
  acc_t* tile_gx = reinterpret_cast<acc_t*>(smem_raw);  // G (.) x
  acc_t* tile_x = tile_gx + tile_p * ld;
  acc_t* s_s = tile_gx + pad16<acc_t>(2 * tile_p * ld);
  acc_t* s_dt = s_s + vp;
  acc_t* s_sig = s_dt + vp;    // the release's PSA_p: sig_p, a factor of d_t
  acc_t* s_dtsum = s_sig + vp;  // the sums of the d_t written for each pixel slot of the
                                // tiles (pixel_dots' emitting lane for it; in shared
                                // memory: no register live across the loop)
  acc_t* s_a = s_dtsum + vp;   // a (sequential) or ones (parallel)
  acc_t* acc_da = s_a + vc;
  acc_t* acc_du = acc_da + vc;
  acc_t* acc_r = acc_du + vc;  // the release's PSA_p: sum_p x_p sig_p
  acc_t* s_norm = acc_r + vc;  // the release's PSA_p: the softmax's state (in shared
                               // memory: held in registers, bf16 spilled on sm_90)

  const int n = blockIdx.y, split = blockIdx.x;
  const int64_t base = n * g.sN, np = static_cast<int64_t>(n) * g.P;
  const bool release = psm.t != nullptr;
  zero_grid(zero, zero_count);
  scale_columns_grid(wa, wv2, a, gridDim.y, wa_rows, g.C);  // (PSA_s: W_v' diag(A))
  if (release && threadIdx.x == 0) {  // visible after the first tile's barrier
    const SoftmaxNorm<acc_t> norm = merge_softmax(psm, n);
    s_norm[0] = norm.top;
    s_norm[1] = norm.total;
  }
  for (int c = threadIdx.x; c < g.C; c += kThreads) {
    s_a[c] = sequential ? a[static_cast<int64_t>(n) * g.C + c] : acc_t(1);
    acc_da[c] = acc_du[c] = acc_r[c] = acc_t(0);
  }
  if (threadIdx.x < tile_p) s_dtsum[threadIdx.x] = acc_t(0);
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  for (int pt = p_begin; pt < p_end; pt += tile_p) {
    const int tp = min(tile_p, p_end - pt);
    __syncthreads();
    load_tiles_gx<VEC>(g, log2_tile, tp, x + base, grad + base, pt, tile_x, tile_gx, ld);
    if (threadIdx.x < tp) {
      const int64_t i = np + pt + threadIdx.x;
      if (release) {
        const acc_t sig = SoftmaxNorm<acc_t>{s_norm[0], s_norm[1]}(psm.t[i]);
        s_sig[threadIdx.x] = sig;
        s_s[threadIdx.x] = op_sigmoid(sig);
      } else {
        s_s[threadIdx.x] = s_mask[i];
      }
    }
    __syncthreads();
    // d_t = dL/d(the gate's logit): paper u . x_p + b; release sig_p dL/d(sig_p) (the factor
    // sig_p of the softmax's backward, whose other term the glue subtracts)
    // (two pixels a warp at once: four spilled 20 bytes, bf16 on sm_90)
    pixel_dots<2>(tile_gx, ld, g.C, tp, s_a, [&](int p, acc_t ds) {
      const acc_t sg = s_s[p];
      const acc_t dt = ds * sg * (acc_t(1) - sg) * (release ? s_sig[p] : acc_t(1));
      s_dt[p] = dt;
      d_t[np + pt + p] = dt;
      s_dtsum[p] += dt;  // (the same lane for slot p in every tile)
    });
    __syncthreads();
    for (int c = threadIdx.x; c < g.C; c += kThreads) {
      const acc_t* const runs[] = {s_s, s_dt, s_sig};  // (s_sig: read, used by the release)
      acc_t da = 0, du = 0, r = 0;
      pixel_runs(tp, runs, [&](int p, const acc_t (&f)[3]) {
        const acc_t gx = tile_gx[p * ld + c], xv = tile_x[p * ld + c];
        da += sequential ? gx * f[0] : gx;
        du += xv * f[1];
        if (release) r += xv * f[2];
      });
      acc_da[c] += da;
      acc_du[c] += du;
      acc_r[c] += r;
    }
  }
  const int64_t o = static_cast<int64_t>(n) * splits + split;
  for (int c = threadIdx.x; c < g.C; c += kThreads) {
    pda[o * g.C + c] = acc_da[c];
    pdu[o * g.C + c] = acc_du[c];
    if (release) pr[o * g.C + c] = acc_r[c];
  }
  __syncthreads();  // every slot of s_dtsum is final
  if (threadIdx.x == 0) {  // in slot order: the same sum every run
    acc_t total = 0;
    for (int p = 0; p < tile_p; ++p) total += s_dtsum[p];
    pdt[o] = total;
  }
}

// ---------------------------------------------------------------- backward, pass 2: dx
// Work that rides along with the backward apply pass in the same launch, on blocks of its own
// ahead of the pass's (the grid's first row, which the GPU schedules first): the weights'
// gradients, which need the glue's output as the pass does but nothing of the pass, so a
// block's backward saves the launch they had (psa_glue.cuh's OuterSums, psa_release_s.cuh's
// ReleaseSWeightGrads). A tail is a value type whose `operator()(block, blocks)` writes its
// values with `blocks` blocks of kThreads threads, a thread per value in a loop over the
// blocks' stride; it gets a row as wide as the pass's (the splits per image: from one block
// for the smallest maps to one wave over the images), which at one wave holds up as many of
// the pass's blocks, waiting for their slots, for the time of a few sums over the images.
// NoTail: the pass alone, no row.
struct NoTail {
  __device__ void operator()(int, int) const {}
};

// The grid rows a tail takes (the kernel's first; none for NoTail).
template <typename Tail>
constexpr int kTailRows = std::is_same<Tail, NoTail>::value ? 0 : 1;

template <typename scalar_t, typename acc_t, int VEC, typename Tail>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
bwd_apply_kernel(Tail tail, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                 scalar_t* __restrict__ dx, Geometry g, int tile_p, int log2_tile, int chunk,
                 int splits, const acc_t* __restrict__ a, const acc_t* __restrict__ s_mask,
                 const acc_t* __restrict__ logits, const acc_t* __restrict__ lnorm,
                 PixelSoftmax<acc_t> psm, const acc_t* __restrict__ beta_t,
                 const acc_t* __restrict__ d_t, const acc_t* __restrict__ u,
                 const acc_t* __restrict__ dm, const acc_t* __restrict__ dsv,
                 const acc_t* __restrict__ wq, const acc_t* __restrict__ beta,
                 acc_t* __restrict__ pgwq, bool sequential, acc_t* __restrict__ gwq,
                 bool accumulate) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ld = g.C + 1;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* s_s = tile + tile_p * ld;
  acc_t* s_pi = s_s + tile_p;
  acc_t* s_dt = s_pi + tile_p;
  acc_t* s_dl = s_dt + tile_p;
  acc_t* s_a = s_dl + tile_p;
  acc_t* s_u = s_a + g.C;
  acc_t* s_dm = s_u + g.C;
  acc_t* s_dsv = s_dm + g.C;
  acc_t* s_wq = s_dsv + g.C;
  acc_t* acc_g = s_wq + g.C;
  acc_t* s_norm = acc_g + g.C;  // pi's softmax state; the release's PSA_p: sig's, and beta_t

  // the grid: the tail's row (if any), then a row of `splits` blocks per image
  if (kTailRows<Tail> == 1 && blockIdx.y == 0) {  // (a whole block returns: no barrier waits)
    tail(blockIdx.x, gridDim.x);
    return;
  }
  const int N = gridDim.y - kTailRows<Tail>, n = blockIdx.y - kTailRows<Tail>;
  const int split = blockIdx.x;
  const int64_t base = n * g.sN, nc = static_cast<int64_t>(n) * g.C;
  const int64_t np = static_cast<int64_t>(n) * g.P;
  const bool release = psm.t != nullptr;
  load_vec(s_a, a + nc, g.C);
  load_vec(s_u, u + nc, g.C);
  load_vec(s_dm, dm + nc, g.C);
  load_vec(s_dsv, dsv + nc, g.C);
  load_vec(s_wq, wq, g.C);
  for (int c = threadIdx.x; c < g.C; c += kThreads) acc_g[c] = acc_t(0);
  if (threadIdx.x == 0) {  // visible after the first tile's barrier
    s_norm[0] = lnorm[n];  // (2, N): the maxima, then the sums of exponentials
    s_norm[1] = lnorm[N + n];
    if (release) {
      const SoftmaxNorm<acc_t> sig_norm = merge_softmax(psm, n);
      s_norm[2] = sig_norm.top;
      s_norm[3] = sig_norm.total;
      s_norm[4] = beta_t[n];
    }
  }
  const acc_t bn = beta[n];
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  for (int pt = p_begin; pt < p_end; pt += tile_p) {
    const int tp = min(tile_p, p_end - pt);
    __syncthreads();
    load_tile<VEC>(g, log2_tile, tp, x + base, pt, tile, ld);
    if (threadIdx.x < tp) {
      const int64_t i = np + pt + threadIdx.x;
      s_pi[threadIdx.x] = SoftmaxNorm<acc_t>{s_norm[0], s_norm[1]}(logits[i]);
      if (release) {  // sig = softmax_p(t), S = sigmoid(sig), dL/dt = w_t - beta_t sig
        const acc_t sig = SoftmaxNorm<acc_t>{s_norm[2], s_norm[3]}(psm.t[i]);
        s_s[threadIdx.x] = op_sigmoid(sig);
        s_dt[threadIdx.x] = d_t[i] - s_norm[4] * sig;
      } else {
        s_s[threadIdx.x] = s_mask[i];
        s_dt[threadIdx.x] = d_t[i];
      }
    }
    __syncthreads();
    pixel_dots(tile, ld, g.C, tp, s_dsv, [&](int p, acc_t r) { s_dl[p] = s_pi[p] * (r - bn); });
    __syncthreads();
    for (int c = threadIdx.x; c < g.C; c += kThreads) {
      acc_t s = 0;
      for (int p = 0; p < tp; ++p) s += tile[p * ld + c] * s_dl[p];
      acc_g[c] += s;
    }
    tile_loop<VEC>(
        g, log2_tile, tp,
        [&](int c, int p) { return load_pack<VEC>(grad + base + at_cp(g, c, pt + p)); },
        [&](int c, int p, int dc, int dp, const Pack<scalar_t, VEC>& gv) {
          Pack<scalar_t, VEC> out;
          if (accumulate)  // dx holds a part already (PSA_s: its value map's)
            out = load_pack<VEC>(dx + base + at_cp(g, c, pt + p));
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const int ck = c + k * dc, pk = p + k * dp;
            const acc_t gate = sequential ? s_a[ck] * s_s[pk] : s_a[ck] + s_s[pk];
            acc_t v = static_cast<acc_t>(gv.v[k]) * gate + s_u[ck] * s_dt[pk] + s_dm[ck] +
                      s_dsv[ck] * s_pi[pk] + s_wq[ck] * s_dl[pk];
            if (accumulate) v += static_cast<acc_t>(out.v[k]);
            out.v[k] = static_cast<scalar_t>(v);
          }
          store_pack(dx + base + at_cp(g, c, pt + p), out);
        });
  }
  // the W_q gradient: this block's part added into gwq (zeroed by the backward's first
  // kernel) when given, else written to its (n, split) row of pgwq
  const int64_t o = static_cast<int64_t>(n) * splits + split;
  for (int c = threadIdx.x; c < g.C; c += kThreads) {
    if (gwq != nullptr)
      atomicAdd(gwq + c, acc_g[c]);
    else
      pgwq[o * g.C + c] = acc_g[c];
  }
}

// ---------------------------------------------------------------- host side
Geometry geometry(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "mmattn psa kernels: x must be 4-D (N, C, H, W), got ", x.dim(),
              "-D");
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(C % 2 == 0 && C > 0, "mmattn psa kernels: C must be even, got C=", C);
  TORCH_CHECK(H * W > 0 && H * W < (int64_t(1) << 31),
              "mmattn psa kernels: H*W must be in [1, 2^31), got ", H * W);
  // (a grid row per image, and one more for the backward apply pass's tail)
  TORCH_CHECK(x.size(0) <= 65534, "mmattn psa kernels: batch size must be <= 65534, got ",
              x.size(0));
  Geometry g;
  g.C = static_cast<int>(C);
  g.P = static_cast<int>(H * W);
  g.sN = x.stride(0);
  g.sC = x.stride(1);
  if (x.is_contiguous()) {
    g.sP = 1;
    g.pix_contig = true;
  } else {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "mmattn psa kernels: x must be contiguous or channels_last, got strides ",
                x.strides());
    g.sP = C;
    g.pix_contig = false;
  }
  if (g.P == 1 || C == 1) g.pix_contig = true;  // both layouts coincide; any order is coalesced
  return g;
}

// `t` made dense like x, checked to index the same way (sizes-1 dimensions may carry any
// stride, so the layouts are compared through their geometry, not their strides).
at::Tensor like_x(const at::Tensor& t_in, const at::Tensor& x, const Geometry& gx,
                  const char* name) {
  const at::Tensor t = t_in.contiguous(x.suggest_memory_format());
  TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              "mmattn psa kernels: ", name, " must match x in shape, dtype and device; got ", name,
              " ", t.sizes(), " ", t.scalar_type(), " ", t.device(), " vs x ", x.sizes(), " ",
              x.scalar_type(), " ", x.device());
  const Geometry gt = geometry(t);
  TORCH_CHECK(gt.sN == gx.sN && gt.sC == gx.sC && gt.sP == gx.sP &&
                  gt.pix_contig == gx.pix_contig,
              "mmattn psa kernels: ", name, " has strides ", t.strides(), ", x has ", x.strides());
  return t;
}

at::Tensor vec(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape,
               const char* name) {
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "mmattn psa kernels: ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc && t.device() == x.device(), "mmattn psa kernels: ", name,
              " must be ", acc, " on ", x.device(), ", got ", t.scalar_type(), " on ",
              t.device());
  return t.contiguous();
}

// Tile size (a power of two) and dynamic shared memory for `tiles` (TP x (C+1)) tiles,
// `per_pixel` TP-vectors, `per_channel` C-vectors (each padded as pad16 says) and `fixed` more
// values of the accumulation type.
struct Launch {
  int tile_p;
  int log2_tile;
  size_t smem;
};

Launch plan(int C, size_t elem, int tiles, int per_pixel, int per_channel, int fixed = 0) {
  const int pad = elem >= 16 ? 1 : static_cast<int>(16 / elem);  // pad16's, for elem
  auto padded = [&](int n) { return static_cast<size_t>((n + pad - 1) / pad * pad); };
  auto bytes = [&](int tp) {
    return elem * (padded(tiles * tp * (C + 1)) + per_pixel * padded(tp) +
                   per_channel * padded(C) + static_cast<size_t>(fixed));
  };
  int tp = kMaxTile;
  while (tp > 1 && bytes(tp) > kDefaultSmem) tp /= 2;
  const size_t smem = bytes(tp);
  if (smem > kDefaultSmem) {
    const int optin = launch::device_attribute(launch::Attr::kSharedMemoryOptin);
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "mmattn psa kernels: C=", C,
                " needs ", smem, " bytes of shared memory per block, the device has ", optin,
                "; use backend='folded'");
  }
  int log2 = 0;
  while ((1 << log2) < tp) ++log2;
  return {tp, log2, smem};
}

// Lets `kernel` use `smem` bytes of shared memory (a plan's); returns how many of its blocks an
// SM holds at once.
template <typename Kernel>
int prepare(Kernel kernel, size_t smem) {
  if (smem > kDefaultSmem) launch::allow_shared_memory(kernel, smem);
  return launch::resident_blocks(kernel, kThreads, smem);
}

template <typename Kernel>
int prepare(Kernel kernel, const Launch& l) {
  return prepare(kernel, l.smem);
}

// Whether the kernels can move the tensors at `ptrs` (laid out like x) in 16-byte vectors of
// kPack16<scalar_t> elements: whole vectors along the contiguous axis, aligned pointers.
template <typename scalar_t>
bool vectorizable(const Geometry& g, const Launch& l, std::initializer_list<const void*> ptrs) {
  constexpr int vec = kPack16<scalar_t>;
  if (vec == 1 || (g.pix_contig ? g.P % vec != 0 || l.tile_p < vec : g.C % vec != 0))
    return false;
  return all_aligned(ptrs, vec * sizeof(scalar_t));
}

// Blocks per image that fill the GPU in one wave: as many blocks as the SMs hold at once
// (`per_sm` each), shared by the N images (rounded down: a second, nearly empty wave would cost a
// whole block's time).
int one_wave(int per_sm, int N) {
  const int sms = launch::device_attribute(launch::Attr::kMultiProcessors);
  return std::max(1, per_sm * sms / std::max(N, 1));
}

// Whether a cooperative grid of `blocks` blocks (`per_sm` of them an SM holds) is resident at
// once, as the launch requires.
inline bool resident_at_once(int64_t blocks, int per_sm) {
  return blocks <= static_cast<int64_t>(per_sm) *
                       launch::device_attribute(launch::Attr::kMultiProcessors);
}

// Blocks (kThreads each) for a kernel whose blocks loop over `units` units of work (rows, or
// blocks' worth of elements), a unit a block at a time: one wave at most.
template <typename... KArgs>
int wave_blocks(void (*kernel)(KArgs...), int64_t units, size_t smem) {
  const int wave = one_wave(launch::resident_blocks(kernel, kThreads, smem), 1);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(units, wave)));
}

// The integer in the environment variable `name`, in [lo, hi], or `unset` where the variable is
// unset or empty; anything else is an error naming it, what it must be (describe(): called only
// then) and its text.
template <typename Describe>
long env_integer(const char* name, long lo, long hi, long unset, Describe&& describe) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return unset;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  TORCH_CHECK(*end == '\0' && value >= lo && value <= hi, name, " must be ", describe(),
              ", got '", text, "'");
  return value;
}

// The environment's cap on the splits per image of the reductions whose size the host code
// chooses: MMATTN_PSA_MAX_SPLITS, a positive integer, or unset / 0 for none. A tuning knob to
// measure with: at a small batch one wave is hundreds of splits per image (an H200 at N = 2:
// 264), each a partial sum that a glue kernel's single block then merges, so fewer, longer
// splits trade the reduction's parallelism for the glue's latency (docs/kernels.md).
inline int max_splits_from_env() {
  return static_cast<int>(env_integer("MMATTN_PSA_MAX_SPLITS", 0, 1L << 30, 0,
                                      [] { return "a non-negative integer (0: no cap)"; }));
}

// The launch of a split reduction: tile plan, blocks per image and pixels per block (one wave
// of blocks, at most MMATTN_PSA_MAX_SPLITS, unless `requested` > 0; no split is empty).
struct SplitLaunch {
  Launch l;
  int splits;
  int chunk;
};

SplitLaunch split(const Launch& l, int64_t requested, int N, int P, int per_sm) {
  const int tiles = (P + l.tile_p - 1) / l.tile_p;
  int splits = requested > 0 ? static_cast<int>(requested) : one_wave(per_sm, N);
  if (requested <= 0) {
    const int cap = max_splits_from_env();
    if (cap > 0) splits = std::min(splits, cap);
  }
  splits = std::max(1, std::min(splits, tiles));
  const int chunk = (tiles + splits - 1) / splits * l.tile_p;
  return {l, (P + chunk - 1) / chunk, chunk};
}

// The release's PSA_p gate logits and their softmax states (PixelSoftmax), as tensors; all
// undefined for the paper's gate.
struct SoftmaxStates {
  at::Tensor t, max, sum;
};

template <typename acc_t>
PixelSoftmax<acc_t> pixel_softmax(const SoftmaxStates& st) {
  if (!st.t.defined()) return {nullptr, nullptr, nullptr, 0};
  return {st.t.data_ptr<acc_t>(), st.max.data_ptr<acc_t>(), st.sum.data_ptr<acc_t>(),
          static_cast<int>(st.max.size(1))};
}

SoftmaxStates check_states(const SoftmaxStates& st, const at::Tensor& x, int N, int P) {
  if (!st.t.defined()) return st;
  const int64_t splits = st.max.size(-1);
  return {vec(st.t, x, {N, P}, "t"), vec(st.max, x, {N, splits}, "tmax"),
          vec(st.sum, x, {N, splits}, "tsum")};
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn

#include "psa_register_tiles.cuh"  // (its host code needs Launch, above)

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

// The forward passes' launch plans (their kernels' shared memory): the reduction's and the
// apply pass's, on the shared-memory tiles (acc_t values of `elem` bytes) and on the register
// tiles; fwd_reduce and fwd_apply take one each, fwd_reduce_apply both.
inline Launch fwd_reduce_plan(int C, size_t elem) { return plan(C, elem, 1, 2, 3); }
inline Launch fwd_apply_plan(int C, size_t elem) { return plan(C, elem, 1, 1, 2, 2 * kWarps); }
template <typename scalar_t>
Launch fwd_reduce_register_plan(int C) { return register_plan<scalar_t>(C, 2, 2); }
template <typename scalar_t>
Launch fwd_apply_register_plan(int C) { return register_plan<scalar_t>(C, 2, 0); }

// The forward reduction with the logit weights `wq`: (C) shared by the images, or (N, C) one
// per image (the release's PSA_p computes its spatial logits u . x_p so); checked by the caller.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_reduce(
    const at::Tensor& x, const Geometry& g, const at::Tensor& wq, int64_t splits_req) {
  const int N = static_cast<int>(x.size(0));
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const int64_t wq_stride = wq.dim() == 2 ? g.C : 0;
  at::Tensor logits = at::empty({N, g.P}, opts);
  at::Tensor pmax, psum, ps, pm;
  MMATTN_PSA_DISPATCH(x.scalar_type(), "psa_fwd_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // the splits' outputs, then the kernel with its tile arguments (the shared-memory tile's
    // width and its log2, or the register tiles' log2 warps per channel group)
    auto run = [&](auto kernel, const Launch& l, auto... tile_args) {
      const SplitLaunch s = split(l, splits_req, N, g.P, prepare(kernel, l));
      pmax = at::empty({N, s.splits}, opts);
      psum = at::empty({N, s.splits}, opts);
      ps = at::empty({N, s.splits, g.C}, opts);
      pm = at::empty({N, s.splits, g.C}, opts);
      if (N == 0) return;
      launch::launch(kernel, dim3(s.splits, N), kThreads, l.smem, x.data_ptr<scalar_t>(), g,
                     tile_args..., s.chunk, s.splits, wq.data_ptr<acc_t>(), wq_stride,
                     logits.data_ptr<acc_t>(), pmax.data_ptr<acc_t>(),
                     psum.data_ptr<acc_t>(), ps.data_ptr<acc_t>(), pm.data_ptr<acc_t>());
    };
    if (register_tiles<scalar_t>(g, {x.data_ptr()})) {
      run(fwd_reduce_registers_kernel<scalar_t, acc_t, kPack16<scalar_t>>,
          fwd_reduce_register_plan<scalar_t>(g.C), register_log2_cw(g.C));
      return;
    }
    const Launch l = fwd_reduce_plan(g.C, sizeof(acc_t));
    with_vectors<scalar_t>(vectorizable<scalar_t>(g, l, {x.data_ptr()}), [&](auto vec_tag) {
      run(fwd_reduce_kernel<scalar_t, acc_t, decltype(vec_tag)::value>, l, l.tile_p,
          l.log2_tile);
    });
  });
  return {logits, pmax, psum, ps, pm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> psa_fwd_reduce_cuda(
    const at::Tensor& x, const at::Tensor& wq_in, int64_t splits_req) {
  const launch::DeviceGuard guard(x.device());
  const Geometry g = geometry(x);
  return fwd_reduce(x, g, vec(wq_in, x, {g.C}, "wq"), splits_req);
}

// y and the gate S (N, P): S_p = sigmoid(u . x_p + bias) (paper), or from `states` (the
// release's PSA_p; u and bias are then unused and may be undefined; `norm_out` (2, N), if
// defined, receives the merged softmax state: the maxima and the sums of exponentials).
std::tuple<at::Tensor, at::Tensor> fwd_apply(const at::Tensor& x, const at::Tensor& a_in,
                                             const at::Tensor& u_in, const at::Tensor& bias_in,
                                             const SoftmaxStates& states_in, bool sequential,
                                             const at::Tensor& norm_out = at::Tensor()) {
  const launch::DeviceGuard guard(x.device());
  const Geometry g = geometry(x);
  const int N = static_cast<int>(x.size(0));
  const at::Tensor a = vec(a_in, x, {N, g.C}, "a");
  const SoftmaxStates states = check_states(states_in, x, N, g.P);
  const bool release = states.t.defined();
  const at::Tensor u = release ? u_in : vec(u_in, x, {N, g.C}, "u");
  const at::Tensor bias = release ? bias_in : vec(bias_in, x, {N}, "bias");
  const at::Tensor y = like_x(at::empty_like(x), x, g, "y");
  at::Tensor s_mask = at::empty({N, g.P}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  if (N == 0 || g.P == 0) return {y, s_mask};
  MMATTN_PSA_DISPATCH(x.scalar_type(), "psa_fwd_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // the kernel on one wave of blocks at most, with its tile arguments (fwd_reduce's)
    auto run = [&](auto kernel, const Launch& l, auto... tile_args) {
      const int tiles = (g.P + l.tile_p - 1) / l.tile_p;
      const int grid_x = std::min(tiles, one_wave(prepare(kernel, l), N));
      launch::launch(kernel, dim3(grid_x, N), kThreads, l.smem,
          x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, tile_args...,
          a.data_ptr<acc_t>(), release ? nullptr : u.data_ptr<acc_t>(),
          release ? nullptr : bias.data_ptr<acc_t>(), pixel_softmax<acc_t>(states),
          s_mask.data_ptr<acc_t>(), norm_out.defined() ? norm_out.data_ptr<acc_t>() : nullptr,
          sequential);
    };
    if (register_tiles<scalar_t>(g, {x.data_ptr(), y.data_ptr()})) {
      run(fwd_apply_registers_kernel<scalar_t, acc_t, kPack16<scalar_t>>,
          fwd_apply_register_plan<scalar_t>(g.C), register_log2_cw(g.C));
      return;
    }
    const Launch l = fwd_apply_plan(g.C, sizeof(acc_t));
    const bool vectors = vectorizable<scalar_t>(g, l, {x.data_ptr(), y.data_ptr()});
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      run(fwd_apply_kernel<scalar_t, acc_t, decltype(vec_tag)::value>, l, l.tile_p,
          l.log2_tile);
    });
  });
  return {y, s_mask};
}

// MMATTN_PSA_COOPERATIVE: unset or 1, PSA_p's spatial reduction and apply pass in one
// cooperative launch where they can (fwd_reduce_apply); 0, in two launches.
inline bool cooperative_from_env() {
  return env_integer("MMATTN_PSA_COOPERATIVE", 0, 1, 1, [] { return "0 or 1"; }) == 1;
}

// The release's PSA_p forward after its glue (u, a: (N, C) in the accumulation dtype) in one
// cooperative launch (fwd_reduce_apply_kernel): y and the spatial logits t (N, P); `norm_out`
// (2, N) receives their softmax's merged state. Nothing (undefined tensors) where the
// environment says no, where the grid of (splits, N) blocks that one wave allows would not be
// resident at once (N beyond one wave) or the two passes would move x differently (a
// different vector width): the caller then runs fwd_reduce and fwd_apply, the same results.
std::tuple<at::Tensor, at::Tensor> fwd_reduce_apply(const at::Tensor& x, const Geometry& g,
                                                    const at::Tensor& u, const at::Tensor& a,
                                                    const at::Tensor& norm_out) {
  const int N = static_cast<int>(x.size(0));
  if (N == 0 || g.P == 0 || !cooperative_from_env()) return {};
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const at::Tensor y = like_x(at::empty_like(x), x, g, "y");
  const at::Tensor t = at::empty({N, g.P}, opts), s_mask = at::empty({N, g.P}, opts);
  bool taken = false;
  MMATTN_PSA_DISPATCH(x.scalar_type(), "psa_fwd_reduce_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // (the kernel, the reduction's plan (the splits are cut in its tiles) with the larger
    // shared memory of the two passes, and the kernel's tile arguments)
    auto run = [&](auto kernel, const Launch& lr, const Launch& la, auto... tile_args) {
      const Launch l{lr.tile_p, lr.log2_tile, std::max(lr.smem, la.smem)};
      const int per_sm = prepare(kernel, l);
      const SplitLaunch s = split(l, 0, N, g.P, per_sm);
      if (!resident_at_once(static_cast<int64_t>(s.splits) * N, per_sm)) return;
      const at::Tensor pmax = at::empty({N, s.splits}, opts), psum = at::empty_like(pmax);
      const at::Tensor ps = at::empty({N, s.splits, g.C}, opts), pm = at::empty_like(ps);
      launch::launch_cooperative(
          kernel, dim3(s.splits, N), kThreads, l.smem, x.data_ptr<scalar_t>(),
          y.data_ptr<scalar_t>(), g, tile_args..., s.chunk, u.data_ptr<acc_t>(),
          a.data_ptr<acc_t>(), t.data_ptr<acc_t>(), pmax.data_ptr<acc_t>(),
          psum.data_ptr<acc_t>(), ps.data_ptr<acc_t>(), pm.data_ptr<acc_t>(),
          s_mask.data_ptr<acc_t>(), norm_out.data_ptr<acc_t>());
      taken = true;
    };
    if (register_tiles<scalar_t>(g, {x.data_ptr(), y.data_ptr()})) {
      run(fwd_reduce_apply_registers_kernel<scalar_t, acc_t, kPack16<scalar_t>>,
          fwd_reduce_register_plan<scalar_t>(g.C), fwd_apply_register_plan<scalar_t>(g.C),
          register_log2_cw(g.C));
      return;
    }
    const Launch lr = fwd_reduce_plan(g.C, sizeof(acc_t));
    const Launch la = fwd_apply_plan(g.C, sizeof(acc_t));
    const bool vectors = vectorizable<scalar_t>(g, lr, {x.data_ptr()});
    if (vectors != vectorizable<scalar_t>(g, la, {x.data_ptr(), y.data_ptr()})) return;
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      run(fwd_reduce_apply_kernel<scalar_t, acc_t, decltype(vec_tag)::value>, lr, la,
          lr.tile_p, lr.log2_tile, la.tile_p, la.log2_tile);
    });
  });
  if (!taken) return {};
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor> psa_fwd_apply_cuda(const at::Tensor& x, const at::Tensor& a,
                                                      const at::Tensor& u,
                                                      const at::Tensor& bias,
                                                      bool sequential) {
  return fwd_apply(x, a, u, bias, SoftmaxStates{}, sequential);
}

// d_t (N, P) and the splits' partial dA, d u sums: `s_in` is the gate S (paper), or undefined
// with `states` given (the release's PSA_p: S and sig computed from them; d_t then carries the
// factor sig_p, and the fourth result holds the splits' partial sum_p x_p sig_p; undefined
// for the paper); the fifth, the splits' partial sums of d_t (N, splits). `zero`, when defined
// (the accumulation dtype, contiguous), is cleared on the way (zero_grid); `wa`, when defined
// ((N, R, C) in x's dtype, contiguous), receives wv2 (R, C) diag(a_n) per image on the way
// (scale_columns_grid).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_reduce(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& a_in,
    const at::Tensor& s_in, const SoftmaxStates& states_in, int64_t splits_req,
    bool sequential, const at::Tensor& zero = at::Tensor(),
    const at::Tensor& wv2 = at::Tensor(), const at::Tensor& wa = at::Tensor()) {
  const launch::DeviceGuard guard(x.device());
  const Geometry g = geometry(x);
  const int N = static_cast<int>(x.size(0));
  const at::Tensor grad = like_x(grad_in, x, g, "grad");
  const at::Tensor a = vec(a_in, x, {N, g.C}, "a");
  const SoftmaxStates states = check_states(states_in, x, N, g.P);
  const bool release = states.t.defined();
  const at::Tensor s_mask = release ? s_in : vec(s_in, x, {N, g.P}, "s_mask");
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  TORCH_CHECK(!zero.defined() || vec(zero, x, {zero.numel()}, "zero").is_same(zero),
              "mmattn psa kernels: the buffer to zero must be a contiguous vector (the kernel "
              "clears it)");
  const int wa_rows = wa.defined() ? static_cast<int>(wa.size(1)) : 0;
  TORCH_CHECK(!wa.defined() ||
                  (wa.sizes() == at::IntArrayRef({N, wa_rows, g.C}) && wa.is_contiguous() &&
                   wa.scalar_type() == x.scalar_type() &&
                   vec(wv2, x, {wa_rows, g.C}, "wv2").is_same(wv2)),
              "mmattn psa kernels: wa must be a contiguous (N, R, C) tensor of x's dtype and wv2 "
              "a contiguous (R, C) one of the accumulation dtype");
  at::Tensor d_t = at::empty({N, g.P}, opts);
  at::Tensor pdt, pda, pdu, pr;
  MMATTN_PSA_DISPATCH(x.scalar_type(), "psa_bwd_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // the splits' outputs, then the kernel with its tile arguments (fwd_reduce's)
    auto run = [&](auto kernel, const Launch& l, auto... tile_args) {
      const SplitLaunch s = split(l, splits_req, N, g.P, prepare(kernel, l));
      pdt = at::empty({N, s.splits}, opts);
      pda = at::empty({N, s.splits, g.C}, opts);
      pdu = at::empty({N, s.splits, g.C}, opts);
      if (release) pr = at::empty({N, s.splits, g.C}, opts);
      if (N == 0) {  // no kernel runs to clear it
        if (zero.defined()) zero.zero_();
        return;
      }
      launch::launch(kernel, dim3(s.splits, N), kThreads, l.smem,
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), g, tile_args...,
          s.chunk, s.splits, a.data_ptr<acc_t>(),
          release ? nullptr : s_mask.data_ptr<acc_t>(), pixel_softmax<acc_t>(states),
          d_t.data_ptr<acc_t>(), pdt.data_ptr<acc_t>(), pda.data_ptr<acc_t>(),
          pdu.data_ptr<acc_t>(), release ? pr.data_ptr<acc_t>() : nullptr, sequential,
          zero.defined() ? zero.data_ptr<acc_t>() : nullptr,
          zero.defined() ? zero.numel() : int64_t{0},
          wa.defined() ? wa.data_ptr<scalar_t>() : nullptr,
          wa.defined() ? wv2.data_ptr<acc_t>() : nullptr, wa_rows);
    };
    if (register_tiles<scalar_t>(g, {x.data_ptr(), grad.data_ptr()})) {
      run(bwd_reduce_registers_kernel<scalar_t, acc_t, kPack16<scalar_t>>,
          register_plan<scalar_t>(g.C, 5, 3), register_log2_cw(g.C));
      return;
    }
    const Launch l = plan(g.C, sizeof(acc_t), 2, 4, 4, 2);
    const bool vectors = vectorizable<scalar_t>(g, l, {x.data_ptr(), grad.data_ptr()});
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      run(bwd_reduce_kernel<scalar_t, acc_t, decltype(vec_tag)::value>, l, l.tile_p,
          l.log2_tile);
    });
  });
  return {d_t, pda, pdu, pr, pdt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> psa_bwd_reduce_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a, const at::Tensor& s_mask,
    int64_t splits_req, bool sequential) {
  auto [d_t, pda, pdu, pr, pdt] = bwd_reduce(grad, x, a, s_mask, SoftmaxStates{}, splits_req,
                                             sequential);
  return {d_t, pda, pdu, pdt};
}

// dx, and the W_q gradient's partial sums per split (N, splits, C); or, with `gwq` given (C
// values of the accumulation dtype, zeroed before by the same stream), the W_q gradient added
// into gwq and no partial sums. pi = softmax_p(logits) from the logits (N, P) and their merged
// softmax state lnorm (2, N) (the maxima, the sums of exponentials). With `dx_part` given (laid
// out as x), dx is dx_part plus this pass's terms, written over dx_part. `s_in` is the gate S
// and `dt_in` dL/dt (paper), or, with `states` given (the release's PSA_p: t and its merged
// state, one split), s_in is unused and S and dL/dt = dt_in - beta_t sig (beta_t (N)) are
// formed from sig = softmax_p(t). `make_tail`, called with a null scalar_t* of x's dtype, gives
// the tail that the same launch runs (NoTail: none).
struct NoTails {
  template <typename S>
  NoTail operator()(S*) const { return {}; }
};

template <typename MakeTail = NoTails>
std::tuple<at::Tensor, at::Tensor> bwd_apply(
    const at::Tensor& grad_in, const at::Tensor& x, const at::Tensor& a_in,
    const at::Tensor& s_in, const at::Tensor& logits_in, const at::Tensor& lnorm_in,
    const at::Tensor& dt_in, const at::Tensor& u_in, const at::Tensor& dm_in,
    const at::Tensor& dsv_in, const at::Tensor& wq_in, const at::Tensor& beta_in,
    int64_t splits_req, bool sequential, const at::Tensor& gwq = at::Tensor(),
    const at::Tensor& dx_part = at::Tensor(), const SoftmaxStates& states_in = SoftmaxStates{},
    const at::Tensor& beta_t_in = at::Tensor(), MakeTail make_tail = MakeTail{}) {
  const launch::DeviceGuard guard(x.device());
  const Geometry g = geometry(x);
  const int N = static_cast<int>(x.size(0));
  const at::Tensor grad = like_x(grad_in, x, g, "grad");
  const at::Tensor a = vec(a_in, x, {N, g.C}, "a");
  const SoftmaxStates states = check_states(states_in, x, N, g.P);
  const bool release = states.t.defined();
  const at::Tensor s_mask = release ? s_in : vec(s_in, x, {N, g.P}, "s_mask");
  const at::Tensor beta_t = release ? vec(beta_t_in, x, {N}, "beta_t") : beta_t_in;
  const at::Tensor logits = vec(logits_in, x, {N, g.P}, "logits");
  const at::Tensor lnorm = vec(lnorm_in, x, {2, N}, "lnorm");
  const at::Tensor d_t = vec(dt_in, x, {N, g.P}, "d_t");
  const at::Tensor u = vec(u_in, x, {N, g.C}, "u");
  const at::Tensor dm = vec(dm_in, x, {N, g.C}, "dm");
  const at::Tensor dsv = vec(dsv_in, x, {N, g.C}, "dsv");
  const at::Tensor wq = vec(wq_in, x, {g.C}, "wq");
  const at::Tensor beta = vec(beta_in, x, {N}, "beta");
  const bool accumulate = dx_part.defined();
  const at::Tensor dx = like_x(accumulate ? dx_part : at::empty_like(x), x, g, "dx");
  TORCH_CHECK(!accumulate || dx.is_same(dx_part),
              "mmattn psa kernels: dx_part must be laid out as x (the pass adds into it)");
  const auto opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
  TORCH_CHECK(!gwq.defined() || (vec(gwq, x, {g.C}, "gwq").is_same(gwq)),
              "mmattn psa kernels: gwq must be contiguous (the kernel adds into it)");
  at::Tensor pgwq;
  MMATTN_PSA_DISPATCH(x.scalar_type(), "psa_bwd_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto tail = make_tail(static_cast<scalar_t*>(nullptr));
    using TailT = std::decay_t<decltype(tail)>;
    // the kernel with its tile arguments (fwd_reduce's), the tail's row first
    auto run = [&](auto kernel, const Launch& l, auto... tile_args) {
      const SplitLaunch s = split(l, splits_req, N, g.P, prepare(kernel, l));
      if (!gwq.defined()) pgwq = at::empty({N, s.splits, g.C}, opts);
      // (no image: the tail alone, its sums over no image zeros)
      const int rows = N + kTailRows<TailT>;
      if (rows == 0) return;
      launch::launch(kernel, dim3(s.splits, rows), kThreads, l.smem, tail,
          grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), g,
          tile_args..., s.chunk, s.splits, a.data_ptr<acc_t>(),
          release ? nullptr : s_mask.data_ptr<acc_t>(), logits.data_ptr<acc_t>(),
          lnorm.data_ptr<acc_t>(), pixel_softmax<acc_t>(states),
          release ? beta_t.data_ptr<acc_t>() : nullptr, d_t.data_ptr<acc_t>(),
          u.data_ptr<acc_t>(), dm.data_ptr<acc_t>(), dsv.data_ptr<acc_t>(),
          wq.data_ptr<acc_t>(), beta.data_ptr<acc_t>(),
          gwq.defined() ? nullptr : pgwq.data_ptr<acc_t>(), sequential,
          gwq.defined() ? gwq.data_ptr<acc_t>() : nullptr, accumulate);
    };
    if (register_tiles<scalar_t>(g, {x.data_ptr(), grad.data_ptr(), dx.data_ptr()})) {
      run(bwd_apply_registers_kernel<scalar_t, acc_t, kPack16<scalar_t>, TailT>,
          register_plan<scalar_t>(g.C, 5, 5, kBwdApplyVectors), register_log2_cw(g.C));
      return;
    }
    const Launch l = plan(g.C, sizeof(acc_t), 1, 4, 6, 5);
    const bool vectors =
        vectorizable<scalar_t>(g, l, {x.data_ptr(), grad.data_ptr(), dx.data_ptr()});
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      run(bwd_apply_kernel<scalar_t, acc_t, decltype(vec_tag)::value, TailT>, l, l.tile_p,
          l.log2_tile);
    });
  });
  return {dx, pgwq};
}

std::tuple<at::Tensor, at::Tensor> psa_bwd_apply_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a, const at::Tensor& s_mask,
    const at::Tensor& logits, const at::Tensor& lnorm, const at::Tensor& d_t,
    const at::Tensor& u, const at::Tensor& dm, const at::Tensor& dsv, const at::Tensor& wq,
    const at::Tensor& beta, int64_t splits_req, bool sequential) {
  return bwd_apply(grad, x, a, s_mask, logits, lnorm, d_t, u, dm, dsv, wq, beta, splits_req,
                   sequential);
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn
