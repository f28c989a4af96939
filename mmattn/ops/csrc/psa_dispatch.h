// The dtype dispatch of a translation unit of the PSA CUDA host code (psa_units.h): the file
// that includes a PSA header defines, before it, the unit's x dtype MMATTN_PSA_UNIT_DTYPE and
// its accumulation dtype MMATTN_PSA_UNIT_ACC (c10::ScalarType names: Float, Double, Half,
// BFloat16), and the namespace MMATTN_PSA_UNIT that the headers put everything in (an inline
// namespace in mmattn::psa: the same names in every unit, defined once in each), as
// psa_cuda.cu does.
#pragma once

#include <ATen/Dispatch.h>

#if defined(MMATTN_PSA_UNIT_DTYPE) && defined(MMATTN_PSA_UNIT_ACC) && defined(MMATTN_PSA_UNIT)
// AT_DISPATCH_FLOATING_TYPES_AND2(kHalf, kBFloat16, ...) (x's dtype) and
// AT_DISPATCH_FLOATING_TYPES (the accumulation dtype) narrowed to the unit's: another dtype
// raises the same error as a dtype that neither takes.
#define MMATTN_PSA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME,             \
                     AT_DISPATCH_CASE(at::ScalarType::MMATTN_PSA_UNIT_DTYPE, __VA_ARGS__))
#define MMATTN_PSA_DISPATCH_ACC(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME,                 \
                     AT_DISPATCH_CASE(at::ScalarType::MMATTN_PSA_UNIT_ACC, __VA_ARGS__))
#else
#error "the PSA CUDA headers need MMATTN_PSA_UNIT_DTYPE, MMATTN_PSA_UNIT_ACC and MMATTN_PSA_UNIT"
#endif
