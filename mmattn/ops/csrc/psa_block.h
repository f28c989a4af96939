// What the two implementations of the op mmattn::psa_block_fwd / psa_block_bwd share (a whole
// PSA block per call, mmattn/ops/psa_block.py): the forms, the weights each takes and the
// checks of the arguments. psa_cpu.cpp is the CPU implementation, psa_cuda.cu (with
// psa_block_cuda.cuh) the CUDA one.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>

namespace mmattn {

// the op's `form` argument: mmattn.ops.psa_block.FORMS
enum Form : int64_t { kPaperParallel = 0, kPaperSequential = 1, kReleaseP = 2, kReleaseS = 3 };

// The expected weight shapes of a form, for the checks: (rows, cols), cols 0 for vectors.
inline std::vector<std::pair<int64_t, int64_t>> weight_shapes(int64_t form, int64_t C,
                                                              int64_t Cb) {
  const int64_t Ch = C / 2;
  switch (form) {
    case kPaperParallel:
    case kPaperSequential:
      return {{C, 0}, {1, 0}, {Ch, C}, {Ch, 0}, {C, Ch}, {C, 0}, {C, 0}, {C, 0},
              {Ch, C}, {Ch, 0}, {Ch, C}, {Ch, 0}};
    case kReleaseP:
      return {{C, 0}, {Ch, C}, {C, Ch}, {Ch, C}, {Ch, C}};
    default:
      return {{C, 0}, {Ch, C}, {Cb, Ch}, {Cb, 0}, {Cb, 0}, {Cb, 0}, {C, Cb}, {C, 0},
              {Ch, C}, {Ch, C}};
  }
}

inline void check_args(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                       int64_t form) {
  TORCH_CHECK(x.dim() == 4, "psa_block: x must be (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(x.is_floating_point(), "psa_block: x must be floating point, got ", x.dtype());
  TORCH_CHECK(form >= 0 && form <= 3, "psa_block: form must be 0-3, got ", form);
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, "psa_block: H and W must be positive, got ",
              x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 2 && C % 2 == 0, "psa_block: C must be even and >= 2, got ", C);
  const int64_t Cb = form == kReleaseS ? weights.at(3).numel() : 0;
  auto shapes = weight_shapes(form, C, Cb);
  TORCH_CHECK(weights.size() == shapes.size(), "psa_block: form ", form, " takes ",
              shapes.size(), " weights, got ", weights.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto& w = weights[i];
    const int64_t expected = shapes[i].first * std::max<int64_t>(shapes[i].second, 1);
    TORCH_CHECK(w.numel() == expected, "psa_block: weight ", i, " must have ", expected,
                " elements, got ", w.numel());
    TORCH_CHECK(w.device() == x.device(), "psa_block: weight ", i, " is on ", w.device(),
                ", x on ", x.device());
  }
}

// The dtype of the C-sized work: float64 for float64 inputs, else float32.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// `tensors` in `dtype`, each as a 1-D view of one buffer into which all were converted at once:
// a concatenation and one conversion, 2 launches on a GPU where a conversion each took one per
// tensor (on the lent H100 machines a launch costs the host about 8 us, and at [16, 256, 128,
// 128] bf16 the block's host time was its wall time, 2026-11-27). With `align` > 1 each view
// starts on a multiple of `align` elements (the gaps: never read).
inline std::vector<at::Tensor> converted_together(at::TensorList tensors, at::ScalarType dtype,
                                                  int64_t align = 1) {
  std::vector<at::Tensor> parts;
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    offsets.push_back(total);
    parts.push_back(tensors[i].reshape({-1}));
    total += tensors[i].numel();
    const int64_t gap = (align - total % align) % align;
    if (gap > 0 && i + 1 < tensors.size()) {
      parts.push_back(at::empty({gap}, tensors[i].options()));
      total += gap;
    }
  }
  const at::Tensor flat = at::cat(parts).to(dtype);
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < tensors.size(); ++i)
    out.push_back(flat.narrow(0, offsets[i], tensors[i].numel()));
  return out;
}

// Whether every tensor is of `dtype`.
inline bool all_of_dtype(at::TensorList tensors, at::ScalarType dtype) {
  return std::all_of(tensors.begin(), tensors.end(),
                     [&](const at::Tensor& t) { return t.scalar_type() == dtype; });
}

// The weights of a form as the accumulation dtype's contiguous vectors and matrices, in the
// op's order (each parameter comes in its own shape: conv weights (rows, cols, 1, 1)). Weights
// already in `acc` are used in place; others (a model cast to bf16 or fp16) are converted all
// at once (converted_together), each slice on a 16-byte boundary for the kernels' vectors.
inline std::vector<at::Tensor> acc_weights(at::TensorList weights, int64_t form, int64_t C,
                                           at::ScalarType acc) {
  const int64_t Cb = form == kReleaseS ? weights[3].numel() : 0;
  const auto shapes = weight_shapes(form, C, Cb);
  const bool in_place = all_of_dtype(weights, acc);
  const std::vector<at::Tensor> flat =
      in_place ? std::vector<at::Tensor>()
               : converted_together(weights, acc, 16 / static_cast<int64_t>(c10::elementSize(acc)));
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [rows, cols] = shapes[i];
    const at::Tensor w = in_place ? weights[i].contiguous() : flat[i];
    out.push_back(cols == 0 ? w.view({rows}) : w.view({rows, cols}));
  }
  return out;
}

// The weights' gradients, computed in the accumulation dtype (`acc_grads`, in the op's order),
// in the weights' shapes and dtypes: views where the dtypes agree; for weights of another
// dtype, one that they share (a model cast to bf16), converted all at once
// (converted_together), else each on its own.
inline std::vector<at::Tensor> weight_gradients(const std::vector<at::Tensor>& acc_grads,
                                                at::TensorList weights) {
  const at::ScalarType dtype = weights[0].scalar_type();
  const bool together = !acc_grads.empty() && acc_grads[0].scalar_type() != dtype &&
                        all_of_dtype(weights, dtype);
  const std::vector<at::Tensor> flat =
      together ? converted_together(acc_grads, dtype) : std::vector<at::Tensor>();
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < acc_grads.size(); ++i)
    grads.push_back(together ? flat[i].view(weights[i].sizes())
                             : acc_grads[i].reshape(weights[i].sizes())
                                   .to(weights[i].scalar_type()));
  return grads;
}

}  // namespace mmattn
