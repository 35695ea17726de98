// The full-resolution part of the AIK attention generator on CPU, on
// contiguous NCHW tensors (see depthwise_context.py for the Python side):
//
//   forward:  z = depthwise_conv(x) centred per channel (by its batch mean,
//             or by a given mean), the batch mean and biased variance of z
//             per channel, and the spatial mean of x per (sample, channel);
//   backward: from the gradient of the local maps proj @ n (n = z * scale
//             + bias, a norm's output), in one pass per channel: z
//             recomputed from x (which the weight gradient reads anyway),
//             the gradient at n, at the conv's output (with a batch norm's
//             terms through its batch statistics), of x (plus the share of
//             the pooled mean's gradient) and of the depthwise weight, and
//             the sums proj's gradient needs; no full-size map is written
//             but x's gradient.
//
// Each channel's planes are independent, so threads take channels; within a
// channel the B planes of z stay in cache from the conv to its statistics.
//
// Per plane, the zero-padded input is split into its stride phases (see
// Geometry), so that every tap is one flat, unit-stride run over all output
// rows at once: long vectorised loops even for 7x7 maps. Sums are vectorised
// too (omp simd reductions: lanes summed in any order, in x's dtype within a
// plane and in double across planes).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "constant_count.h"
#include "cpu_ops.h"
#include "vec.h"
#include "workspace.h"

namespace {

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Phase plane (a, b) of one input plane holds the zero-padded input at
// padded rows h*sh + a and columns w*sw + b, over phase_h x phase_w pixels.
// Tap (ki, kj) reads, for output pixel (i, j), phase plane
// ((ki*dh) % sh, (kj*dw) % sw) at (i + ki*dh / sh, j + kj*dw / sw). With the
// output laid out in rows of phase_w pixels (the last phase_w - out_w
// columns are scratch), the tap is one flat run of out_h * phase_w pixels
// (see Taps). phase_h has one spare row so that the scratch columns of the
// last output row stay inside the plane.
struct Geometry {
  int64_t batch, channels, height, width, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w;
  int64_t phase_h, phase_w;

  int64_t taps() const { return kh * kw; }
  int64_t plane() const { return height * width; }
  int64_t out_plane() const { return out_h * out_w; }
  int64_t phase_size() const { return phase_h * phase_w; }
  int64_t phases_size() const { return sh * sw * phase_size(); }
  int64_t run() const { return out_h * phase_w; }
  // Input rows (or columns) [first, last) of phase rows (columns) 0.. count
  // for phase a: input index h*s + a - p.
  static std::pair<int64_t, int64_t> inside(int64_t count, int64_t s, int64_t a, int64_t p, int64_t size) {
    const int64_t off = a - p;
    const int64_t first = off >= 0 ? 0 : (-off + s - 1) / s;
    const int64_t last = std::min(count, floor_div(size - 1 - off, s) + 1);
    return {first, std::max(first, last)};
  }
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "x must be a contiguous (B, C, H, W) tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.size(1) == 1,
              "weight must be a contiguous (C, 1, kh, kw) tensor, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must have one dtype");
  Geometry g{x.size(0),   x.size(1),   x.size(2),   x.size(3),   weight.size(2), weight.size(3),
             stride[0],   stride[1],   padding[0],  padding[1],  dilation[0],    dilation[1],
             0,           0,           0,           0};
  g.out_h = (g.height + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.out_w = (g.width + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "the depthwise conv's output would be empty");
  g.phase_h = g.out_h + (g.kh - 1) * g.dh / g.sh + 1;
  g.phase_w = g.out_w + (g.kw - 1) * g.dw / g.sw;
  return g;
}

// Where each tap reads in the phase planes, and the same grouped by phase
// plane for the transposed (input-gradient) sum.
struct Taps {
  std::vector<int64_t> offsets;                 // tap t reads from phases + offsets[t]
  std::vector<std::vector<int64_t>> by_phase;   // per phase plane: minus the taps' offsets in it
  std::vector<std::vector<int64_t>> tap_index;  // per phase plane: its taps
  int64_t lead = 0;                             // the largest offset within a phase plane

  explicit Taps(const Geometry& g) : by_phase(g.sh * g.sw), tap_index(g.sh * g.sw) {
    for (int64_t ki = 0; ki < g.kh; ++ki) {
      for (int64_t kj = 0; kj < g.kw; ++kj) {
        const int64_t phase = ((ki * g.dh) % g.sh) * g.sw + (kj * g.dw) % g.sw;
        const int64_t inner = (ki * g.dh / g.sh) * g.phase_w + kj * g.dw / g.sw;
        offsets.push_back(phase * g.phase_size() + inner);
        by_phase[phase].push_back(-inner);
        tap_index[phase].push_back(ki * g.kw + kj);
        lead = std::max(lead, inner);
      }
    }
  }
};

// The kernels below take their number of taps (or maps) as a constant
// (with_count), so that the loop over them unrolls with its pointers and
// weights in registers (with a runtime count, every vector of output re-read
// them and tested the count). Longer lists are cut into chunks of at most
// nine.
constexpr int64_t kMaxChunk = 9;

// out[j] = (accumulate ? out[j] : init) + sum_t w[t] * src[offsets[t] + j]
// for j < n, over N taps. Blocks of four vectors of outputs are summed over
// the taps in registers: one store per output instead of one
// read-modify-write per tap.
template <int64_t N, typename T>
void weighted_sum_chunk(const T* src, const int64_t* offsets, const T* weights, T init, bool accumulate, T* out,
                        int64_t n) {
  using V = Vec<T>;
  using VT = typename V::type;
  constexpr int64_t L = V::size;
  const T* s[N];
  T w[N];
  for (int64_t t = 0; t < N; ++t) {
    s[t] = src + offsets[t];
    w[t] = weights[t];
  }
  const auto start = [&](int64_t j) { return accumulate ? V::load(out + j) : VT{} + init; };
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    VT a0 = start(j), a1 = start(j + L), a2 = start(j + 2 * L), a3 = start(j + 3 * L);
    for (int64_t t = 0; t < N; ++t) {
      a0 += w[t] * V::load(s[t] + j);
      a1 += w[t] * V::load(s[t] + j + L);
      a2 += w[t] * V::load(s[t] + j + 2 * L);
      a3 += w[t] * V::load(s[t] + j + 3 * L);
    }
    V::store(out + j, a0);
    V::store(out + j + L, a1);
    V::store(out + j + 2 * L, a2);
    V::store(out + j + 3 * L, a3);
  }
  for (; j + L <= n; j += L) {
    VT a = start(j);
    for (int64_t t = 0; t < N; ++t) a += w[t] * V::load(s[t] + j);
    V::store(out + j, a);
  }
  for (; j < n; ++j) {
    T acc = accumulate ? out[j] : init;
    for (int64_t t = 0; t < N; ++t) acc += w[t] * s[t][j];
    out[j] = acc;
  }
}

// out[j] = init + sum_t w[t] * src[offsets[t] + j] for j < n.
template <typename T>
void weighted_sum(const T* src, const std::vector<int64_t>& offsets, const T* w, T init, T* out, int64_t n) {
  const int64_t taps = static_cast<int64_t>(offsets.size());
  for (int64_t t0 = 0; t0 < taps; t0 += kMaxChunk) {
    with_count<kMaxChunk>(std::min(kMaxChunk, taps - t0), [&](auto N) {
      weighted_sum_chunk<N()>(src, offsets.data() + t0, w + t0, init, t0 > 0, out, n);
    });
  }
}

// grad_w[t] += sum_j g[j] * src[offsets[t] + j] for j < n, all N taps in
// one pass over g: one register accumulator per tap, so the sums do not
// wait on each other.
template <int64_t N, typename T>
void tap_dots_chunk(const T* g, const T* src, const int64_t* offsets, int64_t n, double* grad_w) {
  using V = Vec<T>;
  using VT = typename V::type;
  constexpr int64_t L = V::size;
  const T* s[N];
  for (int64_t t = 0; t < N; ++t) s[t] = src + offsets[t];
  VT acc[N] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const VT gv = V::load(g + j);
    for (int64_t t = 0; t < N; ++t) acc[t] += gv * V::load(s[t] + j);
  }
  for (int64_t t = 0; t < N; ++t) {
    double sum = V::sum(acc[t]);
    for (int64_t r = j; r < n; ++r) sum += double(g[r]) * s[t][r];
    grad_w[t] += sum;
  }
}

template <typename T>
void tap_dots(const T* g, const T* src, const std::vector<int64_t>& offsets, int64_t n, double* grad_w) {
  const int64_t taps = static_cast<int64_t>(offsets.size());
  for (int64_t t0 = 0; t0 < taps; t0 += kMaxChunk) {
    with_count<kMaxChunk>(std::min(kMaxChunk, taps - t0),
               [&](auto N) { tap_dots_chunk<N()>(g, src, offsets.data() + t0, n, grad_w + t0); });
  }
}

// Channels per task, so that one task does at least ~32k multiply-adds.
int64_t channel_grain(const Geometry& g) {
  const int64_t work = std::max<int64_t>(1, g.batch * g.out_plane() * g.taps());
  return std::max<int64_t>(1, (int64_t{1} << 15) / work);
}

template <typename T>
void check_vector(const at::Tensor& t, const Geometry& g, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == g.channels && t.is_contiguous() &&
                  t.scalar_type() == c10::CppTypeToScalarType<T>::value,
              name, " must be a contiguous (C,) tensor of x's dtype");
}

template <typename T>
double plane_sum(const T* p, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += p[j];
  return acc;
}

// p -= mean; returns the sum of the centred squares.
template <typename T>
double centre_plane(T* p, int64_t n, T mean) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    p[j] -= mean;
    acc += p[j] * p[j];
  }
  return acc;
}

// Calls fn(phase_row, input_row, first, last) for every phase row that lies
// on an input row, with the phase columns [first, last) that lie inside it;
// phase column w reads input column w*sw + b - pw.
template <typename Fn>
void for_each_phase_row(const Geometry& g, const Fn& fn) {
  for (int64_t a = 0; a < g.sh; ++a) {
    const auto [h0, h1] = Geometry::inside(g.phase_h, g.sh, a, g.ph, g.height);
    for (int64_t b = 0; b < g.sw; ++b) {
      const auto [w0, w1] = Geometry::inside(g.phase_w, g.sw, b, g.pw, g.width);
      const int64_t phase = (a * g.sw + b) * g.phase_size();
      for (int64_t h = h0; h < h1; ++h) {
        fn(phase + h * g.phase_w, (h * g.sh + a - g.ph) * g.width + w0 * g.sw + b - g.pw, w0, w1);
      }
    }
  }
}

// dst[k] = src[k * stride] for k < n; stride 2 (the common strided conv) as
// a constant, so that the loop is vectorised.
template <typename T>
void strided_copy(const T* __restrict src, int64_t stride, T* __restrict dst, int64_t n) {
  if (stride == 1) {
    std::copy_n(src, n, dst);
  } else if (stride == 2) {
    for (int64_t k = 0; k < n; ++k) dst[k] = src[2 * k];
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = src[k * stride];
  }
}

// dst[k * stride] += src[k] + share for k < n; stride 1 and 2 as constants.
template <typename T>
void strided_add(const T* __restrict src, int64_t stride, T share, T* __restrict dst, int64_t n) {
  if (stride == 1) {
    for (int64_t k = 0; k < n; ++k) dst[k] += src[k] + share;
  } else if (stride == 2) {
    for (int64_t k = 0; k < n; ++k) dst[2 * k] += src[k] + share;
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k * stride] += src[k] + share;
  }
}

// The phase planes of input plane x into q, whose pixels outside the input
// must be zero already: a Scratch's are, as every call writes the same
// pixels.
template <typename T>
void build_phases(const Geometry& g, const T* x, T* q) {
  for_each_phase_row(g, [&](int64_t at, int64_t from, int64_t first, int64_t last) {
    strided_copy(x + from, g.sw, q + at + first, last - first);
  });
}

// dx += the phase planes' gradient dq + share, at the input pixels they
// hold.
template <typename T>
void add_phases(const Geometry& g, const T* dq, T share, T* dx) {
  for_each_phase_row(g, [&](int64_t at, int64_t from, int64_t first, int64_t last) {
    strided_add(dq + at + first, g.sw, share, dx + from, last - first);
  });
}

// Whether the phase planes hold every input pixel (each at most once, by
// construction); pixels that no tap reads may lie outside them.
bool phases_hold_input(const Geometry& g) {
  int64_t held = 0;
  for_each_phase_row(g, [&](int64_t, int64_t, int64_t first, int64_t last) { held += last - first; });
  return held == g.plane();
}

// Per-thread scratch: the phase planes of `images` input planes (one
// channel's; backward keeps them from the conv to the weight gradient),
// their gradient, and an output plane in rows of phase_w, `rows` (the conv's
// output, or its gradient), led by `lead` zeros (and zero past the run) so
// that the input-gradient sum reads it at negative offsets; backward also
// keeps z and u of each image's output plane.
template <typename T>
struct Scratch {
  std::vector<T> phases, grad_phases, padded_rows, outputs;
  T* rows;
  std::vector<std::vector<T>> phase_weights;  // per phase plane: its taps' weights
  int64_t phases_size, out_plane;

  Scratch(const Geometry& g, const Taps& taps, int64_t images, bool backward, bool grad_input)
      : phases(images * g.phases_size()),
        grad_phases(grad_input ? g.phases_size() : 0),
        padded_rows(taps.lead + g.phase_size(), T(0)),
        outputs(backward ? 2 * images * g.out_plane() : 0),
        rows(padded_rows.data() + taps.lead),
        phase_weights(taps.tap_index.size()),
        phases_size(g.phases_size()),
        out_plane(g.out_plane()) {}

  T* phases_of(int64_t b) { return phases.data() + b * phases_size; }
  T* z_of(int64_t b) { return outputs.data() + 2 * b * out_plane; }
  T* u_of(int64_t b) { return z_of(b) + out_plane; }

  void set_weights(const Taps& taps, const T* w) {
    for (size_t p = 0; p < taps.tap_index.size(); ++p) {
      phase_weights[p].clear();
      for (int64_t t : taps.tap_index[p]) phase_weights[p].push_back(w[t]);
    }
  }
};

// One output plane z = conv(x plane) + init; the plane's phases into `phases`.
template <typename T>
void conv_plane(const Geometry& g, const Taps& taps, const T* x, const T* w, T init, Scratch<T>& s, T* phases,
                T* z) {
  build_phases(g, x, phases);
  weighted_sum(phases, taps.offsets, w, init, s.rows, g.run());
  for (int64_t i = 0; i < g.out_h; ++i) std::copy_n(s.rows + i * g.phase_w, g.out_w, z + i * g.out_w);
}

// The gradient at one output plane, scale * u + e * z + f (u, z: compact
// planes), into s.rows (rows of phase_w, zero in the scratch columns).
template <typename T>
void gradient_rows(const Geometry& g, const T* u, const T* z, T scale, T e, T f, Scratch<T>& s) {
  for (int64_t i = 0; i < g.out_h; ++i) {
    const T* up = u + i * g.out_w;
    const T* zp = z + i * g.out_w;
    T* row = s.rows + i * g.phase_w;
#pragma omp simd
    for (int64_t j = 0; j < g.out_w; ++j) row[j] = scale * up[j] + e * zp[j] + f;
    std::fill(row + g.out_w, row + g.phase_w, T(0));
  }
}

// One input plane's gradient, plus share at every pixel the phase planes
// hold, added to dx (may be null), and the weight gradient's sums (grad_w,
// may be null) from the output gradient in s.rows, with the plane's phases
// (needed for grad_w) and the channel's weights in s.phase_weights.
template <typename T>
void conv_plane_backward(const Geometry& g, const Taps& taps, Scratch<T>& s, const T* phases, T* dx, T share,
                         double* grad_w) {
  if (grad_w) tap_dots(s.rows, phases, taps.offsets, g.run(), grad_w);
  if (!dx) return;
  for (size_t p = 0; p < taps.by_phase.size(); ++p) {
    weighted_sum(s.rows, taps.by_phase[p], s.phase_weights[p].data(), T(0),
                 s.grad_phases.data() + p * g.phase_size(), g.phase_size());
  }
  add_phases(g, s.grad_phases.data(), share, dx);
}

// Back through local = proj @ n for one output plane of channel c, for N of
// the maps: from their gradients dl (N x P, rows of P) and proj's column c
// at them (proj_c[m * stride]), u += sum_m proj_c[m] * dl[m] (u = 0 first
// when not accumulate) and cross[m] += <dl[m], z> (proj's gradient before
// the norm's scale); with u_sums (the last chunk, when u is complete),
// u_sums[0] += <u, z> and u_sums[1] += sum(u). Each vector of u is summed
// over the maps in a register and each map's dot has a register of its own.
template <int64_t N, typename T>
void project_back_chunk(const T* dl, int64_t P, const T* proj_c, int64_t stride, const T* z, bool accumulate, T* u,
                        double* cross, double* u_sums) {
  using V = Vec<T>;
  using VT = typename V::type;
  constexpr int64_t L = V::size;
  T w[N];
  for (int64_t m = 0; m < N; ++m) w[m] = proj_c[m * stride];
  VT dots[N] = {}, uz = {}, u_total = {};
  int64_t j = 0;
  for (; j + L <= P; j += L) {
    const VT zv = V::load(z + j);
    VT uv = accumulate ? V::load(u + j) : VT{};
    for (int64_t m = 0; m < N; ++m) {
      const VT row = V::load(dl + m * P + j);
      uv += w[m] * row;
      dots[m] += row * zv;
    }
    V::store(u + j, uv);
    if (u_sums) {
      uz += uv * zv;
      u_total += uv;
    }
  }
  for (int64_t m = 0; m < N; ++m) cross[m] += V::sum(dots[m]);
  double uz_rest = 0, u_rest = 0;
  for (; j < P; ++j) {
    T uj = accumulate ? u[j] : T(0);
    for (int64_t m = 0; m < N; ++m) {
      uj += w[m] * dl[m * P + j];
      cross[m] += double(dl[m * P + j]) * z[j];
    }
    u[j] = uj;
    uz_rest += double(uj) * z[j];
    u_rest += uj;
  }
  if (u_sums) {
    u_sums[0] += V::sum(uz) + uz_rest;
    u_sums[1] += V::sum(u_total) + u_rest;
  }
}

// The same over all M maps: u = sum_m proj_c[m] * dl[m], the gradient at n,
// and cross[m] += <dl[m], z>; the maps eight at a time (hidden widths are
// multiples of eight unless set otherwise). Returns {<u, z>, sum(u)}.
template <typename T>
std::pair<double, double> project_back(const T* dl, int64_t maps, int64_t P, const T* proj_c, int64_t stride,
                                       const T* z, T* u, double* cross) {
  constexpr int64_t kMaps = 8;
  double u_sums[2] = {0, 0};
  for (int64_t m0 = 0; m0 < maps; m0 += kMaps) {
    const bool last = m0 + kMaps >= maps;
    with_count<kMaps>(std::min(kMaps, maps - m0), [&](auto N) {
      project_back_chunk<N()>(dl + m0 * P, P, proj_c + m0 * stride, stride, z, m0 > 0, u, cross + m0,
                              last ? u_sums : nullptr);
    });
  }
  return {u_sums[0], u_sums[1]};
}

}  // namespace

namespace {

std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     const std::optional<at::Tensor>& given_mean, bool z_in_workspace) {
  const at::Tensor mean = given_mean.value_or(at::Tensor());
  const Geometry g = make_geometry(x, weight, stride, padding, dilation);
  const Taps taps(g);
  const bool batch_stats = !mean.defined();
  const std::vector<int64_t> z_sizes{g.batch, g.channels, g.out_h, g.out_w};
  at::Tensor z = z_in_workspace ? workspace(kCentredContext, z_sizes, x.options()) : at::empty(z_sizes, x.options());
  at::Tensor pooled = at::empty({g.batch, g.channels}, x.options());
  at::Tensor out_mean = batch_stats ? at::empty({g.channels}, x.options()) : mean;
  at::Tensor var = batch_stats ? at::empty({g.channels}, x.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_context_forward", [&] {
    using T = scalar_t;
    if (!batch_stats) check_vector<T>(mean, g, "mean");
    const T* xd = x.data_ptr<T>();
    const T* wd = weight.data_ptr<T>();
    T* zd = z.data_ptr<T>();
    T* pd = pooled.data_ptr<T>();
    T* md = out_mean.data_ptr<T>();
    T* vd = batch_stats ? var.data_ptr<T>() : nullptr;
    const int64_t count = g.batch * g.out_plane();
    at::parallel_for(0, g.channels, channel_grain(g), [&](int64_t c0, int64_t c1) {
      Scratch<T> scratch(g, taps, 1, false, false);
      for (int64_t c = c0; c < c1; ++c) {
        const T init = batch_stats ? T(0) : -md[c];
        double sum = 0;
        for (int64_t b = 0; b < g.batch; ++b) {
          const T* xp = xd + (b * g.channels + c) * g.plane();
          T* zp = zd + (b * g.channels + c) * g.out_plane();
          pd[b * g.channels + c] = static_cast<T>(plane_sum(xp, g.plane()) / g.plane());
          conv_plane(g, taps, xp, wd + c * g.taps(), init, scratch, scratch.phases_of(0), zp);
          if (batch_stats) sum += plane_sum(zp, g.out_plane());
        }
        if (!batch_stats) continue;
        const T mu = static_cast<T>(sum / count);
        double squares = 0;
        for (int64_t b = 0; b < g.batch; ++b) {
          squares += centre_plane(zd + (b * g.channels + c) * g.out_plane(), g.out_plane(), mu);
        }
        md[c] = mu;
        vd[c] = static_cast<T>(squares / count);
      }
    });
  });
  return {z, out_mean, var, pooled};
}

}  // namespace

// x (B, C, H, W), weight (C, 1, kh, kw), mean (C,) or None ->
// [z (B, C, H_out, W_out) centred, mean (C,), biased var (C,; undefined when
// mean was given), pooled (B, C) spatial mean of x]. All contiguous.
std::vector<at::Tensor> depthwise_context_forward(const at::Tensor& x, const at::Tensor& weight,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation,
                                                  const std::optional<at::Tensor>& given_mean) {
  return forward_impl(x, weight, stride, padding, dilation, given_mean, false);
}

std::vector<at::Tensor> depthwise_context_forward_scratch(const at::Tensor& x, const at::Tensor& weight,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation,
                                                          const std::optional<at::Tensor>& given_mean) {
  return forward_impl(x, weight, stride, padding, dilation, given_mean, true);
}

// The backward of local = proj @ n, n = z * scale + bias, z = conv(x) - mean
// (mean, scale: (C,); proj (M, C)), from grad_local (B, M, H_out*W_out).
// Per channel c, in one pass: z is recomputed, the gradient at n is
// u = proj^T grad_local, and the gradient at the conv's output is
//   g = scale[c] * u + stat[c][0] * <u, z> * z + stat[c][1] * sum(u)
// (<.,.> and sum over the batch and positions; stat (C, 2) or None: the
// terms of a batch norm through its batch statistics). grad_pooled (B, C)
// or None is the pooled mean's gradient, added to x's. Neither z nor u is
// kept: proj's gradient needs only cross = sum_b grad_local_b @ z_b^T.
// grad_x_into (B, C, H, W) or None: x's gradient is added to it (and it is
// returned) instead of to zeros.
// -> [grad_x (B, C, H, W), grad_weight (C, 1, kh, kw), undefined where not
// needed, and cross (M, C)].
std::vector<at::Tensor> depthwise_context_backward(const at::Tensor& grad_local, const at::Tensor& proj,
                                                   const at::Tensor& x, const at::Tensor& weight,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, const at::Tensor& mean,
                                                   const at::Tensor& scale,
                                                   const std::optional<at::Tensor>& stat_terms,
                                                   const std::optional<at::Tensor>& pooled_grad,
                                                   const std::optional<at::Tensor>& grad_x_into, bool need_input,
                                                   bool need_weight) {
  const at::Tensor grad_pooled = pooled_grad.value_or(at::Tensor()), stat = stat_terms.value_or(at::Tensor());
  const Geometry g = make_geometry(x, weight, stride, padding, dilation);
  const Taps taps(g);
  const int64_t P = g.out_plane(), M = proj.size(0);
  TORCH_CHECK(proj.dim() == 2 && proj.is_contiguous() && proj.size(1) == g.channels,
              "proj must be a contiguous (M, C) tensor, got ", proj.sizes());
  TORCH_CHECK(grad_local.is_contiguous() && grad_local.sizes() == at::IntArrayRef({g.batch, M, P}),
              "grad_local must be a contiguous (B, M, H_out*W_out) tensor, got ", grad_local.sizes());
  TORCH_CHECK(!stat.defined() || (stat.is_contiguous() && stat.sizes() == at::IntArrayRef({g.channels, 2})),
              "stat must be a contiguous (C, 2) tensor");
  TORCH_CHECK(!grad_pooled.defined() ||
                  (grad_pooled.is_contiguous() && grad_pooled.sizes() == at::IntArrayRef({g.batch, g.channels})),
              "grad_pooled must be a contiguous (B, C) tensor");
  const bool accumulate = need_input && grad_x_into.has_value();
  TORCH_CHECK(!accumulate || (grad_x_into->is_contiguous() && grad_x_into->sizes() == x.sizes()),
              "grad_x_into must be a contiguous tensor of x's shape");
  for (const at::Tensor& t : {grad_local, proj, stat, grad_pooled, grad_x_into.value_or(at::Tensor())}) {
    TORCH_CHECK(!t.defined() || t.scalar_type() == x.scalar_type(), "all tensors must have x's dtype");
  }
  at::Tensor grad_x = accumulate ? *grad_x_into : need_input ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_weight = need_weight ? at::empty_like(weight) : at::Tensor();
  at::Tensor cross = at::empty({M, g.channels}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_context_backward", [&] {
    using T = scalar_t;
    check_vector<T>(mean, g, "mean");
    check_vector<T>(scale, g, "scale");
    const T* xd = x.data_ptr<T>();
    const T* wd = weight.data_ptr<T>();
    const T* dld = grad_local.data_ptr<T>();
    const T* pd = proj.data_ptr<T>();
    const T* md = mean.data_ptr<T>();
    const T* sd = scale.data_ptr<T>();
    const T* std_ = stat.defined() ? stat.data_ptr<T>() : nullptr;
    const T* pgd = grad_pooled.defined() ? grad_pooled.data_ptr<T>() : nullptr;
    T* dxd = need_input ? grad_x.data_ptr<T>() : nullptr;
    T* dwd = need_weight ? grad_weight.data_ptr<T>() : nullptr;
    T* cd = cross.data_ptr<T>();
    const bool phases_hold_all = phases_hold_input(g);
    at::parallel_for(0, g.channels, channel_grain(g), [&](int64_t c0, int64_t c1) {
      Scratch<T> s(g, taps, g.batch, true, need_input);
      std::vector<double> grad_w(g.taps()), cross_c(M);
      for (int64_t c = c0; c < c1; ++c) {
        const T* w = wd + c * g.taps();
        double zu = 0, u_sum = 0;
        std::fill(cross_c.begin(), cross_c.end(), 0.0);
        for (int64_t b = 0; b < g.batch; ++b) {
          T *z = s.z_of(b), *u = s.u_of(b);
          conv_plane(g, taps, xd + (b * g.channels + c) * g.plane(), w, -md[c], s, s.phases_of(b), z);
          const auto [plane_zu, plane_u] =
              project_back(dld + b * M * P, M, P, pd + c, g.channels, z, u, cross_c.data());
          zu += plane_zu;
          u_sum += plane_u;
        }
        const T e = std_ ? static_cast<T>(std_[2 * c] * zu) : T(0);
        const T f = std_ ? static_cast<T>(std_[2 * c + 1] * u_sum) : T(0);
        std::fill(grad_w.begin(), grad_w.end(), 0.0);
        s.set_weights(taps, w);
        for (int64_t b = 0; b < g.batch; ++b) {
          gradient_rows(g, s.u_of(b), s.z_of(b), sd[c], e, f, s);
          T* dx = nullptr;
          T share = 0;  // the pooled mean's gradient at each pixel, when added with the conv's
          if (need_input) {
            dx = dxd + (b * g.channels + c) * g.plane();
            const T pooled_share = pgd ? static_cast<T>(pgd[b * g.channels + c] / g.plane()) : T(0);
            share = phases_hold_all ? pooled_share : T(0);
            const T apart = pooled_share - share;  // else added here, in a pass of its own
            if (!accumulate) {
              std::fill(dx, dx + g.plane(), apart);
            } else if (apart != T(0)) {
              std::for_each(dx, dx + g.plane(), [&](T& v) { v += apart; });
            }
          }
          conv_plane_backward(g, taps, s, s.phases_of(b), dx, share, need_weight ? grad_w.data() : nullptr);
        }
        if (need_weight) {
          for (int64_t t = 0; t < g.taps(); ++t) dwd[c * g.taps() + t] = static_cast<T>(grad_w[t]);
        }
        for (int64_t m = 0; m < M; ++m) cd[m * g.channels + c] = static_cast<T>(cross_c[m]);
      }
    });
  });
  return {grad_x, grad_weight, cross};
}
