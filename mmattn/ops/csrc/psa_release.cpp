// The authors' release of Polarized Self-Attention (DeLightCMU/PSA, PSA_p and PSA_s;
// mmattn.layers.PolarizedSelfAttention with variant='official'): one C++ function per
// direction, written as ATen operations on the whole batch, so it runs on any device. On CUDA
// tensors it is how mmattn::psa_block_fwd / psa_block_bwd run PSA_s (psa_cuda.cu; PSA_p runs
// on the pass kernels, psa_release_p.cuh; the CPU has its own loops, psa_cpu.cpp; the autograd
// registered there serves every device). It is also the op mmattn::psa_release_fwd /
// psa_release_bwd on every device, so that the tests run this very code on the CPU.
//
// What it buys over the module's folded PyTorch path (PolarizedSelfAttention._official_folded):
// a block's forward is one op call and its backward one more, with the autograd in C++: the
// 40-70 operators of a training step are launched from C++ with no Python between them and no
// autograd graph over them; and only x and the weights are kept for the backward, which
// recomputes the rest. PSA_s's (N, C/2, H, W) softmaxed value map exists only inside a call.
//
// Notation (per image; batched over the images below): x[c][p], C channels, P = H*W pixels,
// Ch = C/2; weights as matrices (W_v = conv_v_right, W_up = conv_up, W_1/b_1, LN, W_2/b_2 the
// PSA_s bottleneck, W_q' = conv_q_left, W_v' = conv_v_left).
//   channel branch: l_p = wq . x_p, pi = softmax_p(l), s = sum_p pi_p x_p, m = mean_p x_p, v = W_v s
//     PSA_p: A = sigmoid(W_up v)
//     PSA_s: A = sigmoid(W_2 relu(LN_Cb(W_1 v + b_1)) + b_2)
//   spatial branch:
//     PSA_p: q = W_q' m, u = W_v'^T q, sig = softmax_p(u . x_p), S = sigmoid(sig); y = x (A + S)
//     PSA_s: q = W_q' (A (.) m), V[k][p] = softmax_p(sum_c W_v'[k][c] A_c x[c][p]),
//            S_p = sigmoid(q . V_p); y = x A S
// The products with x-sized operands run in x's dtype (as the release's 1x1 convolutions do;
// tensor cores for half types, and for float32 where torch.backends.cuda.matmul allows TF32);
// the softmaxes and the C-sized chain run in float32 (float64 for float64 inputs).
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "psa_block.h"

namespace mmattn {
namespace {

struct Dims {
  int64_t N, C, H, W, P;
};

// sum_c vec[n][c] x[n][c][p] -> (N, P), acc: one batched product in x's dtype
at::Tensor contract_c(const at::Tensor& xf, const at::Tensor& vec, at::ScalarType acc) {
  return at::bmm(vec.to(xf.scalar_type()).unsqueeze(1), xf).squeeze(1).to(acc);
}

// sum_p x[n][c][p] vec[n][p] -> (N, C), acc
at::Tensor contract_p(const at::Tensor& xf, const at::Tensor& vec, at::ScalarType acc) {
  return at::bmm(vec.to(xf.scalar_type()).unsqueeze(1), xf.transpose(1, 2)).squeeze(1).to(acc);
}

// out[n][c][p] += sum_k left[n][c][k] right[n][k][p], in place on an (N, C, H, W) tensor dense in
// either layout (for channels_last, as the (N, P, C) product)
void add_low_rank_(const at::Tensor& out, const at::Tensor& left, const at::Tensor& right) {
  at::Tensor of = out.flatten(2);
  if (of.stride(1) == 1 && of.size(1) > 1)
    of.transpose(1, 2).baddbmm_(right.transpose(1, 2), left.transpose(1, 2));
  else
    of.baddbmm_(left, right);
}

// The forward's quantities of a batch (acc dtype unless noted), kept by the backward's
// recomputation.
struct Forward {
  at::Tensor pi, s, m, v;       // pi (N, P); s, m (N, C); v (N, Ch)
  at::Tensor h1, mean, rstd;    // PSA_s: W_1 v + b_1 (N, Cb) and its LayerNorm statistics
  at::Tensor h2;                // PSA_s: LN(h1) w + b (N, Cb)
  at::Tensor a;                 // A (N, C)
  at::Tensor mz, q;             // PSA_s: A (.) m; q (N, Ch)
  at::Tensor u, sig;            // PSA_p: u (N, C); sig (N, P)
  at::Tensor wa, V;             // PSA_s: W_v' diag(A) (N, Ch, C), x's dtype; V (N, Ch, P)
  at::Tensor S;                 // S (N, P)
};

Forward forward_parts(const at::Tensor& xf, const std::vector<at::Tensor>& W, int64_t form,
                      double eps, const Dims& d, at::ScalarType acc) {
  Forward f;
  // channel branch: pi = softmax_p(wq . x_p), s = sum_p pi_p x_p, m = mean_p x_p, v = W_v s
  f.pi = at::softmax(contract_c(xf, W[0].expand({d.N, d.C}), acc), -1);
  f.s = contract_p(xf, f.pi, acc);
  f.m = at::mean(xf, {2}, false, acc);
  f.v = at::mm(f.s, W[1].t());
  at::Tensor z;
  if (form == kReleaseP) {
    z = at::mm(f.v, W[2].t());
  } else {  // the bottleneck: W_2 relu(LN(W_1 v + b_1)) + b_2, LayerNorm over its Cb channels
    const int64_t Cb = W[3].size(0);
    f.h1 = at::addmm(W[3], f.v, W[2].t());
    std::tie(f.h2, f.mean, f.rstd) = at::native_layer_norm(f.h1, {Cb}, W[4], W[5], eps);
    z = at::addmm(W[7], at::relu(f.h2), W[6].t());
  }
  f.a = at::sigmoid(z);
  if (form == kReleaseP) {  // S = sigmoid(softmax_p(u . x_p)), u = W_v'^T W_q' m
    f.q = at::mm(f.m, W[3].t());
    f.u = at::mm(f.q, W[4]);
    f.sig = at::softmax(contract_c(xf, f.u, acc), -1);
    f.S = at::sigmoid(f.sig);
  } else {  // S_p = sigmoid(q . V_p), V = softmax_p(W_v' diag(A) x), q = W_q' (A m)
    f.mz = f.a * f.m;
    f.q = at::mm(f.mz, W[8].t());
    f.wa = (W[9].unsqueeze(0) * f.a.unsqueeze(1)).to(xf.scalar_type());
    f.V = at::softmax(at::bmm(f.wa, xf), -1, acc);
    f.S = at::sigmoid(at::bmm(f.q.unsqueeze(1), f.V).squeeze(1));
  }
  return f;
}

Dims dims(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.size(2) * x.size(3)};
}

void check(const at::Tensor& x, at::TensorList weights, int64_t form) {
  check_args(x, std::vector<at::Tensor>(weights.begin(), weights.end()), form);
  TORCH_CHECK(form == kReleaseP || form == kReleaseS,
              "psa_block: on this device only the release's forms run (form 2: PSA_p, 3: "
              "PSA_s); the paper's forms run on the kernels of mmattn::psa_paper_folded; got "
              "form ", form);
}

at::Tensor dense(const at::Tensor& x) { return x.contiguous(x.suggest_memory_format()); }

}  // namespace

at::Tensor release_fwd(const at::Tensor& x_in, at::TensorList weights, int64_t form,
                       double eps) {
  check(x_in, weights, form);
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const Dims d = dims(x);
  const auto acc = acc_type(x);
  const auto W = acc_weights(weights, form, d.C, acc);
  const Forward f = forward_parts(x.flatten(2), W, form, eps, d, acc);
  const at::Tensor a4 = f.a.to(x.scalar_type()).view({d.N, d.C, 1, 1});
  const at::Tensor s4 = f.S.to(x.scalar_type()).view({d.N, 1, d.H, d.W});
  at::Tensor y = at::mul(x, a4);  // x's memory format
  if (form == kReleaseP)
    y.addcmul_(x, s4);  // x A + x S
  else
    y.mul_(s4);         // (x A) S
  return y;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> release_bwd(const at::Tensor& grad,
                                                            const at::Tensor& x_in,
                                                            at::TensorList weights, int64_t form,
                                                            double eps) {
  check(x_in, weights, form);
  TORCH_CHECK(grad.sizes() == x_in.sizes(), "psa_block_bwd: grad must have x's shape ",
              x_in.sizes(), ", got ", grad.sizes());
  const c10::DeviceGuard guard(x_in.device());
  const at::Tensor x = dense(x_in);
  const at::Tensor g = grad.to(x.scalar_type()).contiguous(x.suggest_memory_format());
  const Dims d = dims(x);
  const auto acc = acc_type(x);
  const auto dt = x.scalar_type();
  const auto W = acc_weights(weights, form, d.C, acc);
  const at::Tensor xf = x.flatten(2);
  Forward f = forward_parts(xf, W, form, eps, d, acc);
  const bool parallel = form == kReleaseP;

  // y = x (A + S) or x A S: dA_c = sum_p G x (1 or S_p), dS_p = sum_c G x (1 or A_c)
  const at::Tensor gx = at::mul(g, x).flatten(2);
  at::Tensor da = parallel ? at::sum(gx, {2}, false, acc) : contract_p(gx, f.S, acc);
  const at::Tensor ds_mask = parallel ? at::sum(gx, {1}, false, acc) : contract_c(gx, f.a, acc);
  at::Tensor dm, g_wq_l, g_wv_l;
  at::Tensor left, right;  // dx's low-rank terms: sum_k left[n][c][k] right[n][k][p]
  const at::Tensor ones = at::ones({d.N, d.P}, f.pi.options());
  at::Tensor dt_spatial;   // dL/d(the spatial logit) per pixel
  if (parallel) {
    // S = sigmoid(sig), sig = softmax_p(t), t_p = u . x_p
    const at::Tensor dsig = ds_mask * f.S * (1 - f.S);
    dt_spatial = f.sig * (dsig - (f.sig * dsig).sum(-1, true));
    const at::Tensor du = contract_p(xf, dt_spatial, acc);
    // u = W_v'^T q, q = W_q' m
    const at::Tensor dq = at::mm(du, W[4].t());
    g_wv_l = at::mm(f.q.t(), du);
    g_wq_l = at::mm(dq.t(), f.m);
    dm = at::mm(dq, W[3]);
  } else {
    // S_p = sigmoid(t_p), t_p = sum_k q_k V[k][p]
    dt_spatial = ds_mask * f.S * (1 - f.S);
    const at::Tensor dq = at::bmm(f.V, dt_spatial.unsqueeze(2)).squeeze(2);  // sum_p V dt
    // V[k] = softmax_p(Vl[k]), dV[k][p] = q_k dt_p: dVl = V q_k (dt_p - dq_k); in V's buffer
    const at::Tensor dvl =
        f.V.mul_(f.q.unsqueeze(2)).mul_(dt_spatial.unsqueeze(1) - dq.unsqueeze(2)).to(dt);
    // Vl[k][p] = sum_c W_v'[k][c] A_c x[c][p]: with H[k][c] = sum_p dVl[k][p] x[c][p],
    //   dW_v'[k][c] = sum_n A_c H[k][c], dA_c += sum_k W_v'[k][c] H[k][c],
    //   dx[c][p] += sum_k (W_v' diag(A))[k][c] dVl[k][p]  (below, with the low-rank terms)
    const at::Tensor h = at::bmm(dvl, xf.transpose(1, 2)).to(acc);  // (N, Ch, C)
    g_wv_l = (h * f.a.unsqueeze(1)).sum(0);
    da = da + (h * W[9].unsqueeze(0)).sum(1);
    left = f.wa.transpose(1, 2);
    right = dvl;
    // q = W_q' mz, mz = A (.) m
    g_wq_l = at::mm(dq.t(), f.mz);
    const at::Tensor dmz = at::mm(dq, W[8]);
    dm = dmz * f.a;
    da = da + dmz * f.m;
  }
  // the channel mask A = sigmoid(z), back to dv (v = W_v s)
  const at::Tensor dz = da * f.a * (1 - f.a);
  std::vector<at::Tensor> grads;
  at::Tensor dv;
  if (parallel) {  // z = W_up v
    grads = {at::Tensor(), at::Tensor(), at::mm(dz.t(), f.v)};
    dv = at::mm(dz, W[2]);
  } else {  // z = W_2 relu(h2) + b_2, h2 = LN(h1) w + b, h1 = W_1 v + b_1
    const at::Tensor dr = at::mm(dz, W[6]);
    const at::Tensor dh2 = at::threshold_backward(dr, f.h2, 0);
    auto [dh1, g_ln_w, g_ln_b] = at::native_layer_norm_backward(
        dh2, f.h1, {f.h1.size(1)}, f.mean, f.rstd, W[4], W[5], {true, true, true});
    grads = {at::Tensor(), at::Tensor(), at::mm(dh1.t(), f.v), dh1.sum(0), g_ln_w, g_ln_b,
             at::mm(dz.t(), at::relu(f.h2)), dz.sum(0)};
    dv = at::mm(dh1, W[2]);
  }
  grads[1] = at::mm(dv.t(), f.s);                   // dW_v = dv s^T
  const at::Tensor ds = at::mm(dv, W[1]);           // ds = W_v^T dv
  // s = sum_p pi_p x_p, pi = softmax_p(l), l_p = wq . x_p:
  //   dpi_p = ds . x_p, dl = pi (dpi - ds . s), dwq = sum_p x_p dl_p
  const at::Tensor dpi = contract_c(xf, ds, acc);
  const at::Tensor dl = f.pi * (dpi - (ds * f.s).sum(-1, true));
  grads[0] = contract_p(xf, dl, acc).sum(0);
  grads.push_back(g_wq_l);
  grads.push_back(g_wv_l);

  // dx = G (A + S | A S) + sum of the rank-one terms: dm/P x 1, ds x pi, wq x dl (the channel
  // branch and m), u x dt (PSA_p's spatial logit), plus W_v' diag(A) dVl for PSA_s
  const at::Tensor a4 = f.a.to(dt).view({d.N, d.C, 1, 1});
  const at::Tensor s4 = f.S.to(dt).view({d.N, 1, d.H, d.W});
  at::Tensor dx = at::mul(g, a4);
  if (parallel)
    dx.addcmul_(g, s4);
  else
    dx.mul_(s4);
  std::vector<at::Tensor> lefts{dm / static_cast<double>(d.P), ds, W[0].expand({d.N, d.C})};
  std::vector<at::Tensor> rights{ones, f.pi, dl};
  if (parallel) {
    lefts.push_back(f.u);
    rights.push_back(dt_spatial);
  }
  add_low_rank_(dx, at::stack(lefts, 2).to(dt), at::stack(rights, 1).to(dt));
  if (!parallel) add_low_rank_(dx, left, right);

  std::vector<at::Tensor> out;
  for (size_t i = 0; i < grads.size(); ++i)
    out.push_back(grads[i].reshape(weights[i].sizes()).to(weights[i].scalar_type()));
  return {dx, out};
}

}  // namespace mmattn

// every device: what the tests call on the CPU (psa_cuda.cu runs PSA_s on CUDA tensors with it)
TORCH_LIBRARY_IMPL(mmattn, CompositeExplicitAutograd, m) {
  m.impl("psa_release_fwd", &mmattn::release_fwd);
  m.impl("psa_release_bwd", &mmattn::release_bwd);
}
