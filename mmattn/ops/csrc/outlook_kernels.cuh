// Outlook attention aggregation on CUDA: Eq. 4-5 of VOLO (arXiv 2106.13112), forward and
// backward, fused (the K^2-times larger unfolded tensors are never built).
//
//   y      = Fold(A_hat V_Delta)               gathered per output pixel (Eq. 4-5); in 16-bit
//            types at K = 3, s >= 2, the window products on tensor cores, then their fold
//   grad_v = the same gather with m <-> q swapped and grad_out in place of v
//   grad_A[b,i,j,n,m,q] = <grad_out(pixel m), v(pixel q)> over the channels of head n
//   grad_L = scale A (grad_A - sum_q A grad_A)  with softmax_scale: the gradient of the logits L
//            of A = softmax(scale L) (Eq. 3), from grad_A in float, in the kernel that computes
//            grad_A (where PyTorch's softmax backward and a scaling took two more passes over
//            a map of A's size)
//   pool   = the s x s average pooling (ceil mode) of the block's input, whose projection gives
//            the weights (Eq. 3): PyTorch's avg_pool2d of a channels-last map ran at 0.3 TB/s
//            on an H100 (126 us a call at VOLO-D1's stage 1, [128, 28, 28, 192] bf16), twice per
//            block and step (forward, and the backward's recomputation)
//   unpool = the pooling's backward added to a gradient of x: each pixel gets its cell's pooled
//            gradient over the cell's pixel count (PyTorch's broadcast add of it took 70 us a
//            call at VOLO-D1's stage 1 on an H200, bf16, for 87 MB; its NHWC avg_pool2d
//            backward, 362 us on an H100)
//   softmax = the weights A = softmax(scale L) of the projected pooled map L, over groups of K^2
//            (Eq. 3), a thread a group: PyTorch's softmax took 62 us a call at VOLO-D1's stage
//            1 on an H200 (24 MB, bf16), after a pass of its own for the scaling
//
// Index arithmetic lives in outlook.h, shared with (and tested through) the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_softmax_backward_data.h>
#include <ATen/ops/empty.h>

#include "device_math.cuh"
#include "outlook.h"
#include "vector.cuh"
#include "warp_matrix.cuh"

// needs the launch interface: cuda_launch.cuh (GPU) or the tests' CPU emulation

namespace mmattn {
namespace outlook_detail {

constexpr int kGatherThreads = 256;
// 4 resident gather blocks per SM: 64 registers a thread. Without the bound ptxas spills the
// any-K gather (28-32 bytes on sm_80) at the same register count.
constexpr int kGatherMinBlocks = 4;
constexpr int kWindowThreads = 512;
constexpr int64_t kSmemBudget = 48 * 1024;  // bytes, no opt-in needed

// This thread's item in a row of the grids of launch_gather and launch_rows (blockIdx.x /
// threadIdx.x cover a row's cols x (C / VEC) items, a column's channel packs consecutive): its
// column and first channel; false past the row's items.
template <int VEC>
__device__ __forceinline__ bool row_item(const int cols, const int C, int& col, int& c0) {
  const int packs = C / VEC;
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= cols * packs) return false;
  col = r / packs;
  c0 = (r - col * packs) * VEC;
  return true;
}

// y (TRANSPOSED = false) or grad_v (true). One thread per VEC consecutive channels of one output
// pixel, threads along the channel axis: the src loads are coalesced, the attn weight (shared by
// the d channels of a head) is a broadcast load. blockIdx.y walks the image rows (b, u);
// blockIdx.x / threadIdx.x cover (x, channel pack) of a row. KT = K when fixed at compile time
// (K = 3: the window loops unroll and the loads overlap), 0 for any K.
// out's pixels are ldo apart; with ones, the thread of a pixel's first pack also writes its
// kOnesChannels after C, (1, 0, ..., 0) (outlook_fwd's ones_column).
template <bool TRANSPOSED, int VEC, int KT, typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads, kGatherMinBlocks)
outlook_gather_kernel(const scalar_t* __restrict__ src, const scalar_t* __restrict__ attn,
                      scalar_t* __restrict__ out, const OutlookGeom g, const int C, const int d,
                      const int64_t rows, const int ldo, const bool ones) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  int x, c0;
  if (!row_item<VEC>(g.W, C, x, c0)) return;
  const int64_t head = static_cast<int64_t>(c0 / d) * (g.K * g.K * g.K * g.K);  // d % VEC == 0
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t b = row / g.H;
    const int u = static_cast<int>(row - b * g.H);
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    // No branch per position: a source in the padding is read at the output pixel itself
    // (in the image) with weight 0. With the padding skipped by a branch, each position's
    // loads waited on the previous position's multiply-adds (the SASS, sm_90, bf16: a serial
    // load-to-use chain per position, up to 36 a thread; Nsight Compute, H100: SM 66 %, DRAM
    // 14 %); now a window row's K positions load together (outlook_for_each_position unrolls
    // the positions of a row, not the rows: all K^2 at once spilled at 64 registers). (The
    // pixel itself is a source of every window covering it, so where its value is not finite
    // the output is not either way.)
    outlook_for_each_position<TRANSPOSED, KT>(
        g, b, u, x, [&](int64_t a_off, int64_t src_pix, bool valid) {
          const acc_t w = static_cast<acc_t>(attn[a_off + head]);
          const acc_t wgt = valid ? w : acc_t(0);
          const pack_t sv = load_pack<VEC>(src + src_pix * C + c0);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += wgt * static_cast<acc_t>(sv.v[k]);
        });
    pack_t ov;
#pragma unroll
    for (int k = 0; k < VEC; ++k) ov.v[k] = static_cast<scalar_t>(acc[k]);
    // (grad_v: pixels C apart, no ones; the parameters unused, at no register's cost: with
    // them used, the any-K grad_v spilled 4 bytes in 16-bit types, sm_80 and sm_90)
    scalar_t* o = out + (row * g.W + x) * (TRANSPOSED ? C : ldo);
    store_pack<VEC>(o + c0, ov);
    if (!TRANSPOSED && ones && c0 == 0)
      for (int k = 0; k < kOnesChannels; ++k) o[C + k] = scalar_t(k == 0 ? 1 : 0);
  }
}

// grad_attn, one block per window (b, i, j): stage the window's K^2 rows of grad_out and v (all C
// channels, as acc_t, zero in the padding) in shared memory, then one thread per output
// (n, m, q) -- consecutive threads write consecutive q, coalesced -- computes a length-d dot
// product. Rows are ld = C rounded up to odd apart, so the threads of a warp reading the same
// channel of different rows hit different banks. With softmax (the logits' gradient, scale
// applied), the products stay in shared memory (ds), a thread per row (n, m) sums A grad_A
// over q, and a thread per output writes scale A (grad_A - that sum).
template <typename scalar_t>
__global__ void __launch_bounds__(kWindowThreads)
outlook_grad_attn_smem_kernel(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ v,
                              const scalar_t* __restrict__ attn, scalar_t* __restrict__ gattn,
                              const OutlookGeom g, const int C, const int d, const int ld,
                              const int64_t windows, const bool softmax, const double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int KK = g.K * g.K;
  const int outs = g.N * KK * KK;
  acc_t* gs = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* vs = gs + KK * ld;
  acc_t* ds = vs + KK * ld;  // (softmax) the window's grad_attn, outs values
  acc_t* row_sums = ds + outs;  // (softmax) N K^2 values
  for (int64_t win = blockIdx.x; win < windows; win += gridDim.x) {
    const int j = static_cast<int>(win % g.w);
    const int i = static_cast<int>((win / g.w) % g.h);
    const int64_t b = win / (static_cast<int64_t>(g.w) * g.h);
    for (int e = threadIdx.x; e < KK * C; e += blockDim.x) {
      const int t = e / C, c = e - t * C;
      int64_t pix;
      const bool ok = outlook_window_pixel(g, b, i, j, t, pix);
      gs[t * ld + c] = ok ? static_cast<acc_t>(gout[pix * C + c]) : acc_t(0);
      vs[t * ld + c] = ok ? static_cast<acc_t>(v[pix * C + c]) : acc_t(0);
    }
    __syncthreads();
    scalar_t* out = gattn + win * outs;
    for (int o = threadIdx.x; o < outs; o += blockDim.x) {
      const int q = o % KK, m = (o / KK) % KK, n = o / (KK * KK);
      const acc_t* gr = gs + m * ld + n * d;
      const acc_t* vr = vs + q * ld + n * d;
      acc_t s0 = 0, s1 = 0;  // two chains for ILP
      int c = 0;
      for (; c + 1 < d; c += 2) {
        s0 += gr[c] * vr[c];
        s1 += gr[c + 1] * vr[c + 1];
      }
      if (c < d) s0 += gr[c] * vr[c];
      if (softmax)
        ds[o] = s0 + s1;
      else
        out[o] = static_cast<scalar_t>(s0 + s1);
    }
    if (softmax) {  // (uniform across the block)
      const scalar_t* a = attn + win * outs;
      __syncthreads();
      for (int r = threadIdx.x; r < g.N * KK; r += blockDim.x) {
        acc_t sum = 0;
        for (int q = 0; q < KK; ++q) sum += static_cast<acc_t>(a[r * KK + q]) * ds[r * KK + q];
        row_sums[r] = sum;
      }
      __syncthreads();
      for (int o = threadIdx.x; o < outs; o += blockDim.x)
        out[o] = static_cast<scalar_t>(static_cast<acc_t>(scale) * static_cast<acc_t>(a[o]) *
                                       (ds[o] - row_sums[o / KK]));
    }
    __syncthreads();  // before the next window overwrites the rows
  }
}

// Rows of a window and tile size of the tensor-core grad_attn (K^2 <= 16: K = 3, VOLO's).
constexpr int kMmaTile = 16;
constexpr int kMmaWarps = 8;

// grad_attn on tensor cores, for 16-bit types, K^2 <= 16 and heads of a multiple of 16
// channels: per window (b, i, j) and head n the K^2 x K^2 outputs are the product
// G_n V_n^T of the window's rows of grad_out and v restricted to the head's d channels
// (K^2 x d each): a 16 x 16 x d warp matrix product (wmma, float accumulators) per head, the
// rows past K^2 padding whose products are never read. A block of kMmaWarps warps takes
// kMmaWindows consecutive windows at a time: it stages their K^2 rows of grad_out and v in x's
// dtype (16-byte asynchronous copies, zeros in the padding) and, with softmax, their weights A
// (each thread issuing kMmaWeightBatch loads before their stores); each warp then takes the
// (window, head) pairs warp, warp + kMmaWarps, ... and writes the K^2 x K^2 corner of its
// product through a 16 x 16 float tile of shared memory (with softmax, the logits' gradient
// from that float tile: A grad_A in place, A read by consecutive lanes; lane m < K^2 sums row
// m, a lane writing row m takes that sum by a shuffle: scale (A grad_A - A sum)). Rows are ld
// elements apart, ld = 8 (mod 16): 32-byte aligned for the fragment loads at any multiple of 16
// channels, and the 8 rows that one matrix load reads in a phase fall on distinct banks.
// Replaced the scalar kernel's 2 shared-memory loads per multiply-add (outlook_grad_attn_smem:
// 417 us a call at VOLO-D1's stage 1 on an H100, bf16, SM 82 %, DRAM 7 %). Its first version
// took a window at a time and read A for the epilogue from global memory, row by row: 134 us a
// call on an H200 (2026-11-27), 172 with the epilogue; 25088 windows on 132 SMs x 4 blocks are
// 48 windows a block, about 2.8 us each: two waits on memory (the rows, then A) and three
// barriers for 6 heads on 8 warps. Now one wait and two barriers a kMmaWindows windows.
constexpr int kMmaWindows = 4;
constexpr int kMmaWeightBatch = 8;

// Shared memory of outlook_grad_attn_mma_kernel: the windows' rows of grad_out and v, the
// warps' float tiles, the windows' weights (outs = N K^4 a window).
inline size_t grad_attn_mma_smem(int ld, int outs, size_t elem) {
  return (2 * kMmaWindows * kMmaTile * static_cast<size_t>(ld) +
          kMmaWindows * static_cast<size_t>(outs)) * elem +
         kMmaWarps * kMmaTile * kMmaTile * sizeof(float) + 32;  // (+ the base's alignment)
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMmaWarps * 32, 3)
outlook_grad_attn_mma_kernel(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ v,
                             const scalar_t* __restrict__ attn, scalar_t* __restrict__ gattn,
                             const OutlookGeom g, const int C, const int d, const int ld,
                             const int64_t windows, const bool softmax, const float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using T = typename MmaType<scalar_t>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // (the fragment loads and stores want 32-byte alignment; the launch adds 32 bytes for it)
  unsigned char* base = smem_raw + (32 - reinterpret_cast<uintptr_t>(smem_raw) % 32) % 32;
  const int KK = g.K * g.K, outs = g.N * KK * KK, packs = C / 8;
  const int rows = kMmaTile * ld;  // a window's staged rows of one map
  scalar_t* gs = reinterpret_cast<scalar_t*>(base);
  scalar_t* vs = gs + kMmaWindows * rows;
  float* tiles = reinterpret_cast<float*>(vs + kMmaWindows * rows);
  scalar_t* as = reinterpret_cast<scalar_t*>(tiles + kMmaWarps * kMmaTile * kMmaTile);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* tile = tiles + warp * kMmaTile * kMmaTile;
  for (int64_t win0 = blockIdx.x * static_cast<int64_t>(kMmaWindows); win0 < windows;
       win0 += static_cast<int64_t>(gridDim.x) * kMmaWindows) {
    const int nw = static_cast<int>(min(static_cast<int64_t>(kMmaWindows), windows - win0));
    const int j0 = static_cast<int>(win0 % g.w);
    const int i0 = static_cast<int>((win0 / g.w) % g.h);
    const int64_t b0 = win0 / (static_cast<int64_t>(g.w) * g.h);
    // 1. the rows (copied into shared memory without registers, all in flight at once; zeros
    // in the padding): item e is window w's position t, channels c .. c + 7
    const int items = nw * KK * packs;
    for (int e = threadIdx.x; e < items; e += kMmaWarps * 32) {
      const int w = e / (KK * packs), t = (e - w * (KK * packs)) / packs, c = (e % packs) * 8;
      int i = i0, j = j0 + w;  // window win0 + w
      int64_t b = b0, pix = 0;
      for (; j >= g.w; j -= g.w) {
        if (++i == g.h) {
          i = 0;
          ++b;
        }
      }
      const bool in = outlook_window_pixel(g, b, i, j, t, pix);
      copy_16_async(gs + w * rows + t * ld + c, gout + pix * C + c, in);
      copy_16_async(vs + w * rows + t * ld + c, v + pix * C + c, in);
    }
    // (with softmax) the windows' weights, consecutive in attn
    if (softmax) {
      const scalar_t* a = attn + win0 * outs;
      const int count = nw * outs;
      for (int e0 = threadIdx.x; e0 < count; e0 += kMmaWeightBatch * kMmaWarps * 32) {
        scalar_t av[kMmaWeightBatch];
#pragma unroll
        for (int u = 0; u < kMmaWeightBatch; ++u) {
          const int e = e0 + u * kMmaWarps * 32;
          av[u] = e < count ? a[e] : scalar_t(0);
        }
#pragma unroll
        for (int u = 0; u < kMmaWeightBatch; ++u) {
          const int e = e0 + u * kMmaWarps * 32;
          if (e < count) as[e] = av[u];
        }
      }
    }
    wait_copies();
    __syncthreads();
    // 2. a warp a (window, head): the product, then its K^2 x K^2 corner out
    for (int pair = warp; pair < nw * g.N; pair += kMmaWarps) {
      const int w = pair / g.N, n = pair - w * g.N;
      wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kMmaTile, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int k0 = 0; k0 < d; k0 += kMmaTile) {
        wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, kMmaTile, T, wmma::row_major> ga;
        wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kMmaTile, T, wmma::col_major> vb;
        wmma::load_matrix_sync(ga, reinterpret_cast<const T*>(gs + w * rows + n * d + k0), ld);
        wmma::load_matrix_sync(vb, reinterpret_cast<const T*>(vs + w * rows + n * d + k0), ld);
        wmma::mma_sync(acc, ga, vb, acc);
      }
      wmma::store_matrix_sync(tile, acc, kMmaTile, wmma::mem_row_major);
      __syncwarp();
      const int head = n * KK * KK;
      scalar_t* out = gattn + (win0 + w) * outs + head;
      if (softmax) {  // (uniform across the block)
        const scalar_t* a = as + w * outs + head;
        for (int o = lane; o < KK * KK; o += 32)
          tile[(o / KK) * kMmaTile + o % KK] *= static_cast<float>(a[o]);
        __syncwarp();
        float row_sum = 0.0f;
        if (lane < KK)
          for (int q = 0; q < KK; ++q) row_sum += tile[lane * kMmaTile + q];
        for (int o0 = 0; o0 < KK * KK; o0 += 32) {  // (every lane, for the shuffle)
          const int o = o0 + lane, m = o / KK;
          const float sum_m = __shfl_sync(0xffffffffu, row_sum, m < KK ? m : 0);
          if (o < KK * KK)
            out[o] = static_cast<scalar_t>(
                scale * (tile[m * kMmaTile + o % KK] - static_cast<float>(a[o]) * sum_m));
        }
      } else {
        for (int o = lane; o < KK * KK; o += 32)
          out[o] = static_cast<scalar_t>(tile[(o / KK) * kMmaTile + o % KK]);
      }
      __syncwarp();  // before the next pair's product overwrites the tile
    }
    __syncthreads();  // before the next windows overwrite the rows
  }
#endif
}

// The gathers (y, and grad_v with A transposed) on tensor cores, for 16-bit types, K = 3, heads
// of a multiple of 16 channels and strides whose windows over a tile fit kMmaGatherWindows (s >=
// 2: VOLO's outlookers): per window (b, i, j) and head n, Eq. 4's window product A V_Delta
// (grad_v: A^T grad_out_Delta) is a 16 x 16 x 16 warp matrix product a 16-channel step (the K^2
// positions padded to 16 with zeros), and Eq. 5's fold sums, per output pixel, the rows of the
// products of the windows covering it. A block takes a tile of kMmaGatherTile x kMmaGatherTile
// output pixels at a time and computes the products of every window covering the tile (at K = 3,
// s = 2: at most 5 x 5 windows for 64 pixels, 1.56 windows a pixel's 1 in the image), a head's
// 16 channels a step:
//   1. stages each window's K^2 source rows of the step's 16 channels (16-byte asynchronous
//      copies, zeros in the padding) and, at a head's first step, its K^2 x K^2 weights (8 loads
//      a thread, issued before their stores) in shared memory;
//   2. a warp a window: the product into a 16 x 16 float tile of shared memory;
//   3. a thread per (pixel, 8 channels): the sum of its row in each covering window's tile, in
//      float, window by window in (i, j) order, and one 16-byte store (with ones, the pixel's
//      (1, 0, ..., 0) after C at the head's first step).
// Pipelined: the rows come in two buffers, and each step's copies of the next step's rows (and
// loads of the next head's weights) are in flight while the step's products and fold run, so
// that a tile waits on memory once, not at each of its steps (12 at VOLO-D1's stage 1).
// The scalar gather's 81 multiply-adds an output value on the FP32 pipe (and a conversion per
// source value) took 167 us a call at VOLO-D1's stage 1 on an H200 (bf16, 2026-11-27), three
// calls a forward + backward of the block; here they are 25 matrix products a tile and step.
constexpr int kMmaGatherTile = 8;
constexpr int kMmaGatherWindows = 25;
constexpr int kMmaGatherLdA = 16, kMmaGatherLdV = 24, kMmaGatherLdO = 20;  // row strides

// Windows along one axis that a tile's kMmaGatherTile pixels may need at most: window i covers
// [s i - p, s i - p + K - 1], so those covering [u0, u0 + T - 1] are at most (T - 1 + K - 1) / s
// + 1 apart.
inline int mma_gather_windows(int K, int s) { return (kMmaGatherTile + K - 2) / s + 1; }

// Shared memory of outlook_gather_mma_kernel: the windows' weights, two buffers of their rows,
// their products' float tiles, the windows' and the tile's tables.
inline size_t mma_gather_smem(size_t elem) {
  return kMmaGatherWindows * (kMmaTile * ((kMmaGatherLdA + 2 * kMmaGatherLdV) * elem +
                                         kMmaGatherLdO * sizeof(float)) +
                              sizeof(int64_t) + 2 * sizeof(int)) +
         4 * kMmaGatherTile * sizeof(int) +
         32;  // (the fragments want 32-byte alignment; the kernel aligns its base)
}

template <bool TRANSPOSED, typename scalar_t>
__global__ void __launch_bounds__(kMmaWarps * 32, 2)
outlook_gather_mma_kernel(const scalar_t* __restrict__ src, const scalar_t* __restrict__ attn,
                          scalar_t* __restrict__ out, const OutlookGeom g, const int C,
                          const int d, const int tiles_h, const int tiles_w, const int64_t tiles,
                          const int ldo, const bool ones) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using T = typename MmaType<scalar_t>::type;
  using pack_t = Pack<scalar_t, 8>;
  using a_layout = std::conditional_t<TRANSPOSED, wmma::col_major, wmma::row_major>;
  constexpr int K = 3, KK = K * K, kPacks = kMmaTile / 8;  // 8-channel packs of a step
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* base = smem_raw + (32 - reinterpret_cast<uintptr_t>(smem_raw) % 32) % 32;
  constexpr int kA = kMmaTile * kMmaGatherLdA, kV = kMmaTile * kMmaGatherLdV;
  constexpr int kO = kMmaTile * kMmaGatherLdO;
  constexpr int kRows = kMmaGatherWindows * kV;  // a buffer of rows
  scalar_t* as = reinterpret_cast<scalar_t*>(base);  // a window's weights: kA apart
  scalar_t* vs = as + kMmaGatherWindows * kA;        // its source rows: kV apart, 2 buffers
  float* os = reinterpret_cast<float*>(vs + 2 * kRows);  // its product: kO apart
  int64_t* win_attn = reinterpret_cast<int64_t*>(os + kMmaGatherWindows * kO);
  int* win_y = reinterpret_cast<int*>(win_attn + kMmaGatherWindows);
  int* win_x = win_y + kMmaGatherWindows;
  int* cover = win_x + kMmaGatherWindows;  // the tile's rows' and columns' windows: 4 x kTile
  constexpr int kThreads = kMmaWarps * 32;
  constexpr int kAItems = (kMmaGatherWindows * KK * KK + kThreads - 1) / kThreads;
  constexpr int kVItems = (kMmaGatherWindows * KK * kPacks + kThreads - 1) / kThreads;
  const int warp = threadIdx.x / 32;
  // Zeros once where no step writes: the weights' rows and columns past K^2 and the source rows
  // past K^2 (and, until the first staging, everywhere: the first tile's barrier orders them).
  // (as and vs are adjacent, 32-byte aligned, whole 16-byte vectors: 16-byte stores)
  constexpr int kZeroVectors = (kMmaGatherWindows * kA + 2 * kRows) * 2 / 16;
  static_assert((kMmaGatherWindows * kA + 2 * kRows) * 2 % 16 == 0, "whole vectors");
  for (int e = threadIdx.x; e < kZeroVectors; e += blockDim.x)
    store_pack<4>(reinterpret_cast<uint32_t*>(as) + 4 * e, Pack<uint32_t, 4>{});
  const int steps = d / kMmaTile, total = g.N * steps;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int tx = static_cast<int>(tile % tiles_w);
    const int ty = static_cast<int>((tile / tiles_w) % tiles_h);
    const int64_t b = tile / (static_cast<int64_t>(tiles_w) * tiles_h);
    const int u0 = ty * kMmaGatherTile, x0 = tx * kMmaGatherTile;
    const int th = min(kMmaGatherTile, g.H - u0), tw = min(kMmaGatherTile, g.W - x0);
    // the windows covering the tile: rows [ilo, ihi], columns [jlo, jhi] (none where K < s
    // leaves the tile uncovered; its pixels are then 0)
    int ilo, ihi, jlo, jhi, unused;
    outlook_covering(u0, g.h, K, g.p, g.s, ilo, unused);
    outlook_covering(u0 + th - 1, g.h, K, g.p, g.s, unused, ihi);
    outlook_covering(x0, g.w, K, g.p, g.s, jlo, unused);
    outlook_covering(x0 + tw - 1, g.w, K, g.p, g.s, unused, jhi);
    const int nwj = max(jhi - jlo + 1, 0), nwin = max(ihi - ilo + 1, 0) * nwj;
    // each window's weights (the offset of its head 0) and the origin of its positions; the
    // windows covering each row and each column of the tile (the fold's, without a division a
    // pixel and step), once the previous tile's fold has read them
    __syncthreads();
    for (int w = threadIdx.x; w < nwin; w += blockDim.x) {
      const int i = ilo + w / nwj, j = jlo + w % nwj;
      win_attn[w] = ((b * g.h + i) * g.w + j) * g.N * (KK * KK);
      win_y[w] = g.s * i - g.p;
      win_x[w] = g.s * j - g.p;
    }
    if (threadIdx.x < kMmaGatherTile) {
      const int r = threadIdx.x;
      if (r < th) outlook_covering(u0 + r, g.h, K, g.p, g.s, cover[r], cover[kMmaGatherTile + r]);
      if (r < tw)
        outlook_covering(x0 + r, g.w, K, g.p, g.s, cover[2 * kMmaGatherTile + r],
                         cover[3 * kMmaGatherTile + r]);
    }
    __syncthreads();
    // The copies of step `step`'s source rows into buffer `step % 2` (16-byte asynchronous
    // copies: with 16-bit elements and zeros chosen element by element in registers, nvcc had
    // stored a pack in pieces, sm_90), and the loads and stores of head n's weights.
    auto copy_rows = [&](const int step) {
      const int c0 = step * kMmaTile;  // (heads are d = steps * 16 channels apart)
      scalar_t* rows = vs + (step % 2) * kRows;
#pragma unroll
      for (int k = 0; k < kVItems; ++k) {
        const int e = threadIdx.x + k * kThreads, w = e / (KK * kPacks);
        const int t = (e - w * (KK * kPacks)) / kPacks, c = (e % kPacks) * 8;
        if (w < nwin) {
          const int y = win_y[w] + t / K, x = win_x[w] + t % K;
          const bool in = y >= 0 && y < g.H && x >= 0 && x < g.W;
          copy_16_async(rows + w * kV + t * kMmaGatherLdV + c,
                        in ? src + ((b * g.H + y) * g.W + x) * C + c0 + c : src, in);
        }
      }
    };
    scalar_t a_val[kAItems];
    auto load_weights = [&](const int n) {
#pragma unroll
      for (int k = 0; k < kAItems; ++k) {
        const int e = threadIdx.x + k * kThreads;
        a_val[k] = e < nwin * KK * KK
                       ? attn[win_attn[e / (KK * KK)] + n * (KK * KK) + e % (KK * KK)]
                       : scalar_t(0);
      }
    };
    auto store_weights = [&]() {
#pragma unroll
      for (int k = 0; k < kAItems; ++k) {
        const int e = threadIdx.x + k * kThreads, w = e / (KK * KK);
        const int r = e - w * (KK * KK);
        if (e < nwin * KK * KK) as[w * kA + (r / KK) * kMmaGatherLdA + r % KK] = a_val[k];
      }
    };
    // step 0's rows and head 0's weights
    copy_rows(0);
    load_weights(0);
    store_weights();
    wait_copies();
    __syncthreads();
    for (int step = 0; step < total; ++step) {
      const int n = step / steps, c0 = step * kMmaTile;
      const bool next_head = step + 1 < total && (step + 1) % steps == 0;
      // 1. the next step's rows (into the other buffer, which the previous step's products
      // have read) and the next head's weights (into registers: this step's products read
      // the current head's), in flight during this step's products and fold
      if (step + 1 < total) copy_rows(step + 1);
      if (next_head) load_weights(n + 1);
      // 2. a warp a window: its product, output positions as rows
      const scalar_t* rows = vs + (step % 2) * kRows;
      for (int w = warp; w < nwin; w += kMmaWarps) {
        wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, kMmaTile, T, a_layout> fa;
        wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kMmaTile, T, wmma::row_major> fv;
        wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kMmaTile, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        wmma::load_matrix_sync(fa, reinterpret_cast<const T*>(as + w * kA), kMmaGatherLdA);
        wmma::load_matrix_sync(fv, reinterpret_cast<const T*>(rows + w * kV), kMmaGatherLdV);
        wmma::mma_sync(acc, fa, fv, acc);
        wmma::store_matrix_sync(os + w * kO, acc, kMmaGatherLdO, wmma::mem_row_major);
      }
      __syncthreads();  // the products are in os; the weights and this buffer are read
      if (next_head) store_weights();
      // 3. the fold: a thread per (pixel, 8 channels) of the tile
      constexpr int kItems = kMmaGatherTile * kMmaGatherTile * kPacks;
      for (int e = threadIdx.x; e < kItems; e += blockDim.x) {
        const int px = e / kPacks, c = (e % kPacks) * 8;
        const int r = px / kMmaGatherTile, q = px % kMmaGatherTile;
        if (r >= th || q >= tw) continue;
        const int u = u0 + r, x = x0 + q;
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = 0.0f;
        const int lo_i = cover[r], hi_i = cover[kMmaGatherTile + r];
        const int lo_j = cover[2 * kMmaGatherTile + q], hi_j = cover[3 * kMmaGatherTile + q];
        for (int i = lo_i; i <= hi_i; ++i)
          for (int j = lo_j; j <= hi_j; ++j) {
            const int pos = (u - g.s * i + g.p) * K + (x - g.s * j + g.p);
            const float* o = os + ((i - ilo) * nwj + (j - jlo)) * kO + pos * kMmaGatherLdO + c;
            const Pack<float, 4> lo = load_pack<4>(o), hi = load_pack<4>(o + 4);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              acc[k] += lo.v[k];
              acc[k + 4] += hi.v[k];
            }
          }
        pack_t ov;
#pragma unroll
        for (int k = 0; k < 8; ++k) ov.v[k] = static_cast<scalar_t>(acc[k]);
        scalar_t* o = out + ((b * g.H + u) * g.W + x) * (TRANSPOSED ? C : ldo);
        store_pack<8>(o + c0 + c, ov);
        if (!TRANSPOSED && ones && c0 == 0 && c == 0) {
#pragma unroll
          for (int k = 0; k < 8; ++k) ov.v[k] = scalar_t(k == 0 ? 1 : 0);
          static_assert(kOnesChannels == 8, "the ones are one pack");
          store_pack<8>(o + C, ov);
        }
      }
      wait_copies();
      __syncthreads();  // the next step's rows and weights are in; the fold has read os
    }
  }
#endif
}

// grad_attn fallback when the staged rows exceed the shared-memory budget: one thread per output,
// reading grad_out and v from global memory; out_t: scalar_t, or the accumulation type (the
// logits' gradient is computed from it)
template <typename scalar_t, typename out_t = scalar_t>
__global__ void __launch_bounds__(kGatherThreads)
outlook_grad_attn_kernel(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ v,
                         out_t* __restrict__ gattn, const OutlookGeom g, const int C,
                         const int d, const int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int KK = g.K * g.K;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t t = idx;
    const int q = static_cast<int>(t % KK); t /= KK;
    const int m = static_cast<int>(t % KK); t /= KK;
    const int n = static_cast<int>(t % g.N); t /= g.N;
    const int j = static_cast<int>(t % g.w); t /= g.w;
    const int i = static_cast<int>(t % g.h);
    const int64_t b = t / g.h;
    int64_t pm, pq;
    acc_t sum = 0;
    if (outlook_window_pixel(g, b, i, j, m, pm) && outlook_window_pixel(g, b, i, j, q, pq)) {
      const scalar_t* gr = gout + pm * C + n * d;
      const scalar_t* vr = v + pq * C + n * d;
      for (int c = 0; c < d; ++c) sum += static_cast<acc_t>(gr[c]) * static_cast<acc_t>(vr[c]);
    }
    gattn[idx] = static_cast<out_t>(sum);
  }
}

// The s x s average pooling of x (B, H, W, C), ceil mode, no padding: out (B, h, w, C), h =
// ceil(H / s), each cell the mean of the pixels of its window inside the image (the last row
// and column of cells may hold fewer), summed in row-major order in the accumulation type and
// then divided, as PyTorch's avg_pool2d does. One thread per VEC consecutive channels of one
// cell, threads along the channels (coalesced 16-byte loads where C and the pointers allow);
// as outlook_gather_kernel, blockIdx.y walks the rows of cells (b, i), blockIdx.x / threadIdx.x
// cover (j, channel pack) of a row (32-bit index arithmetic: outlook_pool_check bounds it).
// (The gather's bound, 64 registers: with the thread count's alone ptxas spilled 4-16 bytes in
// six of the eight variants, sm_80 and sm_90, at 32-48 registers.)
template <int VEC, typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads, kGatherMinBlocks)
outlook_pool_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, const int H,
                    const int W, const int h, const int w, const int C, const int s,
                    const int rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  int j, c0;
  if (!row_item<VEC>(w, C, j, c0)) return;
  const int x0 = j * s, x1 = x0 + s < W ? x0 + s : W;
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {
    const int b = row / h, i = row - b * h;
    const int y0 = i * s, y1 = y0 + s < H ? y0 + s : H;
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    for (int y = y0; y < y1; ++y)
      for (int xx = x0; xx < x1; ++xx) {
        const pack_t v =
            load_pack<VEC>(x + (static_cast<int64_t>(b * H + y) * W + xx) * C + c0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += static_cast<acc_t>(v.v[k]);
      }
    const acc_t count = static_cast<acc_t>((y1 - y0) * (x1 - x0));
    pack_t o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(acc[k] / count);
    store_pack<VEC>(out + (static_cast<int64_t>(row) * w + j) * C + c0, o);
  }
}

// softmax(scale L) of one group of NT logits, in the accumulation type and in registers: the
// group's maximum, the sum of the exponentials past it, each one divided by the sum, as
// PyTorch's softmax does. (in may be o: every logit is read before the first write.)
template <int NT, typename scalar_t>
__device__ __forceinline__ void softmax_group(const scalar_t* in, scalar_t* o,
                                              const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t t[NT];
  acc_t top = -std::numeric_limits<acc_t>::infinity(), sum = 0;
#pragma unroll
  for (int q = 0; q < NT; ++q) {
    t[q] = scale * static_cast<acc_t>(in[q]);
    top = t[q] > top ? t[q] : top;
  }
#pragma unroll
  for (int q = 0; q < NT; ++q) {
    t[q] = op_exp(t[q] - top);
    sum += t[q];
  }
#pragma unroll
  for (int q = 0; q < NT; ++q) o[q] = static_cast<scalar_t>(t[q] / sum);
}

// softmax(scale L) over each group of n consecutive logits (rows of L), a thread a group, read
// and written in place in global memory. NT = n when fixed at compile time (the group in
// registers: softmax_group), 0 for any n (three passes over the group, the exponentials
// computed twice). outlook_softmax_tiled_kernel serves K = 3 where the pointers allow.
template <int NT, typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads)
outlook_softmax_kernel(const scalar_t* __restrict__ logits, scalar_t* __restrict__ out,
                       const int64_t groups, const int n, const at::opmath_type<scalar_t> scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int len = NT > 0 ? NT : n;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < groups;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t* in = logits + r * len;
    scalar_t* o = out + r * len;
    if constexpr (NT > 0) {
      softmax_group<NT>(in, o, scale);
    } else {  // (loops not unrolled: double's exp unrolled spilled, sm_80 and sm_90)
      acc_t top = -std::numeric_limits<acc_t>::infinity(), sum = 0;
      for (int q = 0; q < len; ++q) {
        const acc_t t = scale * static_cast<acc_t>(in[q]);
        top = t > top ? t : top;
      }
#pragma unroll 1
      for (int q = 0; q < len; ++q) sum += op_exp(scale * static_cast<acc_t>(in[q]) - top);
#pragma unroll 1
      for (int q = 0; q < len; ++q)
        o[q] = static_cast<scalar_t>(op_exp(scale * static_cast<acc_t>(in[q]) - top) / sum);
    }
  }
}

// dst[0, count) = src[0, count), by a block's threads: V-element vectors (both pointers aligned
// to a vector), the tail past the last whole vector in single elements.
template <int V, typename T>
__device__ __forceinline__ void block_copy(T* dst, const T* src, const int count) {
  const int vecs = count / V;
  for (int i = threadIdx.x; i < vecs; i += blockDim.x)
    store_pack<V>(dst + i * V, load_pack<V>(src + i * V));
  for (int i = vecs * V + threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
}

// The same for groups of NT, a block's kGatherThreads groups at a time through shared memory:
// the tile's NT * kGatherThreads logits come in and go out in 16-byte vectors (the tail of the
// last tile in single elements), each thread's group computed in place in between. A thread a
// group straight from global memory (outlook_softmax_kernel) read and wrote 2-byte elements 18
// bytes apart across a warp in bf16: 54 us a call at VOLO-D1's stage 1 on an H200 (48 MB
// moved, 0.9 TB/s). Needs 16-byte aligned pointers (each tile then starts on a 16-byte boundary:
// kGatherThreads * NT elements is a multiple of a vector).
template <int NT, typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads)
outlook_softmax_tiled_kernel(const scalar_t* __restrict__ logits, scalar_t* __restrict__ out,
                             const int64_t groups, const at::opmath_type<scalar_t> scale) {
  constexpr int V = kPack16<scalar_t>;
  static_assert((kGatherThreads * NT) % V == 0, "a tile must hold whole vectors");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);
  for (int64_t first = blockIdx.x * static_cast<int64_t>(kGatherThreads); first < groups;
       first += static_cast<int64_t>(gridDim.x) * kGatherThreads) {
    const int rows = static_cast<int>(std::min<int64_t>(kGatherThreads, groups - first));
    block_copy<V>(tile, logits + first * NT, rows * NT);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < rows)
      softmax_group<NT>(tile + threadIdx.x * NT, tile + threadIdx.x * NT, scale);
    __syncthreads();
    block_copy<V>(out + first * NT, tile, rows * NT);
    __syncthreads();  // before the next tile overwrites this one
  }
}

// out = grad + the backward of outlook_pool_kernel for pooled: out(b, y, x) = grad(b, y, x) +
// pooled(b, y / s, x / s) / (the pixel count of that cell). One thread per VEC consecutive
// channels of one pixel; blockIdx.y walks the image rows (b, y), blockIdx.x / threadIdx.x cover
// (x, channel pack) of a row, as outlook_pool_kernel's cells.
template <int VEC, typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads, kGatherMinBlocks)
outlook_unpool_add_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ pooled,
                          scalar_t* __restrict__ out, const int H, const int W, const int h,
                          const int w, const int C, const int s, const int rows) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  int x, c0;
  if (!row_item<VEC>(W, C, x, c0)) return;
  const int j = x / s, cols = (j + 1) * s < W ? s : W - j * s;
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {
    const int b = row / H, y = row - b * H, i = y / s;
    const acc_t count = static_cast<acc_t>(((i + 1) * s < H ? s : H - i * s) * cols);
    const int64_t off = (static_cast<int64_t>(row) * W + x) * C + c0;
    const pack_t g = load_pack<VEC>(grad + off);
    const pack_t p = load_pack<VEC>(pooled + (static_cast<int64_t>(b * h + i) * w + j) * C + c0);
    pack_t o;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      o.v[k] = static_cast<scalar_t>(static_cast<acc_t>(g.v[k]) +
                                     static_cast<acc_t>(p.v[k]) / count);
    store_pack<VEC>(out + off, o);
  }
}

// Launches a kernel whose blockIdx.y walks `rows` rows (a grid-stride loop past 65535) and whose
// blockIdx.x / threadIdx.x cover a row's `items` (outlook_pool_kernel, outlook_unpool_add_kernel):
// a row's items over as few blocks as kGatherThreads allows, split evenly.
template <typename Kernel, typename... Args>
void launch_rows(Kernel kernel, const int items, const int64_t rows, Args... args) {
  const int blocks = (items + kGatherThreads - 1) / kGatherThreads;
  const int threads = ((items + blocks - 1) / blocks + 31) / 32 * 32;
  launch::launch(kernel,
                 dim3(static_cast<unsigned>(blocks),
                      static_cast<unsigned>(std::min<int64_t>(rows, 65535))),
                 static_cast<unsigned>(threads), 0, args...);
}

// MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1 puts the gathers on the tensor-core kernel where its
// geometry allows (unset or 0: the scalar kernel). Off by default: on an H200 (2026-11-27,
// VOLO-D1's stage 1, batch 128, bf16) the tensor-core gather took 222-228 µs a call against
// the scalar one's 167 µs (the seventh lease's), the outlook op's forward + backward 2.48 ms
// against 2.35 ms with the scalar gathers in the same turns; kept to time and profile the two.
inline bool tensor_core_gather_from_env() {
  const char* text = std::getenv("MMATTN_OUTLOOK_TENSOR_CORE_GATHER");
  if (text == nullptr || *text == '\0' || std::strcmp(text, "0") == 0) return false;
  TORCH_CHECK(std::strcmp(text, "1") == 0,
              "MMATTN_OUTLOOK_TENSOR_CORE_GATHER must be 0 or 1 (unset: 0), got '", text, "'");
  return true;
}

// Blocks for a kernel whose blocks loop over `units` (tiles, groups of windows): one wave of the
// blocks the SMs hold at once, at most, so that each block's set-up serves several units (and
// the CPU emulation's few blocks run the loop).
template <typename... KArgs>
unsigned wave_grid(void (*kernel)(KArgs...), unsigned threads, size_t smem, int64_t units) {
  const int64_t wave = static_cast<int64_t>(launch::resident_blocks(kernel, threads, smem)) *
                       launch::device_attribute(launch::Attr::kMultiProcessors);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(units, wave)));
}

// Whether the device runs a warp-matrix kernel with `smem` bytes of shared memory a block:
// compute capability 8.0 on (bf16 wmma) and that much shared memory (the opt-in amount).
inline bool tensor_cores_hold(const size_t smem) {
  return launch::device_attribute(launch::Attr::kComputeMajor) >= 8 &&
         smem <= static_cast<size_t>(launch::device_attribute(launch::Attr::kSharedMemoryOptin));
}

// Whether launch_gather takes the tensor-core kernel (outlook_gather_mma_kernel) for a 16-bit
// src of the geometry g (d channels a head) into out: K = 3, whole 16-channel steps, a tile's
// windows within kMmaGatherWindows, 16-byte aligned maps, compute capability 8.0 on, the
// shared memory the device has, and MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1.
inline bool gather_on_tensor_cores(const OutlookGeom& g, const int d, const void* src,
                                   const void* out, const size_t elem) {
  const int windows = mma_gather_windows(g.K, g.s);
  return elem == 2 && g.K == 3 && d % kMmaTile == 0 && tensor_core_gather_from_env() &&
         windows * windows <= kMmaGatherWindows && all_aligned({src, out}, 16) &&
         tensor_cores_hold(mma_gather_smem(elem));
}

// out: (B, H, W, C), or with ones (B, H, W, C + kOnesChannels) (outlook_gather_kernel)
template <bool TRANSPOSED, typename scalar_t>
void launch_gather(const at::Tensor& src, const at::Tensor& attn, const at::Tensor& out,
                   const OutlookGeom& g, const bool ones = false) {
  if (out.numel() == 0) return;
  const int C = static_cast<int>(src.size(3)), d = C / g.N;
  const int ldo = C + (ones ? kOnesChannels : 0);
  const int64_t rows = src.size(0) * g.H;
  const scalar_t* sp = src.const_data_ptr<scalar_t>();
  const scalar_t* ap = attn.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (gather_on_tensor_cores(g, d, sp, op, sizeof(scalar_t))) {
      const int tiles_h = (g.H + kMmaGatherTile - 1) / kMmaGatherTile;
      const int tiles_w = (g.W + kMmaGatherTile - 1) / kMmaGatherTile;
      const int64_t tiles = src.size(0) * tiles_h * tiles_w;
      const size_t smem = mma_gather_smem(sizeof(scalar_t));
      auto kernel = outlook_gather_mma_kernel<TRANSPOSED, scalar_t>;
      if (smem > static_cast<size_t>(kSmemBudget)) launch::allow_shared_memory(kernel, smem);
      launch::launch(kernel, dim3(wave_grid(kernel, kMmaWarps * 32, smem, tiles)),
                     kMmaWarps * 32, smem, sp, ap, op, g, C, d, tiles_h, tiles_w, tiles, ldo,
                     ones);
      return;
    }
  }
  // Packs of VEC channels (16 bytes at most) where the head size and the pointers allow.
  auto fits = [&](int vec) {
    const size_t bytes = vec * sizeof(scalar_t);
    return d % vec == 0 && is_aligned(sp, bytes) && is_aligned(op, bytes);
  };
  auto run = [&](auto vec_tag, auto k_tag) {
    constexpr int VEC = decltype(vec_tag)::value, KT = decltype(k_tag)::value;
    const int items = g.W * (C / VEC);
    const int threads = std::min(kGatherThreads, (items + 31) / 32 * 32);
    const dim3 grid((items + threads - 1) / threads,
                    static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
    launch::launch(outlook_gather_kernel<TRANSPOSED, VEC, KT, scalar_t>, grid,
                   static_cast<unsigned>(threads), 0, sp, ap, op, g, C, d, rows, ldo, ones);
  };
  // The unrolled K = 3 path (VOLO's) moves 16-byte packs; any other K 8-byte packs at most (with
  // 16, its window loops need more than the 64 registers of kGatherMinBlocks and spill, sm_80).
  constexpr int kWide = kPack16<scalar_t>, kNarrow = kWide > 1 ? kWide / 2 : 1;
  if (g.K == 3 && fits(kWide)) return run(Int<kWide>{}, Int<3>{});
  if (fits(kNarrow)) return run(Int<kNarrow>{}, Int<0>{});
  if constexpr (kNarrow > 1) run(Int<1>{}, Int<0>{});
}

// grad_attn into gattn; with softmax_scale, the gradient of the logits instead (see the top)
template <typename scalar_t>
void launch_grad_attn(const at::Tensor& gout, const at::Tensor& v, const at::Tensor& attn,
                      const at::Tensor& gattn, const OutlookGeom& g,
                      const std::optional<double>& softmax_scale) {
  if (gattn.numel() == 0) return;
  using acc_t = at::opmath_type<scalar_t>;
  const int C = static_cast<int>(v.size(3)), d = C / g.N, KK = g.K * g.K;
  const int ld = C | 1;  // odd row stride: conflict-free column reads
  const bool softmax = softmax_scale.has_value();
  const double scale = softmax_scale.value_or(1.0);
  const int64_t smem = (2 * static_cast<int64_t>(KK) * ld +
                        (softmax ? static_cast<int64_t>(g.N) * KK * (KK + 1) : 0)) *
                       sizeof(acc_t);
  const scalar_t* gp = gout.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* ap = attn.const_data_ptr<scalar_t>();
  scalar_t* op = gattn.mutable_data_ptr<scalar_t>();
  const int64_t windows = v.size(0) * static_cast<int64_t>(g.h) * g.w;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    // tensor cores (compute capability 8.0 on: bf16) where the window's rows fit a tile and the
    // heads its steps, with 16-byte copies of the rows
    const int ld_mma = (C + 15) / 16 * 16 + 8;
    const size_t smem_mma = grad_attn_mma_smem(ld_mma, g.N * KK * KK, sizeof(scalar_t));
    if (KK <= kMmaTile && d % kMmaTile == 0 && all_aligned({gp, vp}, 16) &&
        tensor_cores_hold(smem_mma)) {
      auto kernel = outlook_grad_attn_mma_kernel<scalar_t>;
      if (smem_mma > static_cast<size_t>(kSmemBudget))
        launch::allow_shared_memory(kernel, smem_mma);
      const int64_t groups = (windows + kMmaWindows - 1) / kMmaWindows;
      launch::launch(kernel, dim3(wave_grid(kernel, kMmaWarps * 32, smem_mma, groups)),
                     kMmaWarps * 32, smem_mma, gp, vp, ap, op, g, C, d,
                     ld_mma, windows, softmax, static_cast<float>(scale));
      return;
    }
  }
  if (smem <= kSmemBudget) {
    const int outs = g.N * KK * KK;
    const int threads = std::max(128, std::min(kWindowThreads, (outs + 31) / 32 * 32));
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(windows, 1 << 30));
    launch::launch(outlook_grad_attn_smem_kernel<scalar_t>, dim3(blocks),
                   static_cast<unsigned>(threads), static_cast<size_t>(smem), gp, vp, ap, op, g,
                   C, d, ld, windows, softmax, scale);
  } else {
    const int64_t total = gattn.numel();
    const auto blocks = static_cast<unsigned>(
        std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads, 1 << 20));
    if (!softmax) {
      launch::launch(outlook_grad_attn_kernel<scalar_t>, dim3(blocks),
                     static_cast<unsigned>(kGatherThreads), 0, gp, vp, op, g, C, d, total);
      return;
    }
    // rows past the shared-memory budget: grad_A in the accumulation type, PyTorch's softmax
    // backward and the scaling in it, rounded to scalar_t once (as the kernels above round)
    const auto acc_type = at::toOpMathType(gattn.scalar_type());
    const at::Tensor acc = at::empty(gattn.sizes(), gattn.options().dtype(acc_type));
    launch::launch(outlook_grad_attn_kernel<scalar_t, acc_t>, dim3(blocks),
                   static_cast<unsigned>(kGatherThreads), 0, gp, vp,
                   acc.mutable_data_ptr<acc_t>(), g, C, d, total);
    gattn.copy_(at::_softmax_backward_data(acc, attn.to(acc_type), -1, acc_type).mul_(scale));
  }
}

}  // namespace outlook_detail

// mmattn::outlook_pool: x (B, H, W, C) pooled s x s (outlook_pool_kernel).
at::Tensor outlook_pool_cuda(const at::Tensor& x, int64_t stride) {
  int64_t h = 0, w = 0;  // (not structured bindings: the lambda below captures them)
  std::tie(h, w) = outlook_pool_check(x, stride);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const launch::DeviceGuard device_guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({B, h, w, C}, xc.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "outlook_pool_cuda",
                                  [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vectors = C % kPack16<scalar_t> == 0 && all_aligned({xp, op}, 16);
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t rows = B * h;   // of cells; a row's items: (j, pack)
      outlook_detail::launch_rows(outlook_detail::outlook_pool_kernel<VEC, scalar_t>,
                                  static_cast<int>(w * (C / VEC)), rows, xp, op,
                                  static_cast<int>(H), static_cast<int>(W), static_cast<int>(h),
                                  static_cast<int>(w), static_cast<int>(C),
                                  static_cast<int>(stride), static_cast<int>(rows));
    });
  });
  return out;
}

// mmattn::outlook_softmax: softmax(scale L) over L's groups of K^2 (K = 3 with 16-byte aligned
// pointers: outlook_softmax_tiled_kernel; else outlook_softmax_kernel).
at::Tensor outlook_softmax_cuda(const at::Tensor& logits, int64_t kernel_size, double scale) {
  const int64_t groups = outlook_softmax_check(logits, kernel_size);
  const launch::DeviceGuard device_guard(logits.device());
  const at::Tensor lc = logits.contiguous();
  at::Tensor out = at::empty(lc.sizes(), lc.options());
  if (groups == 0) return out;
  const int n = static_cast<int>(kernel_size * kernel_size);
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(
      (groups + outlook_detail::kGatherThreads - 1) / outlook_detail::kGatherThreads, 1 << 20));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "outlook_softmax_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = lc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const auto threads = static_cast<unsigned>(outlook_detail::kGatherThreads);
    auto run = [&](auto n_tag) {
      launch::launch(outlook_detail::outlook_softmax_kernel<decltype(n_tag)::value, scalar_t>,
                     dim3(blocks), threads, 0, lp, op, groups, n, static_cast<acc_t>(scale));
    };
    if (n == 9 && is_aligned(lp, 16) && is_aligned(op, 16))
      launch::launch(outlook_detail::outlook_softmax_tiled_kernel<9, scalar_t>, dim3(blocks),
                     threads, outlook_detail::kGatherThreads * 9 * sizeof(scalar_t), lp, op,
                     groups, static_cast<acc_t>(scale));
    else if (n == 9)
      run(Int<9>{});
    else
      run(Int<0>{});
  });
  return out;
}

// mmattn::outlook_unpool_add: grad + the pooling's backward of pooled (outlook_unpool_add_kernel).
at::Tensor outlook_unpool_add_cuda(const at::Tensor& grad, const at::Tensor& pooled,
                                   int64_t stride) {
  outlook_unpool_add_check(grad, pooled, stride);
  const int64_t B = grad.size(0), H = grad.size(1), W = grad.size(2), C = grad.size(3);
  const int64_t h = pooled.size(1), w = pooled.size(2);
  const launch::DeviceGuard device_guard(grad.device());
  const at::Tensor gc = grad.contiguous(), pc = pooled.contiguous();
  at::Tensor out = at::empty(gc.sizes(), gc.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "outlook_unpool_add_cuda", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* pp = pc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vectors = C % kPack16<scalar_t> == 0 && all_aligned({gp, pp, op}, 16);
    with_vectors<scalar_t>(vectors, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int64_t rows = B * H;   // of pixels; a row's items: (x, pack)
      outlook_detail::launch_rows(outlook_detail::outlook_unpool_add_kernel<VEC, scalar_t>,
                                  static_cast<int>(W * (C / VEC)), rows, gp, pp, op,
                                  static_cast<int>(H), static_cast<int>(W), static_cast<int>(h),
                                  static_cast<int>(w), static_cast<int>(C),
                                  static_cast<int>(stride), static_cast<int>(rows));
    });
  });
  return out;
}

at::Tensor outlook_fwd_cuda(const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size,
                            int64_t padding, int64_t stride, bool ones_column) {
  const OutlookGeom g = outlook_check("outlook_fwd", nullptr, v, attn, kernel_size, padding,
                                      stride);
  const launch::DeviceGuard device_guard(v.device());
  const at::Tensor vc = v.contiguous(), ac = attn.contiguous();
  at::Tensor y = at::empty({vc.size(0), vc.size(1), vc.size(2),
                            vc.size(3) + (ones_column ? kOnesChannels : 0)},
                           vc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "outlook_fwd_cuda",
                                  [&] {
    outlook_detail::launch_gather<false, scalar_t>(vc, ac, y, g, ones_column);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> outlook_bwd_cuda(const at::Tensor& grad_out,
                                                    const at::Tensor& v, const at::Tensor& attn,
                                                    int64_t kernel_size, int64_t padding,
                                                    int64_t stride,
                                                    std::optional<double> softmax_scale) {
  const OutlookGeom g = outlook_check("outlook_bwd", &grad_out, v, attn, kernel_size, padding,
                                      stride);
  const launch::DeviceGuard device_guard(v.device());
  const at::Tensor gc = grad_out.contiguous(), vc = v.contiguous(), ac = attn.contiguous();
  at::Tensor grad_v = at::empty(vc.sizes(), vc.options());
  at::Tensor grad_attn = at::empty(ac.sizes(), ac.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "outlook_bwd_cuda",
                                  [&] {
    outlook_detail::launch_gather<true, scalar_t>(gc, ac, grad_v, g);
    outlook_detail::launch_grad_attn<scalar_t>(gc, vc, ac, grad_attn, g, softmax_scale);
  });
  return {grad_v, grad_attn};
}

}  // namespace mmattn

