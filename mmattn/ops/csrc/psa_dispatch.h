// The dtype dispatch of a translation unit of the PSA CUDA host code (psa_units.h): the file
// that includes a PSA header defines, before it, the unit's x dtype MMATTN_PSA_UNIT_DTYPE (a
// c10::ScalarType name: Float, Double, Half or BFloat16), as psa_cuda.cu does. Its accumulation
// dtype follows (kUnitAccDtype), and the namespace the headers put everything in,
// MMATTN_PSA_UNIT (unit_Float, ...: an inline namespace in mmattn::psa, so that every unit
// defines the same names once in its own).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>

#ifndef MMATTN_PSA_UNIT_DTYPE
#error "the PSA CUDA headers need MMATTN_PSA_UNIT_DTYPE, the dtype of x they are compiled for"
#endif

#define MMATTN_PSA_CONCAT_(a, b) a##b
#define MMATTN_PSA_CONCAT(a, b) MMATTN_PSA_CONCAT_(a, b)
#define MMATTN_PSA_UNIT MMATTN_PSA_CONCAT(unit_, MMATTN_PSA_UNIT_DTYPE)

namespace mmattn {
namespace psa {

// float64 for float64 inputs, else float32 (at::opmath_type)
constexpr at::ScalarType kUnitAccDtype = c10::CppTypeToScalarType<at::opmath_type<
    c10::impl::ScalarTypeToCPPTypeT<at::ScalarType::MMATTN_PSA_UNIT_DTYPE>>>::value;

}  // namespace psa
}  // namespace mmattn

// AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...) (x's dtype) and
// AT_DISPATCH_FLOATING_TYPES (the accumulation dtype) narrowed to the unit's: another dtype
// raises the same error as a dtype that neither takes.
#define MMATTN_PSA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME,             \
                     AT_DISPATCH_CASE(at::ScalarType::MMATTN_PSA_UNIT_DTYPE, __VA_ARGS__))
#define MMATTN_PSA_DISPATCH_ACC(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(::mmattn::psa::kUnitAccDtype, __VA_ARGS__))
