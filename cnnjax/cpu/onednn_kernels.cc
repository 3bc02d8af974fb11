// oneDNN convolutions and max-pools as XLA FFI custom calls for the CPU (built by cnnjax/cpu/onednn.py).
//
// CnnjaxOnednnConv: three kinds (attribute `kind`), all NHWC activations and HWIO kernels, G = `groups`:
//   0 forward:          (x [N,H,W,I], w [KH,KW,I/G,O])  -> y  [N,Ho,Wo,O]
//   1 input gradient:   (g [N,Ho,Wo,O], w [KH,KW,I/G,O]) -> dx [N,H,W,I]
//   2 kernel gradient:  (x [N,H,W,I], g [N,Ho,Wo,O])    -> dw [KH,KW,I/G,O]
// Attributes: strides (sh, sw), paddings (pt, pb, pl, pr), dilations (dh, dw; 1 = none), groups (G divides I and
// O; output channel o belongs to group o / (O/G), as in XLA's feature_group_count: the kernel is oneDNN's grouped
// {G, O/G, I/G, KH, KW} in its `hwigo` layout, which is HWIO with O = G * O/G; I = G is a depthwise conv).
// float32 or bfloat16, the same dtype for every operand. Kernels are reordered between HWIO and the blocked
// layout oneDNN picks; primitives are cached per shape and kind, and the scratchpad is the caller's thread's.
//
// CnnjaxOnednnMaxPoolForward: x [N,H,W,C] -> (y [N,Ho,Wo,C], workspace: the window position of each maximum,
// N*Ho*Wo*C bytes); CnnjaxOnednnMaxPoolBackward: (g [N,Ho,Wo,C], workspace) -> dx [N,H,W,C]. Attributes: window
// (kh, kw), strides (sh, sw), paddings (pt, pb, pl, pr), padding counting as -inf; float32 or bfloat16.
//
// Threads: each call splits its batch into slices and runs them on the calling thread of XLA's intra-op pool and
// on one task of that pool, oneDNN single-threaded on each (ParallelSlices). oneDNN's own OpenMP team is not used:
// in XLA every pool thread that called oneDNN became the master of a team of its own, more threads than cores.
// Kernel gradients of the slices are summed in float32 in slice order, so results do not depend on which thread ran a slice.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

extern "C" void omp_set_num_threads(int);  // libgomp's, which oneDNN's OpenMP build links

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Batch slices per call: one for each of the two threads that run a call's slices (at most the batch).
int64_t SliceCount(int64_t batch) { return std::min<int64_t>(2, batch); }

// oneDNN on this thread runs single-threaded (once per thread; OpenMP's thread count is a per-thread setting).
void OneOmpThread() {
  thread_local bool set = false;
  if (!set) {
    omp_set_num_threads(1);
    set = true;
  }
}

// body(i) for every i in [0, n): on the caller and, when n > 1, on one task of `pool`, each taking the next
// unclaimed i until none is left. Returns when all n have run. The caller never waits for an i nobody has claimed,
// so a pool whose threads are all busy (or waiting in calls like this one) only leaves the caller to run every i.
void ParallelSlices(ffi::ThreadPool* pool, int64_t n, const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto run = [n](State& s, const std::function<void(int64_t)>& f) {
    OneOmpThread();
    for (int64_t i; (i = s.next.fetch_add(1)) < n;) {
      f(i);
      std::lock_guard<std::mutex> lock(s.mu);
      if (++s.finished == n) s.all_done.notify_all();
    }
  };
  // The task may start after this call returned: it then claims nothing and never touches `body`.
  if (pool != nullptr && n > 1) pool->Schedule([state, run, &body] { run(*state, body); });
  run(*state, body);
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_done.wait(lock, [&] { return state->finished == n; });
}

// slice(i, first_row, rows) for each of the n batch slices of a batch of `batch` rows, spread by ParallelSlices.
// Returns the first error a slice threw (dnnl::error, std::bad_alloc), or "" when none did.
std::string ForEachBatchSlice(ffi::ThreadPool* pool, int64_t batch, int64_t n,
                              const std::function<void(int64_t, int64_t, int64_t)>& slice) {
  std::mutex mu;
  std::string first_error;
  auto fail = [&](const char* what) {
    std::lock_guard<std::mutex> lock(mu);
    if (first_error.empty()) first_error = what;
  };
  try {
    ParallelSlices(pool, n, [&](int64_t i) {
      const int64_t begin = i * batch / n, end = (i + 1) * batch / n;
      try {
        slice(i, begin, end - begin);
      } catch (const std::exception& e) {
        fail(e.what());
      }
    });
  } catch (const std::exception& e) {
    fail(e.what());
  }
  return first_error;
}

int64_t Product(const memory::dims& d) {
  int64_t p = 1;
  for (auto v : d) p *= v;
  return p;
}

// Bytes of one batch row of an NCHW-dimensioned activation of dtype dt.
int64_t RowBytes(const memory::dims& dims, memory::data_type dt) {
  return Product(dims) / dims[0] * static_cast<int64_t>(memory::data_type_size(dt));
}

struct Conv {
  dnnl::primitive conv;
  memory::desc user_weights;    // HWIO as jax has it
  memory::desc conv_weights;    // the layout the primitive wants
  bool reorder_weights = false;
  dnnl::primitive weights_reorder;  // HWIO -> blocked (kinds 0, 1) or blocked -> HWIO (kind 2)
  memory::desc scratchpad;
};

// NCHW-ordered dims: src {N, I, H, W}, weights {O, I/G, KH, KW}, dst {N, O, Ho, Wo}; G = groups.
struct Geometry {
  memory::dims src, weights, dst, strides, dilations, pad_l, pad_r;
  int64_t groups = 1;
};

// The kernel's dims as oneDNN's primitives take them: {O, I, KH, KW}, or {G, O/G, I/G, KH, KW} for G > 1.
memory::dims WeightsDims(const Geometry& g) {
  if (g.groups == 1) return g.weights;
  return {g.groups, g.weights[0] / g.groups, g.weights[1], g.weights[2], g.weights[3]};
}

template <typename PD>
void Finish(Conv& c, const PD& pd, const memory::desc& weights_md, bool weights_out) {
  c.conv_weights = weights_md;
  c.reorder_weights = !(weights_md == c.user_weights);
  if (c.reorder_weights) {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto from = weights_out ? c.conv_weights : c.user_weights;
    auto to = weights_out ? c.user_weights : c.conv_weights;
    dnnl::reorder::primitive_desc rpd(Engine(), from, Engine(), to, attr);
    c.weights_reorder = dnnl::reorder(rpd);
  }
}

std::unique_ptr<Conv> Build(int kind, memory::data_type dt, const Geometry& g) {
  auto c = std::make_unique<Conv>();
  // Kernel gradients are written in float32 (summed over batch slices, then rounded to `dt` by the caller).
  const auto w_dt = kind == 2 ? memory::data_type::f32 : dt;
  const memory::dims weights = WeightsDims(g);
  memory::desc src(g.src, dt, tag::nhwc), dst(g.dst, dt, tag::nhwc), any_w(weights, dt, tag::any);
  c->user_weights = memory::desc(weights, w_dt, g.groups == 1 ? tag::hwio : tag::hwigo);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto alg = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::desc fwd(dnnl::prop_kind::forward_training, alg, src, any_w, dst, g.strides,
                                      g.dilations, g.pad_l, g.pad_r);
  dnnl::convolution_forward::primitive_desc fwd_pd(fwd, attr, Engine());
  if (kind == 0) {
    c->conv = dnnl::convolution_forward(fwd_pd);
    c->scratchpad = fwd_pd.scratchpad_desc();
    Finish(*c, fwd_pd, fwd_pd.weights_desc(), false);
  } else if (kind == 1) {
    dnnl::convolution_backward_data::desc bwd(alg, src, any_w, dst, g.strides, g.dilations, g.pad_l, g.pad_r);
    dnnl::convolution_backward_data::primitive_desc pd(bwd, attr, Engine(), fwd_pd);
    c->conv = dnnl::convolution_backward_data(pd);
    c->scratchpad = pd.scratchpad_desc();
    Finish(*c, pd, pd.weights_desc(), false);
  } else {
    memory::desc any_dw(weights, w_dt, tag::any);
    dnnl::convolution_backward_weights::desc bwd(alg, src, any_dw, dst, g.strides, g.dilations, g.pad_l,
                                                 g.pad_r);
    dnnl::convolution_backward_weights::primitive_desc pd(bwd, attr, Engine(), fwd_pd);
    c->conv = dnnl::convolution_backward_weights(pd);
    c->scratchpad = pd.scratchpad_desc();
    Finish(*c, pd, pd.diff_weights_desc(), true);
  }
  return c;
}

// A primitive cache's key: `prefix`, then every dimension list.
std::string CacheKey(std::string prefix, std::initializer_list<const memory::dims*> dims_lists) {
  for (const auto* dims : dims_lists) {
    prefix += "|";
    for (auto d : *dims) prefix += std::to_string(d) + ",";
  }
  return prefix;
}

// What build() makes for `key`, made once per process and kept: one cache per call site (each passes its own
// lambda type), guarded by its own mutex.
template <typename Build>
const auto& CachedBy(const std::string& key, Build build) {
  using T = typename decltype(build())::element_type;
  static std::mutex mu;
  static std::unordered_map<std::string, std::unique_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[key];
  if (!slot) slot = build();
  return *slot;
}

const Conv& Cached(int kind, memory::data_type dt, const Geometry& g) {
  return CachedBy(CacheKey(std::to_string(kind) + ":" + std::to_string(static_cast<int>(dt)) + ":" +
                               std::to_string(g.groups),
                           {&g.src, &g.weights, &g.dst, &g.strides, &g.dilations, &g.pad_l, &g.pad_r}),
                  [&] { return Build(kind, dt, g); });
}

// Per-thread buffers (grown, never shrunk): 0 the scratchpad, 1 the blocked kernel, 2-4 the source, kernel and
// output of a kernel gradient run as a forward convolution (WgradSlice); 2 also the input patches of
// WgradMatmulSlice and the gathered input of StridedPointwiseWgradSlice; 2 and 3 also the float32 input and output
// gradient of DepthwiseWgradSlice.
#ifdef CNNJAX_ONEDNN_TEST_BUFFERS
// tests/cpu_native/buffer_bounds.cc builds this file with buffers of its own that end at an unmapped page.
void* TestThreadBuffer(int which, size_t bytes);
void* ThreadBuffer(int which, size_t bytes) { return TestThreadBuffer(which, bytes); }
#else
void* ThreadBuffer(int which, size_t bytes) {
  thread_local std::vector<char> buffers[5];
  auto& b = buffers[which];
  if (b.size() < bytes + 64) b.resize(bytes + 64);
  auto p = reinterpret_cast<std::uintptr_t>(b.data());
  return reinterpret_cast<void*>((p + 63) & ~std::uintptr_t(63));
}
#endif

// One convolution of `kind` on the activations x / y and the HWIO kernel w (each an input or the output; a kernel
// gradient is written in float32), on this thread. Throws dnnl::error or std::bad_alloc.
void ConvSlice(int kind, memory::data_type dt, const Geometry& g, void* x_p, void* w_p, void* y_p) {
  const Conv& c = Cached(kind, dt, g);
  dnnl::stream stream(Engine());
  memory x_m(memory::desc(g.src, dt, tag::nhwc), Engine(), x_p);
  memory y_m(memory::desc(g.dst, dt, tag::nhwc), Engine(), y_p);
  memory w_user(c.user_weights, Engine(), w_p);
  memory w_conv = c.reorder_weights
      ? memory(c.conv_weights, Engine(), ThreadBuffer(1, c.conv_weights.get_size())) : w_user;
  memory pad(c.scratchpad, Engine(), ThreadBuffer(0, c.scratchpad.get_size()));
  if (c.reorder_weights && kind != 2)
    c.weights_reorder.execute(stream, {{DNNL_ARG_FROM, w_user}, {DNNL_ARG_TO, w_conv}});
  if (kind == 0) {
    c.conv.execute(stream, {{DNNL_ARG_SRC, x_m}, {DNNL_ARG_WEIGHTS, w_conv}, {DNNL_ARG_DST, y_m},
                            {DNNL_ARG_SCRATCHPAD, pad}});
  } else if (kind == 1) {
    c.conv.execute(stream, {{DNNL_ARG_DIFF_DST, y_m}, {DNNL_ARG_WEIGHTS, w_conv}, {DNNL_ARG_DIFF_SRC, x_m},
                            {DNNL_ARG_SCRATCHPAD, pad}});
  } else {
    c.conv.execute(stream, {{DNNL_ARG_SRC, x_m}, {DNNL_ARG_DIFF_DST, y_m}, {DNNL_ARG_DIFF_WEIGHTS, w_conv},
                            {DNNL_ARG_SCRATCHPAD, pad}});
    if (c.reorder_weights)
      c.weights_reorder.execute(stream, {{DNNL_ARG_FROM, w_conv}, {DNNL_ARG_TO, w_user}});
  }
  stream.wait();
}

// --- kernel gradients as forward convolutions --------------------------------------------------------------
//
// With the batch as the channels, a stride-1 convolution's kernel gradient
//   dw[kh, kw, i, o] = sum over n, ho, wo of x[n, ho + kh - pt, wo + kw - pl, i] * g[n, ho, wo, o]
// is a forward convolution of x read as [I, N, H, W] (batch I, channels N) with g read as an [O, N, Ho, Wo] kernel,
// whose [I, O, KH, KW] output is dw written as HWIO. x is copied into a zeroed buffer with the original's padding
// around it, so the forward convolution itself is unpadded (oneDNN's brgemm forward with a kernel as large as the
// map and padding was 4x slower). oneDNN 2.6 runs bfloat16 forwards on AMX with its brgemm kernels but kernel
// gradients with its older jit kernel, 3-5x the forward's time for fast_cnn's 256-channel convolutions on 6x6 and
// 3x3 maps. The forward wins only where the map, so the forward's kernel, is small: [512, 3, 3, 256] -> 256 in two
// slices took 11 ms against 61-70 (on 6x6 maps 103-131 ms against 93-94, a 6x6 kernel over 3x3 outputs; on 13x13
// maps 4-7x slower). Which kernel gradients take this path: cnnjax.conv.onednn_wgrad_path.

// --- kernel gradients of strided 1x1 convolutions ------------------------------------------------------------
//
// oneDNN 2.6's kernel gradient of a strided 1x1 convolution (its "reduce to unit stride" path, which compacts the
// input it reads into the scratchpad) writes past the scratchpad it asks for when the input has few channels (1 to 5
// of the 1 to 19 tried at stride 2): 80 bytes past 448 for [8, 8, 5] -> 7 at stride 2, 21 KB past 3 KB for [56, 56, 1]
// (AVX2; tests/cpu_native/buffer_bounds.cc finds them). That overwrote the heap: aborts and segfaults far from the
// cause. Such kernel gradients run here as the stride-1, unpadded 1x1 kernel gradient of the input positions the
// kernel reads, gathered first (zeros where it reads padding): the same sums, on oneDNN's unit-stride path.

bool StridedPointwise(const Geometry& g) {
  return g.weights[2] == 1 && g.weights[3] == 1 && (g.strides[0] != 1 || g.strides[1] != 1);
}

// How a kernel gradient runs: oneDNN's backward-weights primitive (ConvSlice), a forward convolution (WgradSlice), a
// matrix product (WgradMatmulSlice) or a loop for depthwise convolutions (DepthwiseWgradSlice), as the call's `wgrad`
// attribute asks (cnnjax.cpu.rules.Rules.wgrad_path and grouped_wgrad_path choose, by dtype, CPU and shape); the
// forward and matmul paths only for stride-1 undilated convolutions of groups 1, the loop only for depthwise ones.
// Strided 1x1 kernel gradients always run as the unit-stride primitive on the gathered input
// (StridedPointwiseWgradSlice), whatever was asked: oneDNN's own path for them must not run.
enum class Wgrad { kNative = 0, kForward = 1, kMatmul = 2, kDepthwise = 3, kStridedPointwise };

// A depthwise convolution: one input channel per group (O a multiple of I).
bool Depthwise(const Geometry& g) { return g.groups == g.src[1] && g.weights[1] == 1; }

Wgrad WgradMode(Wgrad asked, const Geometry& g) {
  if (StridedPointwise(g)) return Wgrad::kStridedPointwise;
  if (asked == Wgrad::kDepthwise) return Depthwise(g) ? Wgrad::kDepthwise : Wgrad::kNative;
  if (g.groups != 1) return Wgrad::kNative;  // the forward and matmul paths are written for groups 1
  for (auto s : g.strides) if (s != 1) return Wgrad::kNative;
  for (auto d : g.dilations) if (d != 0) return Wgrad::kNative;
  return asked;
}

struct WgradConv {
  dnnl::primitive conv, src_reorder, wei_reorder, dst_reorder;
  memory::desc src_user, wei_user, dst_user, src_conv, src_inner, wei_conv, dst_conv, scratchpad;
};

std::unique_ptr<WgradConv> BuildWgrad(memory::data_type dt, const Geometry& g) {
  const auto n = g.src[0], i = g.src[1], h = g.src[2], w = g.src[3];
  const auto o = g.dst[1], ho = g.dst[2], wo = g.dst[3], kh = g.weights[2], kw = g.weights[3];
  const auto f32 = memory::data_type::f32;
  auto c = std::make_unique<WgradConv>();
  // NHWC x and g and the HWIO output, read through strides in the roles above.
  c->src_user = memory::desc({i, n, h, w}, dt, memory::dims{1, h * w * i, w * i, i});
  c->wei_user = memory::desc({o, n, ho, wo}, dt, memory::dims{1, ho * wo * o, wo * o, o});
  c->dst_user = memory::desc({i, o, kh, kw}, f32, memory::dims{o, 1, kw * i * o, i * o});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto hp = h + g.pad_l[0] + g.pad_r[0], wp = w + g.pad_l[1] + g.pad_r[1];
  dnnl::convolution_forward::desc fwd(
      dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      memory::desc({i, n, hp, wp}, dt, tag::any), memory::desc({o, n, ho, wo}, dt, tag::any),
      memory::desc({i, o, kh, kw}, f32, tag::any), {1, 1}, {0, 0}, {0, 0}, {0, 0});
  dnnl::convolution_forward::primitive_desc pd(fwd, attr, Engine());
  c->conv = dnnl::convolution_forward(pd);
  c->scratchpad = pd.scratchpad_desc();
  c->src_conv = pd.src_desc();
  c->src_inner = c->src_conv.submemory_desc({i, n, h, w}, {0, 0, g.pad_l[0], g.pad_l[1]});
  c->wei_conv = pd.weights_desc();
  c->dst_conv = pd.dst_desc();
  auto reorder = [](const memory::desc& from, const memory::desc& to) {
    return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
  };
  c->src_reorder = reorder(c->src_user, c->src_inner);
  c->wei_reorder = reorder(c->wei_user, c->wei_conv);
  c->dst_reorder = reorder(c->dst_conv, c->dst_user);
  return c;
}

// A kernel-gradient path's cache key: the path's prefix, the dtype and the (stride-1, undilated) geometry.
std::string WgradKey(const char* prefix, memory::data_type dt, const Geometry& g) {
  return CacheKey(prefix + std::to_string(static_cast<int>(dt)), {&g.src, &g.weights, &g.dst, &g.pad_l, &g.pad_r});
}

const WgradConv& CachedWgrad(memory::data_type dt, const Geometry& g) {
  return CachedBy(WgradKey("w:", dt, g), [&] { return BuildWgrad(dt, g); });
}

// The float32 HWIO kernel gradient of one batch slice (x, g NHWC) into w_out, as a forward convolution.
void WgradSlice(memory::data_type dt, const Geometry& g, void* x_p, void* y_p, void* w_out) {
  const WgradConv& c = CachedWgrad(dt, g);
  dnnl::stream stream(Engine());
  memory src_user(c.src_user, Engine(), x_p), wei_user(c.wei_user, Engine(), y_p);
  memory dst_user(c.dst_user, Engine(), w_out);
  void* src_p = ThreadBuffer(2, c.src_conv.get_size());
  std::memset(src_p, 0, c.src_conv.get_size());  // the padding
  memory src(c.src_conv, Engine(), src_p), src_inner(c.src_inner, Engine(), src_p);
  memory wei(c.wei_conv, Engine(), ThreadBuffer(3, c.wei_conv.get_size()));
  memory dst(c.dst_conv, Engine(), ThreadBuffer(4, c.dst_conv.get_size()));
  memory pad(c.scratchpad, Engine(), ThreadBuffer(0, c.scratchpad.get_size()));
  c.src_reorder.execute(stream, {{DNNL_ARG_FROM, src_user}, {DNNL_ARG_TO, src_inner}});
  c.wei_reorder.execute(stream, {{DNNL_ARG_FROM, wei_user}, {DNNL_ARG_TO, wei}});
  c.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                          {DNNL_ARG_SCRATCHPAD, pad}});
  c.dst_reorder.execute(stream, {{DNNL_ARG_FROM, dst}, {DNNL_ARG_TO, dst_user}});
  stream.wait();
}

// --- kernel gradients as one matrix product -----------------------------------------------------------------
//
// The same kernel gradient as dw[(kh, kw, i), o] = P^T g, where P [N Ho Wo, KH KW I] holds each output position's
// input patch (im2col, zeros where the window leaves the map) and g is read as [N Ho Wo, O]: oneDNN's matmul, whose
// [KH KW I, O] float32 output is HWIO as it stands. Chosen by the `wgrad` attribute (WgradMode).

// The input rows [C] that each output position's kernel taps read, as P [N Ho Wo, KH KW C] (im2col; zeros where a
// tap reads padding), for an undilated geometry g (NCHW dims) of rows of `row` bytes.
void GatherPatches(const Geometry& g, size_t row, const void* x_p, void* out) {
  const auto n = g.src[0], h = g.src[2], w = g.src[3], ho = g.dst[2], wo = g.dst[3];
  const auto kh = g.weights[2], kw = g.weights[3];
  const auto* x = static_cast<const char*>(x_p);
  auto* p = static_cast<char*>(out);
  for (int64_t b = 0; b < n; ++b)
    for (int64_t oy = 0; oy < ho; ++oy)
      for (int64_t ox = 0; ox < wo; ++ox)
        for (int64_t ky = 0; ky < kh; ++ky)
          for (int64_t kx = 0; kx < kw; ++kx, p += row) {
            const int64_t iy = oy * g.strides[0] + ky - g.pad_l[0], ix = ox * g.strides[1] + kx - g.pad_l[1];
            if (iy < 0 || iy >= h || ix < 0 || ix >= w) std::memset(p, 0, row);
            else std::memcpy(p, x + ((b * h + iy) * w + ix) * row, row);
          }
}

struct WgradMatmul {
  dnnl::primitive matmul;
  memory::desc patches_t, grad, out, scratchpad;
};

std::unique_ptr<WgradMatmul> BuildWgradMatmul(memory::data_type dt, const Geometry& g) {
  const auto m = g.dst[0] * g.dst[2] * g.dst[3], k = g.weights[1] * g.weights[2] * g.weights[3], o = g.dst[1];
  auto c = std::make_unique<WgradMatmul>();
  c->patches_t = memory::desc({k, m}, dt, memory::dims{1, k});  // P^T, a transposed view of P [m, k]
  c->grad = memory::desc({m, o}, dt, memory::dims{o, 1});
  c->out = memory::desc({k, o}, memory::data_type::f32, memory::dims{o, 1});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(c->patches_t, c->grad, c->out), attr, Engine());
  c->matmul = dnnl::matmul(pd);
  c->scratchpad = pd.scratchpad_desc();
  return c;
}

const WgradMatmul& CachedWgradMatmul(memory::data_type dt, const Geometry& g) {
  return CachedBy(WgradKey("m:", dt, g), [&] { return BuildWgradMatmul(dt, g); });
}

void WgradMatmulSlice(memory::data_type dt, const Geometry& g, void* x_p, void* y_p, void* w_out) {
  const WgradMatmul& c = CachedWgradMatmul(dt, g);
  const size_t row = g.src[1] * memory::data_type_size(dt);
  void* patches = ThreadBuffer(2, g.dst[0] * g.dst[2] * g.dst[3] * g.weights[2] * g.weights[3] * row);
  GatherPatches(g, row, x_p, patches);
  dnnl::stream stream(Engine());
  memory a(c.patches_t, Engine(), patches), bm(c.grad, Engine(), y_p), out(c.out, Engine(), w_out);
  memory pad(c.scratchpad, Engine(), ThreadBuffer(0, c.scratchpad.get_size()));
  c.matmul.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, out},
                            {DNNL_ARG_SCRATCHPAD, pad}});
  stream.wait();
}

// A strided 1x1 kernel gradient (StridedPointwise) as the unit-stride one of the gathered input.
void StridedPointwiseWgradSlice(memory::data_type dt, const Geometry& g, void* x_p, void* y_p, void* w_out) {
  const size_t row = g.src[1] * memory::data_type_size(dt);
  void* gathered = ThreadBuffer(2, g.dst[0] * g.dst[2] * g.dst[3] * row);
  GatherPatches(g, row, x_p, gathered);
  const Geometry unit{{g.src[0], g.src[1], g.dst[2], g.dst[3]}, g.weights, g.dst, {1, 1}, {0, 0}, {0, 0}, {0, 0},
                      g.groups};
  ConvSlice(2, dt, unit, gathered, w_out, y_p);
}

// --- kernel gradients of depthwise convolutions as a loop ---------------------------------------------------
//
// oneDNN 2.6's depthwise backward-weights kernel takes only kernels up to 3 wide, undilated, with pads up to half the
// kernel; other depthwise kernel gradients fall to its generic grouped kernel, which pads each group's one input and
// output channel to a 16x16 block. Asked by the `wgrad` attribute (cnnjax.cpu.rules.Rules.grouped_wgrad_path), a
// depthwise kernel gradient (O = m * I, output channel o reading input channel o / m) runs here instead as
//   dw[i, j, 0, o] = sum over n, ho, wo of x[n, ho * sh + i * dh - pt, wo * sw + j * dw - pl, o / m] * g[n, ho, wo, o]
// in float32. The slice's x is first copied as float32 with its padding (zeros) and each channel repeated m times,
// and g as float32, both with O rounded up to whole vectors of kLanes channels (zeros); then, per vector of channels,
// image and kernel row i, the kernel row's KW accumulators stay in registers while the row's output positions stream
// by (one image's vector of channels stays in cache over the KH rows). The loop is compiled for AVX-512, AVX2 and a
// baseline, the CPU's picked at load time.

constexpr int64_t kLanes = 16;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline float Float(float v) { return v; }
inline float Float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Everything DepthwiseKernel calls is inlined into it, so compiled for each of its targets.
#define CNNJAX_INLINE inline __attribute__((always_inline))

// Unaligned loads and stores (heap buffers are not aligned to a whole vector).
CNNJAX_INLINE Lanes LoadLanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

CNNJAX_INLINE void StoreLanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof(v)); }

// The padded, spread float32 input and the float32 output gradient of DepthwiseWgrad: [N, Hp, Wp, Op], [N, Ho, Wo, Op].
struct DepthwiseOperands {
  const float* x;
  const float* g;
  int64_t batch, hp, wp, ho, wo, op;
};

// Adds kernel row i's gradient for channels [c0, c0 + kLanes) of image b into the kw vectors at acc (KW > 0: kw == KW,
// known when compiled, so the accumulators stay in registers).
template <int KW>
CNNJAX_INLINE void DepthwiseRow(const DepthwiseOperands& d, const Geometry& g, int64_t b, int64_t i, int64_t c0,
                                int64_t kw, float* acc) {
  constexpr int64_t kMax = KW > 0 ? KW : 1;
  Lanes a[kMax];
  const int64_t n = KW > 0 ? KW : kw;
  const int64_t sh = g.strides[0], sw = g.strides[1], dh = g.dilations[0] + 1, dw = g.dilations[1] + 1;
  if (KW > 0) {
    for (int64_t j = 0; j < KW; ++j) a[j] = LoadLanes(acc + j * kLanes);
  }
  for (int64_t oy = 0; oy < d.ho; ++oy) {
    const float* x_row = d.x + ((b * d.hp + oy * sh + i * dh) * d.wp) * d.op + c0;
    const float* g_row = d.g + ((b * d.ho + oy) * d.wo) * d.op + c0;
    for (int64_t ox = 0; ox < d.wo; ++ox) {
      const Lanes gv = LoadLanes(g_row + ox * d.op);
      const float* xp = x_row + ox * sw * d.op;
      if (KW > 0) {
        for (int64_t j = 0; j < KW; ++j) a[j] += LoadLanes(xp + j * dw * d.op) * gv;
      } else {
        for (int64_t j = 0; j < n; ++j)
          StoreLanes(acc + j * kLanes, LoadLanes(acc + j * kLanes) + LoadLanes(xp + j * dw * d.op) * gv);
      }
    }
  }
  if (KW > 0) {
    for (int64_t j = 0; j < KW; ++j) StoreLanes(acc + j * kLanes, a[j]);
  }
}

template <int KW>
CNNJAX_INLINE void DepthwiseRows(const DepthwiseOperands& d, const Geometry& g, float* w_out, int64_t o) {
  const int64_t kh = g.weights[2], kw = g.weights[3];
  std::vector<float> acc(kh * kw * kLanes);
  for (int64_t c0 = 0; c0 < d.op; c0 += kLanes) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t b = 0; b < d.batch; ++b)
      for (int64_t i = 0; i < kh; ++i) DepthwiseRow<KW>(d, g, b, i, c0, kw, acc.data() + i * kw * kLanes);
    const int64_t lanes = std::min(kLanes, o - c0);
    for (int64_t t = 0; t < kh * kw; ++t) std::memcpy(w_out + t * o + c0, &acc[t * kLanes], lanes * sizeof(float));
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void DepthwiseKernel(const DepthwiseOperands& d, const Geometry& g, float* w_out, int64_t o) {
  switch (g.weights[3]) {
    case 1: return DepthwiseRows<1>(d, g, w_out, o);
    case 2: return DepthwiseRows<2>(d, g, w_out, o);
    case 3: return DepthwiseRows<3>(d, g, w_out, o);
    case 4: return DepthwiseRows<4>(d, g, w_out, o);
    case 5: return DepthwiseRows<5>(d, g, w_out, o);
    case 6: return DepthwiseRows<6>(d, g, w_out, o);
    case 7: return DepthwiseRows<7>(d, g, w_out, o);
    default: return DepthwiseRows<0>(d, g, w_out, o);
  }
}

// The float32 HWIO kernel gradient [KH, KW, 1, O] of one batch slice of a depthwise geometry g (NHWC x and y of
// element type T) into w_out.
template <typename T>
void DepthwiseWgrad(const Geometry& g, const T* x, const T* y, float* w_out) {
  const int64_t batch = g.src[0], c_in = g.src[1], h = g.src[2], w = g.src[3];
  const int64_t o = g.dst[1], ho = g.dst[2], wo = g.dst[3], m = o / c_in;
  const int64_t op = (o + kLanes - 1) / kLanes * kLanes;
  const int64_t hp = h + g.pad_l[0] + g.pad_r[0], wp = w + g.pad_l[1] + g.pad_r[1];
  const size_t x_count = static_cast<size_t>(batch * hp * wp * op), g_count = static_cast<size_t>(batch * ho * wo * op);
  auto* xp = static_cast<float*>(ThreadBuffer(2, x_count * sizeof(float)));
  std::memset(xp, 0, x_count * sizeof(float));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t iy = 0; iy < h; ++iy)
      for (int64_t ix = 0; ix < w; ++ix) {
        const T* from = x + ((b * h + iy) * w + ix) * c_in;
        float* to = xp + ((b * hp + iy + g.pad_l[0]) * wp + ix + g.pad_l[1]) * op;
        if (m == 1) {
          for (int64_t c = 0; c < c_in; ++c) to[c] = Float(from[c]);
        } else {
          for (int64_t c = 0; c < c_in; ++c) std::fill(to + c * m, to + (c + 1) * m, Float(from[c]));
        }
      }
  const float* gp = reinterpret_cast<const float*>(y);  // float32 with whole vectors: g itself
  if (!std::is_same<T, float>::value || o != op) {
    auto* copy = static_cast<float*>(ThreadBuffer(3, g_count * sizeof(float)));
    for (int64_t p = 0; p < batch * ho * wo; ++p) {
      float* to = copy + p * op;
      for (int64_t c = 0; c < o; ++c) to[c] = Float(y[p * o + c]);
      std::fill(to + o, to + op, 0.0f);
    }
    gp = copy;
  }
  // Every tap of every output reads within [0, hp) x [0, wp) (the output size rounds down): no bounds to check.
  DepthwiseKernel(DepthwiseOperands{xp, gp, batch, hp, wp, ho, wo, op}, g, w_out, o);
}

void DepthwiseWgradSlice(memory::data_type dt, const Geometry& g, void* x_p, void* y_p, void* w_out) {
  if (dt == memory::data_type::f32)
    DepthwiseWgrad(g, static_cast<const float*>(x_p), static_cast<const float*>(y_p), static_cast<float*>(w_out));
  else
    DepthwiseWgrad(g, static_cast<const uint16_t*>(x_p), static_cast<const uint16_t*>(y_p), static_cast<float*>(w_out));
}

// float32 -> bfloat16, rounding to nearest even (NaNs stay NaN).
uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// One convolution of `kind` over the whole batch, its batch slices spread by ParallelSlices.
// `wgrad`: how a kernel gradient (kind 2) runs, as asked (WgradMode); the other kinds ignore it.
ffi::Error Execute(ffi::ThreadPool* pool, int kind, memory::data_type dt, const Geometry& g, void* x_p, void* w_p,
                   void* y_p, Wgrad wgrad = Wgrad::kNative) {
  const int64_t batch = g.src[0], n = SliceCount(batch), w_count = Product(g.weights);
  const int64_t x_row = RowBytes(g.src, dt), y_row = RowBytes(g.dst, dt);
  std::vector<float> partial;  // each slice's float32 kernel gradient
  try {
    partial.resize(kind == 2 ? n * w_count : 0);
  } catch (const std::bad_alloc& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  std::string error = ForEachBatchSlice(pool, batch, n, [&](int64_t i, int64_t begin, int64_t rows) {
    Geometry s = g;
    s.src[0] = s.dst[0] = rows;
    void* w = kind == 2 ? static_cast<void*>(partial.data() + i * w_count) : w_p;
    void* x = static_cast<char*>(x_p) + begin * x_row;
    void* y = static_cast<char*>(y_p) + begin * y_row;
    const Wgrad mode = kind == 2 ? WgradMode(wgrad, s) : Wgrad::kNative;
    if (mode == Wgrad::kStridedPointwise) StridedPointwiseWgradSlice(dt, s, x, y, w);
    else if (mode == Wgrad::kForward) WgradSlice(dt, s, x, y, w);
    else if (mode == Wgrad::kMatmul) WgradMatmulSlice(dt, s, x, y, w);
    else if (mode == Wgrad::kDepthwise) DepthwiseWgradSlice(dt, s, x, y, w);
    else ConvSlice(kind, dt, s, x, w, y);
  });
  if (!error.empty()) return ffi::Error::Internal("onednn_conv: " + error);
  if (kind == 2) {
    for (int64_t i = 1; i < n; ++i)
      for (int64_t j = 0; j < w_count; ++j) partial[j] += partial[i * w_count + j];
    if (dt == memory::data_type::f32) {
      std::memcpy(w_p, partial.data(), w_count * sizeof(float));
    } else {
      auto* out = static_cast<uint16_t*>(w_p);
      for (int64_t j = 0; j < w_count; ++j) out[j] = ToBf16(partial[j]);
    }
  }
  return ffi::Error::Success();
}

ffi::Error Run(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, int64_t kind,
               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw,
               int64_t wgrad, int64_t groups, ffi::ThreadPool pool) {
  if (kind < 0 || kind > 2) return ffi::Error::InvalidArgument("onednn_conv: kind must be 0, 1 or 2");
  if (wgrad < 0 || wgrad > 3) return ffi::Error::InvalidArgument("onednn_conv: wgrad must be 0, 1, 2 or 3");
  auto type = a.element_type();
  if (b.element_type() != type || out->element_type() != type)
    return ffi::Error::InvalidArgument("onednn_conv: every operand must have one dtype");
  memory::data_type dt;
  if (type == ffi::DataType::F32) dt = memory::data_type::f32;
  else if (type == ffi::DataType::BF16) dt = memory::data_type::bf16;
  else return ffi::Error::InvalidArgument("onednn_conv: float32 or bfloat16 only");
  // Buffers by role: x [N,H,W,I], w [KH,KW,I,O], y [N,Ho,Wo,O]; oneDNN wants N,C,H,W and O,I,KH,KW.
  auto x_d = kind == 1 ? out->dimensions() : a.dimensions();
  auto w_d = kind == 2 ? out->dimensions() : b.dimensions();
  auto y_d = kind == 0 ? out->dimensions() : (kind == 1 ? a.dimensions() : b.dimensions());
  if (x_d.size() != 4 || w_d.size() != 4 || y_d.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: operands must be rank 4 (NHWC, HWIO)");
  if (groups < 1 || x_d[3] != groups * w_d[2] || w_d[3] % groups != 0 || y_d[3] != w_d[3])
    return ffi::Error::InvalidArgument("onednn_conv: x [N,H,W,I], w [KH,KW,I/G,O] and y [N,Ho,Wo,O] with G = groups "
                                       "dividing I and O");
  Geometry g{{x_d[0], x_d[3], x_d[1], x_d[2]}, {w_d[3], w_d[2], w_d[0], w_d[1]}, {y_d[0], y_d[3], y_d[1], y_d[2]},
             {sh, sw}, {dh - 1, dw - 1}, {pt, pl}, {pb, pr}, groups};
  void* x_p = kind == 1 ? out->untyped_data() : a.untyped_data();
  void* w_p = kind == 2 ? out->untyped_data() : b.untyped_data();
  void* y_p = kind == 0 ? out->untyped_data() : (kind == 1 ? a.untyped_data() : b.untyped_data());
  return Execute(&pool, static_cast<int>(kind), dt, g, x_p, w_p, y_p, static_cast<Wgrad>(wgrad));
}

// --- max-pool ---------------------------------------------------------------------------------------

struct PoolGeometry {
  memory::dims src, dst, kernel, strides, pad_l, pad_r;
};

struct Pool {
  dnnl::primitive forward, backward;
  memory::desc workspace;
  memory::desc forward_scratchpad, backward_scratchpad;
};

std::unique_ptr<Pool> BuildPool(memory::data_type dt, const PoolGeometry& g) {
  auto p = std::make_unique<Pool>();
  memory::desc src(g.src, dt, tag::nhwc), dst(g.dst, dt, tag::nhwc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::pooling_forward::desc fwd(dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max, src, dst,
                                  g.strides, g.kernel, g.pad_l, g.pad_r);
  dnnl::pooling_forward::primitive_desc fwd_pd(fwd, attr, Engine());
  dnnl::pooling_backward::desc bwd(dnnl::algorithm::pooling_max, src, dst, g.strides, g.kernel, g.pad_l, g.pad_r);
  dnnl::pooling_backward::primitive_desc bwd_pd(bwd, attr, Engine(), fwd_pd);
  p->forward = dnnl::pooling_forward(fwd_pd);
  p->backward = dnnl::pooling_backward(bwd_pd);
  p->workspace = fwd_pd.workspace_desc();
  p->forward_scratchpad = fwd_pd.scratchpad_desc();
  p->backward_scratchpad = bwd_pd.scratchpad_desc();
  return p;
}

const Pool& CachedPool(memory::data_type dt, const PoolGeometry& g) {
  return CachedBy(CacheKey(std::to_string(static_cast<int>(dt)), {&g.src, &g.dst, &g.kernel, &g.strides, &g.pad_l,
                                                                   &g.pad_r}), [&] { return BuildPool(dt, g); });
}

// The pool's geometry from x [N,H,W,C] and y [N,Ho,Wo,C] (oneDNN wants N,C,H,W), with the dtype of both.
ffi::Error PoolSetup(ffi::AnyBuffer::Dimensions x_d, ffi::AnyBuffer::Dimensions y_d, ffi::DataType x_type,
                     ffi::DataType y_type, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                     int64_t pl, int64_t pr, PoolGeometry* g, memory::data_type* dt) {
  if (x_type != y_type) return ffi::Error::InvalidArgument("onednn_max_pool: x and y must have one dtype");
  if (x_type == ffi::DataType::F32) *dt = memory::data_type::f32;
  else if (x_type == ffi::DataType::BF16) *dt = memory::data_type::bf16;
  else return ffi::Error::InvalidArgument("onednn_max_pool: float32 or bfloat16 only");
  if (x_d.size() != 4 || y_d.size() != 4) return ffi::Error::InvalidArgument("onednn_max_pool: operands must be NHWC");
  *g = PoolGeometry{{x_d[0], x_d[3], x_d[1], x_d[2]}, {y_d[0], y_d[3], y_d[1], y_d[2]}, {kh, kw}, {sh, sw},
                    {pt, pl}, {pb, pr}};
  return ffi::Error::Success();
}

// The forward (x -> y and the workspace) or the backward (g and the workspace -> dx) of the max-pool of geometry g,
// on this thread; `src` is x or dx, `dst` is y or g. Throws dnnl::error or std::bad_alloc.
void PoolSlice(bool backward, memory::data_type dt, const PoolGeometry& g, void* src, void* dst, void* ws) {
  const Pool& p = CachedPool(dt, g);
  if (static_cast<int64_t>(p.workspace.get_size()) != Product(g.dst))  // what slicing the workspace assumes
    throw std::runtime_error("oneDNN's pooling workspace is not one byte per output element");
  dnnl::stream stream(Engine());
  memory src_m(memory::desc(g.src, dt, tag::nhwc), Engine(), src);
  memory dst_m(memory::desc(g.dst, dt, tag::nhwc), Engine(), dst);
  memory ws_m(p.workspace, Engine(), ws);
  const memory::desc& scratchpad = backward ? p.backward_scratchpad : p.forward_scratchpad;
  memory pad(scratchpad, Engine(), ThreadBuffer(0, scratchpad.get_size()));
  if (backward) {
    p.backward.execute(stream, {{DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_WORKSPACE, ws_m}, {DNNL_ARG_DIFF_SRC, src_m},
                                {DNNL_ARG_SCRATCHPAD, pad}});
  } else {
    p.forward.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DST, dst_m}, {DNNL_ARG_WORKSPACE, ws_m},
                               {DNNL_ARG_SCRATCHPAD, pad}});
  }
  stream.wait();
}

// The max-pool over the whole batch, its batch slices spread by ParallelSlices (the workspace, like y, has the
// batch outermost: one byte per output element).
ffi::Error ExecutePool(ffi::ThreadPool* pool, bool backward, memory::data_type dt, const PoolGeometry& g, void* src,
                       void* dst, void* ws, size_t ws_bytes) {
  if (static_cast<int64_t>(ws_bytes) != Product(g.dst))
    return ffi::Error::InvalidArgument("onednn_max_pool: the workspace must have " + std::to_string(Product(g.dst)) +
                                       " bytes");
  const int64_t batch = g.src[0], src_row = RowBytes(g.src, dt), dst_row = RowBytes(g.dst, dt);
  const int64_t ws_row = Product(g.dst) / batch;
  std::string error = ForEachBatchSlice(pool, batch, SliceCount(batch), [&](int64_t, int64_t begin, int64_t rows) {
    PoolGeometry s = g;
    s.src[0] = s.dst[0] = rows;
    PoolSlice(backward, dt, s, static_cast<char*>(src) + begin * src_row, static_cast<char*>(dst) + begin * dst_row,
              static_cast<char*>(ws) + begin * ws_row);
  });
  if (!error.empty()) return ffi::Error::Internal("onednn_max_pool: " + error);
  return ffi::Error::Success();
}

ffi::Error MaxPoolForward(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> ws,
                          int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                          int64_t pr, ffi::ThreadPool pool) {
  PoolGeometry g;
  memory::data_type dt;
  auto status = PoolSetup(x.dimensions(), y->dimensions(), x.element_type(), y->element_type(), kh, kw, sh, sw,
                          pt, pb, pl, pr, &g, &dt);
  if (status.failure()) return status;
  return ExecutePool(&pool, false, dt, g, x.untyped_data(), y->untyped_data(), ws->untyped_data(), ws->size_bytes());
}

ffi::Error MaxPoolBackward(ffi::AnyBuffer g_in, ffi::AnyBuffer ws, ffi::Result<ffi::AnyBuffer> dx, int64_t kh,
                           int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                           ffi::ThreadPool pool) {
  PoolGeometry g;
  memory::data_type dt;
  auto status = PoolSetup(dx->dimensions(), g_in.dimensions(), dx->element_type(), g_in.element_type(), kh, kw, sh,
                          sw, pt, pb, pl, pr, &g, &dt);
  if (status.failure()) return status;
  return ExecutePool(&pool, true, dt, g, dx->untyped_data(), g_in.untyped_data(), ws.untyped_data(), ws.size_bytes());
}

// The max-pool handlers' attributes, in the order of their parameters.
template <typename Binding>
auto WithPoolAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("kh")
      .template Attr<int64_t>("kw")
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pb")
      .template Attr<int64_t>("pl")
      .template Attr<int64_t>("pr")
      .template Ctx<ffi::ThreadPool>();
}

// Whether this CPU's oneDNN builds bfloat16 primitives: a 3x3 convolution (forward, input and kernel gradient, and
// the kernel gradient's forward and matmul paths), the same kinds of a depthwise and a grouped 3x3 convolution, a
// 2x2 max-pool (both ways). oneDNN 2.6 has none without AVX-512
// (an AVX2-only AMD EPYC Zen 3 says "could not create a primitive descriptor iterator").
bool Bf16Primitives() {
  const auto bf16 = memory::data_type::bf16;
  const Geometry g{{2, 16, 4, 4}, {16, 16, 3, 3}, {2, 16, 4, 4}, {1, 1}, {0, 0}, {1, 1}, {1, 1}};
  const PoolGeometry pool{{2, 16, 4, 4}, {2, 16, 2, 2}, {2, 2}, {2, 2}, {0, 0}, {0, 0}};
  try {
    Geometry depthwise = g, grouped = g;
    depthwise.weights[1] = 1, depthwise.groups = 16;
    grouped.weights[1] = 8, grouped.groups = 2;
    for (int kind = 0; kind < 3; ++kind) {
      Build(kind, bf16, g);
      Build(kind, bf16, depthwise);
      Build(kind, bf16, grouped);
    }
    BuildWgrad(bf16, g);
    BuildWgradMatmul(bf16, g);
    BuildPool(bf16, pool);
  } catch (const dnnl::error&) {
    return false;
  }
  return true;
}

}  // namespace

// 1 when bfloat16 convolutions and max-pools can run here (Bf16Primitives), else 0; read by onednn.py via ctypes.
extern "C" int CnnjaxOnednnBf16() { return Bf16Primitives() ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnConv, Run,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kind")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pb")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("wgrad")
                                  .Attr<int64_t>("groups")
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnMaxPoolForward, MaxPoolForward,
                              WithPoolAttrs(ffi::Ffi::Bind()
                                                .Arg<ffi::AnyBuffer>()
                                                .Ret<ffi::AnyBuffer>()
                                                .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CnnjaxOnednnMaxPoolBackward, MaxPoolBackward,
                              WithPoolAttrs(ffi::Ffi::Bind()
                                                .Arg<ffi::AnyBuffer>()
                                                .Arg<ffi::AnyBuffer>()
                                                .Ret<ffi::AnyBuffer>()));
