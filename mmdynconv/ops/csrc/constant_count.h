// A count known only at run time handed to a kernel as a compile-time
// constant, so that the kernel's loop over it unrolls with its pointers and
// weights in registers.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <type_traits>
#include <utility>

// Calls fn(std::integral_constant<int64_t, count>{}), 1 <= count <= kMax.
template <int64_t kMax, typename Fn>
void with_count(int64_t count, const Fn& fn) {
  TORCH_CHECK(count >= 1 && count <= kMax, "with_count: a count of 1 to ", kMax, " expected, got ", count);
  [&]<int64_t... N>(std::integer_sequence<int64_t, N...>) {
    (void)((count == N + 1 && (fn(std::integral_constant<int64_t, N + 1>{}), true)) || ...);
  }(std::make_integer_sequence<int64_t, kMax>{});
}
