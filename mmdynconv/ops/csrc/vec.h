// Vec: a GCC vector of 64 bytes for the compiled ops' hand-vectorised loops.
#pragma once

#include <cstdint>
#include <cstring>

// A GCC vector of 64 bytes (one AVX-512 register, two AVX2 ones); loads and
// stores through memcpy, so unaligned.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t size = 64 / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(type));
    return v;
  }
  static void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(type)); }
  // The sum of v's lanes, in double.
  static double sum(const type& v) {
    double total = 0;
    for (int64_t k = 0; k < size; ++k) total += v[k];
    return total;
  }
};
