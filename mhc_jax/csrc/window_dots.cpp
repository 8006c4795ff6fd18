// The weight gradient of the mix, as an XLA:CPU custom call (FFI).
//
//   out[k] = <g, h_k> = sum_i g[i] * h_k[i],   k = 0 .. K-1
//
// with g the cotangent of a skip's output and h_1 .. h_K its window of
// states. XLA's own lowering of these K dot products is K separate library
// reductions, each a thunk of its own; in a deep stack those thunks, not the
// arithmetic, are what the mix costs (README, "Benchmark"). This reads g
// once per four states, in one call.
//
// The summation order is fixed (lane-wise partial sums, then a fixed pairwise
// order, then the tail), so the result does not depend on threads or timing.
// Built by mhc_jax/_native.py on first use; see there for the fallback.

#include <cstddef>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Partial sums in 32-byte vectors (GCC/Clang vector extensions: AVX where
// the build targets it, pairs of SSE registers otherwise), two per state so
// consecutive iterations do not wait on one another's adds.
// (GCC ignores vector_size on a dependent type in an alias template, so
// each element type gets its own typedef.)
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
inline Vec<T> Load(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename T, int G>
void DotsGroup(const T* __restrict g, const T* const* states, int64_t n, T* out) {
  constexpr int W = sizeof(Vec<T>) / sizeof(T);
  const T* __restrict h[G];
  for (int k = 0; k < G; ++k) h[k] = states[k];
  Vec<T> acc0[G], acc1[G];
  for (int k = 0; k < G; ++k) acc0[k] = acc1[k] = Vec<T>{};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const Vec<T> g0 = Load(g + i), g1 = Load(g + i + W);
#pragma GCC unroll 4
    for (int k = 0; k < G; ++k) {
      acc0[k] += Load(h[k] + i) * g0;
      acc1[k] += Load(h[k] + i + W) * g1;
    }
  }
  for (int k = 0; k < G; ++k) {
    const Vec<T> v = acc0[k] + acc1[k];
    T lanes[W];
    __builtin_memcpy(lanes, &v, sizeof(v));
    for (int width = W / 2; width > 0; width /= 2) {  // pairwise, in a fixed order
      for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    }
    T sum = lanes[0];
    for (int64_t j = i; j < n; ++j) sum += h[k][j] * g[j];
    out[k] = sum;
  }
}

template <typename T>
ffi::Error Dots(ffi::AnyBuffer g, ffi::RemainingArgs states, T* out) {
  const int64_t n = static_cast<int64_t>(g.element_count());
  const T* gd = static_cast<const T*>(g.untyped_data());
  const int64_t num = static_cast<int64_t>(states.size());
  const T* h[4];
  for (int64_t first = 0; first < num; first += 4) {
    const int group = static_cast<int>(num - first < 4 ? num - first : 4);
    for (int k = 0; k < group; ++k) {
      auto state = states.get<ffi::AnyBuffer>(first + k);
      if (state.has_error()) return state.error();
      if (state->element_type() != g.element_type() || state->element_count() != g.element_count()) {
        return ffi::Error::InvalidArgument("mhc_window_dots: every state must match g in dtype and size");
      }
      h[k] = static_cast<const T*>(state->untyped_data());
    }
    switch (group) {  // read g once per group of (up to) four states
      case 4: DotsGroup<T, 4>(gd, h, n, out + first); break;
      case 3: DotsGroup<T, 3>(gd, h, n, out + first); break;
      case 2: DotsGroup<T, 2>(gd, h, n, out + first); break;
      default: DotsGroup<T, 1>(gd, h, n, out + first); break;
    }
  }
  return ffi::Error::Success();
}

ffi::Error WindowDots(ffi::AnyBuffer g, ffi::RemainingArgs states, ffi::Result<ffi::AnyBuffer> out) {
  if (out->element_count() != states.size()) {
    return ffi::Error::InvalidArgument("mhc_window_dots: the result needs one element per state");
  }
  switch (g.element_type()) {
    case ffi::DataType::F32: return Dots<float>(g, states, static_cast<float*>(out->untyped_data()));
    case ffi::DataType::F64: return Dots<double>(g, states, static_cast<double*>(out->untyped_data()));
    default: return ffi::Error::InvalidArgument("mhc_window_dots: float32 or float64 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MhcWindowDots, WindowDots,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().RemainingArgs().Ret<ffi::AnyBuffer>());
