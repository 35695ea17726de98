// The tail of the AIK attention generator on CPU (called by attention_generator_cpu.cpp):
// from the local maps L (B, M, P) and the global vector g (B, M), per
// sample b and position p,
//
//   F = fusion(L, g)                     (M' = M, or 2M for 'cat', channels)
//   H = relu((F - mean) * scale + beta)  (the fusion norm; scale = gamma * invstd)
//   Z = W H + bias                       (the head, G*K logits)
//
// and A = act(Z) for act 2*sigmoid or sigmoid, in the same pass (K *
// softmax over each group's taps is left to torch's ops), and the backward
// of A from A and dA. Maps are NCHW with the spatial dims
// flattened; every pass runs over blocks of positions with the channels in
// an outer loop, so the inner loops are unit-stride and vectorised. The
// passes over (sample, block) pairs run in parallel; their sums go to
// per-thread partials.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"
#include "norm_vectors.h"
#include "tensor_data.h"
#include "vec.h"
#include "workspace.h"

namespace {

constexpr int64_t kBlock = 256;  // positions per block

template <typename T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

using Floats = Vec<float>::type;
typedef int32_t Ints __attribute__((vector_size(sizeof(Floats))));

// e^v lane by lane: e^v = 2^n e^r with n = floor(v log2(e) + 1/2) and
// r = v - n ln(2) (ln(2) in two parts, so that r is exact), e^r by the
// polynomial of Cephes' expf. Beyond +-88.37, where 2^n would leave the
// float exponent's range, inf and 0; NaN stays NaN. (std::exp vectorises
// only under -ffast-math, and torch's vectorised exp is not reachable from
// an extension: a tensor op per block would cost more than the pass.)
Floats exp_lanes(Floats v) {
  constexpr float kLimit = 88.3762626647949f;
  const Floats inside = v > kLimit ? Floats{} + kLimit : v < -kLimit ? Floats{} - kLimit : v;
  const Floats shifted = inside * 1.44269504088896341f + 0.5f;
  Floats n = __builtin_convertvector(__builtin_convertvector(shifted, Ints), Floats);
  n = n > shifted ? n - 1.0f : n;  // floor: the conversion truncates towards zero
  const Floats r = (inside - n * 0.693359375f) - n * -2.12194440e-4f;
  Floats p = Floats{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Floats er = p * (r * r) + r + 1.0f;
  const Ints exponent = (__builtin_convertvector(n, Ints) + 127) << 23;
  const Floats e = er * (Floats)exponent;  // the vector cast keeps the bits: 2^n
  return v > kLimit ? Floats{} + HUGE_VALF : v < -kLimit ? Floats{} : e;
}

// row[p] = scale * sigmoid(row[p]) for p < n.
template <typename T>
void scaled_sigmoid(T* row, int64_t n, T scale) {
  int64_t p = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; p + Vec<float>::size <= n; p += Vec<float>::size) {
      Vec<float>::store(row + p, scale / (1.0f + exp_lanes(-Vec<float>::load(row + p))));
    }
  }
  for (; p < n; ++p) row[p] = scale * sigmoid(row[p]);
}

// Sizes and the optional tensors' pointers of one call.
template <typename T>
struct Tail {
  int64_t batch, local_channels, positions, hidden, logits;
  Fusion fusion;
  const T* local;  // (B, M, P)
  const T* glob;   // (B, M) or null
  const T* weight; // head (G*K, M')

  int64_t blocks() const { return (positions + kBlock - 1) / kBlock; }

  // F[b, j, p0:p0+n] into f.
  void fused_row(int64_t b, int64_t j, int64_t p0, int64_t n, T* f) const {
    const int64_t M = local_channels;
    if (fusion == kCat && j >= M) {
      std::fill(f, f + n, glob[b * M + j - M]);
      return;
    }
    const T* l = local + (b * M + j) * positions + p0;
    if (fusion == kNone || fusion == kCat) {
      std::copy_n(l, n, f);
    } else if (fusion == kAdd) {
      const T add = glob[b * M + j];
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) f[p] = l[p] + add;
    } else {
      const T gate = sigmoid(glob[b * M + j]);
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) f[p] = l[p] * gate;
    }
  }

  // H (M' x n, rows of kBlock) and the centred F (same layout) of a block.
  void hidden_block(int64_t b, int64_t p0, int64_t n, const T* mean, const T* scale, const T* beta, T* h,
                    T* centred) const {
    for (int64_t j = 0; j < hidden; ++j) {
      T* c = centred + j * kBlock;
      T* hj = h + j * kBlock;
      fused_row(b, j, p0, n, c);
      const T m = mean[j], s = scale[j], shift = beta ? beta[j] : T(0);
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) {
        c[p] -= m;
        hj[p] = std::max(T(0), c[p] * s + shift);
      }
    }
  }
};

template <typename T>
Tail<T> make_tail(const at::Tensor& local, const std::optional<at::Tensor>& glob, int64_t fusion,
                  const at::Tensor& weight) {
  TORCH_CHECK(local.dim() == 3 && local.is_contiguous(), "local must be a contiguous (B, M, P) tensor");
  const int64_t B = local.size(0), M = local.size(1);
  const bool has_glob = glob.has_value() && glob->defined();
  TORCH_CHECK(has_glob == (fusion != kNone), "glob is needed exactly when there is a fusion");
  TORCH_CHECK(!has_glob || (glob->is_contiguous() && glob->sizes() == at::IntArrayRef({B, M})),
              "glob must be a contiguous (B, M) tensor");
  const int64_t hidden = fusion == kCat ? 2 * M : M;
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == hidden,
              "weight must be a contiguous (G*K, M') tensor, got ", weight.sizes());
  return {B,
          M,
          local.size(2),
          hidden,
          weight.size(0),
          static_cast<Fusion>(fusion),
          local.data_ptr<T>(),
          has_glob ? glob->data_ptr<T>() : nullptr,
          weight.data_ptr<T>()};
}

// Z (logits x n, rows of kBlock) = W H + bias.
template <typename T>
void head_block(const Tail<T>& tail, const T* h, const T* bias, int64_t n, T* z) {
  for (int64_t k = 0; k < tail.logits; ++k) {
    T* zk = z + k * kBlock;
    std::fill(zk, zk + n, bias[k]);
    for (int64_t j = 0; j < tail.hidden; ++j) {
      const T w = tail.weight[k * tail.hidden + j];
      const T* hj = h + j * kBlock;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) zk[p] += w * hj[p];
    }
  }
}

// dZ from A and dA (both (B, logits, P), at the block) into dz (rows of kBlock).
template <typename T>
void activation_backward_block(const Tail<T>& tail, Act act, int64_t groups, const T* attn, const T* grad,
                               int64_t n, T* dz) {
  const int64_t stride = tail.positions;
  if (act != kSoftmax) {
    const T half = act == kTwoSigmoid ? T(0.5) : T(1);
    for (int64_t k = 0; k < tail.logits; ++k) {
      const T* a = attn + k * stride;
      const T* d = grad + k * stride;
      T* out = dz + k * kBlock;
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) out[p] = (a[p] - half * a[p] * a[p]) * d[p];
    }
    return;
  }
  const int64_t taps = tail.logits / groups;
  for (int64_t g = 0; g < groups; ++g) {
    const T* a = attn + g * taps * stride;
    const T* d = grad + g * taps * stride;
    T* out = dz + g * taps * kBlock;
    for (int64_t p = 0; p < n; ++p) {
      T mean = 0;
      for (int64_t t = 0; t < taps; ++t) mean += a[t * stride + p] * d[t * stride + p];
      mean /= T(taps);
      for (int64_t t = 0; t < taps; ++t) out[t * kBlock + p] = a[t * stride + p] * (d[t * stride + p] - mean);
    }
  }
}

// The forward on one dtype (see tail_forward).
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& local, const std::optional<at::Tensor>& glob,
                                     int64_t fusion, const std::optional<at::Tensor>& given_mean,
                                     const std::optional<at::Tensor>& given_invstd,
                                     const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                     const at::Tensor& weight, const at::Tensor& bias, int64_t act) {
  const bool batch_stats = !(given_mean.has_value() && given_mean->defined());
  at::Tensor logits, mean, var, invstd;
  const Tail<T> tail = make_tail<T>(local, glob, fusion, weight);
  logits = at::empty({tail.batch, tail.logits, tail.positions}, local.options());
  if (batch_stats) {
    mean = at::empty({tail.hidden}, local.options());
    var = at::empty({tail.hidden}, local.options());
    T* md = mean.data_ptr<T>();
    T* vd = var.data_ptr<T>();
    const double count = double(tail.batch) * tail.positions;
    // two passes, the mean and then the centred squares (as the torch path)
    at::parallel_for(0, tail.hidden, 1, [&](int64_t j0, int64_t j1) {
      std::vector<T> f(kBlock);
      // the sum of term(F[b, j, p]) over the batch and positions
      const auto fused_sum = [&](int64_t j, const auto& term) {
        double total = 0;
        for (int64_t b = 0; b < tail.batch; ++b) {
          for (int64_t p0 = 0; p0 < tail.positions; p0 += kBlock) {
            const int64_t n = std::min(kBlock, tail.positions - p0);
            tail.fused_row(b, j, p0, n, f.data());
            T s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t p = 0; p < n; ++p) s += term(f[p]);
            total += s;
          }
        }
        return total;
      };
      for (int64_t j = j0; j < j1; ++j) {
        const T mu = static_cast<T>(fused_sum(j, [](T v) { return v; }) / count);
        md[j] = mu;
        vd[j] = static_cast<T>(fused_sum(j, [mu](T v) { return (v - mu) * (v - mu); }) / count);
      }
    });
    invstd = inverse_std<T>(var, eps);
  } else {
    mean = given_mean->contiguous();
    invstd = given_invstd->contiguous();
  }
  const at::Tensor scale = norm_scale<T>(gamma, invstd);
  const T* md = mean.data_ptr<T>();
  const T* sd = scale.data_ptr<T>();
  const T* betad = data_or_null<T>(beta);
  const T* biasd = bias.data_ptr<T>();
  T* zd = logits.data_ptr<T>();
  at::parallel_for(0, tail.batch * tail.blocks(), 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> h(tail.hidden * kBlock), c(tail.hidden * kBlock), z(tail.logits * kBlock);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / tail.blocks(), p0 = (i % tail.blocks()) * kBlock;
      const int64_t n = std::min(kBlock, tail.positions - p0);
      tail.hidden_block(b, p0, n, md, sd, betad, h.data(), c.data());
      head_block(tail, h.data(), biasd, n, z.data());
      for (int64_t k = 0; k < tail.logits; ++k) {
        if (act != kSoftmax) scaled_sigmoid(z.data() + k * kBlock, n, act == kTwoSigmoid ? T(2) : T(1));
        std::copy_n(z.data() + k * kBlock, n, zd + (b * tail.logits + k) * tail.positions + p0);
      }
    }
  });
  return {logits, mean, batch_stats ? var : at::Tensor(), invstd};
}

// The backward on one dtype (see tail_backward).
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& local, const std::optional<at::Tensor>& glob,
                                      int64_t fusion, const at::Tensor& mean, const at::Tensor& scale,
                                      const std::optional<at::Tensor>& stat_terms,
                                      const at::Tensor& beta, const at::Tensor& weight,
                                      const at::Tensor& attn, const at::Tensor& grad_attn, int64_t act,
                                      int64_t groups) {
  const Tail<T> tail = make_tail<T>(local, glob, fusion, weight);
  TORCH_CHECK(groups > 0 && tail.logits % groups == 0, "groups must divide the logits");
  const std::vector<int64_t> maps{tail.batch, tail.logits, tail.positions};
  TORCH_CHECK(attn.is_contiguous() && attn.sizes() == at::IntArrayRef(maps) && grad_attn.is_contiguous() &&
                  grad_attn.sizes() == at::IntArrayRef(maps),
              "attn and grad_attn must be contiguous (B, G*K, P) tensors");
  const int64_t M2 = tail.hidden, GK = tail.logits, P = tail.positions;
  TORCH_CHECK(mean.is_contiguous() && scale.is_contiguous() && mean.numel() == tail.hidden &&
                  scale.numel() == tail.hidden,
              "mean and scale must be contiguous (M',) tensors");
  const at::Tensor stat = stat_terms.value_or(at::Tensor());
  TORCH_CHECK(!stat.defined() || (stat.is_contiguous() && stat.sizes() == at::IntArrayRef({tail.hidden, 2})),
              "stat must be a contiguous (M', 2) tensor");
  const T* md = mean.data_ptr<T>();
  const T* sd = scale.data_ptr<T>();
  const T* betad = data_or_null<T>(beta);
  const T* ad = attn.data_ptr<T>();
  const T* gad = grad_attn.data_ptr<T>();
  // per thread: grad_weight (GK x M'), grad_bias (GK), sum dN, sum dN * centred (M' each)
  const int64_t threads = at::get_num_threads(), sums = GK * M2 + GK + 2 * M2;
  std::vector<double> partials(threads * sums, 0.0);
  at::Tensor grad_norm = workspace(kGradNorm, {tail.batch, M2, P}, local.options());  // dN
  T* dnd = grad_norm.data_ptr<T>();
  at::parallel_for(0, tail.batch * tail.blocks(), 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> h(M2 * kBlock), c(M2 * kBlock), dz(GK * kBlock);
    double* acc = partials.data() + at::get_thread_num() * sums;
    double* grad_w = acc;
    double* grad_b = acc + GK * M2;
    double* grad_sum = grad_b + GK;
    double* grad_dot = grad_sum + M2;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / tail.blocks(), p0 = (i % tail.blocks()) * kBlock;
      const int64_t n = std::min(kBlock, P - p0);
      tail.hidden_block(b, p0, n, md, sd, betad, h.data(), c.data());
      activation_backward_block(tail, static_cast<Act>(act), groups, ad + b * GK * P + p0, gad + b * GK * P + p0,
                                n, dz.data());
      for (int64_t k = 0; k < GK; ++k) {
        const T* dzk = dz.data() + k * kBlock;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t p = 0; p < n; ++p) s += dzk[p];
        grad_b[k] += s;
        for (int64_t j = 0; j < M2; ++j) {
          const T* hj = h.data() + j * kBlock;
          T d = 0;
#pragma omp simd reduction(+ : d)
          for (int64_t p = 0; p < n; ++p) d += dzk[p] * hj[p];
          grad_w[k * M2 + j] += d;
        }
      }
      for (int64_t j = 0; j < M2; ++j) {
        T* dn = dnd + (b * M2 + j) * P + p0;
        std::fill(dn, dn + n, T(0));
        for (int64_t k = 0; k < GK; ++k) {
          const T w = tail.weight[k * M2 + j];
          const T* dzk = dz.data() + k * kBlock;
#pragma omp simd
          for (int64_t p = 0; p < n; ++p) dn[p] += w * dzk[p];
        }
        const T* hj = h.data() + j * kBlock;
        const T* cj = c.data() + j * kBlock;
        T s = 0, d = 0;
#pragma omp simd reduction(+ : s, d)
        for (int64_t p = 0; p < n; ++p) {
          dn[p] = hj[p] > T(0) ? dn[p] : T(0);
          s += dn[p];
          d += dn[p] * cj[p];
        }
        grad_sum[j] += s;
        grad_dot[j] += d;
      }
    }
  });
  std::vector<double> total(sums, 0.0);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t k = 0; k < sums; ++k) total[k] += partials[t * sums + k];
  }
  const double* grad_sum = total.data() + GK * M2 + GK;
  const double* grad_dot = grad_sum + M2;
  // dF = dN * scale + e * centred + f
  std::vector<T> e(M2, T(0)), f(M2, T(0));
  if (stat.defined()) {
    const T* std_ = stat.data_ptr<T>();
    for (int64_t j = 0; j < M2; ++j) {
      e[j] = static_cast<T>(std_[2 * j] * grad_dot[j]);
      f[j] = static_cast<T>(std_[2 * j + 1] * grad_sum[j]);
    }
  }
  const int64_t M = tail.local_channels;
  at::Tensor grad_local = workspace(kGradLocal, local.sizes(), local.options());
  at::Tensor grad_glob = tail.glob ? at::zeros({tail.batch, M}, local.options()) : at::Tensor();
  T* gld = grad_local.data_ptr<T>();
  T* ggd = tail.glob ? grad_glob.data_ptr<T>() : nullptr;
  at::parallel_for(0, tail.batch * M2, 1, [&](int64_t i0, int64_t i1) {
    std::vector<T> df(P);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / M2, j = i % M2;
      tail.fused_row(b, j, 0, P, df.data());
      const T* dn = dnd + (b * M2 + j) * P;
      const T m = md[j], s = sd[j], ej = e[j], fj = f[j];
      T dsum = 0;
#pragma omp simd reduction(+ : dsum)
      for (int64_t p = 0; p < P; ++p) {
        df[p] = dn[p] * s + ej * (df[p] - m) + fj;
        dsum += df[p];
      }
      if (tail.fusion == kCat && j >= M) {
        ggd[b * M + j - M] = dsum;
        continue;
      }
      T* dl = gld + (b * M + j) * P;
      if (tail.fusion != kMul) {
        std::copy_n(df.data(), P, dl);
        if (tail.fusion == kAdd) ggd[b * M + j] = dsum;
        continue;
      }
      const T gate = sigmoid(tail.glob[b * M + j]);
      const T* l = tail.local + (b * M + j) * P;
      T dgate = 0;
#pragma omp simd reduction(+ : dgate)
      for (int64_t p = 0; p < P; ++p) {
        dl[p] = df[p] * gate;
        dgate += df[p] * l[p];
      }
      ggd[b * M + j] = dgate * gate * (T(1) - gate);
    }
  });
  at::Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty({GK}, local.options());
  T* gwd = grad_weight.data_ptr<T>();
  T* gbd = grad_bias.data_ptr<T>();
  for (int64_t k = 0; k < GK * M2; ++k) gwd[k] = static_cast<T>(total[k]);
  for (int64_t k = 0; k < GK; ++k) gbd[k] = static_cast<T>(total[GK * M2 + k]);
  at::Tensor sums_out = at::empty({2, M2}, local.options());  // sum dN, sum dN * centred
  T* sod = sums_out.data_ptr<T>();
  for (int64_t j = 0; j < M2; ++j) {
    sod[j] = static_cast<T>(grad_sum[j]);
    sod[M2 + j] = static_cast<T>(grad_dot[j]);
  }
  return {grad_local, grad_glob, sums_out[0], sums_out[1], grad_weight, grad_bias};
}

}  // namespace

// local (B, M, P), glob (B, M) or None, the fusion norm's mean and invstd
// (M',; None: batch statistics), gamma and beta (M',) or None, head weight
// (G*K, M') and bias (G*K,), the activation -> [A (B, G*K, P) for the
// sigmoids, the logits Z for softmax, mean (M'), biased var (M'; undefined
// when mean was given), invstd (M'; the given one, or 1 / sqrt(var + eps))].
std::vector<at::Tensor> tail_forward(const at::Tensor& local, const std::optional<at::Tensor>& glob,
                                     int64_t fusion, const std::optional<at::Tensor>& mean,
                                     const std::optional<at::Tensor>& invstd,
                                     const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                     const at::Tensor& weight, const at::Tensor& bias, int64_t act) {
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(local.scalar_type(), "tail_forward", [&] {
    result = forward_impl<scalar_t>(local, glob, fusion, mean, invstd, gamma, beta, eps, weight, bias, act);
  });
  return result;
}

// The backward of tail_forward from A and dA (B, G*K, P), with the fusion
// norm's mean and scale (M',) and its batch-statistics terms stat (M', 2) or
// None: the gradient at the fusion is dN * scale + stat[j][0] *
// sum(dN * centred) * centred + stat[j][1] * sum(dN), dN the gradient at the
// norm's output.
// -> [grad_local (B, M, P; a workspace, see workspace.h), grad_glob (B, M; undefined without),
// sum(dN), sum(dN * centred) (M',), grad_weight (G*K, M'), grad_bias (G*K,)].
std::vector<at::Tensor> tail_backward(const at::Tensor& local, const std::optional<at::Tensor>& glob,
                                      int64_t fusion, const at::Tensor& mean, const at::Tensor& scale,
                                      const std::optional<at::Tensor>& stat_terms,
                                      const at::Tensor& beta, const at::Tensor& weight,
                                      const at::Tensor& attn, const at::Tensor& grad_attn, int64_t act,
                                      int64_t groups) {
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(local.scalar_type(), "tail_backward", [&] {
    result = backward_impl<scalar_t>(local, glob, fusion, mean, scale, stat_terms, beta, weight, attn, grad_attn,
                                     act, groups);
  });
  return result;
}
