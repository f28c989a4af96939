// Outlook attention aggregation on the CPU: Eq. 4-5 of VOLO (arXiv 2106.13112), forward and
// backward, fused (the K^2-times larger unfolded tensors are never built).
//
//   y      = Fold(A_hat V_Delta)               gathered per output pixel (Eq. 4-5)
//   grad_v = the same gather with m <-> q swapped and grad_out in place of v
//   grad_A[b,i,j,n,m,q] = <grad_out(pixel m), v(pixel q)> over the channels of head n
//   grad_L = scale A (grad_A - sum_q A grad_A)  with softmax_scale: the logits' gradient
//
// Index arithmetic lives in outlook.h, shared with the CUDA kernels.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "outlook.h"

namespace mmattn {
namespace {

// out(b,u,x,:) = sum over the sources of (b,u,x) of attn weight (per head) * src(pixel, :); out's
// pixels ldo apart, with ones the kOnesChannels after C (1, 0, ..., 0).
template <bool TRANSPOSED, int KT, typename scalar_t>
void outlook_gather_cpu(const scalar_t* src, const scalar_t* attn, scalar_t* out,
                        const OutlookGeom& g, int64_t B, int64_t C, int64_t ldo, bool ones) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t d = C / g.N, K4 = static_cast<int64_t>(g.K) * g.K * g.K * g.K;
  const int64_t pixels = B * g.H * g.W;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C * g.K * g.K));
  at::parallel_for(0, pixels, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_buf(C);
    acc_t* __restrict__ acc = acc_buf.data();
    for (int64_t pix = begin; pix < end; ++pix) {
      const int x = static_cast<int>(pix % g.W);
      const int u = static_cast<int>((pix / g.W) % g.H);
      const int64_t b = pix / (static_cast<int64_t>(g.W) * g.H);
      std::fill(acc, acc + C, acc_t(0));
      outlook_for_each_source<TRANSPOSED, KT>(g, b, u, x, [&](int64_t a_off, int64_t src_pix) {
        const scalar_t* __restrict__ sp = src + src_pix * C;
        for (int n = 0; n < g.N; ++n) {
          const acc_t wgt = static_cast<acc_t>(attn[a_off + n * K4]);
          acc_t* __restrict__ a = acc + n * d;
          const scalar_t* __restrict__ s = sp + n * d;
          for (int64_t c = 0; c < d; ++c) a[c] += wgt * static_cast<acc_t>(s[c]);
        }
      });
      scalar_t* __restrict__ op = out + pix * ldo;
      for (int64_t c = 0; c < C; ++c) op[c] = static_cast<scalar_t>(acc[c]);
      if (ones)
        for (int k = 0; k < kOnesChannels; ++k) op[C + k] = scalar_t(k == 0 ? 1 : 0);
    }
  });
}

// K = 3 (VOLO's) with the window loops unrolled, like the CUDA fast path; any K otherwise.
template <bool TRANSPOSED, typename scalar_t>
void outlook_gather_cpu_any_k(const scalar_t* src, const scalar_t* attn, scalar_t* out,
                              const OutlookGeom& g, int64_t B, int64_t C, bool ones = false) {
  const int64_t ldo = C + (ones ? kOnesChannels : 0);
  if (g.K == 3)
    outlook_gather_cpu<TRANSPOSED, 3>(src, attn, out, g, B, C, ldo, ones);
  else
    outlook_gather_cpu<TRANSPOSED, 0>(src, attn, out, g, B, C, ldo, ones);
}

// Dot product with 8 independent partial sums (lets the compiler vectorise without
// reassociating a single sum).
template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T part[8] = {};
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    for (int l = 0; l < 8; ++l) part[l] += a[c + l] * b[c + l];
  T sum = 0;
  for (; c < n; ++c) sum += a[c] * b[c];
  for (int l = 0; l < 8; ++l) sum += part[l];
  return sum;
}

// grad_attn, one window at a time: stage its K^2 rows of grad_out and v (as acc_t, zero in the
// padding), then the N*K^2*K^2 dot products of length d, a row (n, m) at a time; with softmax,
// the row's logits' gradient from them (scale A (grad_A - sum_q A grad_A), in acc_t).
template <typename scalar_t>
void outlook_grad_attn_cpu(const scalar_t* gout, const scalar_t* v, const scalar_t* attn,
                           scalar_t* gattn, const OutlookGeom& g, int64_t B, int64_t C,
                           const std::optional<double>& softmax_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int KK = g.K * g.K;
  const int64_t d = C / g.N;
  const int64_t windows = B * g.h * g.w;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.N * KK * KK * d));
  at::parallel_for(0, windows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gs(KK * C), vs(KK * C), row(KK);
    std::vector<char> valid(KK);
    for (int64_t win = begin; win < end; ++win) {
      const int j = static_cast<int>(win % g.w);
      const int i = static_cast<int>((win / g.w) % g.h);
      const int64_t b = win / (static_cast<int64_t>(g.w) * g.h);
      for (int t = 0; t < KK; ++t) {
        int64_t pix;
        valid[t] = outlook_window_pixel(g, b, i, j, t, pix);
        if (!valid[t]) continue;
        const scalar_t* gp = gout + pix * C;
        const scalar_t* vp = v + pix * C;
        for (int64_t c = 0; c < C; ++c) {
          gs[t * C + c] = static_cast<acc_t>(gp[c]);
          vs[t * C + c] = static_cast<acc_t>(vp[c]);
        }
      }
      scalar_t* out = gattn + win * g.N * KK * KK;
      const scalar_t* a = attn + win * g.N * KK * KK;
      for (int n = 0; n < g.N; ++n)
        for (int m = 0; m < KK; ++m, out += KK, a += KK) {
          acc_t sum = 0;
          for (int q = 0; q < KK; ++q) {
            row[q] = valid[m] && valid[q]
                ? dot(gs.data() + m * C + n * d, vs.data() + q * C + n * d, d) : acc_t(0);
            if (softmax_scale) sum += static_cast<acc_t>(a[q]) * row[q];
          }
          if (softmax_scale) {
            const auto scale = static_cast<acc_t>(*softmax_scale);
            for (int q = 0; q < KK; ++q)
              out[q] = static_cast<scalar_t>(scale * static_cast<acc_t>(a[q]) * (row[q] - sum));
          } else {
            for (int q = 0; q < KK; ++q) out[q] = static_cast<scalar_t>(row[q]);
          }
        }
    }
  });
}

}  // namespace

at::Tensor outlook_fwd_cpu(const at::Tensor& v, const at::Tensor& attn, int64_t kernel_size,
                           int64_t padding, int64_t stride, bool ones_column) {
  const OutlookGeom g = outlook_check("outlook_fwd", nullptr, v, attn, kernel_size, padding,
                                      stride);
  const at::Tensor vc = v.contiguous(), ac = attn.contiguous();
  at::Tensor y = at::empty({vc.size(0), vc.size(1), vc.size(2),
                            vc.size(3) + (ones_column ? kOnesChannels : 0)},
                           vc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "outlook_fwd_cpu",
                                  [&] {
    outlook_gather_cpu_any_k<false>(vc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(),
                                    y.mutable_data_ptr<scalar_t>(), g, vc.size(0), vc.size(3),
                                    ones_column);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> outlook_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& v,
                                                   const at::Tensor& attn, int64_t kernel_size,
                                                   int64_t padding, int64_t stride,
                                                   std::optional<double> softmax_scale) {
  const OutlookGeom g = outlook_check("outlook_bwd", &grad_out, v, attn, kernel_size, padding,
                                      stride);
  const at::Tensor gc = grad_out.contiguous(), vc = v.contiguous(), ac = attn.contiguous();
  at::Tensor grad_v = at::empty(vc.sizes(), vc.options());
  at::Tensor grad_attn = at::empty(ac.sizes(), ac.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "outlook_bwd_cpu",
                                  [&] {
    outlook_gather_cpu_any_k<true>(gc.const_data_ptr<scalar_t>(), ac.const_data_ptr<scalar_t>(),
                                   grad_v.mutable_data_ptr<scalar_t>(), g, vc.size(0), vc.size(3));
    outlook_grad_attn_cpu<scalar_t>(gc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                                    ac.const_data_ptr<scalar_t>(),
                                    grad_attn.mutable_data_ptr<scalar_t>(), g, vc.size(0),
                                    vc.size(3), softmax_scale);
  });
  return {grad_v, grad_attn};
}

// mmattn::outlook_pool on the CPU: ATen's average pooling (ceil mode) of x's NCHW view, the
// result channels-last and dense like the CUDA kernel's.
at::Tensor outlook_pool_cpu(const at::Tensor& x, int64_t stride) {
  outlook_pool_check(x, stride);
  return at::avg_pool2d(x.permute({0, 3, 1, 2}), {stride, stride}, {stride, stride}, {0, 0},
                        /*ceil_mode=*/true)
      .permute({0, 2, 3, 1})
      .contiguous();
}

// mmattn::outlook_softmax on the CPU: ATen's softmax of the scaled logits, each group of K^2 a
// row, in the accumulation type (float for 16-bit logits), the result in the logits' dtype.
at::Tensor outlook_softmax_cpu(const at::Tensor& logits, int64_t kernel_size, double scale) {
  outlook_softmax_check(logits, kernel_size);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::softmax(logits.reshape({-1, kernel_size * kernel_size}).to(acc).mul(scale), -1)
      .to(logits.scalar_type())
      .view(logits.sizes());
}

// mmattn::outlook_unpool_add on the CPU: grad plus ATen's backward of the pooling (ceil mode,
// each cell's gradient shared by the pixels of its window inside the image), in the
// accumulation type (float for 16-bit tensors: one rounding, as the CUDA kernel's).
at::Tensor outlook_unpool_add_cpu(const at::Tensor& grad, const at::Tensor& pooled,
                                  int64_t stride) {
  outlook_unpool_add_check(grad, pooled, stride);
  const at::ScalarType acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor spread = at::avg_pool2d_backward(
      pooled.to(acc).permute({0, 3, 1, 2}), grad.permute({0, 3, 1, 2}).to(acc),
      {stride, stride}, {stride, stride}, {0, 0}, /*ceil_mode=*/true,
      /*count_include_pad=*/true, std::nullopt);
  return spread.permute({0, 2, 3, 1}).add(grad).to(grad.scalar_type()).contiguous();
}

}  // namespace mmattn

TORCH_LIBRARY_IMPL(mmattn, CPU, m) {
  m.impl("outlook_unpool_add", &mmattn::outlook_unpool_add_cpu);
  m.impl("outlook_pool", &mmattn::outlook_pool_cpu);
  m.impl("outlook_softmax", &mmattn::outlook_softmax_cpu);
  m.impl("outlook_fwd", &mmattn::outlook_fwd_cpu);
  m.impl("outlook_bwd", &mmattn::outlook_bwd_cpu);
}
