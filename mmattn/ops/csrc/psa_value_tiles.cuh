// PSA_s's value map Vl = Wa x (psa_release_s.cuh) inside its kernels' own tiles: each block
// computes the tiles of Vl it needs on tensor cores from x and Wa and writes none of the map to
// memory, so that the forward after its glue is one cooperative launch (instead of a GEMM into a
// transient (N, C/2, P) map, a kernel for the map's softmax state and the apply pass) and the
// backward's map, dq, dVl, dx's part and M = dVl x^T another (instead of the map's GEMM, a
// kernel, dx's part's GEMM and M's GEMM, or in float32 one per image and their sum): issue
// 12's "an online softmax along the pixels, products on tensor cores", a forward in 3 launches,
// a backward in 4 and 7 a block and training step.
//
// Forward (value_forward_kernel), grid (splits, N), a block taking the image's tiles of
// kValuePixels pixels s, s + splits, ...:
//   1. each tile of Vl (kValueRows rows at a time), then every row's online-softmax state over
//      the tile's pixels merged into the block's (max, sum of exponentials) per row; the
//      block's states to global memory (N, C/2, splits);
//   -- grid barrier --
//   2. every row's states merged over the splits (a warp per row, the grid's warps over the
//      N C/2 rows): the value softmax's state `norm` (2, N, C/2), which the backward keeps;
//   -- grid barrier --
//   3. per tile again: Vl's tile again, t_p = sum_k q_k exp(Vl[k][p] - max_k) / sum_k,
//      S_p = sigmoid(t_p) (written: the backward's), y = x A S.
// Backward (value_backward_kernel): the same three phases for dq, dVl and Wa^T dVl, then M
// (there).
//
// The products (tile_product): 64 x 64 tiles from operands staged 32 at a time in shared
// memory, 8 warps each 16 rows x 32 columns: warp matrix products (nvcuda::wmma; 16 x 16 x 16
// for bf16/fp16, 16 x 16 x 8 TF32 for float32 where PyTorch allows TF32 in cuDNN's
// convolutions) accumulating in float32, or (Product::kScalar: float32 without TF32, float64)
// fused multiply-adds in the accumulation dtype, 16 outputs a thread. Each value is rounded to
// x's dtype, as the GEMM path's map is, before anything reads it.
//
// Needs psa_kernels.cuh and the launch interface (cuda_launch.cuh, or the tests' emulation).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "psa_dispatch.h"
#include "psa_kernels.cuh"
#include "warp_matrix.cuh"

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

// How a tile of Vl is multiplied: 16-bit warp matrix products, TF32 ones, or scalar FMAs.
enum class Product { kScalar, kHalf, kTf32 };

constexpr int kValueRows = 64;    // rows k of Vl in a tile: 4 row blocks of 16
constexpr int kValuePixels = 64;  // pixels of a tile: each warp two blocks of 16
constexpr int kValueDepth = 32;   // channels staged per step of the product
// Leading dimensions in shared memory: multiples of 16 bytes (the fragment loads and stores
// want them), not of 128 (rows 16 bytes apart in the banks).
constexpr int kValueLdA = kValueDepth + 8;
constexpr int kValueLdB = kValuePixels + 8;
constexpr int kValueLdO = kValuePixels + 4;
constexpr int kValueOuts = kValueRows * kValuePixels / kThreads;  // a thread's, scalar products

__host__ __device__ constexpr size_t round32(size_t bytes) { return (bytes + 31) / 32 * 32; }

// A block's shared memory: Wa's staged rows, x's staged channels, the tile of Vl, then what the
// kernel keeps besides (`rest`); every part 32-byte aligned (the fragments' pointers must be).
template <typename scalar_t, typename acc_t>
struct ValueSmem {
  scalar_t* wa;  // kValueRows x kValueLdA
  scalar_t* x;   // kValueDepth x kValueLdB
  acc_t* out;    // kValueRows x kValueLdO
  acc_t* rest;

  static constexpr size_t kWaBytes = round32(kValueRows * kValueLdA * sizeof(scalar_t));
  static constexpr size_t kXBytes = round32(kValueDepth * kValueLdB * sizeof(scalar_t));
  static constexpr size_t kOutBytes = round32(kValueRows * kValueLdO * sizeof(acc_t));
  static constexpr size_t kHead = kWaBytes + kXBytes + kOutBytes;

  __device__ __forceinline__ explicit ValueSmem(unsigned char* raw) {
    unsigned char* base = raw + (32 - reinterpret_cast<uintptr_t>(raw) % 32) % 32;
    wa = reinterpret_cast<scalar_t*>(base);
    x = reinterpret_cast<scalar_t*>(base + kWaBytes);
    out = reinterpret_cast<acc_t*>(base + kWaBytes + kXBytes);
    rest = reinterpret_cast<acc_t*>(base + kHead);
  }
};

// The dynamic shared memory of value_forward_kernel for C channels (32 bytes of it for the
// alignment): the head, then 2 H + C + kValuePixels values (phase 3's; phase 1 needs 2 H).
template <typename scalar_t, typename acc_t>
size_t value_forward_smem(int C) {
  return 32 + ValueSmem<scalar_t, acc_t>::kHead +
         static_cast<size_t>(2 * (C / 2) + C + kValuePixels) * sizeof(acc_t);
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// A warp product's operand type for PR and what its fragments load from shared memory.
template <Product PR, typename scalar_t>
struct MmaOperand {
  using type = typename MmaType<scalar_t>::type;
  using stored = type;
};
template <typename scalar_t>
struct MmaOperand<Product::kTf32, scalar_t> {
  using type = nvcuda::wmma::precision::tf32;
  using stored = float;
};
#endif

// body(c, p, dc, dp) for the i-th vector of V elements of a cs x ps region (channels x pixels)
// of a map whose contiguous axis is the pixels (pix_contig: dc 0, dp 1) or the channels (dc 1,
// dp 0), consecutive vectors along that axis; its extent along that axis a multiple of V.
template <int V, typename F>
__device__ __forceinline__ void vector_at(bool pix_contig, int cs, int ps, int i, F&& body) {
  if (pix_contig) {
    const int per = ps / V;
    body(i / per, i % per * V, 0, 1);
  } else {
    const int per = cs / V;
    body(i % per * V, i / per, 1, 0);
  }
}

// body(c, p, dc, dp) for each vector of such a region, consecutive threads taking consecutive
// vectors.
template <int V, typename F>
__device__ __forceinline__ void map_vectors(bool pix_contig, int cs, int ps, F&& body) {
  const int vectors = pix_contig ? cs * (ps / V) : (cs / V) * ps;
  for (int i = threadIdx.x; i < vectors; i += kThreads) vector_at<V>(pix_contig, cs, ps, i, body);
}

// A thread's vectors of a CS x PS region (map_vectors's, of a region whose vectors every
// thread has as many of), loaded by fetch() into registers, all of them (and those of the other
// operand staged with them) before put() stores any: the stages' loads in flight together, one
// memory latency a stage, where map_vectors's loop of loads and stores waits for each in turn
// (the PTX of the first value kernels: each operand's loop a block of its own, a load and its
// shared-memory store in each iteration).
template <int V, int CS, int PS, typename T>
struct StagedPacks {
  static constexpr int kEach = CS * PS / (V * kThreads);
  static_assert(kEach >= 1 && kEach * V * kThreads == CS * PS, "whole vectors a thread");
  Pack<T, V> v[kEach];

  // v[e] = load(c, p, dc, dp) of the thread's e-th vector
  template <typename Load>
  __device__ __forceinline__ void fetch(bool pix_contig, Load&& load) {
#pragma unroll
    for (int e = 0; e < kEach; ++e)
      vector_at<V>(pix_contig, CS, PS, threadIdx.x + e * kThreads,
                   [&](int c, int p, int dc, int dp) { v[e] = load(c, p, dc, dp); });
  }

  // store(c, p, dc, dp, v[e]) for each
  template <typename Store>
  __device__ __forceinline__ void put(bool pix_contig, Store&& store) const {
#pragma unroll
    for (int e = 0; e < kEach; ++e)
      vector_at<V>(pix_contig, CS, PS, threadIdx.x + e * kThreads,
                   [&](int c, int p, int dc, int dp) { store(c, p, dc, dp, v[e]); });
  }
};

// A stage of the tile products' operands: each region's vectors loaded with load(c, p, dc,
// dp) and stored with store(c, p, dc, dp, vector), the regions' loads all before the first store
// (StagedPacks), but for 8-byte elements (float64: 4 vectors a thread a region, beside the
// scalar products' 16 accumulators of 8 bytes), a vector at a time: grouped, the float64
// backward spilled 56-132 bytes. stage_region: one region; stage_regions: two.
template <int V, int CS, int PS, typename T, typename Load, typename Store>
__device__ __forceinline__ void stage_region(bool pix_contig, Load&& load, Store&& store) {
  if constexpr (sizeof(T) < 8) {
    StagedPacks<V, CS, PS, T> v;
    v.fetch(pix_contig, load);
    v.put(pix_contig, store);
  } else {
    map_vectors<V>(pix_contig, CS, PS, [&](int c, int p, int dc, int dp) {
      store(c, p, dc, dp, load(c, p, dc, dp));
    });
  }
}

template <int V, int CSA, int PSA, int CSB, int PSB, typename T, typename LoadA,
          typename StoreA, typename LoadB, typename StoreB>
__device__ __forceinline__ void stage_regions(bool a_contig, LoadA&& load_a, StoreA&& store_a,
                                              bool b_contig, LoadB&& load_b, StoreB&& store_b) {
  if constexpr (sizeof(T) < 8) {
    StagedPacks<V, CSA, PSA, T> a;
    StagedPacks<V, CSB, PSB, T> b;
    a.fetch(a_contig, load_a);
    b.fetch(b_contig, load_b);
    a.put(a_contig, store_a);
    b.put(b_contig, store_b);
  } else {
    stage_region<V, CSA, PSA, T>(a_contig, load_a, store_a);
    stage_region<V, CSB, PSB, T>(b_contig, load_b, store_b);
  }
}

// A staged vector of V elements into a shared-memory tile (leading dimension ld) from row r,
// column col: along the row (along_row: one store of the pack) or down the column, element j
// to row r + j (a transposing store: x's channels to rows when its pixels are contiguous, or
// the reverse; Wa's columns to rows).
template <int V, typename T>
__device__ __forceinline__ void store_in_tile(T* tile, int ld, int r, int col, bool along_row,
                                              const Pack<T, V>& v) {
  if (along_row) {
    store_pack(tile + r * ld + col, v);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) tile[(r + j) * ld + col] = v.v[j];
  }
}

// A 64 x 64 tile product into `out` (kValueLdO), rounded to scalar_t (kRound; else as
// accumulated): sum over `depth` of A (64 x depth) times B (depth x 64), kValueDepth at a time:
// stage(d0) writes A's columns d0.. to s.wa (64 x kValueDepth, kValueLdA; zeros past the ends)
// and, where B is staged too, B's rows d0.. to s.x; b(d0) is then B's rows d0.. (kValueDepth x
// 64, kValueLdB). Every thread of the block calls it; `out` is complete on return, and was free
// at its first barrier (the callers' last reads of it, and of what stage() overwrites, come
// before).
template <Product PR, bool kRound = true, typename scalar_t, typename acc_t, typename Stage,
          typename B>
__device__ __forceinline__ void tile_product(int depth, const ValueSmem<scalar_t, acc_t>& s,
                                             Stage&& stage, B&& b, acc_t* out) {
  constexpr int kK = PR == Product::kTf32 ? 8 : 16;  // the warp product's depth
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x >> 5;
  const int r0 = (warp >> 1) * 16, p0 = (warp & 1) * 32;  // the warp's 16 x 32 outputs
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[2];
  if constexpr (PR != Product::kScalar) {
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
  }
#endif
  acc_t sums[kValueOuts];  // scalar products: row threadIdx.x / 4, columns threadIdx.x % 4 + 4 j
#pragma unroll
  for (int j = 0; j < kValueOuts; ++j) sums[j] = acc_t(0);
  const int r = threadIdx.x >> 2, q = threadIdx.x & 3;
  for (int d0 = 0; d0 < depth; d0 += kValueDepth) {
    __syncthreads();  // the last step's operands (or the callers' reads) done
    stage(d0);
    __syncthreads();
    const scalar_t* bs = b(d0);
    if constexpr (PR == Product::kScalar) {
      for (int d = 0; d < kValueDepth; ++d) {
        const acc_t w = static_cast<acc_t>(s.wa[r * kValueLdA + d]);
        const scalar_t* br = bs + d * kValueLdB + q;
#pragma unroll
        for (int j = 0; j < kValueOuts; ++j) sums[j] += w * static_cast<acc_t>(br[4 * j]);
      }
    } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
      using T = typename MmaOperand<PR, scalar_t>::type;
      using Stored = typename MmaOperand<PR, scalar_t>::stored;
      // (TF32's 4 steps not unrolled: unrolled, ptxas spilled 8 bytes in the float32 backward,
      // loading later steps' fragments early)
#pragma unroll(PR == Product::kTf32 ? 1 : 2)
      for (int kk = 0; kk < kValueDepth; kk += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, T, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, reinterpret_cast<const Stored*>(s.wa + r0 * kValueLdA + kk),
                               kValueLdA);
        if constexpr (PR == Product::kTf32)
          for (int e = 0; e < fa.num_elements; ++e) fa.x[e] = wmma::__float_to_tf32(fa.x[e]);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, kK, T, wmma::row_major> fb;
          wmma::load_matrix_sync(
              fb, reinterpret_cast<const Stored*>(bs + kk * kValueLdB + p0 + 16 * j), kValueLdB);
          if constexpr (PR == Product::kTf32)
            for (int e = 0; e < fb.num_elements; ++e) fb.x[e] = wmma::__float_to_tf32(fb.x[e]);
          wmma::mma_sync(acc[j], fa, fb, acc[j]);
        }
      }
#endif
    }
  }
  if constexpr (PR == Product::kScalar) {
#pragma unroll
    for (int j = 0; j < kValueOuts; ++j)
      out[r * kValueLdO + q + 4 * j] =
          kRound ? static_cast<acc_t>(static_cast<scalar_t>(sums[j])) : sums[j];
  } else {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if constexpr (kRound && PR == Product::kHalf)  // (float32's values are float already)
        for (int e = 0; e < acc[j].num_elements; ++e)
          acc[j].x[e] = static_cast<float>(static_cast<scalar_t>(acc[j].x[e]));
      wmma::store_matrix_sync(out + r0 * kValueLdO + p0 + 16 * j, acc[j], kValueLdO,
                              wmma::mem_row_major);
    }
#endif
  }
  __syncthreads();
}

// The tile of Vl of rows k0.. (at most kValueRows; H rows in all) and pixels pt.. (tp <=
// kValuePixels) of one image (wa: its (H, C) rows; xn: its map) into s.out, rounded to x's
// dtype; rows and pixels past the ends hold zeros (tile_product's contract).
template <Product PR, typename scalar_t, typename acc_t>
__device__ __forceinline__ void value_tile(const scalar_t* __restrict__ wa, int H,
                                           const scalar_t* __restrict__ xn, const Geometry& g,
                                           int k0, int pt, int tp,
                                           const ValueSmem<scalar_t, acc_t>& s) {
  constexpr int V = kPack16<scalar_t>;
  const int C = g.C, rows = min(kValueRows, H - k0);
  // Wa's rows k0.., channels c0.. (a whole vector in or out: C % V == 0), and x's channels
  // c0.., the tile's pixels, along x's contiguous axis (whole vectors: P % V == 0, C % V == 0)
  auto stage = [&](int c0) {
    stage_regions<V, kValueDepth, kValueRows, kValueDepth, kValuePixels, scalar_t>(
        false,
        [&](int c, int rr, int, int) {
          return load_pack_or_zero<V>(wa + static_cast<int64_t>(k0 + rr) * C + c0 + c,
                                      rr < rows && c0 + c < C);
        },
        [&](int c, int rr, int, int, const Pack<scalar_t, V>& v) {
          store_in_tile(s.wa, kValueLdA, rr, c, true, v);
        },
        g.pix_contig,
        [&](int c, int p, int, int) {
          return load_pack_or_zero<V>(xn + at_cp(g, c0 + c, pt + p), p < tp && c0 + c < C);
        },
        [&](int c, int p, int, int dp, const Pack<scalar_t, V>& v) {
          store_in_tile(s.x, kValueLdB, c, p, dp == 1, v);
        });
  };
  tile_product<PR>(C, s, stage, [&](int) { return s.x; }, s.out);
}

// Where a block of a value kernel (grid (splits, N)) stands: its image n, the image's rows of
// the map from nh, x and Wa; each_tile walks its tiles, each_row its warp's rows of the grid's
// N H (a warp per row).
template <typename scalar_t>
struct ValueBlock {
  int C, H, n, splits, warp, lane, tiles;
  int64_t nh, rows;
  const scalar_t* xn;
  const scalar_t* wan;

  __device__ __forceinline__ ValueBlock(const scalar_t* x, const scalar_t* wa, const Geometry& g)
      : C(g.C), H(g.C / 2), n(blockIdx.y), splits(gridDim.x), warp(threadIdx.x >> 5),
        lane(threadIdx.x & 31), tiles((g.P + kValuePixels - 1) / kValuePixels),
        nh(static_cast<int64_t>(blockIdx.y) * (g.C / 2)),
        rows(static_cast<int64_t>(gridDim.y) * (g.C / 2)), xn(x + blockIdx.y * g.sN),
        wan(wa + static_cast<int64_t>(blockIdx.y) * (g.C / 2) * g.C) {}

  // body(pt, tp): the block's tiles, pixels pt.. (tp of them), tiles s, s + splits, ...
  template <typename F>
  __device__ __forceinline__ void each_tile(int P, F&& body) const {
    for (int t = blockIdx.x; t < tiles; t += splits) {
      const int pt = t * kValuePixels;
      body(pt, min(kValuePixels, P - pt));
    }
  }

  // body(row) for this warp's rows of the grid's N H
  template <typename F>
  __device__ __forceinline__ void each_row(F&& body) const {
    const int64_t warps = static_cast<int64_t>(splits) * gridDim.y * kWarps;
    for (int64_t row = (static_cast<int64_t>(n) * splits + blockIdx.x) * kWarps + warp;
         row < rows; row += warps)
      body(row);
  }
};

// PSA_s's forward after its glue, in one cooperative launch (the phases above): x, y (N, C, P)
// in x's layout; wa (N, H, C) in x's dtype; a (N, C), q (N, H) in the accumulation dtype;
// pmax, psum (N, H, splits): the splits' states; norm (2, N, H) and s_mask (N, P): outputs.
// Grid (splits, N), splits at most the image's tiles (every split has one).
template <typename scalar_t, typename acc_t, Product PR>
__global__ void __launch_bounds__(kThreads, 2)
value_forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                     const scalar_t* __restrict__ wa, const acc_t* __restrict__ a,
                     const acc_t* __restrict__ q, acc_t* __restrict__ pmax,
                     acc_t* __restrict__ psum, acc_t* __restrict__ norm,
                     acc_t* __restrict__ s_mask) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const ValueSmem<scalar_t, acc_t> s(MMATTN_BLOCK_SHARED(smem_raw));
  const ValueBlock<scalar_t> b(x, wa, g);
  const int H = b.H, lane = b.lane;

  // 1. the block's online-softmax state of each row over its tiles: the row's (max, sum) in
  // shared memory, row k merged by lane 0 of warp k % kWarps (the same thread every tile)
  acc_t* s_top = s.rest;
  acc_t* s_total = s_top + H;
  for (int k = threadIdx.x; k < H; k += kThreads) {
    s_top[k] = -INFINITY;
    s_total[k] = acc_t(0);
  }
  b.each_tile(g.P, [&](int pt, int tp) {
    for (int k0 = 0; k0 < H; k0 += kValueRows) {
      value_tile<PR>(b.wan, H, b.xn, g, k0, pt, tp, s);
      for (int r = b.warp; r < min(kValueRows, H - k0); r += kWarps) {
        const acc_t* o = s.out + r * kValueLdO;
        const acc_t v0 = lane < tp ? o[lane] : -INFINITY;
        const acc_t v1 = lane + 32 < tp ? o[lane + 32] : -INFINITY;
        const acc_t m = warp_max(op_max(v0, v1));  // (finite: tp >= 1)
        acc_t e = (lane < tp ? op_exp(v0 - m) : acc_t(0)) +
                  (lane + 32 < tp ? op_exp(v1 - m) : acc_t(0));
        e = warp_sum(e);
        if (lane == 0) merge_state(s_top[k0 + r], s_total[k0 + r], m, e);
      }
    }
  });
  __syncthreads();
  for (int k = threadIdx.x; k < H; k += kThreads) {
    pmax[(b.nh + k) * b.splits + blockIdx.x] = s_top[k];
    psum[(b.nh + k) * b.splits + blockIdx.x] = s_total[k];
  }
  launch::grid_sync();

  // 2. each row's states merged over the splits: a warp per row
  b.each_row([&](int64_t row) {
    acc_t top = -INFINITY, total = acc_t(0);
    for (int i = lane; i < b.splits; i += 32)
      merge_state(top, total, pmax[row * b.splits + i], psum[row * b.splits + i]);
    warp_merge(top, total);
    if (lane == 0) {
      norm[row] = top;
      norm[b.rows + row] = total;
    }
  });
  launch::grid_sync();

  // 3. the gate and y, tile by tile: 4 threads a pixel (threadIdx.x / 4), a quarter of a
  // tile's rows each, added in shuffles; the sum over the row tiles in a register
  acc_t* s_vmax = s.rest;
  acc_t* s_qz = s_vmax + H;  // q_k / sum_k
  acc_t* s_a = s_qz + H;
  acc_t* s_s = s_a + b.C;    // the tile's S
  load_vec(s_a, a + static_cast<int64_t>(b.n) * b.C, b.C);
  for (int k = threadIdx.x; k < H; k += kThreads) {
    s_vmax[k] = norm[b.nh + k];
    s_qz[k] = q[b.nh + k] / norm[b.rows + b.nh + k];
  }
  const int pixel = threadIdx.x >> 2, quarter = threadIdx.x & 3;
  b.each_tile(g.P, [&](int pt, int tp) {
    acc_t logit = acc_t(0);
    for (int k0 = 0; k0 < H; k0 += kValueRows) {
      value_tile<PR>(b.wan, H, b.xn, g, k0, pt, tp, s);
      acc_t part = acc_t(0);
      for (int r = quarter; r < min(kValueRows, H - k0); r += 4)
        part += s_qz[k0 + r] * op_exp(s.out[r * kValueLdO + pixel] - s_vmax[k0 + r]);
      part += __shfl_xor_sync(0xffffffffu, part, 1);
      part += __shfl_xor_sync(0xffffffffu, part, 2);
      logit += part;
    }
    if (quarter == 0 && pixel < tp) {
      const acc_t sg = op_sigmoid(logit);
      s_s[pixel] = sg;
      s_mask[static_cast<int64_t>(b.n) * g.P + pt + pixel] = sg;
    }
    __syncthreads();
    constexpr int V = kPack16<scalar_t>;
    map_vectors<V>(g.pix_contig, b.C, tp, [&](int c, int p, int dc, int dp) {
      const int64_t at = at_cp(g, c, pt + p);
      const Pack<scalar_t, V> v = load_pack<V>(b.xn + at);
      Pack<scalar_t, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j)
        out.v[j] = static_cast<scalar_t>(static_cast<acc_t>(v.v[j]) * s_a[c + j * dc] *
                                         s_s[p + j * dp]);
      store_pack(y + b.n * g.sN + at, out);
    });
  });
}

// The rows of the backward's dVl tile in shared memory: H rounded up to whole row tiles.
__host__ __device__ constexpr int value_rows_padded(int H) {
  return (H + kValueRows - 1) / kValueRows * kValueRows;
}

// value_backward_kernel's values in shared memory after the head (3 H + kValuePixels), in bytes
// to the tile's dVl (32-byte aligned: fragments load it).
template <typename acc_t>
__host__ __device__ constexpr size_t value_backward_vector_bytes(int H) {
  return round32(static_cast<size_t>(3 * H + kValuePixels) * sizeof(acc_t));
}

// The dynamic shared memory of value_backward_kernel for C channels: the head, 3 H +
// kValuePixels values, then the tile's dVl (all its rows, x's dtype).
template <typename scalar_t, typename acc_t>
size_t value_backward_smem(int C) {
  const int H = C / 2;
  return 32 + ValueSmem<scalar_t, acc_t>::kHead + value_backward_vector_bytes<acc_t>(H) +
         static_cast<size_t>(value_rows_padded(H)) * kValueLdB * sizeof(scalar_t);
}

// M = dVl x^T (N, H, C) in x's dtype, from dVl (N, H, P: x's dtype, dense, written by the
// grid's blocks before a grid barrier) and x, with the grid's blocks: its 64 x 64 tiles (rows
// k, channels c) each cut into `runs` runs of `run_pixels` pixels, a block taking the tiles'
// runs (items) its index, then the grid's blocks, apart. With one run a tile is M's, rounded
// to x's dtype; with more, each run's tile goes to `parts` (runs, N, H, C) in the
// accumulation dtype, and after a grid barrier every value of M is its runs' sum in their
// order.
template <Product PR, typename scalar_t, typename acc_t>
__device__ __forceinline__ void value_weight_products(
    const scalar_t* __restrict__ x, const Geometry& g, int N, const scalar_t* dvl, int runs,
    int run_pixels, acc_t* __restrict__ parts, scalar_t* __restrict__ m,
    const ValueSmem<scalar_t, acc_t>& s) {
  constexpr int V = kPack16<scalar_t>;
  const int C = g.C, H = C / 2, P = g.P;
  const int row_tiles = (H + kValueRows - 1) / kValueRows;
  const int channel_tiles = (C + kValuePixels - 1) / kValuePixels;
  const int64_t items = static_cast<int64_t>(N) * row_tiles * channel_tiles * runs;
  const int64_t nhc = static_cast<int64_t>(N) * H * C;
  const int64_t blocks = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t block = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  for (int64_t item = block; item < items; item += blocks) {
    const int run = static_cast<int>(item % runs);
    int64_t rest = item / runs;
    const int c0 = static_cast<int>(rest % channel_tiles) * kValuePixels;
    rest /= channel_tiles;
    const int k0 = static_cast<int>(rest % row_tiles) * kValueRows;
    const int n = static_cast<int>(rest / row_tiles);
    const int p0 = run * run_pixels, pe = min(P, p0 + run_pixels);
    const scalar_t* dn = dvl + static_cast<int64_t>(n) * H * P;
    const scalar_t* xn = x + n * g.sN;
    // A: dVl's rows k0.., pixels pd.. (whole vectors in or out: P % V == 0, runs start at
    // multiples of kValueDepth); B: x^T's rows, pixels pd.., channels c0.., along x's
    // contiguous axis
    auto stage = [&](int d0) {
      const int pd = p0 + d0;
      stage_regions<V, kValueRows, kValueDepth, kValuePixels, kValueDepth, scalar_t>(
          true,
          [&](int r, int d, int, int) {
            return load_pack_or_zero<V>(dn + static_cast<int64_t>(k0 + r) * P + pd + d,
                                        k0 + r < H && pd + d < pe);
          },
          [&](int r, int d, int, int, const Pack<scalar_t, V>& v) {
            store_in_tile(s.wa, kValueLdA, r, d, true, v);
          },
          g.pix_contig,
          [&](int c, int d, int, int) {
            return load_pack_or_zero<V>(xn + at_cp(g, c0 + c, pd + d),
                                        c0 + c < C && pd + d < pe);
          },
          [&](int c, int d, int dc, int, const Pack<scalar_t, V>& v) {
            store_in_tile(s.x, kValueLdB, d, c, dc == 1, v);
          });
    };
    tile_product<PR, false>(pe - p0, s, stage, [&](int) { return s.x; }, s.out);
    const int rows = min(kValueRows, H - k0), cols = min(kValuePixels, C - c0);
    for (int i = threadIdx.x; i < rows * kValuePixels; i += kThreads) {
      const int r = i / kValuePixels, c = i % kValuePixels;
      if (c >= cols) continue;
      const int64_t at = (static_cast<int64_t>(n) * H + k0 + r) * C + c0 + c;
      const acc_t v = s.out[r * kValueLdO + c];
      if (runs == 1)
        m[at] = static_cast<scalar_t>(v);
      else
        parts[run * nhc + at] = v;
    }
  }
  if (runs == 1) return;
  launch::grid_sync();
  grid_stride(nhc, [&](int64_t i) {
    acc_t sum = acc_t(0);
    for (int run = 0; run < runs; ++run) sum += parts[run * nhc + i];
    m[i] = static_cast<scalar_t>(sum);
  });
}

// PSA_s's backward through its value map in one cooperative launch (the GEMM path's map again,
// value_grad_kernel, the GEMM of dx's part A (.) e = Wa^T dVl and that of M), with the forward's
// tiles:
//   1. per block, over its tiles: the tiles of Vl again, and each row's partial
//      sum_p exp(Vl[k][p] - max_k) dt_p (N, H, splits);
//   -- grid barrier --
//   2. dq_k = sum over the splits / sum_k (a warp per row), written for the glue;
//   -- grid barrier --
//   3. per tile: the tile of Vl again, row tile by row tile; dVl = V q (dt - dq) (rounded to x's
//      dtype) over all H rows of the tile in shared memory and to `dvl` (N, H, P); then
//      A (.) e = Wa^T dVl, 64 channels at a time (the product's A: Wa's columns, staged
//      transposed), written to ex in x's layout;
//   -- grid barrier --
//   4. M = dVl x^T (N, H, C), which the glue takes for W_v's gradient and dA's part: tiles of
//      M over runs of the pixels (value_weight_products; `runs` of `run_pixels` pixels, and with
//      more than one, after another grid barrier, the runs' sum from `parts`); with no runs
//      (MMATTN_PSA_FUSED_M=0) not here: the GEMM of M after the launch reads `dvl`.
// wa (N, H, C) in x's dtype; q (N, H), norm (2, N, H), d_t (N, P): the accumulation dtype.
template <typename scalar_t, typename acc_t, Product PR>
__global__ void __launch_bounds__(kThreads, 2)
value_backward_kernel(const scalar_t* __restrict__ x, Geometry g,
                      const scalar_t* __restrict__ wa, const acc_t* __restrict__ q,
                      const acc_t* __restrict__ norm, const acc_t* __restrict__ d_t,
                      acc_t* __restrict__ pdq, acc_t* __restrict__ dq, scalar_t* dvl,
                      scalar_t* __restrict__ ex, int runs, int run_pixels,
                      acc_t* __restrict__ parts, scalar_t* __restrict__ m) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const ValueSmem<scalar_t, acc_t> s(MMATTN_BLOCK_SHARED(smem_raw));
  const ValueBlock<scalar_t> b(x, wa, g);
  const int C = b.C, H = b.H, lane = b.lane;
  const acc_t* dtn = d_t + static_cast<int64_t>(b.n) * g.P;
  acc_t* s_vmax = s.rest;
  acc_t* s_qz = s_vmax + H;  // phase 3: q_k / sum_k
  acc_t* s_dq = s_qz + H;    // phase 1: the block's partial sums; phase 3: dq
  acc_t* s_dt = s_dq + H;    // the tile's dt
  scalar_t* s_dvl = reinterpret_cast<scalar_t*>(reinterpret_cast<unsigned char*>(s.rest) +
                                                 value_backward_vector_bytes<acc_t>(H));
  for (int k = threadIdx.x; k < H; k += kThreads) {
    s_vmax[k] = norm[b.nh + k];
    s_dq[k] = acc_t(0);
  }
  // the tile's dt (after a barrier: the last tile's reads of it done)
  auto load_dt = [&](int pt, int tp) {
    __syncthreads();
    if (threadIdx.x < kValuePixels)
      s_dt[threadIdx.x] = threadIdx.x < tp ? dtn[pt + threadIdx.x] : acc_t(0);
  };

  // 1. the rows' partial sums over this block's tiles (row k's by lane 0 of warp k % kWarps)
  b.each_tile(g.P, [&](int pt, int tp) {
    load_dt(pt, tp);
    for (int k0 = 0; k0 < H; k0 += kValueRows) {
      value_tile<PR>(b.wan, H, b.xn, g, k0, pt, tp, s);
      for (int r = b.warp; r < min(kValueRows, H - k0); r += kWarps) {
        const acc_t* o = s.out + r * kValueLdO;
        const acc_t top = s_vmax[k0 + r];
        acc_t part = (lane < tp ? op_exp(o[lane] - top) * s_dt[lane] : acc_t(0)) +
                     (lane + 32 < tp ? op_exp(o[lane + 32] - top) * s_dt[lane + 32] : acc_t(0));
        part = warp_sum(part);
        if (lane == 0) s_dq[k0 + r] += part;
      }
    }
  });
  __syncthreads();
  for (int k = threadIdx.x; k < H; k += kThreads)
    pdq[(b.nh + k) * b.splits + blockIdx.x] = s_dq[k];
  launch::grid_sync();

  // 2. dq_k: the splits' sums added (a warp per row, in a fixed order), over sum_k
  b.each_row([&](int64_t row) {
    acc_t part = acc_t(0);
    for (int i = lane; i < b.splits; i += 32) part += pdq[row * b.splits + i];
    part = warp_sum(part);
    if (lane == 0) dq[row] = part / norm[b.rows + row];
  });
  launch::grid_sync();

  // 3. dVl and A (.) e, tile by tile
  for (int k = threadIdx.x; k < H; k += kThreads) {
    s_qz[k] = q[b.nh + k] / norm[b.rows + b.nh + k];
    s_dq[k] = dq[b.nh + k];
  }
  const int hp = value_rows_padded(H);
  b.each_tile(g.P, [&](int pt, int tp) {
    load_dt(pt, tp);
    constexpr int V = kPack16<scalar_t>;
    for (int k0 = 0; k0 < H; k0 += kValueRows) {
      value_tile<PR>(b.wan, H, b.xn, g, k0, pt, tp, s);
      // the rows' vectors of pixels (whole vectors in or out: P % V == 0); zeros outside,
      // which the product below sums
      map_vectors<V>(true, kValueRows, kValuePixels, [&](int r, int p, int, int) {
        const int k = k0 + r;
        const bool inside = k < H && p < tp;
        Pack<scalar_t, V> d;
#pragma unroll
        for (int j = 0; j < V; ++j)
          d.v[j] = static_cast<scalar_t>(
              inside ? op_exp(s.out[r * kValueLdO + p + j] - s_vmax[k]) * s_qz[k] *
                           (s_dt[p + j] - s_dq[k])
                     : acc_t(0));
        store_pack(s_dvl + k * kValueLdB + p, d);
        if (inside) store_pack(dvl + (b.nh + k) * g.P + pt + p, d);
      });
    }
    for (int c0 = 0; c0 < C; c0 += kValueRows) {
      const int cs = min(kValueRows, C - c0);
      auto stage = [&](int k0) {  // A's rows: Wa's columns c0.., its rows k0.., read along
                                  // Wa's rows (whole vectors: C % V == 0)
        stage_region<V, kValueRows, kValueDepth, scalar_t>(
            false,
            [&](int cc, int kk, int, int) {
              return load_pack_or_zero<V>(b.wan + static_cast<int64_t>(k0 + kk) * C + c0 + cc,
                                          cc < cs && k0 + kk < H);
            },
            [&](int cc, int kk, int, int, const Pack<scalar_t, V>& v) {
              store_in_tile(s.wa, kValueLdA, cc, kk, false, v);
            });
      };
      tile_product<PR>(hp, s, stage, [&](int k0) { return s_dvl + k0 * kValueLdB; }, s.out);
      map_vectors<V>(g.pix_contig, cs, tp, [&](int c, int p, int dc, int dp) {
        Pack<scalar_t, V> v;
#pragma unroll
        for (int j = 0; j < V; ++j)
          v.v[j] = static_cast<scalar_t>(s.out[(c + j * dc) * kValueLdO + p + j * dp]);
        store_pack(ex + b.n * g.sN + at_cp(g, c0 + c, pt + p), v);
      });
    }
  });
  if (runs == 0) return;
  launch::grid_sync();

  // 4. M
  value_weight_products<PR>(x, g, static_cast<int>(gridDim.y), dvl, runs, run_pixels, parts, m,
                            s);
}

// MMATTN_PSA_VALUE_TILES: unset, the value map in value_forward_kernel's and
// value_backward_kernel's tiles where tensor cores take its products (16-bit x; float32 where
// PyTorch allows TF32 in cuDNN's convolutions, torch.backends.cudnn.allow_tf32, its default:
// the value products are the reference's 1x1 convolution); 1, for every dtype (scalar products
// for float32 without TF32 and for float64, which cuBLAS's GEMMs do better: the exact path the
// tests check the kernels' logic with); 0, never (GEMMs into a transient map, which follow
// torch.backends.cuda.matmul.allow_tf32 as PyTorch's products do). Either way only with the
// cooperative launch (MMATTN_PSA_COOPERATIVE).
inline int value_tiles_from_env() {
  return static_cast<int>(
      env_integer("MMATTN_PSA_VALUE_TILES", 0, 1, -1, [] { return "0 or 1"; }));
}

// MMATTN_PSA_FUSED_M: unset or 1, M = dVl x^T in value_backward_kernel's launch (its phase 4);
// 0, a GEMM after it (value_products, psa_release_s.cuh): a launch more, or N + 1 where the
// GEMM is cut over the pixels. The switch to measure one against the other with.
inline bool fused_m_from_env() {
  return env_integer("MMATTN_PSA_FUSED_M", 0, 1, 1, [] { return "0 or 1"; }) == 1;
}

// The products the value kernels would take for scalar_t, or false (none: the GEMM path).
// Tensor cores need compute capability 8.0 (bf16, TF32); below it 16-bit x takes the GEMM path
// and float32 scalar products (MMATTN_PSA_VALUE_TILES=1) or the GEMM path.
template <typename scalar_t>
bool value_product(Product* product) {
  const int mode = value_tiles_from_env();
  if (mode == 0 || !cooperative_from_env()) return false;
  const bool tensor_cores = launch::device_attribute(launch::Attr::kComputeMajor) >= 8;
  if constexpr (sizeof(scalar_t) == 2) {  // (no scalar products for them: the GEMM's)
    *product = Product::kHalf;
    return tensor_cores;
  }
  *product = Product::kScalar;
  if constexpr (std::is_same<scalar_t, float>::value)
    if (tensor_cores && at::globalContext().allowTF32CuDNN()) *product = Product::kTf32;
  return *product != Product::kScalar || mode == 1;
}

// Whether the value kernels can move x, Wa and their outputs (`out`, laid out as x) in 16-byte
// vectors, as they do: whole vectors along every row they read or write (C and P multiples of
// the width), aligned pointers (Wa and the transient buffers: fresh allocations). Else the
// GEMM path.
template <typename scalar_t>
bool value_vectors(const Geometry& g, const at::Tensor& x, const at::Tensor& out) {
  constexpr int vec = kPack16<scalar_t>;
  return vec > 1 && g.C % vec == 0 && g.P % vec == 0 &&
         all_aligned({x.data_ptr(), out.data_ptr()}, 16);
}

// `run` called with the instance `kernel` gives for the products value_product chose
// (value_forward_kernel's or value_backward_kernel's).
template <typename scalar_t, typename Kernel, typename Run>
void with_product(Product product, Kernel&& kernel, Run&& run) {
  if constexpr (sizeof(scalar_t) == 2) {
    run(kernel(std::integral_constant<Product, Product::kHalf>{}));
  } else {
    if constexpr (std::is_same<scalar_t, float>::value)
      if (product == Product::kTf32)
        return run(kernel(std::integral_constant<Product, Product::kTf32>{}));
    run(kernel(std::integral_constant<Product, Product::kScalar>{}));
  }
}

// The blocks per image of a value kernel's cooperative grid (splits, N), `smem` bytes each:
// one wave, at most the image's tiles; 0 where the grid would not be resident at once or the
// shared memory exceeds the device's.
template <typename Kernel>
int value_splits(Kernel kernel, size_t smem, int N, int P) {
  if (smem > static_cast<size_t>(launch::device_attribute(launch::Attr::kSharedMemoryOptin)))
    return 0;
  const int per_sm = prepare(kernel, smem);
  const int splits = std::min(one_wave(per_sm, N), (P + kValuePixels - 1) / kValuePixels);
  return resident_at_once(static_cast<int64_t>(splits) * N, per_sm) ? splits : 0;
}

// PSA_s's forward after the glue (value_forward_kernel): y, s_mask (N, P), norm (2, N, H)
// written; false, nothing written, where it does not run (no pixels, value_product,
// value_splits): the caller takes the GEMM path.
template <typename scalar_t, typename acc_t>
bool value_forward(const at::Tensor& x, const Geometry& g, const at::Tensor& wa,
                   const at::Tensor& a, const at::Tensor& q, const at::Tensor& y,
                   const at::Tensor& norm, const at::Tensor& s_mask) {
  Product product;
  if (g.P == 0 || !value_vectors<scalar_t>(g, x, y) || !value_product<scalar_t>(&product))
    return false;
  const int N = static_cast<int>(x.size(0));
  const size_t smem = value_forward_smem<scalar_t, acc_t>(g.C);
  bool taken = false;
  with_product<scalar_t>(
      product, [](auto pr) { return value_forward_kernel<scalar_t, acc_t, decltype(pr)::value>; },
      [&](auto kernel) {
        const int splits = value_splits(kernel, smem, N, g.P);
        if (splits == 0) return;
        const at::Tensor pmax = at::empty({N, g.C / 2, splits}, norm.options());
        const at::Tensor psum = at::empty_like(pmax);
        launch::launch_cooperative(
            kernel, dim3(splits, N), kThreads, smem, x.data_ptr<scalar_t>(),
            y.data_ptr<scalar_t>(), g, wa.data_ptr<scalar_t>(), a.data_ptr<acc_t>(),
            q.data_ptr<acc_t>(), pmax.data_ptr<acc_t>(), psum.data_ptr<acc_t>(),
            norm.data_ptr<acc_t>(), s_mask.data_ptr<acc_t>());
        taken = true;
      });
  return taken;
}

// The runs of pixels value_weight_products cuts M's tiles into for a grid of `blocks` blocks:
// enough that the tiles' runs fill the grid, each at least kValueMinRun pixels and a multiple
// of kValueDepth (so that a run's vectors are whole); {runs, pixels a run}. Cut this way, the
// product's reduction over the pixels takes the grid's blocks where M has fewer tiles than
// them (HRNet-OCR's widest map, [2, 48, 128, 256]: 2 tiles and 32768 pixels), as the GEMM
// path's cut into chunks (value_product_splits, psa_release_s.cuh) does for cuBLAS.
constexpr int kValueMinRun = 256;

inline std::pair<int, int> value_product_runs(int N, int C, int P, int blocks) {
  const int H = C / 2;
  const int64_t tiles = static_cast<int64_t>(N) * ((H + kValueRows - 1) / kValueRows) *
                        ((C + kValuePixels - 1) / kValuePixels);
  const int64_t wanted = std::min<int64_t>((blocks + tiles - 1) / tiles,
                                           (P + kValueMinRun - 1) / kValueMinRun);
  const int64_t runs = std::max<int64_t>(wanted, 1);
  const int run_pixels = static_cast<int>((P + runs - 1) / runs + kValueDepth - 1) /
                         kValueDepth * kValueDepth;
  return {(P + run_pixels - 1) / run_pixels, run_pixels};
}

// PSA_s's backward through its value map (value_backward_kernel): dq (N, H) and ex (laid out
// as x) written, dVl (N, H, P) in x's dtype returned and, unless MMATTN_PSA_FUSED_M=0, M =
// dVl x^T (N, H, C) in x's dtype to *m; undefined, nothing written, where it does not run (as
// value_forward): the caller takes the GEMM path.
template <typename scalar_t, typename acc_t>
at::Tensor value_backward(const at::Tensor& x, const Geometry& g, const at::Tensor& wa,
                          const at::Tensor& q, const at::Tensor& norm, const at::Tensor& d_t,
                          const at::Tensor& dq, const at::Tensor& ex, at::Tensor* m) {
  Product product;
  if (g.P == 0 || x.size(0) == 0 || !value_vectors<scalar_t>(g, x, ex) ||
      !value_product<scalar_t>(&product))
    return {};
  const int N = static_cast<int>(x.size(0)), H = g.C / 2;
  const size_t smem = value_backward_smem<scalar_t, acc_t>(g.C);
  at::Tensor dvl;
  with_product<scalar_t>(
      product,
      [](auto pr) { return value_backward_kernel<scalar_t, acc_t, decltype(pr)::value>; },
      [&](auto kernel) {
        const int splits = value_splits(kernel, smem, N, g.P);
        if (splits == 0) return;
        const at::Tensor pdq = at::empty({N, H, splits}, dq.options());
        dvl = at::empty({N, H, g.P}, x.options());
        const auto [runs, run_pixels] = fused_m_from_env()
                                            ? value_product_runs(N, g.C, g.P, splits * N)
                                            : std::pair<int, int>{0, 0};
        // (runs: 0, M not here; 1, M written directly; more, the runs' tiles in `parts` first)
        const at::Tensor parts = runs > 1 ? at::empty({runs, N, H, g.C}, dq.options())
                                          : at::Tensor();
        const at::Tensor fused = runs > 0 ? at::empty({N, H, g.C}, x.options()) : at::Tensor();
        launch::launch_cooperative(
            kernel, dim3(splits, N), kThreads, smem, x.data_ptr<scalar_t>(), g,
            wa.data_ptr<scalar_t>(), q.data_ptr<acc_t>(), norm.data_ptr<acc_t>(),
            d_t.data_ptr<acc_t>(), pdq.data_ptr<acc_t>(), dq.data_ptr<acc_t>(),
            dvl.data_ptr<scalar_t>(), ex.data_ptr<scalar_t>(), runs, run_pixels,
            runs > 1 ? parts.data_ptr<acc_t>() : nullptr,
            runs > 0 ? fused.data_ptr<scalar_t>() : nullptr);
        *m = fused;
      });
  return dvl;
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn
