// Vectors of elements moved by one memory access, shared by the CUDA kernel families (and their
// CPU emulation): memory-bound kernels want 16-byte accesses per thread.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace mmattn {

template <int V>
using Int = std::integral_constant<int, V>;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Two values loaded together (one thread's step of a pass that reads two tensors).
template <typename T>
struct Pair {
  T first, second;
};

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kPack16 = sizeof(T) >= 16 ? 1 : 16 / static_cast<int>(sizeof(T));

// Element k of a pack as R (a compile-time k in an unrolled loop). A bf16 is the upper half of
// a float's bits, so from a pair's 32-bit word one shift (the lower element) or one mask (the
// upper) gives it; the conversion of each 16-bit value took two instructions in the SASS
// (nvcc 13.0, sm_90: a byte permute that extracts it, then the shift).
template <typename R, typename T, int VEC>
__device__ __forceinline__ R pack_value(const Pack<T, VEC>& p, int k) {
  if constexpr (std::is_same<T, c10::BFloat16>::value && std::is_same<R, float>::value &&
                VEC % 2 == 0) {
    uint32_t word;
    std::memcpy(&word, &p.v[k & ~1], sizeof(word));
    const uint32_t bits = k % 2 == 0 ? word << 16 : word & 0xffff0000u;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  } else {
    return static_cast<R>(p.v[k]);
  }
}

// (the CPU emulation of the tests defines MMATTN_CHECK_ALIGNMENT: a vector access off its
// alignment, which the GPU refuses, stops the test there)
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
#ifdef MMATTN_CHECK_ALIGNMENT
  MMATTN_CHECK_ALIGNMENT(p, sizeof(Pack<T, VEC>));
#endif
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// The pack at p where `inside`, else zeros (p is not read then).
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack_or_zero(const T* p, bool inside) {
  if (inside) return load_pack<VEC>(p);
  Pack<T, VEC> zero;
#pragma unroll
  for (int j = 0; j < VEC; ++j) zero.v[j] = T(0);
  return zero;
}

template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& value) {
#ifdef MMATTN_CHECK_ALIGNMENT
  MMATTN_CHECK_ALIGNMENT(p, sizeof(Pack<T, VEC>));
#endif
  *reinterpret_cast<Pack<T, VEC>*>(p) = value;
}

// 16 bytes from global memory (src) into shared memory (dst), both 16-byte aligned, without
// passing through registers: cp.async (compute capability 8.0 on), or 16 zero bytes where
// !valid (src then unread, but a valid address). Complete for the calling thread after
// wait_copies(); for the block after a __syncthreads() that follows that. The tests' CPU
// emulation defers the copy to the wait (MMATTN_EMULATED_ASYNC_COPY); elsewhere (an older
// device) a plain copy.
__device__ __forceinline__ void copy_16_async(void* dst, const void* src, bool valid) {
#ifdef MMATTN_CHECK_ALIGNMENT
  MMATTN_CHECK_ALIGNMENT(dst, 16);
  MMATTN_CHECK_ALIGNMENT(src, 16);
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
#elif defined(MMATTN_EMULATED_ASYNC_COPY)
  MMATTN_EMULATED_ASYNC_COPY(dst, src, valid);
#else
  struct alignas(16) Bytes16 {
    unsigned char b[16];
  };
  *reinterpret_cast<Bytes16*>(dst) = valid ? *reinterpret_cast<const Bytes16*>(src) : Bytes16{};
#endif
}

// Waits for the calling thread's copy_16_async copies.
__device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(MMATTN_EMULATED_ASYNC_WAIT)
  MMATTN_EMULATED_ASYNC_WAIT();
#endif
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Whether every pointer is a multiple of `bytes`.
inline bool all_aligned(std::initializer_list<const void*> ptrs, size_t bytes) {
  return std::all_of(ptrs.begin(), ptrs.end(), [&](const void* p) { return is_aligned(p, bytes); });
}

// f(Int<VEC>{}): kernels instantiated for 16-byte vectors of T (kPack16<T> elements) where
// `vectors`, else for single elements.
template <typename T, typename F>
void with_vectors(bool vectors, F&& f) {
  if (vectors)
    f(Int<kPack16<T>>{});
  else
    f(Int<1>{});
}

// The widest vector (elements of T, 16 bytes at most) that divides C and that every pointer is
// aligned to.
template <typename T>
int vector_width(const int64_t C, std::initializer_list<const void*> ptrs) {
  for (int vec = kPack16<T>; vec > 1; vec /= 2)
    if (C % vec == 0 && all_aligned(ptrs, vec * sizeof(T))) return vec;
  return 1;
}

// f(Int<vec>{}) for the vector widths vector_width can choose.
template <typename T, typename F>
void with_width(const int vec, F&& f) {
  switch (vec) {
    case 16: if constexpr (kPack16<T> >= 16) { f(Int<16>{}); return; } break;
    case 8: if constexpr (kPack16<T> >= 8) { f(Int<8>{}); return; } break;
    case 4: if constexpr (kPack16<T> >= 4) { f(Int<4>{}); return; } break;
    case 2: if constexpr (kPack16<T> >= 2) { f(Int<2>{}); return; } break;
    default: break;
  }
  f(Int<1>{});
}

}  // namespace mmattn
