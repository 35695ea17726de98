// AIK convolution on CPU, groups == 1, contiguous NCHW tensors throughout
// (see aik_conv2d_cpp.py for the Python side).
//
//   y[b, o, u] = sum_{c, t} w[o, c, t] * attn[b, a(c), t, u] * x[b, c, s*u - p + d*delta_t]
//
// The output positions are cut into tiles of whole output rows. For a tile
// of R positions the attention-modulated patch matrix P (C*K x R),
// P[c*K + t, r] = attn[b, a(c), t, r] * x[b, c, window(r, t)], is built in a
// buffer and contracted with the weight, viewed as (O x C*K), by one GEMM. No
// K-times-larger tensor of the whole batch is kept, and the weight is used as
// it lies. Backward, per tile: one GEMM gives the patch gradient
// Q = w^T dy (C*K x R); one fused pass turns it into the attention gradient
// and the input gradient and rebuilds P over it (one buffer), which feeds
// one GEMM, dy P^T, into the weight gradient.
//
// Two schedules:
// * many small tiles (thin layers with large maps): bands of one image,
//   run in parallel, one per thread, each small enough for its buffers to
//   stay in that core's cache; GEMMs read and write y[b] and dy[b]
//   (O x H_out*W_out) in place; the weight gradient goes to per-thread
//   partials;
// * one tile of the whole batch (wide layers with small maps, whose weight
//   is too big to re-read per small tile): each GEMM on all threads, on
//   staged copies of y and dy with images side by side (small here); the
//   element-wise passes in parallel over blocks of channels of whole images
//   (each thread sums its own attention gradient).
// Strided convolutions read x through its stride phases (see Geometry), so
// that every pass runs over unit-stride rows.
// The passes read the attention masked by the taps' padding (zero where a
// tap reads outside the input), so that a tap's rows run flat over row ends
// without per-row edge handling.
// Input-gradient passes on bands that run at the same time must not touch
// the same input row: they take bands of output rows in two phases, even
// then odd bands, with each band tall enough that bands two apart read
// disjoint rows.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <vector>

#include "blas.h"
#include "constant_count.h"
#include "cpu_ops.h"
#include "tensor_data.h"
#include "workspace.h"

namespace {

// With stride s, x is read through its s_h*s_w phase planes,
// plane (p, q)[h', w'] = x[h'*s_h + p, w'*s_w + q] (zero past the input), of
// plane_h x plane_w pixels: every tap then reads a plane with unit stride,
// output position (oh, ow) at plane pixel (oh + di, ow + dj) (see TapRow).
// With stride 1 the one plane is x itself.
struct Geometry {
  int64_t batch, channels, height, width;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t out_h, out_w, attn_groups;
  int64_t plane_h, plane_w;

  int64_t taps() const { return kh * kw; }
  int64_t cols() const { return channels * taps(); }
  int64_t positions() const { return out_h * out_w; }
  int64_t phases() const { return sh * sw; }
  int64_t plane_size() const { return plane_h * plane_w; }
};

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output rows oh0 <= oh < oh1 of channels c0 <= c < c1 of image b; index
// counts the bands of the image.
struct Band {
  int64_t b, oh0, oh1, index, c0, c1;
};

// A tile: output rows oh0 <= oh < oh1 of images b0 <= b < b1 (a band of one
// image, or the whole batch), matched with the columns (image-major) of its
// patch matrix.
// Its element-wise passes are split into parts: the band itself, or for the
// whole batch, blocks of channels of single images.
struct Tile {
  int64_t b0, b1, oh0, oh1, index;
  std::vector<Band> parts;

  int64_t images() const { return b1 - b0; }
  int64_t positions(const Geometry& g) const { return images() * (oh1 - oh0) * g.out_w; }
};

struct Schedule {
  std::vector<Tile> tiles;
  bool parallel_tiles;
  int64_t tile_elements, part_elements;  // matrix elements of a (typical) tile and part
  int64_t thread_elements;                // work below which another thread costs more than it saves
  int64_t max_positions(const Geometry& g) const {
    int64_t positions = 0;
    for (const auto& tile : tiles) positions = std::max(positions, tile.positions(g));
    return positions;
  }
};

// Input-plane elements per thread of the phase-plane conversions.
constexpr int64_t kPlaneGrain = 1 << 15;
// Tiles per thread below which tiles are too few to balance across threads.
constexpr int64_t kTilesPerThread = 4;

Geometry make_geometry(const at::Tensor& x, const at::Tensor& attn, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "x must be a contiguous (B, C, H, W) tensor");
  TORCH_CHECK(attn.dim() == 5 && attn.is_contiguous(),
              "attn must be a contiguous (B, G, K, H_out, W_out) tensor");
  Geometry g{x.size(0),  x.size(1),  x.size(2),  x.size(3),  kernel[0],    kernel[1],
             stride[0],  stride[1],  padding[0], padding[1], dilation[0], dilation[1],
             attn.size(3), attn.size(4), attn.size(1)};
  TORCH_CHECK(attn.size(0) == g.batch && attn.size(2) == g.taps() && g.channels % g.attn_groups == 0,
              "attn does not match x and the kernel");
  g.plane_h = (g.height + g.sh - 1) / g.sh;
  g.plane_w = (g.width + g.sw - 1) / g.sw;
  return g;
}

// Bands of `height` output rows (at least the input-gradient minimum) of image b.
// Taps read plane rows oh + di with di in [di_min, di_max]; the minimum
// keeps bands two apart on disjoint plane rows with one spare row between,
// which the flat runs of scatter_patch_grad may touch (adding zero) at their
// ends.
std::vector<Band> make_bands(const Geometry& g, int64_t b, int64_t height) {
  const int64_t di_min = floor_div(-g.ph, g.sh), di_max = floor_div(g.dh * (g.kh - 1) - g.ph, g.sh);
  const int64_t min_height = di_max - di_min + 2;
  height = std::min(g.out_h, std::max(min_height, height));
  std::vector<Band> bands;
  for (int64_t oh = 0, k = 0; oh < g.out_h; oh += height, ++k) {
    bands.push_back({b, oh, std::min(oh + height, g.out_h), k, 0, g.channels});
  }
  return bands;
}

// tile_elements: the patch-matrix budget of a parallel tile; it also decides
// between the two schedules. thread_elements: see Schedule.
Schedule make_schedule(const Geometry& g, int64_t tile_elements, int64_t thread_elements) {
  const int64_t tile_positions = std::max<int64_t>(1, tile_elements / g.cols());
  const int64_t threads = at::get_num_threads();
  Schedule schedule;
  schedule.thread_elements = thread_elements;
  const int64_t budget = kTilesPerThread * threads * tile_positions;
  schedule.parallel_tiles = g.batch * g.positions() >= budget;
  if (schedule.parallel_tiles) {
    for (int64_t b = 0; b < g.batch; ++b) {
      for (const Band& band : make_bands(g, b, (tile_positions + g.out_w - 1) / g.out_w)) {
        schedule.tiles.push_back({b, b + 1, band.oh0, band.oh1, band.index, {band}});
      }
    }
  } else {  // the whole batch fits the budget of all threads' tiles: one tile
    // whose parts are whole images of blocks of channels (long runs per tap
    // row; parts of different channels never write the same input pixel)
    Tile tile{0, g.batch, 0, g.out_h, 0, {}};
    const int64_t channel_elements = g.taps() * g.positions();
    const int64_t block = std::max<int64_t>(1, (thread_elements + channel_elements - 1) / channel_elements);
    for (int64_t b = 0; b < g.batch; ++b) {
      for (int64_t c = 0; c < g.channels; c += block) {
        tile.parts.push_back({b, 0, g.out_h, 0, c, std::min(c + block, g.channels)});
      }
    }
    schedule.tiles.push_back(std::move(tile));
  }
  const Tile& first = schedule.tiles.front();
  const Band& part = first.parts[0];
  schedule.tile_elements = first.positions(g) * g.cols();
  schedule.part_elements = (part.oh1 - part.oh0) * g.out_w * (part.c1 - part.c0) * g.taps();
  return schedule;
}

// Calls fn(i, thread) for 0 <= i < count in parallel, giving each thread at
// least the schedule's thread_elements matrix elements (an item has
// `elements`); with two phases, first for the i of even parity(i), then for
// the odd ones.
template <typename Parity, typename Fn>
void parallel_in_phases(const Schedule& schedule, int64_t count, int64_t elements, bool two_phases,
                        const Parity& parity, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, schedule.thread_elements / std::max<int64_t>(1, elements));
  for (int64_t phase = 0; phase < (two_phases ? 2 : 1); ++phase) {
    std::vector<int64_t> active;
    for (int64_t i = 0; i < count; ++i) {
      if (!two_phases || parity(i) == phase) active.push_back(i);
    }
    at::parallel_for(0, static_cast<int64_t>(active.size()), grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(active[i], at::get_thread_num());
    });
  }
}

// Runs tile_fn(tile, thread) over the tiles: in parallel (two phases for
// input-gradient passes) or one after another as thread 0.
template <typename Fn>
void for_each_tile(const Schedule& schedule, bool two_phases, const Fn& tile_fn) {
  if (!schedule.parallel_tiles) {
    for (const Tile& tile : schedule.tiles) tile_fn(tile, 0);
    return;
  }
  parallel_in_phases(
      schedule, static_cast<int64_t>(schedule.tiles.size()), schedule.tile_elements, two_phases,
      [&](int64_t i) { return schedule.tiles[i].index % 2; },
      [&](int64_t i, int64_t thread) { tile_fn(schedule.tiles[i], thread); });
}

// Runs part_fn(part, thread) over the tile's parts, in parallel unless the
// tiles themselves run in parallel (then as the tile's thread).
template <typename Fn>
void for_each_part(const Schedule& schedule, const Tile& tile, int64_t tile_thread, bool two_phases,
                   const Fn& part_fn) {
  if (schedule.parallel_tiles) {
    for (const Band& part : tile.parts) part_fn(part, tile_thread);
    return;
  }
  parallel_in_phases(
      schedule, static_cast<int64_t>(tile.parts.size()), schedule.part_elements, two_phases,
      [&](int64_t i) { return tile.parts[i].index % 2; },
      [&](int64_t i, int64_t thread) { part_fn(tile.parts[i], thread); });
}

// Pointers of one tile's element-wise pass: x, the masked attention and
// (optional) their gradients, whole; the tile's (C*K, R) matrix over its R
// positions.
template <typename scalar_t>
struct TileData {
  const scalar_t* x;
  const scalar_t* attn;  // zero where the tap reads outside its plane
  scalar_t* matrix;      // P (written), or Q (read, and with rebuild_patches P written over it)
  scalar_t* grad_attn;   // before the mask: a thread's partial sum, see aik_backward
  scalar_t* grad_x;
  bool rebuild_patches;
};

// One (channel, tap) row of a part (a band of image b): where it sits in the
// tile matrix, in attn and in the phase planes of x.
struct TapRow {
  int64_t matrix_offset;  // of (c*K + t, the part's first position) in the tile matrix
  int64_t attn_offset;    // of (b, a(c), t, 0, 0) in attn
  int64_t x_plane;        // of the tap's phase plane of (b, c)
  int64_t x_offset;       // x_plane + di*plane_w + dj: output position (oh, ow) reads
                          // x_offset + oh*plane_w + ow
  int64_t di, dj;         // plane pixel minus output position
};

// Where tap (i, j) reads: plane pixel minus output position (di, dj), and
// the index of its phase plane.
struct TapShift {
  int64_t di, dj, phase;
};

TapShift tap_shift(const Geometry& g, int64_t i, int64_t j) {
  const int64_t row_shift = i * g.dh - g.ph, di = floor_div(row_shift, g.sh);
  const int64_t col_shift = j * g.dw - g.pw, dj = floor_div(col_shift, g.sw);
  return {di, dj, (row_shift - di * g.sh) * g.sw + col_shift - dj * g.sw};
}

// tap_shift of each tap t = i * kw + j, computed once per pass rather than
// per (channel, tap) row.
std::vector<TapShift> tap_shifts(const Geometry& g) {
  std::vector<TapShift> shifts;
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j = 0; j < g.kw; ++j) shifts.push_back(tap_shift(g, i, j));
  }
  return shifts;
}

// Up to kBlockRows (channel, tap) rows of one tap, of consecutive channels
// of one attention group: they share their attention row, which the passes
// then read once for all of them (and take the rows' count as a constant,
// with_count).
constexpr int64_t kBlockRows = 4;

struct TapBlock {
  int64_t rows;
  std::array<TapRow, kBlockRows> row;
};

// Calls fn(block) for each tap of each block of up to kBlockRows channels
// of the part; channels outer, so that a block's input (and input-gradient)
// rows stay in cache over its taps.
template <typename Fn>
void for_each_tap_block(const Geometry& g, const Tile& tile, const Band& part, const Fn& fn) {
  const int64_t R = tile.positions(g), Cg = g.channels / g.attn_groups;
  const int64_t first_position = ((part.b - tile.b0) * (tile.oh1 - tile.oh0) + part.oh0 - tile.oh0) * g.out_w;
  const std::vector<TapShift> shifts = tap_shifts(g);
  for (int64_t c0 = part.c0; c0 < part.c1;) {
    const int64_t group = c0 / Cg;
    const int64_t rows = std::min({kBlockRows, part.c1 - c0, (group + 1) * Cg - c0});
    const int64_t attn_row = (part.b * g.attn_groups + group) * g.taps();
    for (int64_t t = 0; t < g.taps(); ++t) {
      const TapShift& shift = shifts[t];
      TapBlock block{rows, {}};
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t c = c0 + i;
        const int64_t x_plane = ((part.b * g.channels + c) * g.phases() + shift.phase) * g.plane_size();
        block.row[i] = TapRow{(c * g.taps() + t) * R + first_position, (attn_row + t) * g.positions(), x_plane,
                              x_plane + shift.di * g.plane_w + shift.dj, shift.di, shift.dj};
      }
      fn(block);
    }
    c0 += rows;
  }
}

// Output rows of the part whose tap reads inside its plane: [first, last).
std::pair<int64_t, int64_t> inside_rows(const Geometry& g, const Band& part, int64_t di) {
  const int64_t first = std::clamp(-di, part.oh0, part.oh1);
  return {first, std::clamp(g.plane_h - di, first, part.oh1)};
}

// Output columns whose tap reads inside its plane: [begin, end).
std::pair<int64_t, int64_t> inside_columns(const Geometry& g, int64_t dj) {
  const int64_t begin = std::clamp<int64_t>(-dj, 0, g.out_w);
  return {begin, std::clamp(g.plane_w - dj, begin, g.out_w)};
}

// With plane_w == W_out, output position k = oh*W_out + ow of a tap reads
// its plane at k + x_offset, so a tap's rows form one flat run. Where the
// run wraps around a row end it reads the neighbouring row's pixels, and
// rows past the plane's edge read its first or last row: the masked
// attention is zero at those positions, so they add nothing (the attention
// gradient is masked after its pass). A run reaches at most one row past
// the rows its tap reads (the spare row of make_bands) only while no tap
// shifts columns by more than a row's width. flat_run returns the part's
// positions [begin, end) whose reads stay inside the plane.
bool flat_runs(const Geometry& g) {
  // the first and the last kernel column shift columns the most
  const int64_t dj_min = tap_shift(g, 0, 0).dj, dj_max = tap_shift(g, 0, g.kw - 1).dj;
  return g.out_w == g.plane_w && -dj_min <= g.plane_w && dj_max <= g.plane_w;
}

std::pair<int64_t, int64_t> flat_run(const Geometry& g, const TapRow& row, const Band& part) {
  const int64_t shift = row.x_offset - row.x_plane;
  const int64_t begin = std::clamp(-shift, part.oh0 * g.out_w, part.oh1 * g.out_w);
  return {begin, std::clamp(g.plane_size() - shift, begin, part.oh1 * g.out_w)};
}

// Sets the positions of the part's output rows where tap (di, dj) reads
// outside its plane to zero, in m, a row of the tap indexed by output
// position (m points at position (0, 0)).
template <typename scalar_t>
void zero_outside(const Geometry& g, const Band& part, int64_t di, int64_t dj, scalar_t* m) {
  const auto [first, last] = inside_rows(g, part, di);
  const auto [lo, hi] = inside_columns(g, dj);
  std::fill(m + part.oh0 * g.out_w, m + first * g.out_w, scalar_t(0));
  for (int64_t oh = first; oh < last; ++oh) {
    std::fill(m + oh * g.out_w, m + oh * g.out_w + lo, scalar_t(0));
    std::fill(m + oh * g.out_w + hi, m + (oh + 1) * g.out_w, scalar_t(0));
  }
  std::fill(m + last * g.out_w, m + part.oh1 * g.out_w, scalar_t(0));
}

// Masks t (B, G, K, H_out, W_out), contiguous, in place: zero where the tap
// reads outside its phase plane (in the padding).
void mask_padding_taps(const Geometry& g, at::Tensor& t) {
  const Band image{0, 0, g.out_h, 0, 0, g.channels};
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "mask_padding_taps", [&] {
    scalar_t* data = t.data_ptr<scalar_t>();
    const std::vector<TapShift> shifts = tap_shifts(g);
    for (int64_t row = 0; row < g.batch * g.attn_groups * g.taps(); ++row) {
      const TapShift& shift = shifts[row % g.taps()];
      zero_outside(g, image, shift.di, shift.dj, data + row * g.positions());
    }
  });
}

// Runs over the N (channel, tap) rows of a block at output positions r0 + k
// and input pixels x0 + k, lo <= k < hi (a, q, p, ga indexed by output
// position; src, gx by input pixel); a and ga are the block's one attention
// row and its gradient.

// P's rows: p = a * src.
template <int64_t N, typename scalar_t>
void patch_run(int64_t r0, int64_t x0, int64_t lo, int64_t hi, const scalar_t* a, const scalar_t* const* src,
               scalar_t* const* p) {
  for (int64_t i = 0; i < N; ++i) {
#pragma omp simd
    for (int64_t k = lo; k < hi; ++k) p[i][r0 + k] = a[r0 + k] * src[i][x0 + k];
  }
}

// From Q's rows: ga += q * src, gx += a * q, and P's rows p = a * src over
// them, each where its flag is set, in one loop. ga sums the rows in their
// order, as one row at a time would.
template <int64_t N, bool kPatches, bool kGradAttn, bool kGradX, typename scalar_t>
void grad_run(int64_t r0, int64_t x0, int64_t lo, int64_t hi, const scalar_t* a, const scalar_t* const* src,
              scalar_t* const* q, scalar_t* ga, scalar_t* const* gx) {
#pragma omp simd
  for (int64_t k = lo; k < hi; ++k) {
    const scalar_t ak = a[r0 + k];
    scalar_t gak = kGradAttn ? ga[r0 + k] : scalar_t(0);
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t qk = q[i][r0 + k];  // once: the compiler cannot tell that the stores leave q alone
      const scalar_t sk = src[i][x0 + k];
      if constexpr (kGradAttn) gak += qk * sk;
      if constexpr (kGradX) gx[i][x0 + k] += ak * qk;
      if constexpr (kPatches) q[i][r0 + k] = ak * sk;
    }
    if constexpr (kGradAttn) ga[r0 + k] = gak;
  }
}

// The N rows of one tap of a block of the part:
// with kPatches, P[c*K + t, r] = attn[a(c), t, r] * x[c, window(r, t)] into
// d.matrix (zero in the padding); from Q[c*K + t, r] = sum_o w[o, c, t] * dy[o, r]
// in d.matrix, first, with kGradAttn, grad_attn[a, t, r] += sum_{c in a} Q * x[c, window(r, t)]
// (before the tap mask), and with kGradX, grad_x[c, window(r, t)] += attn[a(c), t, r] * Q.
template <int64_t N, bool kPatches, bool kGradAttn, bool kGradX, typename scalar_t>
void tap_block_pass(const Geometry& g, const Band& part, const TapBlock& block, const TileData<scalar_t>& d) {
  const int64_t part_begin = part.oh0 * g.out_w, part_end = part.oh1 * g.out_w;
  const TapRow& first = block.row[0];  // the rows share attn_offset, di and dj
  // p, q, a, ga: indexed by output position (oh, ow) -> oh*W_out + ow of the
  // image; src, gx: by the plane pixel oh*plane_w + ow that position reads
  const scalar_t* a = d.attn + first.attn_offset;
  scalar_t* ga = kGradAttn ? d.grad_attn + first.attn_offset : nullptr;
  scalar_t* p[N];
  const scalar_t* src[N];
  scalar_t* gx[N];
  for (int64_t i = 0; i < N; ++i) {
    p[i] = d.matrix + (block.row[i].matrix_offset - part_begin);
    src[i] = d.x + block.row[i].x_offset;
    gx[i] = kGradX ? d.grad_x + block.row[i].x_offset : nullptr;
  }
  // P may overwrite Q in place: Q is read at the positions where the tap
  // reads inside its plane before P is written there, and P's zeros go
  // elsewhere
  const auto run = [&](int64_t r0, int64_t x0, int64_t lo, int64_t hi) {
    if constexpr (kGradAttn || kGradX) {
      grad_run<N, kPatches, kGradAttn, kGradX>(r0, x0, lo, hi, a, src, p, ga, gx);
    } else {
      patch_run<N>(r0, x0, lo, hi, a, src, p);
    }
  };
  if (flat_runs(g)) {
    const auto [begin, end] = flat_run(g, first, part);
    run(0, 0, begin, end);
    if constexpr (kPatches) {
      for (int64_t i = 0; i < N; ++i) {
        std::fill(p[i] + part_begin, p[i] + begin, scalar_t(0));
        std::fill(p[i] + end, p[i] + part_end, scalar_t(0));
      }
    }
    return;
  }
  const auto [first_row, last_row] = inside_rows(g, part, first.di);
  const auto [lo, hi] = inside_columns(g, first.dj);
  if constexpr (kPatches) {
    for (int64_t i = 0; i < N; ++i) zero_outside(g, part, first.di, first.dj, p[i]);
  }
  for (int64_t oh = first_row; oh < last_row; ++oh) run(oh * g.out_w, oh * g.plane_w, lo, hi);
}

// The part's rows of P into d.matrix.
template <typename scalar_t>
void build_patches(const Geometry& g, const Tile& tile, const Band& part, const TileData<scalar_t>& d) {
  for_each_tap_block(g, tile, part, [&](const TapBlock& block) {
    with_count<kBlockRows>(block.rows,
                           [&](auto rows) { tap_block_pass<rows(), true, false, false>(g, part, block, d); });
  });
}

// Calls fn(std::bool_constant<flag>{}).
template <typename Fn>
void with_flag(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// From Q in d.matrix, the part's attention and input gradients into
// d.grad_attn and d.grad_x, each when given, and with d.rebuild_patches
// its rows of P over Q (see tap_block_pass).
template <typename scalar_t>
void scatter_patch_grad(const Geometry& g, const Tile& tile, const Band& part,
                        const TileData<scalar_t>& d) {
  with_flag(d.rebuild_patches, [&](auto patches) {
    with_flag(d.grad_attn != nullptr, [&](auto grad_attn) {
      with_flag(d.grad_x != nullptr, [&](auto grad_x) {
        for_each_tap_block(g, tile, part, [&](const TapBlock& block) {
          with_count<kBlockRows>(block.rows, [&](auto rows) {
            tap_block_pass<rows(), patches(), grad_attn(), grad_x()>(g, part, block, d);
          });
        });
      });
    });
  });
}

// The tile's columns of a (B, O, H_out*W_out) tensor, as an (O, R) matrix
// with leading dimension ld.
template <typename scalar_t>
struct Columns {
  scalar_t* data;
  int64_t ld;
};

// Copies between the tile's columns of t (B, O, H_out*W_out) and `staging`
// (O, R): gather into staging when kGather, else scatter from it.
template <bool kGather, typename scalar_t>
void copy_columns(scalar_t* t, int64_t O, const Geometry& g, const Tile& tile, scalar_t* staging) {
  const int64_t columns = (tile.oh1 - tile.oh0) * g.out_w, R = tile.positions(g);
  for (int64_t b = tile.b0; b < tile.b1; ++b) {
    for (int64_t o = 0; o < O; ++o) {
      scalar_t* image = t + (b * O + o) * g.positions() + tile.oh0 * g.out_w;
      scalar_t* staged = staging + o * R + (b - tile.b0) * columns;
      if constexpr (kGather) {
        std::copy(image, image + columns, staged);
      } else {
        std::copy(staged, staged + columns, image);
      }
    }
  }
}

// The tile's columns of t: t itself for a tile of one image; else staging,
// gathered from t when kGather (for dy; y is scattered after its GEMM).
template <bool kGather, typename scalar_t>
Columns<scalar_t> tile_columns(scalar_t* t, int64_t O, const Geometry& g, const Tile& tile, scalar_t* staging) {
  if (tile.images() == 1) return {t + tile.b0 * O * g.positions() + tile.oh0 * g.out_w, g.positions()};
  if constexpr (kGather) copy_columns<true>(t, O, g, tile, staging);
  return {staging, tile.positions(g)};
}

int64_t buffer_count(const Schedule& schedule) {
  return schedule.parallel_tiles ? at::get_num_threads() : 1;
}

// A thread's tile buffer, row `thread` of (buffers, elements) `buffers`; null when undefined.
template <typename scalar_t>
scalar_t* thread_buffer(const at::Tensor& buffers, int64_t thread) {
  return buffers.defined() ? buffers.data_ptr<scalar_t>() + thread * buffers.size(1) : nullptr;
}

// The sum over the first dimension of parts (N, ...) of the parts[i] with
// written[i] (at least one), in order, by a plain loop: zeroed partials and
// a tensor sum took about 60 us more of the op's backward at C = 64, 56x56.
at::Tensor sum_written_parts(const at::Tensor& parts, const std::vector<char>& written) {
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < parts.size(0); ++i) {
    if (written[i]) rows.push_back(i);
  }
  at::Tensor total = at::empty(parts.sizes().slice(1), parts.options());
  const int64_t n = total.numel();
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "sum_written_parts", [&] {
    scalar_t* out = total.data_ptr<scalar_t>();
    std::copy_n(parts.data_ptr<scalar_t>() + rows.front() * n, n, out);
    for (size_t r = 1; r < rows.size(); ++r) {
      const scalar_t* part = parts.data_ptr<scalar_t>() + rows[r] * n;
      for (int64_t k = 0; k < n; ++k) out[k] += part[k];
    }
  });
  return total;
}

// A copy of attn (B, G, K, H_out, W_out) masked by mask_padding_taps (a
// workspace).
at::Tensor masked_attention(const at::Tensor& attn, const Geometry& g) {
  at::Tensor masked = workspace(kMaskedAttention, attn.sizes(), attn.options()).copy_(attn);
  mask_padding_taps(g, masked);
  return masked;
}

// Staging for the columns of a tile of several images, (O, R): their
// images lie apart in y and dy. Undefined when every tile is one image.
at::Tensor staging_columns(const Schedule& schedule, int64_t O, const Geometry& g, const at::TensorOptions& options) {
  const Tile& tile = schedule.tiles.front();
  return tile.images() == 1 ? at::Tensor() : workspace(kColumns, {O, tile.positions(g)}, options);
}

// Calls fn(plane) for each of the B*C input planes, in parallel.
template <typename Fn>
void for_each_input_plane(const Geometry& g, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kPlaneGrain / (g.height * g.width));
  at::parallel_for(0, g.batch * g.channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) fn(plane);
  });
}

// Calls fn(h, at) for every input row h: its pixels at columns q, q + s_w,
// ... sit in phase plane (h % s_h, q), row h / s_h, at offset
// at + q * plane_size of a (s_h*s_w, plane_h, plane_w) block.
template <typename Fn>
void for_each_phase_row(const Geometry& g, const Fn& fn) {
  for (int64_t h = 0; h < g.height; ++h) fn(h, ((h % g.sh) * g.sw * g.plane_h + h / g.sh) * g.plane_w);
}

// Copies between an input row (`width` pixels) and its s_w column phases
// (phase q at phases + q * phase_stride): split when kSplit, else merge.
// Stride 2 has its own loop, with a constant stride that the compiler
// vectorises.
template <bool kSplit, typename scalar_t>
void phase_row(scalar_t* row, int64_t width, int64_t sw, scalar_t* phases, int64_t phase_stride) {
  const auto copy = [](scalar_t& from_row, scalar_t& from_phase) {
    if constexpr (kSplit) {
      from_phase = from_row;
    } else {
      from_row = from_phase;
    }
  };
  if (sw == 2) {
    scalar_t *even = phases, *odd = phases + phase_stride;
    const int64_t pairs = width / 2;
    for (int64_t w = 0; w < pairs; ++w) {
      copy(row[2 * w], even[w]);
      copy(row[2 * w + 1], odd[w]);
    }
    if (width % 2) copy(row[width - 1], even[pairs]);
    return;
  }
  for (int64_t w = 0; w < width; ++w) copy(row[w], phases[(w % sw) * phase_stride + w / sw]);
}

// Copies between images (B, C, H, W) and their phase planes (B, C,
// s_h*s_w, plane_h, plane_w), both contiguous, in one parallel pass: into
// the planes (zero past the input) when kSplit, else into the images.
template <bool kSplit>
void copy_phases(const at::Tensor& images, const at::Tensor& planes, const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(images.scalar_type(), "copy_phases", [&] {
    scalar_t* image_data = images.data_ptr<scalar_t>();
    scalar_t* plane_data = planes.data_ptr<scalar_t>();
    const int64_t block = g.phases() * g.plane_size();
    const bool padded = g.plane_h * g.sh != g.height || g.plane_w * g.sw != g.width;
    for_each_input_plane(g, [&](int64_t plane) {
      scalar_t* image = image_data + plane * g.height * g.width;
      scalar_t* phases = plane_data + plane * block;
      if (kSplit && padded) std::fill(phases, phases + block, scalar_t(0));
      for_each_phase_row(g, [&](int64_t h, int64_t at) {
        phase_row<kSplit>(image + h * g.width, g.width, g.sw, phases + at, g.plane_size());
      });
    });
  });
}

// x (B, C, H, W) -> its phase planes (B, C, s_h*s_w, plane_h, plane_w),
// contiguous, zero past the input; x itself for stride 1.
at::Tensor phase_planes(const at::Tensor& x, const Geometry& g) {
  if (g.phases() == 1) return x;
  at::Tensor planes = workspace(kInputPlanes, {g.batch, g.channels, g.phases(), g.plane_h, g.plane_w}, x.options());
  copy_phases<true>(x, planes, g);
  return planes;
}

// Inverse of phase_planes for a gradient: (B, C, s_h*s_w, plane_h, plane_w) -> (B, C, H, W).
at::Tensor from_phase_planes(const at::Tensor& planes, const Geometry& g) {
  if (g.phases() == 1) return planes;
  at::Tensor x = at::empty({g.batch, g.channels, g.height, g.width}, planes.options());
  copy_phases<false>(x, planes, g);
  return x;
}

}  // namespace

// x (B, C, H, W), attn (B, G, K, H_out, W_out), weight (O, C, kh, kw), all
// contiguous -> y (B, O, H_out, W_out) without bias.
at::Tensor aik_forward(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& weight,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t tile_elements, int64_t thread_elements) {
  const Geometry g = make_geometry(x, attn, weight.sizes().slice(2), stride, padding, dilation);
  TORCH_CHECK(weight.is_contiguous() && weight.size(1) == g.channels,
              "weight must be a contiguous (O, C, kh, kw) tensor");
  const Schedule schedule = make_schedule(g, tile_elements, thread_elements);
  const int64_t O = weight.size(0);
  const at::Tensor planes = phase_planes(x, g);
  const at::Tensor masked = masked_attention(attn, g);
  at::Tensor out = at::empty({g.batch, O, g.positions()}, x.options());
  const at::Tensor staging_buffer = staging_columns(schedule, O, g, x.options());
  at::Tensor buffers =
      workspace(kMatrixBuffers, {buffer_count(schedule), g.cols() * schedule.max_positions(g)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aik_forward", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    scalar_t* staging = data_or_null<scalar_t>(staging_buffer);
    for_each_tile(schedule, false, [&](const Tile& tile, int64_t thread) {
      const int64_t R = tile.positions(g);
      const TileData<scalar_t> data{planes.data_ptr<scalar_t>(), masked.data_ptr<scalar_t>(),
                                    thread_buffer<scalar_t>(buffers, thread), nullptr, nullptr, false};
      for_each_part(schedule, tile, thread, false,
                    [&](const Band& part, int64_t) { build_patches(g, tile, part, data); });
      const Columns<scalar_t> columns = tile_columns<false>(y, O, g, tile, staging);
      gemm<scalar_t>(false, false, O, R, g.cols(), w, g.cols(), data.matrix, R, 0, columns.data, columns.ld);
      if (tile.images() > 1) copy_columns<false>(y, O, g, tile, staging);
    });
  });
  return out.view({g.batch, O, g.out_h, g.out_w});
}

// grad_out (B, O, H_out, W_out) contiguous -> [grad_x (B, C, H, W),
// grad_attn (B, G, K, H_out, W_out), grad_weight (O, C, kh, kw)], undefined
// where not needed.
std::vector<at::Tensor> aik_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& attn, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t tile_elements,
                                     int64_t thread_elements, bool need_input, bool need_attn, bool need_weight) {
  const Geometry g = make_geometry(x, attn, weight.sizes().slice(2), stride, padding, dilation);
  const int64_t O = weight.size(0);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == at::IntArrayRef({g.batch, O, g.out_h, g.out_w}),
              "grad_out must be a contiguous (B, O, H_out, W_out) tensor");
  const Schedule schedule = make_schedule(g, tile_elements, thread_elements);
  const int64_t buffers = buffer_count(schedule), elements = g.cols() * schedule.max_positions(g);
  const bool need_q = need_input || need_attn;
  const at::Tensor planes = phase_planes(x, g);
  const at::Tensor masked = masked_attention(attn, g);
  // the input gradient itself for stride 1
  at::Tensor grad_planes;
  if (need_input) {
    grad_planes = g.phases() == 1 ? at::zeros_like(planes) : workspace(kGradPlanes, planes.sizes(), x.options()).zero_();
  }
  // The attention gradient before the mask; one partial sum per thread when
  // the parts of the one tile run in parallel (parts of different channels
  // share attention rows), else one (bands of an image are disjoint).
  const int64_t attn_partials = schedule.parallel_tiles ? 1 : at::get_num_threads();
  at::Tensor grad_attn_parts = need_attn ? at::zeros({attn_partials, attn.numel()}, x.options()) : at::Tensor();
  // One weight-gradient partial per thread: a thread's first tile writes
  // it, later ones add to it; written[thread] says whether it was.
  at::Tensor grad_w_parts;
  std::vector<char> written(buffers, 0);
  if (need_weight) {
    grad_w_parts = schedule.parallel_tiles ? workspace(kWeightGradParts, {buffers, O, g.cols()}, x.options())
                                           : at::empty({1, O, g.cols()}, x.options());
  }
  // per thread: Q, then P over it
  at::Tensor matrix_buffers =
      need_q || need_weight ? workspace(kMatrixBuffers, {buffers, elements}, x.options()) : at::Tensor();
  const at::Tensor staging_buffer = staging_columns(schedule, O, g, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "aik_backward", [&] {
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* dy = grad_out.data_ptr<scalar_t>();
    scalar_t* staging = data_or_null<scalar_t>(staging_buffer);
    const TileData<scalar_t> all{planes.data_ptr<scalar_t>(), masked.data_ptr<scalar_t>(), nullptr,
                                 data_or_null<scalar_t>(grad_attn_parts), data_or_null<scalar_t>(grad_planes),
                                 need_weight};
    for_each_tile(schedule, need_input, [&](const Tile& tile, int64_t thread) {
      const int64_t R = tile.positions(g);
      const Columns<scalar_t> tile_dy = tile_columns<true>(dy, O, g, tile, staging);
      TileData<scalar_t> data = all;
      data.matrix = thread_buffer<scalar_t>(matrix_buffers, thread);
      if (need_q) {  // P, when needed, is built over Q in the pass that reads it
        gemm<scalar_t>(true, false, g.cols(), R, O, w, g.cols(), tile_dy.data, tile_dy.ld, 0, data.matrix, R);
        for_each_part(schedule, tile, thread, need_input, [&](const Band& part, int64_t part_thread) {
          TileData<scalar_t> part_data = data;
          if (part_data.grad_attn && attn_partials > 1) part_data.grad_attn += part_thread * attn.numel();
          scatter_patch_grad(g, tile, part, part_data);
        });
      }
      if (need_weight && !need_q) {
        const TileData<scalar_t> build{all.x, all.attn, data.matrix, nullptr, nullptr, false};
        for_each_part(schedule, tile, thread, false,
                      [&](const Band& part, int64_t) { build_patches(g, tile, part, build); });
      }
      if (need_weight) {
        scalar_t* part = grad_w_parts.data_ptr<scalar_t>() + thread * O * g.cols();
        gemm<scalar_t>(false, true, O, g.cols(), R, tile_dy.data, tile_dy.ld, data.matrix, R,
                       written[thread] ? 1 : 0, part, g.cols());
        written[thread] = 1;
      }
    });
  });
  at::Tensor grad_weight;
  if (need_weight) {
    grad_weight = schedule.parallel_tiles ? sum_written_parts(grad_w_parts, written) : grad_w_parts.select(0, 0);
    grad_weight = grad_weight.view(weight.sizes());
  }
  at::Tensor grad_attn;
  if (need_attn) {
    grad_attn = (attn_partials == 1 ? grad_attn_parts.select(0, 0) : grad_attn_parts.sum(0)).view(attn.sizes());
    mask_padding_taps(g, grad_attn);
  }
  at::Tensor grad_x = need_input ? from_phase_planes(grad_planes, g) : at::Tensor();
  return {grad_x, grad_attn, grad_weight};
}
