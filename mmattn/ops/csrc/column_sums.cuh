// Sums over the rows of a (rows x C) row-major gradient, a column each: a linear layer's bias
// gradient Σ_r g[r][c], and LayerNorm's affine gradients Σ_r g[r][c] x̂[r][c] (the weight's)
// and Σ_r g[r][c] (the bias's), x̂[r][c] = (x[r][c] - μ_r) σ_r⁻¹ from the forward's row
// statistics. PyTorch's kernels for these were the largest kernels of mmattn's VOLO-D1 training
// step that compiled timm does not pay (an H100, batch 128, bf16, 2026-11-26: its column
// reductions for the bias gradients 3.4 ms a step, LayerNorm's weight-gradient kernel 3.1 ms;
// on an H200 `grad_out.sum(0)` of a [100352, 192] bf16 gradient took 123 µs, 0.31 TB/s).
//
// Two launches: a pass over the rows, each block summing its share of them into a row of
// partial sums in the accumulation type (blocks split the rows, grid.y the columns; a thread
// reads 16-byte vectors of one column group, kUnroll rows ahead), then a small kernel summing
// those rows per column into the outputs, in g's dtype. The pass reads g (and x) once; the
// partial sums are 8 x SMs rows at most.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "column_sums.h"
#include "column_sums_args.h"
#include "column_sums_aten.h"
#include "vector.cuh"

namespace mmattn {
namespace colsum {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;       // rows a thread loads before it adds
// the pass's blocks an SM, at most (as many as its registers allow: 6 for bf16's sums at 40
// registers, 4 for LayerNorm's at 64): the loads in flight that the HBM's rate needs (ptxas
// issues two rows' 16-byte loads a thread before the first add; 6 x 256 x 32 bytes = 48 KB an
// SM, where an H200's 4.8 TB/s x about 0.8 µs over 132 SMs asks for about 29 KB)
constexpr int kBlocksPerSM = 8;
constexpr int kFinishColumns = 32, kFinishLanes = kThreads / kFinishColumns;
constexpr int64_t kMaxTiles = 65535;  // a grid's y

extern __shared__ __align__(16) unsigned char smem_raw[];

// Shared memory of the pass: each thread's VEC sums (two sets with NORM).
template <typename acc_t, int VEC, bool NORM>
constexpr size_t pass_smem() {
  return sizeof(acc_t) * kThreads * VEC * (NORM ? 2 : 1);
}

// partial[b][part][c], part 0 Σ g, part 1 (NORM) Σ g x̂, over block b's rows: rows
// b·lanes + lane + k·gridDim.x·lanes. A block's threads are `lanes` rows of `tile` column
// groups of VEC columns (tile·lanes <= kThreads), grid.y the tiles of columns.
template <typename T, typename acc_t, int VEC, bool NORM>
__global__ void __launch_bounds__(kThreads)
    column_partials_kernel(const T* __restrict__ g, const T* __restrict__ x,
                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                           const int64_t rows, const int C, const int tile,
                           acc_t* __restrict__ partial) {
  constexpr int kParts = NORM ? 2 : 1;
  const int lanes = kThreads / tile;
  const int gt = static_cast<int>(threadIdx.x) % tile;
  const int lane = static_cast<int>(threadIdx.x) / tile;
  const int first = static_cast<int>(blockIdx.y) * tile * VEC;  // the tile's first column
  const int col = first + gt * VEC;
  acc_t sum[VEC], sumx[VEC];
  for (int k = 0; k < VEC; ++k) sum[k] = sumx[k] = acc_t(0);
  if (lane < lanes && col < C) {
    const int64_t step = static_cast<int64_t>(gridDim.x) * lanes;
    int64_t r = static_cast<int64_t>(blockIdx.x) * lanes + lane;
    auto add = [&](const Pack<T, VEC>& gp, const Pack<T, VEC>& xp, acc_t mu, acc_t rs) {
      for (int k = 0; k < VEC; ++k) {
        const acc_t gv = static_cast<acc_t>(gp.v[k]);
        sum[k] += gv;
        if constexpr (NORM) sumx[k] += gv * ((static_cast<acc_t>(xp.v[k]) - mu) * rs);
      }
    };
    for (; r + (kUnroll - 1) * step < rows; r += kUnroll * step) {
      Pack<T, VEC> gp[kUnroll], xp[kUnroll];
      acc_t mu[kUnroll], rs[kUnroll];
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t at = (r + u * step) * C + col;
        gp[u] = load_pack<VEC>(g + at);
        if constexpr (NORM) {
          xp[u] = load_pack<VEC>(x + at);
          mu[u] = mean[r + u * step];
          rs[u] = rstd[r + u * step];
        }
      }
      for (int u = 0; u < kUnroll; ++u) {
        if constexpr (NORM)
          add(gp[u], xp[u], mu[u], rs[u]);
        else
          add(gp[u], gp[u], acc_t(0), acc_t(0));
      }
    }
    for (; r < rows; r += step) {
      const int64_t at = r * C + col;
      const Pack<T, VEC> gp = load_pack<VEC>(g + at);
      if constexpr (NORM)
        add(gp, load_pack<VEC>(x + at), mean[r], rstd[r]);
      else
        add(gp, gp, acc_t(0), acc_t(0));
    }
  }
  // the lanes' sums of each column, added in shared memory
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);
  const int width = tile * VEC;  // a lane's values
  if (lane < lanes)
    for (int k = 0; k < VEC; ++k) {
      red[lane * width + gt * VEC + k] = sum[k];
      if constexpr (NORM) red[(lanes + lane) * width + gt * VEC + k] = sumx[k];
    }
  __syncthreads();
  for (int e = threadIdx.x; e < kParts * width; e += kThreads) {
    const int part = e / width, c = e % width;
    if (first + c >= C) continue;
    acc_t total = acc_t(0);
    for (int l = 0; l < lanes; ++l) total += red[(part * lanes + l) * width + c];
    partial[(static_cast<int64_t>(blockIdx.x) * kParts + part) * C + first + c] = total;
  }
}

// out[part][c] = Σ_b partial[b][part][c], in T: a block of kFinishLanes lanes of kFinishColumns
// columns each per (32 columns, part).
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    column_finish_kernel(const acc_t* __restrict__ partial, const int blocks, const int parts,
                         const int C, T* __restrict__ out) {
  acc_t* red = reinterpret_cast<acc_t*>(smem_raw);
  const int cx = static_cast<int>(threadIdx.x) % kFinishColumns;
  const int lane = static_cast<int>(threadIdx.x) / kFinishColumns;
  const int part = static_cast<int>(blockIdx.y);
  const int c = static_cast<int>(blockIdx.x) * kFinishColumns + cx;
  acc_t total = acc_t(0);
  if (c < C)
    for (int b = lane; b < blocks; b += kFinishLanes)
      total += partial[(static_cast<int64_t>(b) * parts + part) * C + c];
  red[threadIdx.x] = total;
  __syncthreads();
  if (lane == 0 && c < C) {
    for (int l = 1; l < kFinishLanes; ++l) total += red[l * kFinishColumns + cx];
    out[static_cast<int64_t>(part) * C + c] = static_cast<T>(total);
  }
}

// The column groups a block takes (a tile; the grid's y the tiles): from the fewest tiles on, a
// tile more where it keeps more than a sixteenth of the block's threads more busy (e.g. 144
// groups, C = 1152 bf16: 3 tiles of 48 groups, 5 lanes, 240 threads busy, where one tile of
// 144 keeps 144 busy; 24 groups, C = 192 bf16: one tile, 10 lanes, 240 busy).
inline int column_tile(const int groups) {
  const int fewest = (groups + kThreads - 1) / kThreads;
  int best = (groups + fewest - 1) / fewest, best_busy = -kThreads;
  for (int tiles = fewest; tiles <= fewest + 3 && tiles <= groups && tiles <= kMaxTiles;
       ++tiles) {
    const int tile = (groups + tiles - 1) / tiles;
    const int busy = kThreads / tile * tile;
    if (busy > best_busy + kThreads / 16) best = tile, best_busy = busy;
  }
  return best;
}

// (Σ_r g, Σ_r g x̂) per column of g viewed as (rows, C), C its last dimension, in g's dtype; the
// second only where x (and mean, rstd: a value per row, any floating dtype) is given.
inline std::vector<at::Tensor> column_sums(const char* op, const at::Tensor& grad,
                                           const at::Tensor* x, const at::Tensor* mean,
                                           const at::Tensor* rstd) {
  check_column_sums_args(op, grad, x, mean, rstd);
  const int64_t C = grad.size(-1), rows = C == 0 ? 0 : grad.numel() / C;
  TORCH_CHECK(C <= std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 columns, got ", C);
  const int parts = x != nullptr ? 2 : 1;
  const at::Tensor g = grad.contiguous();
  at::Tensor xc, mc, rc;
  if (x != nullptr) {
    // the kernel reads the row statistics in the accumulation type (CUDA's LayerNorm keeps
    // them so; CPU's in the input's dtype)
    const auto acc = at::toOpMathType(grad.scalar_type());
    xc = x->contiguous();
    mc = mean->to(acc).contiguous();
    rc = rstd->to(acc).contiguous();
  }
  at::Tensor out = at::empty({parts, C}, g.options());
  if (rows == 0 || C == 0) {
    out.zero_();
  } else if (C > kMaxTiles * static_cast<int64_t>(kThreads)) {
    // more column tiles than a grid's y holds: ATen's sums (a bias of over 16.7 M values)
    return aten_column_sums(g, x != nullptr ? &xc : nullptr, &mc, &rc);
  } else {
    launch::DeviceGuard guard(g.device());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "column_sums",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g.data_ptr<scalar_t>();
      const scalar_t* xp = x != nullptr ? xc.data_ptr<scalar_t>() : nullptr;
      const int vec = vector_width<scalar_t>(C, {gp, x != nullptr ? xp : gp});
      with_width<scalar_t>(vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        const int groups = static_cast<int>(C / VEC);
        const int tile = column_tile(groups), tiles = (groups + tile - 1) / tile;
        const int lanes = kThreads / tile;
        auto run = [&](auto kernel, size_t smem) {
          const int64_t wave =
              static_cast<int64_t>(std::min(kBlocksPerSM,
                                            launch::resident_blocks(kernel, kThreads, smem))) *
              launch::device_attribute(launch::Attr::kMultiProcessors);
          const int64_t chunks = (rows + static_cast<int64_t>(lanes) * kUnroll - 1) /
                                 (static_cast<int64_t>(lanes) * kUnroll);
          const int blocks =
              static_cast<int>(std::max<int64_t>(1, std::min(chunks, wave / tiles)));
          const at::Tensor partial = at::empty(
              {blocks, parts, C}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
          launch::launch(kernel, dim3(blocks, tiles), kThreads, smem, gp, xp,
                         x != nullptr ? mc.data_ptr<acc_t>() : nullptr,
                         x != nullptr ? rc.data_ptr<acc_t>() : nullptr, rows,
                         static_cast<int>(C), tile, partial.data_ptr<acc_t>());
          launch::launch(&column_finish_kernel<scalar_t, acc_t>,
                         dim3((C + kFinishColumns - 1) / kFinishColumns, parts), kThreads,
                         sizeof(acc_t) * kThreads, partial.data_ptr<acc_t>(), blocks, parts,
                         static_cast<int>(C), out.data_ptr<scalar_t>());
        };
        if (x != nullptr)
          run(&column_partials_kernel<scalar_t, acc_t, VEC, true>, pass_smem<acc_t, VEC, true>());
        else
          run(&column_partials_kernel<scalar_t, acc_t, VEC, false>,
              pass_smem<acc_t, VEC, false>());
      });
    });
  }
  if (parts == 1) return {out[0]};
  return {out[0], out[1]};
}

}  // namespace colsum

// mmattn::bias_grad on CUDA (column_sums.h): Σ over every dimension of grad but the last.
at::Tensor bias_grad_cuda(const at::Tensor& grad) {
  return colsum::column_sums("bias_grad", grad, nullptr, nullptr, nullptr)[0];
}

// mmattn::layer_norm_param_grads on CUDA: (the weight's Σ g x̂, the bias's Σ g) of a LayerNorm
// over grad's last dimension, x̂ = (x - mean) rstd per row (column_sums.h).
std::tuple<at::Tensor, at::Tensor> layer_norm_param_grads_cuda(const at::Tensor& grad,
                                                               const at::Tensor& x,
                                                               const at::Tensor& mean,
                                                               const at::Tensor& rstd) {
  const std::vector<at::Tensor> sums =
      colsum::column_sums("layer_norm_param_grads", grad, &x, &mean, &rstd);
  return {sums[1], sums[0]};
}

}  // namespace mmattn
