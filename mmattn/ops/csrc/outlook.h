// Outlook attention aggregation, Eq. 4-5 of VOLO (arXiv 2106.13112), fused: no unfold, no fold.
//
//   Y_Delta(i,j) = A_hat(i,j) V_Delta(i,j)                          (Eq. 4, per head)
//   Y(u,x)       = sum of the window outputs that land on (u,x)      (Eq. 5, the fold)
//
// Channels-last: v (B,H,W,C), attn (B,h,w,N,K^2,K^2) with attn[b,i,j,n,m,q] the weight of source
// position q for window position m. Window (i,j) covers the pixels (s*i - p + ka, s*j - p + kb),
// position index ka*K + kb; pixels outside the image are zero padding.
//
// With ones_column, outlook_fwd returns y with kOnesChannels more channels, (1, 0, ..., 0) at
// every pixel: a matrix product of a gradient with it (over the pixels) gives, beside the
// projection's weight gradient, its bias gradient (the sum of the gradient over the pixels) in
// the same product. 8, so that a pixel's channels stay 16-byte aligned in 16-bit types.
//
// With softmax_scale, outlook_bwd returns, in place of grad_attn, the gradient of the logits L of
// attn = softmax(scale L) over its last axis (Eq. 3): scale attn (grad_attn - sum_q attn
// grad_attn), computed from grad_attn in the accumulation type.
//
// This header holds the index arithmetic shared by the CPU (outlook_cpu.cpp) and CUDA
// (outlook_cuda.cu) kernels, so that the CPU build tests the very code the GPU runs.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#ifndef MMATTN_HD
#ifdef __CUDACC__
#define MMATTN_HD __host__ __device__
#else
#define MMATTN_HD
#endif
#endif

namespace mmattn {

constexpr int kOnesChannels = 8;  // outlook_fwd's ones_column (see the top)

// Geometry of one call (all small: int).
struct OutlookGeom {
  int H, W;     // image
  int h, w;     // window grid
  int N;        // heads
  int K, p, s;  // window size, zero padding, stride
};

// Windows along one axis covering coordinate u: those i in [lo, hi] with 0 <= u + p - s*i < K
// and 0 <= i < n (lo > hi when none does).
MMATTN_HD inline void outlook_covering(int u, int n, int K, int p, int s, int& lo, int& hi) {
  const int top = u + p;            // s*i <= top (top >= 0)
  const int first = top - K + 1;    // s*i >= first
  lo = first > 0 ? (first + s - 1) / s : 0;
  hi = top / s;
  if (hi > n - 1) hi = n - 1;
}

// Flat pixel index (b*H + y)*W + x of position t of window (b, i, j); false in the padding.
MMATTN_HD inline bool outlook_window_pixel(const OutlookGeom& g, int64_t b, int i, int j, int t,
                                           int64_t& pix) {
  const int y = g.s * i - g.p + t / g.K;
  const int x = g.s * j - g.p + t % g.K;
  if (y < 0 || y >= g.H || x < 0 || x >= g.W) return false;
  pix = (b * g.H + y) * g.W + x;
  return true;
}

// Calls f(attn_offset, src_pixel, valid) for every position of every window covering output
// pixel (b, u, x), K^2 a window:
//   forward (TRANSPOSED = false): (u,x) is window position m, the sources are the q's:
//     y(u,x) += attn[.., m, q] * v(pixel q);
//   grad_v (TRANSPOSED = true): (u,x) is source position q, the sources are the m's:
//     grad_v(u,x) += attn[.., m, q] * grad_out(pixel m).
// attn_offset points at head 0 of attn[b,i,j]; add n*K^4 for head n. src_pixel is a flat pixel
// index (multiply by C); valid is false for a source in the padding, which contributes
// nothing (src_pixel is then (b, u, x) itself, a pixel of the image). KT > 0 fixes K = KT at
// compile time (the loops over a window's positions unroll); KT = 0 reads g.K. Calling f for
// the padding too, with a flag, lets a GPU kernel load a window's sources without a branch per
// position (loads the compiler can issue together); outlook_for_each_source skips them.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <bool TRANSPOSED, int KT = 0, typename F>
MMATTN_HD inline void outlook_for_each_position(const OutlookGeom& g, int64_t b, int u, int x,
                                                F&& f) {
  const int K = KT > 0 ? KT : g.K;
  const int KK = K * K;
  const int64_t self = (b * g.H + u) * g.W + x;
  int ilo, ihi, jlo, jhi;
  outlook_covering(u, g.h, K, g.p, g.s, ilo, ihi);
  outlook_covering(x, g.w, K, g.p, g.s, jlo, jhi);
  for (int i = ilo; i <= ihi; ++i) {
    const int y0 = g.s * i - g.p;  // first row of window row i
    for (int j = jlo; j <= jhi; ++j) {
      const int x0 = g.s * j - g.p;
      const int pos = (u - y0) * K + (x - x0);  // position of (u,x) in window (i,j)
      const int64_t win = ((b * g.h + i) * g.w + j) * g.N * KK * KK;
#ifdef __CUDACC__
#pragma unroll 1  // (a row's positions unrolled, the rows not: the gather's registers)
#endif
      for (int ta = 0; ta < K; ++ta) {
        const int sy = y0 + ta;
        const bool row_in = sy >= 0 && sy < g.H;
        for (int tb = 0; tb < K; ++tb) {
          const int sx = x0 + tb;
          const bool in = row_in && sx >= 0 && sx < g.W;
          const int t = ta * K + tb;
          f(win + (TRANSPOSED ? t * KK + pos : pos * KK + t),
            in ? (b * g.H + sy) * g.W + sx : self, in);
        }
      }
    }
  }
}

// Calls f(attn_offset, src_pixel) for the pairs of outlook_for_each_position whose source is a
// pixel of the image (the padding skipped).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <bool TRANSPOSED, int KT = 0, typename F>
MMATTN_HD inline void outlook_for_each_source(const OutlookGeom& g, int64_t b, int u, int x,
                                              F&& f) {
  outlook_for_each_position<TRANSPOSED, KT>(g, b, u, x,
                                            [&](int64_t a_off, int64_t src_pix, bool valid) {
                                              if (valid) f(a_off, src_pix);
                                            });
}

// Host-side validation shared by the CPU and CUDA entry points; returns the geometry.
// grad_out may be null (forward).
inline OutlookGeom outlook_check(const char* op, const at::Tensor* grad_out, const at::Tensor& v,
                                 const at::Tensor& attn, int64_t K, int64_t p, int64_t s) {
  TORCH_CHECK(K >= 1, op, ": kernel_size must be >= 1, got ", K);
  TORCH_CHECK(p >= 0, op, ": padding must be >= 0, got ", p);
  TORCH_CHECK(s >= 1, op, ": stride must be >= 1, got ", s);
  TORCH_CHECK(K <= 64 && p <= 64 && s <= 64, op, ": kernel_size, padding and stride must be "
              "<= 64, got ", K, ", ", p, ", ", s);
  TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D (B, H, W, C), got shape ", v.sizes());
  TORCH_CHECK(attn.dim() == 6, op, ": attn must be 6-D (B, h, w, N, K*K, K*K), got shape ",
              attn.sizes());
  TORCH_CHECK(attn.scalar_type() == v.scalar_type(), op, ": attn dtype ", attn.scalar_type(),
              " must match v dtype ", v.scalar_type());
  TORCH_CHECK(attn.device() == v.device(), op, ": attn is on ", attn.device(),
              " but v is on ", v.device());
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->sizes() == v.sizes(), op, ": grad_out must have v's shape ",
                v.sizes(), ", got ", grad_out->sizes());
    TORCH_CHECK(grad_out->scalar_type() == v.scalar_type(), op, ": grad_out dtype ",
                grad_out->scalar_type(), " must match v dtype ", v.scalar_type());
    TORCH_CHECK(grad_out->device() == v.device(), op, ": grad_out is on ", grad_out->device(),
                " but v is on ", v.device());
  }
  const int64_t B = v.size(0), H = v.size(1), W = v.size(2), C = v.size(3);
  const int64_t N = attn.size(3), KK = K * K;
  TORCH_CHECK(attn.size(4) == KK && attn.size(5) == KK, op, ": attn's last two dims must be "
              "K*K = ", KK, " (kernel_size ", K, "), got ", attn.size(4), " x ", attn.size(5));
  TORCH_CHECK(N >= 1 && C % N == 0, op, ": the channels C = ", C, " of v must be divisible by "
              "the heads N = attn.size(3) = ", N);
  const int64_t h = H + 2 * p >= K ? (H + 2 * p - K) / s + 1 : 0;
  const int64_t w = W + 2 * p >= K ? (W + 2 * p - K) / s + 1 : 0;
  TORCH_CHECK(attn.size(0) == B && attn.size(1) == h && attn.size(2) == w, op,
              ": attn's (B, h, w) must be (", B, ", ", h, ", ", w, ") for v of shape ",
              v.sizes(), " and kernel_size=", K, ", padding=", p, ", stride=", s, ", got (",
              attn.size(0), ", ", attn.size(1), ", ", attn.size(2), ")");
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(W * C <= kMax && B * H <= kMax && N * KK * KK <= kMax, op,
              ": tensors too large for this kernel, v ", v.sizes(), ", attn ", attn.sizes());
  return OutlookGeom{static_cast<int>(H), static_cast<int>(W), static_cast<int>(h),
                     static_cast<int>(w), static_cast<int>(N), static_cast<int>(K),
                     static_cast<int>(p), static_cast<int>(s)};
}

// Host-side validation of mmattn::outlook_pool's arguments, shared by the CPU and CUDA entry
// points; returns the pooled grid (h, w) = (ceil(H / s), ceil(W / s)). `op` and `name` name the
// caller and its map in the messages (outlook_unpool_add checks its grad, of x's shape, here).
inline std::tuple<int64_t, int64_t> outlook_pool_check(const at::Tensor& x, int64_t stride,
                                                       const char* op = "outlook_pool",
                                                       const char* name = "x") {
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be 4-D (B, H, W, C), got shape ", x.sizes());
  TORCH_CHECK(x.is_floating_point(), op, ": ", name, " must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(stride >= 1 && stride <= 64, op, ": stride must be in [1, 64], got ", stride);
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(H >= 1 && W >= 1, op, ": H and W must be >= 1, got shape ", x.sizes());
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(W * C <= kMax && B * H <= kMax, op, ": ", name, " too large for this kernel, ",
              x.sizes());
  return {(H + stride - 1) / stride, (W + stride - 1) / stride};
}

// Host-side validation of mmattn::outlook_softmax's arguments, shared by the CPU and CUDA entry
// points; returns the number of groups of K^2 logits.
inline int64_t outlook_softmax_check(const at::Tensor& logits, int64_t kernel_size) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size <= 64, "outlook_softmax: kernel_size must be in "
              "[1, 64], got ", kernel_size);
  TORCH_CHECK(logits.dim() >= 1, "outlook_softmax: logits must have at least one dimension, "
              "got a scalar");
  TORCH_CHECK(logits.is_floating_point(), "outlook_softmax: logits must be floating point, got ",
              logits.scalar_type());
  const int64_t n = kernel_size * kernel_size;
  TORCH_CHECK(logits.size(-1) % n == 0, "outlook_softmax: the last dimension of logits must be "
              "a multiple of kernel_size^2 = ", n, ", got shape ", logits.sizes());
  return logits.numel() / n;
}

// Host-side validation of mmattn::outlook_unpool_add's arguments (grad (B, H, W, C), pooled
// (B, ceil(H / s), ceil(W / s), C)), shared by the CPU and CUDA entry points.
inline void outlook_unpool_add_check(const at::Tensor& grad, const at::Tensor& pooled,
                                     int64_t stride) {
  int64_t h = 0, w = 0;
  std::tie(h, w) = outlook_pool_check(grad, stride, "outlook_unpool_add", "grad");
  TORCH_CHECK(pooled.dim() == 4 && pooled.size(0) == grad.size(0) && pooled.size(1) == h &&
              pooled.size(2) == w && pooled.size(3) == grad.size(3), "outlook_unpool_add: "
              "pooled must be (B, ceil(H / s), ceil(W / s), C) = (", grad.size(0), ", ", h, ", ",
              w, ", ", grad.size(3), ") for grad of shape ", grad.sizes(), " and stride ", stride,
              ", got shape ", pooled.sizes());
  TORCH_CHECK(pooled.scalar_type() == grad.scalar_type(), "outlook_unpool_add: pooled dtype ",
              pooled.scalar_type(), " must match grad dtype ", grad.scalar_type());
  TORCH_CHECK(pooled.device() == grad.device(), "outlook_unpool_add: pooled is on ",
              pooled.device(), " but grad is on ", grad.device());
}

at::Tensor outlook_pool_cpu(const at::Tensor& x, int64_t stride);
at::Tensor outlook_unpool_add_cpu(const at::Tensor& grad, const at::Tensor& pooled,
                                  int64_t stride);
at::Tensor outlook_unpool_add_cuda(const at::Tensor& grad, const at::Tensor& pooled,
                                   int64_t stride);
at::Tensor outlook_softmax_cpu(const at::Tensor& logits, int64_t kernel_size, double scale);
at::Tensor outlook_softmax_cuda(const at::Tensor& logits, int64_t kernel_size, double scale);
at::Tensor outlook_fwd_cpu(const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size,
                           int64_t padding, int64_t stride, bool ones_column);
std::tuple<at::Tensor, at::Tensor> outlook_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& v,
                                                   const at::Tensor& attn, int64_t kernel_size,
                                                   int64_t padding, int64_t stride,
                                                   std::optional<double> softmax_scale);
at::Tensor outlook_fwd_cuda(const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size,
                            int64_t padding, int64_t stride, bool ones_column);
at::Tensor outlook_pool_cuda(const at::Tensor& x, int64_t stride);
std::tuple<at::Tensor, at::Tensor> outlook_bwd_cuda(const at::Tensor& grad_out,
                                                    const at::Tensor& v, const at::Tensor& attn,
                                                    int64_t kernel_size, int64_t padding,
                                                    int64_t stride,
                                                    std::optional<double> softmax_scale);

// Registers the CUDA implementations above in a torch::Library: mmattn's (cuda_ops.cpp), or the
// tests' emulated ones (a template, so that no CUDA source needs torch/library.h).
template <typename Library>
void register_outlook_cuda_ops(Library& m) {
  m.impl("outlook_fwd", &outlook_fwd_cuda);
  m.impl("outlook_bwd", &outlook_bwd_cuda);
  m.impl("outlook_pool", &outlook_pool_cuda);
  m.impl("outlook_softmax", &outlook_softmax_cuda);
  m.impl("outlook_unpool_add", &outlook_unpool_add_cuda);
}

}  // namespace mmattn
