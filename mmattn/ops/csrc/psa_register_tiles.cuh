// The four pass kernels of psa_kernels.cuh (the forward reduction and gating, the backward
// reduction and apply pass) for NCHW x of up to 256 channels moved in 16-byte vectors, with
// the tile in registers instead of shared memory.
//
// The shared-memory tile (psa_kernels.cuh) stages TP pixels x C channels as the accumulation
// type and then walks it twice: the per-pixel dot products over the channels (a warp per
// pixel group, a load from shared memory per multiply-add) and the per-channel sums over the
// pixels (a thread per channel, again a load per multiply-add); three or four barriers a tile.
// Nsight Compute found the forward reduction issue-bound (H100, 2026-11-27: 0.64 warp
// instructions a cycle per scheduler, 2.3x its DRAM floor), so its instructions set its time;
// the other passes waited on memory and barriers at 50 % occupancy. Here a thread owns one
// channel of the tile and 2 VEC consecutive pixels of it (two 16-byte loads a tensor, kept in
// registers; the backward apply pass, which reads three tensors, one):
//   - the per-channel sums over the pixels are the thread's own (no shared memory);
//   - the dot products over the channels are each warp's butterfly (halving_butterfly: 2 VEC
//     sums a lane halved to one) and, where a channel group spans several warps, a sum of
//     their partial sums through shared memory;
//   - two barriers a tile: the warps' partial sums, then the pixels' values (the
//     exponentials, the gate, d_t, pi and d_l) from the lanes that finish them;
//   - a few KB of shared memory, the tile's loads issued together, the gating pass's next
//     tile in flight while it works on this one.
// A channel group is the 32 cw threads of cw consecutive warps (cw = 1, 2, 4, 8: the smallest
// with 32 cw >= C; channels past C read channel C - 1, weigh 0 and write nothing), so a block
// holds kWarps / cw groups, each on its own 2 VEC pixels of the tile: a tile is kWarps / cw x
// 2 VEC pixels (bf16 at C = 256: 16; at C = 48, cw = 2: 64).
//
// Taken by fwd_reduce, fwd_apply, bwd_reduce and bwd_apply (psa_kernels.cuh) where
// register_tiles() allows, unless MMATTN_PSA_REGISTER_TILES=0 (the shared-memory tiles, for
// comparison).
#pragma once

// (included by psa_kernels.cuh after its device helpers: Geometry, Pack, halving_butterfly,
// smem_run, SoftmaxNorm, gate_softmax)

namespace mmattn {
namespace psa {
inline namespace MMATTN_PSA_UNIT {

constexpr int kRegVectors = 2;  // 16-byte vectors a thread loads per tile
constexpr int kRegMaxChannels = 32 * kWarps;

// Where a thread's channel and pixels lie: channel c = (warp % cw) 32 + lane of channel group
// warp / cw; the group's pixels [group PT, group PT + PT) of the tile, PT = kRegVectors VEC.
struct RegLayout {
  int lane, warp, c, group, groups, log2_cw;
  bool c_ok;
  bool lead_warp;  // the group's first warp, whose lanes j < PT finish pixel j

  __device__ __forceinline__ RegLayout(int C, int log2_cw_) : log2_cw(log2_cw_) {
    lane = threadIdx.x & 31;
    warp = threadIdx.x >> 5;
    const int cw = 1 << log2_cw;
    c = (warp & (cw - 1)) * 32 + lane;
    group = warp >> log2_cw;
    groups = kWarps >> log2_cw;
    c_ok = c < C;
    lead_warp = (warp & (cw - 1)) == 0;
  }

  // Where image n's row of the thread's channel starts in x (or a tensor laid out as x); a
  // channel past C reads channel C - 1's (it weighs 0 and writes nothing).
  __device__ __forceinline__ int64_t row(const Geometry& g, int n) const {
    return n * g.sN + min(c, g.C - 1) * g.sC;
  }
};

// The thread's channel's sum over the block's groups of a per-thread value (`vec`: kThreads of
// shared memory, group k's thread of channel c at k 32 cw + c), for group 0's threads
// (threadIdx.x = c), after a barrier that follows the writes; in group order, the same every
// run.
template <typename acc_t>
__device__ __forceinline__ acc_t groups_sum(const acc_t* vec, const RegLayout& r) {
  acc_t sum = 0;
  for (int k = 0; k < r.groups; ++k) sum += vec[(k << (5 + r.log2_cw)) + r.c];
  return sum;
}

// A thread's part of a tile: x[c, p0 + j] for j < PT = kRegVectors VEC, converted to the
// accumulation type when loaded (CONVERT) or where used (the 16-bit values then take half the
// registers: room for a second tile in flight, fwd_apply_registers_kernel). A vector past the
// tile (ok[v] false) holds the tile's last vector instead, so that every load is made and none
// is replaced by zeros (a byte permute an element in the SASS, sm_90: about as many
// instructions as the tile's arithmetic): its pixels' values go unused (their exponentials are
// 0, their gates not stored, their per-channel sums masked).
template <int VEC, typename scalar_t, bool CONVERT, int NV = kRegVectors>
struct RegisterTile {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kValues = CONVERT ? NV * VEC : 1;
  acc_t xv[kValues];                           // CONVERT
  Pack<scalar_t, VEC> raw[CONVERT ? 1 : NV];  // !CONVERT
  bool ok[NV];

  // xc: a channel's row at the tile's first pixel; tp, the tile's pixels, a multiple of VEC
  // (whole vectors). The loads are all issued before any is used.
  __device__ __forceinline__ void load(const scalar_t* xc, int p0, int tp) {
    Pack<scalar_t, VEC> in[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      ok[v] = p0 + v * VEC < tp;
      in[v] = load_pack<VEC>(xc + min(p0 + v * VEC, tp - VEC));
    }
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      if constexpr (CONVERT) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) xv[v * VEC + k] = pack_value<acc_t>(in[v], k);
      } else {
        raw[v] = in[v];
      }
    }
  }

  __device__ __forceinline__ acc_t get(int j) const {
    if constexpr (CONVERT)
      return xv[j];
    else
      return pack_value<acc_t>(raw[j / VEC], j % VEC);
  }

  // get(j) by the 16-bit type's own conversion (!CONVERT): two instructions a bf16, but in
  // the backward kernels, which hold two tiles, the one-instruction form (a 32-bit register a
  // value until used) spilled 24-64 bytes (bwd_reduce_registers_kernel, sm_80 and sm_90)
  __device__ __forceinline__ acc_t get_narrow(int j) const {
    return static_cast<acc_t>(raw[j / VEC].v[j % VEC]);
  }
};

// Each warp's partial sums over its 32 channels of prod[j] (a lane's channel's term of pixel
// j's dot product, j < PT) into part[warp PT + j] (kWarps x PT values of shared memory). Then,
// after a barrier, group_dot gives pixel j's whole sum to lane j of the group's first warp.
template <int PT, typename acc_t>
__device__ __forceinline__ void warp_partial_sums(acc_t (&prod)[PT], const RegLayout& r,
                                                  acc_t* part) {
  constexpr int kSpan = 32 / PT;  // the lanes that end with one pixel's sum
  halving_butterfly(prod, r.lane);  // lane l: pixel l / kSpan's sum over its kSpan lanes' set
#pragma unroll
  for (int o = kSpan / 2; o > 0; o >>= 1) prod[0] += __shfl_xor_sync(0xffffffffu, prod[0], o);
  if (r.lane % kSpan == 0) part[r.warp * PT + r.lane / kSpan] = prod[0];
}

// warp_partial_sums of w x[c, p] (w: the thread's channel's weight, 0 past C).
template <int VEC, typename scalar_t, bool CONVERT, int NV, typename acc_t>
__device__ __forceinline__ void warp_partial_dots(
    const RegisterTile<VEC, scalar_t, CONVERT, NV>& xt, acc_t w, const RegLayout& r,
    acc_t* part) {
  acc_t prod[NV * VEC];
#pragma unroll
  for (int j = 0; j < NV * VEC; ++j) prod[j] = xt.get(j) * w;
  warp_partial_sums(prod, r, part);
}

// Pixel j's sum over its group's cw warps, `mine` = part + (first warp of the group) PT + j
// (the lead lanes' pointer, set once: the loop's loads then take constant offsets).
template <int PT, typename acc_t>
__device__ __forceinline__ acc_t group_dot(const acc_t* mine, int log2_cw) {
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < kWarps; ++k)  // (unrolled: cw <= kWarps, a predicate each)
    if (k < (1 << log2_cw)) sum += mine[k * PT];
  return sum;
}

// Dynamic shared memory of a register-tile kernel, in bytes: `pixel_vectors` vectors of
// kWarps x PT values of acc_t (the warps' partial sums, the pixels' values), `thread_vectors`
// of a value per thread (the merge at the end), and 3 kWarps values of per-group scratch.
template <typename acc_t, int VEC>
constexpr size_t register_tiles_smem(int pixel_vectors, int thread_vectors,
                                     int nv = kRegVectors) {
  return sizeof(acc_t) * (pixel_vectors * kWarps * nv * VEC + thread_vectors * kThreads +
                          3 * kWarps);
}

// ---------------------------------------------------------------- forward, pass 1: reductions
// fwd_reduce_kernel's contract (its outputs the same, the splits `chunk` pixels each, a
// multiple of the tile's kWarps / cw x PT pixels).
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void fwd_reduce_registers_body(
    const scalar_t* __restrict__ x, Geometry g, int log2_cw, int chunk, int splits,
    const acc_t* __restrict__ wq, int64_t wq_stride, acc_t* __restrict__ logits,
    acc_t* __restrict__ pmax, acc_t* __restrict__ psum, acc_t* __restrict__ ps,
    acc_t* __restrict__ pm) {
  constexpr int PT = kRegVectors * VEC;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // kWarps x PT (MMATTN_BLOCK_SHARED: the emulation runs a cooperative launch's blocks at once)
  acc_t* part = reinterpret_cast<acc_t*>(MMATTN_BLOCK_SHARED(smem_raw));
  acc_t* s_e = part + kWarps * PT;                   // the groups' exponentials, PT each
  acc_t* s_sums = s_e + kWarps * PT;                 // 2 kThreads, for the merge at the end
  acc_t* s_alpha = s_sums + 2 * kThreads;            // a rescaling factor per group
  acc_t* s_state = s_alpha + kWarps;                 // the groups' (max, sum): 2 kWarps

  const RegLayout r(g.C, log2_cw);
  const int n = blockIdx.y, split = blockIdx.x;
  const scalar_t* xc = x + r.row(g, n);
  const acc_t w = r.c_ok ? wq[n * wq_stride + r.c] : acc_t(0);
  const int TP = r.groups * PT, p0 = r.group * PT;
  const acc_t* mine = part + (r.group << log2_cw) * PT + r.lane % PT;  // (group_dot's)
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  acc_t run_max = -INFINITY, run_sum = 0;  // the group's online-softmax state (its lead warp)
  acc_t acc_s = 0, acc_m = 0;              // channel c's sums over the group's pixels
  for (int pt = p_begin; pt < p_end; pt += TP) {
    const int tp = min(TP, p_end - pt);
    RegisterTile<VEC, scalar_t, true> xt;
    xt.load(xc + pt, p0, tp);
    warp_partial_dots(xt, w, r, part);
    __syncthreads();  // the partial sums are visible (and the last tile's s_e, s_alpha read)
    if (r.lead_warp) {  // (warp-uniform) lane j finishes pixel p0 + j
      const bool ok = r.lane < PT && p0 + r.lane < tp;
      const acc_t l = ok ? group_dot<PT>(mine, log2_cw) : acc_t(-INFINITY);
      if (ok) logits[static_cast<int64_t>(n) * g.P + pt + p0 + r.lane] = l;
      const acc_t new_max = op_max(run_max, warp_max(l));
      // (a group past the tile's end has seen no pixel yet: nothing to rescale)
      const acc_t alpha = new_max == -INFINITY ? acc_t(1) : op_exp(run_max - new_max);
      const acc_t e = ok ? op_exp(l - new_max) : acc_t(0);
      run_sum = run_sum * alpha + warp_sum(e);
      run_max = new_max;
      if (r.lane < PT) s_e[p0 + r.lane] = e;
      if (r.lane == 0) s_alpha[r.group] = alpha;
    }
    __syncthreads();
    const Pack<acc_t, PT> e = smem_run<PT, 1>(s_e, p0);
    const acc_t alpha = s_alpha[r.group];
    acc_t s = 0;
#pragma unroll
    for (int v = 0; v < kRegVectors; ++v) {
      acc_t m = 0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t xj = xt.get(v * VEC + k);
        s += e.v[v * VEC + k] * xj;
        m += xj;
      }
      acc_m += xt.ok[v] ? m : acc_t(0);
    }
    acc_s = acc_s * alpha + s;
  }
  // The groups' states merged (group 0 has seen a pixel: no split is empty), then each
  // channel's sums over the groups, rescaled to the merged maximum, by group 0's threads.
  if (r.lead_warp && r.lane == 0) {
    s_state[r.group] = run_max;
    s_state[kWarps + r.group] = run_sum;
  }
  __syncthreads();
  acc_t top = -INFINITY;
  for (int k = 0; k < r.groups; ++k) top = op_max(top, s_state[k]);
  const acc_t group_max = s_state[r.group];
  s_sums[threadIdx.x] = group_max == -INFINITY ? acc_t(0) : acc_s * op_exp(group_max - top);
  s_sums[kThreads + threadIdx.x] = acc_m;
  __syncthreads();
  const int64_t o = static_cast<int64_t>(n) * splits + split;
  if (r.group == 0 && r.c_ok) {
    ps[o * g.C + r.c] = groups_sum(s_sums, r);
    pm[o * g.C + r.c] = groups_sum(s_sums + kThreads, r);
  }
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int k = 0; k < r.groups; ++k)
      if (s_state[k] != -INFINITY) total += s_state[kWarps + k] * op_exp(s_state[k] - top);
    pmax[o] = top;
    psum[o] = total;
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
fwd_reduce_registers_kernel(const scalar_t* __restrict__ x, Geometry g, int log2_cw, int chunk,
                            int splits, const acc_t* __restrict__ wq, int64_t wq_stride,
                            acc_t* __restrict__ logits, acc_t* __restrict__ pmax,
                            acc_t* __restrict__ psum, acc_t* __restrict__ ps,
                            acc_t* __restrict__ pm) {
  fwd_reduce_registers_body<scalar_t, acc_t, VEC>(x, g, log2_cw, chunk, splits, wq, wq_stride,
                                                  logits, pmax, psum, ps, pm);
}

// ---------------------------------------------------------------- forward, pass 2: gating
// fwd_apply_kernel's contract; its grid's blocks loop over the image's tiles of
// kWarps / cw x PT pixels.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void fwd_apply_registers_body(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g, int log2_cw,
    const acc_t* __restrict__ a, const acc_t* __restrict__ u, const acc_t* __restrict__ bias,
    PixelSoftmax<acc_t> psm, acc_t* __restrict__ s_mask, acc_t* __restrict__ norm_out,
    bool sequential) {
  constexpr int PT = kRegVectors * VEC;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* part = reinterpret_cast<acc_t*>(MMATTN_BLOCK_SHARED(smem_raw));  // kWarps x PT
  acc_t* s_s = part + kWarps * PT;                   // the groups' gates, PT each
  acc_t* s_merge = s_s + kWarps * PT;                // block_merge's 2 kWarps values

  const RegLayout r(g.C, log2_cw);
  const int n = blockIdx.y;
  const int64_t row = r.row(g, n);
  const int64_t np = static_cast<int64_t>(n) * g.P;
  const bool release = psm.t != nullptr;  // the gate from given logits: no dot products
  const acc_t ac = r.c_ok ? a[static_cast<int64_t>(n) * g.C + r.c] : acc_t(0);
  const acc_t uc = !release && r.c_ok ? u[static_cast<int64_t>(n) * g.C + r.c] : acc_t(0);
  const acc_t b = release ? acc_t(0) : bias[n];
  const SoftmaxNorm<acc_t> norm = gate_softmax(psm, n, s_merge, norm_out);
  const int TP = r.groups * PT, p0 = r.group * PT;
  const acc_t* mine = part + (r.group << log2_cw) * PT + r.lane % PT;  // (group_dot's)
  const int tiles = (g.P + TP - 1) / TP;
  // the block's next tile is loaded while it works on this one (its loads in flight across
  // the barriers; the passes that read x once wait on memory rather than on issue)
  RegisterTile<VEC, scalar_t, false> xt, next;
  const int t0 = blockIdx.x;
  if (t0 < tiles) xt.load(x + row + t0 * TP, p0, min(TP, g.P - t0 * TP));
  for (int t = t0; t < tiles; t += gridDim.x) {
    const int pt = t * TP, tp = min(TP, g.P - pt), tn = t + gridDim.x;
    if (tn < tiles) next.load(x + row + tn * TP, p0, min(TP, g.P - tn * TP));
    if (!release) warp_partial_dots(xt, uc, r, part);
    __syncthreads();  // the partial sums are visible (and the last tile's gates read)
    if (r.lead_warp && r.lane < PT && p0 + r.lane < tp) {
      const int p = p0 + r.lane;
      const acc_t sg = release ? op_sigmoid(norm(psm.t[np + pt + p]))
                               : op_sigmoid(group_dot<PT>(mine, log2_cw) + b);
      s_s[p] = sg;
      s_mask[np + pt + p] = sg;
    }
    __syncthreads();
    if (r.c_ok) {
      const Pack<acc_t, PT> sv = smem_run<PT, 1>(s_s, p0);  // (past tp: unused)
#pragma unroll
      for (int v = 0; v < kRegVectors; ++v) {
        if (!xt.ok[v]) continue;
        Pack<scalar_t, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int j = v * VEC + k;
          const acc_t gate = sequential ? ac * sv.v[j] : ac + sv.v[j];
          out.v[k] = static_cast<scalar_t>(xt.get(j) * gate);
        }
        store_pack(y + row + pt + p0 + v * VEC, out);
      }
    }
    xt = next;
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
fwd_apply_registers_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, Geometry g,
                           int log2_cw, const acc_t* __restrict__ a, const acc_t* __restrict__ u,
                           const acc_t* __restrict__ bias, PixelSoftmax<acc_t> psm,
                           acc_t* __restrict__ s_mask, acc_t* __restrict__ norm_out,
                           bool sequential) {
  fwd_apply_registers_body<scalar_t, acc_t, VEC>(x, y, g, log2_cw, a, u, bias, psm, s_mask,
                                                 norm_out, sequential);
}

// fwd_reduce_apply_kernel (psa_kernels.cuh) on the register tiles: both passes' tiles of the
// same channel groups (log2_cw).
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
fwd_reduce_apply_registers_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  Geometry g, int log2_cw, int chunk,
                                  const acc_t* __restrict__ u, const acc_t* __restrict__ a,
                                  acc_t* __restrict__ t, acc_t* __restrict__ pmax,
                                  acc_t* __restrict__ psum, acc_t* __restrict__ ps,
                                  acc_t* __restrict__ pm, acc_t* __restrict__ s_mask,
                                  acc_t* __restrict__ norm_out) {
  const int splits = static_cast<int>(gridDim.x);
  fwd_reduce_registers_body<scalar_t, acc_t, VEC>(x, g, log2_cw, chunk, splits, u, g.C, t, pmax,
                                                  psum, ps, pm);
  launch::grid_sync();
  fwd_apply_registers_body<scalar_t, acc_t, VEC>(x, y, g, log2_cw, a, nullptr, nullptr,
                                                 PixelSoftmax<acc_t>{t, pmax, psum, splits},
                                                 s_mask, norm_out, false);
}

// ---------------------------------------------------------------- backward, pass 1: reductions
// bwd_reduce_kernel's contract (its outputs the same; the splits `chunk` pixels each, a multiple
// of the tile). Per tile: G (.) x's dot products with a (or ones) give dL/dS; the lead lanes
// form d_t from it and the gate; then each thread's sums over its pixels of G x (S or 1),
// x d_t and (the release's PSA_p) x sig.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
bwd_reduce_registers_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                            Geometry g, int log2_cw, int chunk, int splits,
                            const acc_t* __restrict__ a, const acc_t* __restrict__ s_mask,
                            PixelSoftmax<acc_t> psm, acc_t* __restrict__ d_t,
                            acc_t* __restrict__ pdt, acc_t* __restrict__ pda,
                            acc_t* __restrict__ pdu, acc_t* __restrict__ pr, bool sequential,
                            acc_t* __restrict__ zero, int64_t zero_count,
                            scalar_t* __restrict__ wa, const acc_t* __restrict__ wv2,
                            int wa_rows) {
  constexpr int PT = kRegVectors * VEC;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* part = reinterpret_cast<acc_t*>(smem_raw);  // kWarps x PT
  acc_t* s_s = part + kWarps * PT;                   // the groups' gates S, PT each
  acc_t* s_dt = s_s + kWarps * PT;                   // d_t
  acc_t* s_sig = s_dt + kWarps * PT;                 // the release's PSA_p: sig
  acc_t* s_dtsum = s_sig + kWarps * PT;              // the lead lanes' sums of d_t
  acc_t* s_sums = s_dtsum + kWarps * PT;             // 3 kThreads, for the merge at the end

  const RegLayout r(g.C, log2_cw);
  const int n = blockIdx.y, split = blockIdx.x;
  const int64_t row = r.row(g, n);
  const int64_t np = static_cast<int64_t>(n) * g.P;
  const bool release = psm.t != nullptr;
  zero_grid(zero, zero_count);
  scale_columns_grid(wa, wv2, a, gridDim.y, wa_rows, g.C);  // (PSA_s: W_v' diag(A))
  // the dot products' weight: A (sequential) or ones (parallel), 0 past C
  const acc_t wc = !r.c_ok ? acc_t(0) : sequential ? a[static_cast<int64_t>(n) * g.C + r.c]
                                                   : acc_t(1);
  const int TP = r.groups * PT, p0 = r.group * PT;
  const acc_t* mine = part + (r.group << log2_cw) * PT + r.lane % PT;  // (group_dot's)
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  acc_t dtsum = 0;  // a lead lane's sum of its pixel slot's d_t
  acc_t acc_da = 0, acc_du = 0, acc_r = 0;
  for (int pt = p_begin; pt < p_end; pt += TP) {
    const int tp = min(TP, p_end - pt);
    RegisterTile<VEC, scalar_t, false> xt, gt;
    xt.load(x + row + pt, p0, tp);
    gt.load(grad + row + pt, p0, tp);
    acc_t prod[PT];
#pragma unroll
    for (int j = 0; j < PT; ++j) prod[j] = gt.get_narrow(j) * xt.get_narrow(j) * wc;
    warp_partial_sums(prod, r, part);
    __syncthreads();  // the partial sums are visible (and the last tile's values read)
    if (r.lead_warp && r.lane < PT) {
      const int p = p0 + r.lane;
      acc_t sg = 0, sig = 0, dt = 0;  // (past the tile: zeros)
      if (p < tp) {
        const int64_t i = np + pt + p;
        if (release) {  // (the backward gets t's softmax state merged: one split)
          sig = merge_softmax(psm, n)(psm.t[i]);
          sg = op_sigmoid(sig);
        } else {
          sg = s_mask[i];
        }
        // d_t = dL/d(the gate's logit): paper u . x_p + b; release sig_p dL/d(sig_p) (the
        // factor sig_p of the softmax's backward, whose other term the glue subtracts)
        dt = group_dot<PT>(mine, log2_cw) * sg * (acc_t(1) - sg) * (release ? sig : acc_t(1));
        d_t[i] = dt;
        dtsum += dt;
      }
      s_s[p] = sg;
      s_dt[p] = dt;
      s_sig[p] = sig;
    }
    __syncthreads();
    const Pack<acc_t, PT> sv = smem_run<PT, 1>(s_s, p0);
    const Pack<acc_t, PT> dtv = smem_run<PT, 1>(s_dt, p0);
#pragma unroll
    for (int v = 0; v < kRegVectors; ++v) {
      acc_t da = 0, du = 0, rr = 0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int j = v * VEC + k;
        const acc_t xj = xt.get_narrow(j), gx = gt.get_narrow(j) * xj;
        da += sequential ? gx * sv.v[j] : gx;
        du += xj * dtv.v[j];
        if (release) rr += xj * s_sig[p0 + j];
      }
      if (xt.ok[v]) {
        acc_da += da;
        acc_du += du;
        acc_r += rr;
      }
    }
  }
  // each channel's sums over the groups, by group 0's threads; d_t's sum over the lead lanes'
  // slots in slot order (the same sum every run)
  if (r.lead_warp && r.lane < PT) s_dtsum[p0 + r.lane] = dtsum;
  s_sums[threadIdx.x] = acc_da;
  s_sums[kThreads + threadIdx.x] = acc_du;
  s_sums[2 * kThreads + threadIdx.x] = acc_r;
  __syncthreads();
  const int64_t o = static_cast<int64_t>(n) * splits + split;
  if (r.group == 0 && r.c_ok) {
    pda[o * g.C + r.c] = groups_sum(s_sums, r);
    pdu[o * g.C + r.c] = groups_sum(s_sums + kThreads, r);
    if (release) pr[o * g.C + r.c] = groups_sum(s_sums + 2 * kThreads, r);
  }
  if (threadIdx.x == 0) {
    acc_t total = 0;
    for (int p = 0; p < TP; ++p) total += s_dtsum[p];
    pdt[o] = total;
  }
}

// ---------------------------------------------------------------- backward, pass 2: dx
// One 16-byte vector a tensor a thread per tile (tiles of half the other kernels' pixels): with
// two (x's, G's and dx's part), the products and the pixels' four factors spilled 12-44 bytes
// (nvcc 13.0, sm_80 and sm_90), even with the channel's constants in shared memory.
constexpr int kBwdApplyVectors = 1;

// bwd_apply_kernel's contract (its tail in the grid's first row, its splits `chunk` pixels
// each, a multiple of the tile). Per tile: x's dot products with dsv; the lead lanes form pi,
// S, dL/dt and d_l = pi (dsv . x_p - beta); then each thread's dx over its pixels and its sum
// of x d_l (the W_q gradient). A channel's constants (A, u, dm, dsv, w_q) are the thread's.
template <typename scalar_t, typename acc_t, int VEC, typename Tail>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
bwd_apply_registers_kernel(Tail tail, const scalar_t* __restrict__ grad,
                           const scalar_t* __restrict__ x, scalar_t* __restrict__ dx, Geometry g,
                           int log2_cw, int chunk, int splits, const acc_t* __restrict__ a,
                           const acc_t* __restrict__ s_mask, const acc_t* __restrict__ logits,
                           const acc_t* __restrict__ lnorm, PixelSoftmax<acc_t> psm,
                           const acc_t* __restrict__ beta_t, const acc_t* __restrict__ d_t,
                           const acc_t* __restrict__ u, const acc_t* __restrict__ dm,
                           const acc_t* __restrict__ dsv, const acc_t* __restrict__ wq,
                           const acc_t* __restrict__ beta, acc_t* __restrict__ pgwq,
                           bool sequential, acc_t* __restrict__ gwq, bool accumulate) {
  constexpr int PT = kBwdApplyVectors * VEC;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* part = reinterpret_cast<acc_t*>(smem_raw);  // kWarps x PT
  acc_t* s_s = part + kWarps * PT;                   // the groups' S, PT each
  acc_t* s_pi = s_s + kWarps * PT;                   // pi
  acc_t* s_dt = s_pi + kWarps * PT;                  // dL/dt
  acc_t* s_dl = s_dt + kWarps * PT;                  // d_l
  acc_t* s_sums = s_dl + kWarps * PT;                // kThreads, for the merge at the end
  acc_t* s_const = s_sums + kThreads;  // A, u, dm, w_q of the thread's channel (kThreads each:
                                       // read where used, which held registers spilled)

  if (kTailRows<Tail> == 1 && blockIdx.y == 0) {  // (a whole block returns: no barrier waits)
    tail(blockIdx.x, gridDim.x);
    return;
  }
  const int N = gridDim.y - kTailRows<Tail>, n = blockIdx.y - kTailRows<Tail>;
  const int split = blockIdx.x;
  const RegLayout r(g.C, log2_cw);
  const int64_t row = r.row(g, n);
  const int64_t np = static_cast<int64_t>(n) * g.P, nc = static_cast<int64_t>(n) * g.C;
  const bool release = psm.t != nullptr;
  const int cc = min(r.c, g.C - 1);  // (a channel past C: C - 1's constants, nothing written)
  s_const[threadIdx.x] = a[nc + cc];
  s_const[kThreads + threadIdx.x] = u[nc + cc];
  s_const[2 * kThreads + threadIdx.x] = dm[nc + cc];
  s_const[3 * kThreads + threadIdx.x] = wq[cc];
  const acc_t dsvc = r.c_ok ? dsv[nc + cc] : acc_t(0);  // (the dot products' weight)
  const acc_t bn = beta[n];
  const int TP = r.groups * PT, p0 = r.group * PT;
  const acc_t* mine = part + (r.group << log2_cw) * PT + r.lane % PT;  // (group_dot's)
  const int p_begin = split * chunk, p_end = min(g.P, p_begin + chunk);
  acc_t acc_g = 0;  // channel c's sum over its pixels of x d_l
  for (int pt = p_begin; pt < p_end; pt += TP) {
    const int tp = min(TP, p_end - pt);
    RegisterTile<VEC, scalar_t, false, kBwdApplyVectors> xt, gt;
    xt.load(x + row + pt, p0, tp);
    gt.load(grad + row + pt, p0, tp);
    warp_partial_dots(xt, dsvc, r, part);
    __syncthreads();  // the partial sums are visible (and the last tile's values read)
    if (r.lead_warp && r.lane < PT) {
      const int p = p0 + r.lane;
      acc_t sg = 0, pi = 0, dt = 0, dl = 0;  // (past the tile: zeros)
      if (p < tp) {
        const int64_t i = np + pt + p;
        pi = SoftmaxNorm<acc_t>{lnorm[n], lnorm[N + n]}(logits[i]);
        if (release) {  // sig = softmax_p(t), S = sigmoid(sig), dL/dt = w_t - beta_t sig
          const acc_t sig = merge_softmax(psm, n)(psm.t[i]);
          sg = op_sigmoid(sig);
          dt = d_t[i] - beta_t[n] * sig;
        } else {
          sg = s_mask[i];
          dt = d_t[i];
        }
        dl = pi * (group_dot<PT>(mine, log2_cw) - bn);
      }
      s_s[p] = sg;
      s_pi[p] = pi;
      s_dt[p] = dt;
      s_dl[p] = dl;
    }
    __syncthreads();
#pragma unroll
    for (int v = 0; v < kBwdApplyVectors; ++v) {
      const int q = p0 + v * VEC;
      Pack<scalar_t, VEC> out;
      if (accumulate && r.c_ok && xt.ok[v])  // dx holds a part already (PSA_s: its value map's)
        out = load_pack<VEC>(dx + row + pt + q);
      const acc_t ac = s_const[threadIdx.x], uc = s_const[kThreads + threadIdx.x];
      const acc_t dmc = s_const[2 * kThreads + threadIdx.x];
      const acc_t wqc = s_const[3 * kThreads + threadIdx.x];
      acc_t gsum = 0;
      // the pixels' four factors a 16-byte run at a time (all of a vector's at once spilled)
      constexpr int W = VEC < kPack16<acc_t> ? VEC : kPack16<acc_t>;
#pragma unroll
      for (int k0 = 0; k0 < VEC; k0 += W) {
        const Pack<acc_t, W> sv = smem_run<W, 1>(s_s, q + k0);
        const Pack<acc_t, W> piv = smem_run<W, 1>(s_pi, q + k0);
        const Pack<acc_t, W> dtv = smem_run<W, 1>(s_dt, q + k0);
        const Pack<acc_t, W> dlv = smem_run<W, 1>(s_dl, q + k0);
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const int k = k0 + i, j = v * VEC + k;
          const acc_t xj = xt.get_narrow(j);
          gsum += xj * dlv.v[i];
          const acc_t gate = sequential ? ac * sv.v[i] : ac + sv.v[i];
          acc_t d = gt.get_narrow(j) * gate + uc * dtv.v[i] + dmc + dsvc * piv.v[i] +
                    wqc * dlv.v[i];
          if (accumulate) d += static_cast<acc_t>(out.v[k]);
          out.v[k] = static_cast<scalar_t>(d);
        }
      }
      if (xt.ok[v]) {
        acc_g += gsum;
        if (r.c_ok) store_pack(dx + row + pt + q, out);
      }
    }
  }
  // the W_q gradient: each channel's sum over the groups (group 0's threads), added into gwq
  // (zeroed by the backward's first kernel) when given, else written to its (n, split) row of
  // pgwq
  s_sums[threadIdx.x] = acc_g;
  __syncthreads();
  if (r.group == 0 && r.c_ok) {
    const acc_t sum = groups_sum(s_sums, r);
    if (gwq != nullptr)
      atomicAdd(gwq + r.c, sum);
    else
      pgwq[(static_cast<int64_t>(n) * splits + split) * g.C + r.c] = sum;
  }
}

// ---------------------------------------------------------------- host side
// MMATTN_PSA_REGISTER_TILES: unset, empty or 1, the register tiles where they apply; 0, never.
inline bool register_tiles_from_env() {
  const char* text = std::getenv("MMATTN_PSA_REGISTER_TILES");
  if (text == nullptr || *text == '\0') return true;
  TORCH_CHECK((text[0] == '0' || text[0] == '1') && text[1] == '\0',
              "MMATTN_PSA_REGISTER_TILES must be 0 or 1, got '", text, "'");
  return text[0] == '1';
}

// Whether the register-tile kernels take x (laid out as g says; `ptrs`: x and the tensors laid
// out like it that the pass moves): NCHW, H*W a multiple of the 16-byte vector, aligned data,
// at most kRegMaxChannels channels, and the environment does not say no.
template <typename scalar_t>
bool register_tiles(const Geometry& g, std::initializer_list<const void*> ptrs) {
  constexpr int vec = kPack16<scalar_t>;
  return vec > 1 && g.pix_contig && g.C <= kRegMaxChannels && g.P % vec == 0 &&
         all_aligned(ptrs, vec * sizeof(scalar_t)) && register_tiles_from_env();
}

// log2 of the warps of a channel group: the smallest cw (a power of two) with 32 cw >= C.
inline int register_log2_cw(int C) {
  int l = 0;
  while ((32 << l) < C) ++l;
  return l;
}

// The launch plan of the register tiles: a tile of kWarps / cw x PT pixels, PT = nv VEC
// (Launch's tile_p; log2_tile unused) and the kernel's shared memory (register_tiles_smem's
// arguments).
template <typename scalar_t>
Launch register_plan(int C, int pixel_vectors, int thread_vectors, int nv = kRegVectors) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int vec = kPack16<scalar_t>;
  const int tile = (kWarps >> register_log2_cw(C)) * nv * vec;
  int log2 = 0;
  while ((1 << log2) < tile) ++log2;
  return {tile, log2, register_tiles_smem<acc_t, vec>(pixel_vectors, thread_vectors, nv)};
}

}  // namespace MMATTN_PSA_UNIT
}  // namespace psa
}  // namespace mmattn
