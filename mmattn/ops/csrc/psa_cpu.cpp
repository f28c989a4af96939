// Polarized Self-Attention (arXiv 2107.00782) as one fused CPU op per direction, for the four
// forms mmattn.layers.PolarizedSelfAttention computes: the paper's Eq. 1-5 (parallel,
// sequential) and the authors' release (PSA_p, PSA_s). One call runs a whole block's forward,
// one call its backward (parameter gradients included): the cost of a small map is then its
// arithmetic, not hundreds of operator launches. The backward recomputes the forward's small
// quantities from x and the weights; nothing but x is kept between the two, and PSA_s's
// (C/2, H, W) value map exists only inside a call, one image at a time.
//
// Notation (per image): x[c][p], C channels, P = H*W pixels, Ch = C/2; weights as matrices.
//   channel branch (all forms): l_p = wq . x_p, pi = softmax_p(l), s = sum_p pi_p x_p,
//                               m = mean_p x_p;
//   paper:       A = sigmoid(LN_C(W_z (W_v s + b_v) + b_z)),
//                q = softmax(W_q' mz + b_q') with mz = A (.) m (sequential) or m,
//                S_p = sigmoid(ueff . x_p + q . b_v'),  u = W_v'^T q, ueff = A (.) u or u;
//                y = x A S (sequential) or x (A + S)
//   PSA_p:       A = sigmoid(W_up W_v s), u = W_v'^T W_q' m, S = sigmoid(softmax_p(u . x_p)),
//                y = x (A + S)
//   PSA_s:       A = sigmoid(W_2 relu(LN_Cb(W_1 W_v s + b_1)) + b_2), q = W_q' (A (.) m),
//                V[k][p] = softmax_p(sum_c W_v'[k][c] A_c x[c][p]), S_p = sigmoid(q . V_p),
//                y = x A S
// The derivations of the backward follow the forward line by line, in reverse (comments).
#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "psa_block.h"

namespace mmattn {
namespace {

template <typename T>
using Vec = std::vector<T>;

template <typename T>
T sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }

// sum_i a[i] b[i] in eight interleaved partial sums: independent chains the compiler can keep
// in vector registers (one running sum would be bound by the latency of its additions)
template <typename T>
T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  T acc = 0;
  for (; i < n; ++i) acc += a[i] * b[i];
  for (int k = 0; k < 8; ++k) acc += part[k];
  return acc;
}

// y[i] = sum_j W[i][j] v[j] (+ b[i]); W row-major (rows x cols)
template <typename T>
void matvec(const T* W, const T* v, const T* b, int64_t rows, int64_t cols, T* y) {
  for (int64_t i = 0; i < rows; ++i) y[i] = (b ? b[i] : T(0)) + dot(W + i * cols, v, cols);
}

// y[j] = sum_i W[i][j] v[i]: the transposed product
template <typename T>
void matvec_t(const T* W, const T* v, int64_t rows, int64_t cols, T* y) {
  std::fill(y, y + cols, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* w = W + i * cols;
    for (int64_t j = 0; j < cols; ++j) y[j] += w[j] * v[i];
  }
}

// G[i][j] += a[i] b[j]
template <typename T>
void outer_add(T* G, const T* a, const T* b, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    T* g = G + i * cols;
    for (int64_t j = 0; j < cols; ++j) g[j] += a[i] * b[j];
  }
}

// PSA_s's per-pixel (C/2 x C) products go to BLAS (at::mm on the raw buffers) from this many
// multiply-adds per image on; below it, the loops (an ATen call costs microseconds)
constexpr int64_t kBlasWork = 1 << 14;

template <typename T>
at::Tensor wrap(const T* data, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<T*>(data), {rows, cols},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out (rows x cols) = a (rows x inner) @ b (inner x cols), each given as a tensor view
template <typename T>
void mm_into(T* out, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor dst = wrap(out, a.size(0), b.size(1));
  at::mm_out(dst, a, b);
}

// softmax of v[0..n) in place
template <typename T>
void softmax(T* v, int64_t n) {
  T top = *std::max_element(v, v + n), total = 0;
  for (int64_t i = 0; i < n; ++i) total += (v[i] = std::exp(v[i] - top));
  for (int64_t i = 0; i < n; ++i) v[i] /= total;
}

// d_in = p (.) (d_out - sum p d_out): the softmax's backward
template <typename T>
void softmax_backward(const T* p, const T* d_out, int64_t n, T* d_in) {
  T dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += p[i] * d_out[i];
  for (int64_t i = 0; i < n; ++i) d_in[i] = p[i] * (d_out[i] - dot);
}

// out[p] = sum_c w[c] x[c][p] (+ bias)
template <typename T>
void contract_c(const T* x, const T* w, T bias, int64_t C, int64_t P, T* out) {
  std::fill(out, out + P, bias);
  for (int64_t c = 0; c < C; ++c) {
    const T wc = w[c];
    const T* xc = x + c * P;
    for (int64_t p = 0; p < P; ++p) out[p] += wc * xc[p];
  }
}

// out[c] = sum_p x[c][p] w[p]
template <typename T>
void contract_p(const T* x, const T* w, int64_t C, int64_t P, T* out) {
  for (int64_t c = 0; c < C; ++c) out[c] = dot(x + c * P, w, P);
}

// LayerNorm over n values without affine: zhat, and 1/std
template <typename T>
T layer_norm(const T* z, int64_t n, T eps, T* zhat) {
  T mu = 0, var = 0;
  for (int64_t i = 0; i < n; ++i) mu += z[i];
  mu /= n;
  for (int64_t i = 0; i < n; ++i) var += (z[i] - mu) * (z[i] - mu);
  const T rstd = T(1) / std::sqrt(var / n + eps);
  for (int64_t i = 0; i < n; ++i) zhat[i] = (z[i] - mu) * rstd;
  return rstd;
}

// the backward of zhat = LN(z): dz = rstd (dzhat - mean(dzhat) - zhat mean(dzhat zhat))
template <typename T>
void layer_norm_backward(const T* zhat, const T* dzhat, T rstd, int64_t n, T* dz) {
  T m1 = 0, m2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    m1 += dzhat[i];
    m2 += dzhat[i] * zhat[i];
  }
  m1 /= n;
  m2 /= n;
  for (int64_t i = 0; i < n; ++i) dz[i] = rstd * (dzhat[i] - m1 - zhat[i] * m2);
}

// Everything the forward computes for one image, kept for its backward.
template <typename T>
struct Image {
  int64_t C, Ch, P, Cb = 0;
  Vec<T> pi, s, m, v, a;           // channel branch: pi (P), s, m (C), v (Ch), A (C)
  Vec<T> z, zhat, h2; T rstd = 0;  // paper: z (C); PSA_s: z = W_1 v + b_1, h2 (Cb)
  Vec<T> mz, q, u, ueff, S, sig;   // spatial branch
  Vec<T> V;                        // PSA_s: softmaxed values (Ch x P)
  T c0 = 0;
};

// Weight pointers of the four forms (acc dtype, contiguous), in the op's list order.
template <typename T>
struct Weights {
  // paper: ch_wq, ch_bq, ch_wv, ch_bv, ch_wz, ch_bz, ln_weight, ln_bias, sp_wq, sp_bq, sp_wv,
  // sp_bv; PSA_p: wq_r, wv_r, w_up, wq_l, wv_l; PSA_s: wq_r, wv_r, w_1, b_1, ln_w, ln_b, w_2,
  // b_2, wq_l, wv_l
  std::vector<const T*> w;
  const T* operator[](size_t i) const { return w[i]; }
};

template <typename T>
void forward_image(const T* x, const Weights<T>& W, int64_t form, T eps, Image<T>& im, T* y) {
  const int64_t C = im.C, Ch = im.Ch, P = im.P;
  const bool paper = form == kPaperParallel || form == kPaperSequential;
  const bool sequential = form == kPaperSequential || form == kReleaseS;
  // channel branch: pi = softmax_p(wq . x_p), s = sum_p pi_p x_p, m = mean_p x_p
  im.pi.resize(P);
  contract_c(x, W[0], T(0), C, P, im.pi.data());
  softmax(im.pi.data(), P);
  im.s.resize(C);
  im.m.resize(C);
  contract_p(x, im.pi.data(), C, P, im.s.data());
  const Vec<T> ones(P, T(1));
  for (int64_t c = 0; c < C; ++c) im.m[c] = dot(x + c * P, ones.data(), P) / P;
  im.v.resize(Ch);
  im.a.resize(C);
  im.z.resize(C);
  if (paper) {  // A = sigmoid(LN(W_z (W_v s + b_v) + b_z))
    matvec(W[2], im.s.data(), W[3], Ch, C, im.v.data());
    matvec(W[4], im.v.data(), W[5], C, Ch, im.z.data());
    im.zhat.resize(C);
    im.rstd = layer_norm(im.z.data(), C, eps, im.zhat.data());
    for (int64_t c = 0; c < C; ++c) im.a[c] = sigmoid(W[6][c] * im.zhat[c] + W[7][c]);
  } else if (form == kReleaseP) {  // A = sigmoid(W_up W_v s)
    matvec(W[1], im.s.data(), static_cast<const T*>(nullptr), Ch, C, im.v.data());
    matvec(W[2], im.v.data(), static_cast<const T*>(nullptr), C, Ch, im.z.data());
    for (int64_t c = 0; c < C; ++c) im.a[c] = sigmoid(im.z[c]);
  } else {  // A = sigmoid(W_2 relu(LN(W_1 W_v s + b_1)) + b_2)
    const int64_t Cb = im.Cb;
    matvec(W[1], im.s.data(), static_cast<const T*>(nullptr), Ch, C, im.v.data());
    Vec<T> h1(Cb), r(Cb);
    matvec(W[2], im.v.data(), W[3], Cb, Ch, h1.data());
    im.zhat.resize(Cb);
    im.h2.resize(Cb);
    im.rstd = layer_norm(h1.data(), Cb, eps, im.zhat.data());
    for (int64_t j = 0; j < Cb; ++j) {
      im.h2[j] = W[4][j] * im.zhat[j] + W[5][j];
      r[j] = std::max(im.h2[j], T(0));
    }
    matvec(W[6], r.data(), W[7], C, Cb, im.z.data());
    for (int64_t c = 0; c < C; ++c) im.a[c] = sigmoid(im.z[c]);
  }
  // spatial branch
  im.S.resize(P);
  im.u.resize(C);
  im.q.resize(Ch);
  im.mz.resize(C);
  for (int64_t c = 0; c < C; ++c) im.mz[c] = sequential ? im.a[c] * im.m[c] : im.m[c];
  if (paper) {  // q = softmax(W_q' mz + b_q'), u = W_v'^T q, S_p = sigmoid(ueff . x_p + q . b_v')
    matvec(W[8], im.mz.data(), W[9], Ch, C, im.q.data());
    softmax(im.q.data(), Ch);
    matvec_t(W[10], im.q.data(), Ch, C, im.u.data());
    im.c0 = 0;
    for (int64_t k = 0; k < Ch; ++k) im.c0 += im.q[k] * W[11][k];
    im.ueff.resize(C);
    for (int64_t c = 0; c < C; ++c) im.ueff[c] = sequential ? im.u[c] * im.a[c] : im.u[c];
    contract_c(x, im.ueff.data(), im.c0, C, P, im.S.data());
    for (int64_t p = 0; p < P; ++p) im.S[p] = sigmoid(im.S[p]);
  } else if (form == kReleaseP) {  // S = sigmoid(softmax_p(u . x_p)), u = W_v'^T W_q' m
    matvec(W[3], im.m.data(), static_cast<const T*>(nullptr), Ch, C, im.q.data());
    matvec_t(W[4], im.q.data(), Ch, C, im.u.data());
    im.sig.resize(P);
    contract_c(x, im.u.data(), T(0), C, P, im.sig.data());
    softmax(im.sig.data(), P);
    for (int64_t p = 0; p < P; ++p) im.S[p] = sigmoid(im.sig[p]);
  } else {  // q = W_q' (A m); V = softmax_p(W_v' diag(A) x); S_p = sigmoid(q . V_p)
    const T* wq = W[8];
    const T* wv = W[9];
    matvec(wq, im.mz.data(), static_cast<const T*>(nullptr), Ch, C, im.q.data());
    im.V.assign(Ch * P, T(0));
    if (Ch * C * P >= kBlasWork) {  // V = (W_v' diag(A)) x
      Vec<T> wa(Ch * C);
      for (int64_t k = 0; k < Ch; ++k)
        for (int64_t c = 0; c < C; ++c) wa[k * C + c] = wv[k * C + c] * im.a[c];
      mm_into(im.V.data(), wrap(wa.data(), Ch, C), wrap(x, C, P));
    } else {
      for (int64_t k = 0; k < Ch; ++k) {
        T* vk = im.V.data() + k * P;
        for (int64_t c = 0; c < C; ++c) {
          const T w = wv[k * C + c] * im.a[c];
          const T* xc = x + c * P;
          for (int64_t p = 0; p < P; ++p) vk[p] += w * xc[p];
        }
      }
    }
    for (int64_t k = 0; k < Ch; ++k) softmax(im.V.data() + k * P, P);
    std::fill(im.S.begin(), im.S.end(), T(0));
    for (int64_t k = 0; k < Ch; ++k) {
      const T qk = im.q[k];
      const T* vk = im.V.data() + k * P;
      for (int64_t p = 0; p < P; ++p) im.S[p] += qk * vk[p];
    }
    for (int64_t p = 0; p < P; ++p) im.S[p] = sigmoid(im.S[p]);
  }
  if (y == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
    const T ac = im.a[c];
    for (int64_t p = 0; p < P; ++p)
      y[c * P + p] = sequential ? x[c * P + p] * ac * im.S[p] : x[c * P + p] * (ac + im.S[p]);
  }
}

// dx for one image; the weight gradients are added into dW (acc dtype, the weights' shapes).
template <typename T>
void backward_image(const T* g, const T* x, const Weights<T>& W, int64_t form, T eps,
                    Image<T>& im, T* dx, std::vector<T*>& dW) {
  const int64_t C = im.C, Ch = im.Ch, P = im.P;
  forward_image<T>(x, W, form, eps, im, nullptr);
  const bool paper = form == kPaperParallel || form == kPaperSequential;
  const bool sequential = form == kPaperSequential || form == kReleaseS;
  const T* a = im.a.data();
  const T* S = im.S.data();
  // y = x A S or x (A + S):  dx = G (A S or A + S), dA_c = sum_p G x (S or 1),
  // dS_p = sum_c G x (A or 1)
  Vec<T> da(C, T(0)), dS(P, T(0)), gx(P), ones(P, T(1));
  for (int64_t c = 0; c < C; ++c) {
    const T* gc = g + c * P;
    const T* xc = x + c * P;
    T* dxc = dx + c * P;
    const T ac = a[c], scale = sequential ? ac : T(1);
    for (int64_t p = 0; p < P; ++p) {
      gx[p] = gc[p] * xc[p];
      dS[p] += scale * gx[p];
      dxc[p] = gc[p] * (sequential ? ac * S[p] : ac + S[p]);
    }
    da[c] = dot(gx.data(), sequential ? S : ones.data(), P);
  }
  Vec<T> dm(C, T(0));  // dL/dm (m = mean_p x_p)
  if (paper) {
    // S_p = sigmoid(t_p), t_p = ueff . x_p + c0
    Vec<T> dt(P), dueff(C);
    T dc0 = 0;
    for (int64_t p = 0; p < P; ++p) {
      dt[p] = dS[p] * S[p] * (T(1) - S[p]);
      dc0 += dt[p];
    }
    contract_p(x, dt.data(), C, P, dueff.data());
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) dx[c * P + p] += im.ueff[c] * dt[p];
    // ueff = u (.) A (sequential) or u
    Vec<T> du(C);
    for (int64_t c = 0; c < C; ++c) {
      du[c] = sequential ? dueff[c] * a[c] : dueff[c];
      if (sequential) da[c] += dueff[c] * im.u[c];
    }
    // u = W_v'^T q, c0 = q . b_v':  dq = W_v' du + dc0 b_v', dW_v' = q du^T, db_v' = dc0 q
    Vec<T> dq(Ch), dgq(Ch), dmz(C);
    matvec(W[10], du.data(), static_cast<const T*>(nullptr), Ch, C, dq.data());
    for (int64_t k = 0; k < Ch; ++k) {
      dq[k] += dc0 * W[11][k];
      dW[11][k] += dc0 * im.q[k];
    }
    outer_add(dW[10], im.q.data(), du.data(), Ch, C);
    // q = softmax(W_q' mz + b_q')
    softmax_backward(im.q.data(), dq.data(), Ch, dgq.data());
    outer_add(dW[8], dgq.data(), im.mz.data(), Ch, C);
    for (int64_t k = 0; k < Ch; ++k) dW[9][k] += dgq[k];
    matvec_t(W[8], dgq.data(), Ch, C, dmz.data());
    for (int64_t c = 0; c < C; ++c) {  // mz = A (.) m or m
      dm[c] = sequential ? dmz[c] * a[c] : dmz[c];
      if (sequential) da[c] += dmz[c] * im.m[c];
    }
  } else if (form == kReleaseP) {
    // S = sigmoid(sig), sig = softmax_p(t), t_p = u . x_p
    Vec<T> dsig(P), dt(P), du(C), dq(Ch);
    for (int64_t p = 0; p < P; ++p) dsig[p] = dS[p] * S[p] * (T(1) - S[p]);
    softmax_backward(im.sig.data(), dsig.data(), P, dt.data());
    contract_p(x, dt.data(), C, P, du.data());
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) dx[c * P + p] += im.u[c] * dt[p];
    // u = W_v'^T q, q = W_q' m
    matvec(W[4], du.data(), static_cast<const T*>(nullptr), Ch, C, dq.data());
    outer_add(dW[4], im.q.data(), du.data(), Ch, C);
    outer_add(dW[3], dq.data(), im.m.data(), Ch, C);
    matvec_t(W[3], dq.data(), Ch, C, dm.data());
  } else {
    // S_p = sigmoid(t_p), t_p = sum_k q_k V[k][p]
    const T* wv = W[9];
    Vec<T> dt(P), dq(Ch, T(0)), dvl(Ch * P), e(C * P, T(0));
    for (int64_t p = 0; p < P; ++p) dt[p] = dS[p] * S[p] * (T(1) - S[p]);
    for (int64_t k = 0; k < Ch; ++k) {
      const T* vk = im.V.data() + k * P;
      const T vdt = dot(vk, dt.data(), P);
      dq[k] = vdt;
      // V[k] = softmax_p(Vl[k]), dV[k][p] = q_k dt_p: dVl[k][p] = V q_k (dt_p - V[k] . dt)
      const T qk = im.q[k];
      T* dvk = dvl.data() + k * P;
      for (int64_t p = 0; p < P; ++p) dvk[p] = vk[p] * qk * (dt[p] - vdt);
    }
    // Vl[k][p] = sum_c W_v'[k][c] A_c x[c][p]:
    //   dW_v'[k][c] = A_c sum_p dVl[k][p] x[c][p],  e[c][p] = sum_k W_v'[k][c] dVl[k][p]
    if (Ch * C * P >= kBlasWork) {
      const at::Tensor dvl_t = wrap(dvl.data(), Ch, P);
      mm_into(e.data(), wrap(wv, Ch, C).t(), dvl_t);
      Vec<T> g(Ch * C);
      mm_into(g.data(), dvl_t, wrap(x, C, P).t());
      for (int64_t k = 0; k < Ch; ++k)
        for (int64_t c = 0; c < C; ++c) dW[9][k * C + c] += g[k * C + c] * a[c];
    } else {
      for (int64_t k = 0; k < Ch; ++k) {
        const T* dvk = dvl.data() + k * P;
        for (int64_t c = 0; c < C; ++c) {
          const T w = wv[k * C + c];
          T* ec = e.data() + c * P;
          for (int64_t p = 0; p < P; ++p) ec[p] += w * dvk[p];
          dW[9][k * C + c] += dot(dvk, x + c * P, P) * a[c];
        }
      }
    }
    // the value input A_c x[c][p]: dx += A e, dA += sum_p x e
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t p = 0; p < P; ++p) dx[c * P + p] += a[c] * e[c * P + p];
      da[c] += dot(x + c * P, e.data() + c * P, P);
    }
    // q = W_q' mz, mz = A (.) m
    Vec<T> dmz(C);
    outer_add(dW[8], dq.data(), im.mz.data(), Ch, C);
    matvec_t(W[8], dq.data(), Ch, C, dmz.data());
    for (int64_t c = 0; c < C; ++c) {
      dm[c] = dmz[c] * a[c];
      da[c] += dmz[c] * im.m[c];
    }
  }
  // m = mean_p x_p
  for (int64_t c = 0; c < C; ++c)
    for (int64_t p = 0; p < P; ++p) dx[c * P + p] += dm[c] / P;
  // the channel mask A, back to dv (the gradient of v = W_v s (+ b_v))
  Vec<T> dz(C), dv(Ch);
  for (int64_t c = 0; c < C; ++c) dz[c] = da[c] * a[c] * (T(1) - a[c]);  // A = sigmoid(.)
  const T* wv_ch;
  if (paper) {  // sigmoid(LN(z) w + b), z = W_z v + b_z
    Vec<T> dzhat(C), dzz(C);
    for (int64_t c = 0; c < C; ++c) {
      dW[6][c] += dz[c] * im.zhat[c];
      dW[7][c] += dz[c];
      dzhat[c] = dz[c] * W[6][c];
    }
    layer_norm_backward(im.zhat.data(), dzhat.data(), im.rstd, C, dzz.data());
    outer_add(dW[4], dzz.data(), im.v.data(), C, Ch);
    for (int64_t c = 0; c < C; ++c) dW[5][c] += dzz[c];
    matvec_t(W[4], dzz.data(), C, Ch, dv.data());
    for (int64_t k = 0; k < Ch; ++k) dW[3][k] += dv[k];
    wv_ch = W[2];
  } else if (form == kReleaseP) {  // z = W_up v
    outer_add(dW[2], dz.data(), im.v.data(), C, Ch);
    matvec_t(W[2], dz.data(), C, Ch, dv.data());
    wv_ch = W[1];
  } else {  // z = W_2 relu(h2) + b_2, h2 = LN(h1) w + b, h1 = W_1 v + b_1
    const int64_t Cb = im.Cb;
    Vec<T> r(Cb), dr(Cb), dzhat(Cb), dh1(Cb);
    for (int64_t j = 0; j < Cb; ++j) r[j] = std::max(im.h2[j], T(0));
    outer_add(dW[6], dz.data(), r.data(), C, Cb);
    for (int64_t c = 0; c < C; ++c) dW[7][c] += dz[c];
    matvec_t(W[6], dz.data(), C, Cb, dr.data());
    for (int64_t j = 0; j < Cb; ++j) {
      const T dh2 = im.h2[j] > T(0) ? dr[j] : T(0);
      dW[4][j] += dh2 * im.zhat[j];
      dW[5][j] += dh2;
      dzhat[j] = dh2 * W[4][j];
    }
    layer_norm_backward(im.zhat.data(), dzhat.data(), im.rstd, Cb, dh1.data());
    outer_add(dW[2], dh1.data(), im.v.data(), Cb, Ch);
    for (int64_t j = 0; j < Cb; ++j) dW[3][j] += dh1[j];
    matvec_t(W[2], dh1.data(), Cb, Ch, dv.data());
    wv_ch = W[1];
  }
  // v = W_v s: dW_v = dv s^T, ds = W_v^T dv
  const size_t wv_index = paper ? 2 : 1;
  Vec<T> ds(C), dpi(P), dl(P), dwq(C);
  outer_add(dW[wv_index], dv.data(), im.s.data(), Ch, C);
  matvec_t(wv_ch, dv.data(), Ch, C, ds.data());
  // s = sum_p pi_p x_p: dx += pi_p ds, dpi_p = ds . x_p; pi = softmax(l), l_p = wq . x_p
  contract_c(x, ds.data(), T(0), C, P, dpi.data());
  softmax_backward(im.pi.data(), dpi.data(), P, dl.data());
  contract_p(x, dl.data(), C, P, dwq.data());
  const T* wq = W[0];
  for (int64_t c = 0; c < C; ++c) {
    dW[0][c] += dwq[c];
    for (int64_t p = 0; p < P; ++p) dx[c * P + p] += im.pi[p] * ds[c] + wq[c] * dl[p];
  }
  // paper: ch_bq shifts every logit equally, the softmax removes it: its gradient is 0
}

template <typename T>
Weights<T> weight_ptrs(const std::vector<at::Tensor>& wa) {
  Weights<T> W;
  for (const auto& w : wa) W.w.push_back(w.data_ptr<T>());
  return W;
}

at::Tensor psa_block_fwd_cpu(const at::Tensor& x, at::TensorList weights_in, int64_t form,
                             double eps) {
  std::vector<at::Tensor> weights(weights_in.begin(), weights_in.end());
  check_args(x, weights, form);
  const auto acc = acc_type(x);
  const at::Tensor xa = x.to(acc).contiguous();
  const auto wa = acc_weights(weights, form, x.size(1), acc);
  at::Tensor y = at::empty_like(xa);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "psa_block_fwd_cpu", [&] {
    const auto W = weight_ptrs<scalar_t>(wa);
    const scalar_t* xp = xa.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        Image<scalar_t> im;
        im.C = C, im.Ch = C / 2, im.P = P, im.Cb = form == kReleaseS ? wa[3].numel() : 0;
        forward_image<scalar_t>(xp + n * C * P, W, form, static_cast<scalar_t>(eps), im,
                                yp + n * C * P);
      }
    });
  });
  return y.to(x.scalar_type()).contiguous(x.suggest_memory_format());
}

std::tuple<at::Tensor, std::vector<at::Tensor>> psa_block_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList weights_in, int64_t form,
    double eps) {
  std::vector<at::Tensor> weights(weights_in.begin(), weights_in.end());
  check_args(x, weights, form);
  TORCH_CHECK(grad.sizes() == x.sizes(), "psa_block_bwd: grad must have x's shape ", x.sizes(),
              ", got ", grad.sizes());
  const auto acc = acc_type(x);
  const at::Tensor xa = x.to(acc).contiguous(), ga = grad.to(acc).contiguous();
  const auto wa = acc_weights(weights, form, x.size(1), acc);
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  at::Tensor dx = at::empty_like(xa);
  // the weight gradients of each image in one row of one buffer (images run in parallel),
  // summed over the images at the end
  std::vector<int64_t> offsets{0};
  for (const auto& w : wa) offsets.push_back(offsets.back() + w.numel());
  at::Tensor dws = at::zeros({N, offsets.back()}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "psa_block_bwd_cpu", [&] {
    const auto W = weight_ptrs<scalar_t>(wa);
    const scalar_t* xp = xa.data_ptr<scalar_t>();
    const scalar_t* gp = ga.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* dwp = dws.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        Image<scalar_t> im;
        im.C = C, im.Ch = C / 2, im.P = P, im.Cb = form == kReleaseS ? wa[3].numel() : 0;
        std::vector<scalar_t*> dW;
        for (size_t i = 0; i + 1 < offsets.size(); ++i)
          dW.push_back(dwp + n * offsets.back() + offsets[i]);
        backward_image<scalar_t>(gp + n * C * P, xp + n * C * P, W, form,
                                 static_cast<scalar_t>(eps), im, dxp + n * C * P, dW);
      }
    });
  });
  const at::Tensor total = N == 1 ? dws[0] : dws.sum(0);
  std::vector<at::Tensor> acc_grads;
  for (size_t i = 0; i < weights.size(); ++i)
    acc_grads.push_back(total.slice(0, offsets[i], offsets[i + 1]));
  return {dx.to(x.scalar_type()).contiguous(x.suggest_memory_format()),
          weight_gradients(acc_grads, weights)};
}

}  // namespace
}  // namespace mmattn

TORCH_LIBRARY_IMPL(mmattn, CPU, m) {
  m.impl("psa_block_fwd", &mmattn::psa_block_fwd_cpu);
  m.impl("psa_block_bwd", &mmattn::psa_block_bwd_cpu);
}

