// 2-D convolutions (forward, input gradient, weight gradient) through oneDNN, as XLA FFI handlers
// for the CPU backend, in float32 or bfloat16 (all buffers of a call the same type; oneDNN
// accumulates bfloat16 products in float32, as XLA does). Activations are NHWC and kernels HWIO in XLA's default row-major
// layout; oneDNN picks its own blocked kernel layout ("any") and the kernels are reordered on
// each call (they change every update; they are small next to the activations).
//
// Winograd (``winograd`` attribute 1): a float32 3x3 stride-1 convolution on a map of at most 16x16
// runs oneDNN's Winograd F(4x4, 3x3) kernels where this CPU has them, about twice the direct kernels'
// rate at the paper ResNets' shapes; they read and write oneDNN's blocked activation layout, so the
// activations are reordered in and out of per-thread staging buffers on each call (on larger maps
// the reorders cost more than Winograd saves: UseWinograd). Rounding differs from the direct
// kernels' (Winograd's transforms), within float32 training tolerances (tests/test_onednn_conv.py
// checks both against float64).
//
// Built by prelar_jax/model/nets/onednn/build.py; used through prelar_jax/model/nets/onednn/__init__.py.
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Geometry of one convolution: x [n, h, w, ci], kernel [kh, kw, ci, co], y [n, oh, ow, co].
struct Geometry {
  int64_t n, h, w, ci, kh, kw, co, oh, ow, sh, sw, pt, pb, pl, pr;
  dt type;
  bool winograd;  // allowed (the caller's choice); used only where UseWinograd says so
  std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
             int64_t, int64_t, int64_t, int64_t, int, bool>
  key() const {
    return {n, h, w, ci, kh, kw, co, oh, ow, sh, sw, pt, pb, pl, pr, static_cast<int>(type), winograd};
  }
  memory::desc x() const { return memory::desc({n, ci, h, w}, type, tag::nhwc); }
  memory::desc y() const { return memory::desc({n, co, oh, ow}, type, tag::nhwc); }
  memory::desc x_any() const { return memory::desc({n, ci, h, w}, type, tag::any); }
  memory::desc y_any() const { return memory::desc({n, co, oh, ow}, type, tag::any); }
  memory::desc k_plain() const { return memory::desc({co, ci, kh, kw}, type, tag::hwio); }
  memory::desc k_any() const { return memory::desc({co, ci, kh, kw}, type, tag::any); }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

// Whether a convolution runs oneDNN's Winograd kernels in all three directions (when the CPU has
// them; else the direct ones). Measured on the 2-core AVX-512 machine at batch 400, float32
// (experiments/BENCHMARKS.md, "Winograd"): each kernel alone runs about twice the direct rate, but its
// activations are reordered into and out of the blocked layout on every call. For the 16x16 and 8x8
// layers that still wins in every direction; for the 32x32 ones the reorders of their larger
// activations ate the gain inside the full paper step (median step 5.75 s with Winograd there too,
// 5.35 s without, direct kernels everywhere 6.12 s; three alternating rounds beside a background
// benchmark run at autogroup nice 19).
bool UseWinograd(const Geometry& g) {
  if (!g.winograd || g.type != dt::f32 || g.kh != 3 || g.kw != 3 || g.sh != 1 || g.sw != 1) return false;
  return g.oh * g.ow <= 16 * 16;
}

// Primitives for one geometry, made once and reused (oneDNN JIT-compiles kernels per shape): direct
// or Winograd (UseWinograd), the layouts each reads and writes in its primitive_desc.
struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  bool winograd;  // Winograd kernels (all three)
};

Prims* GetPrims(const Geometry& g) {
  static std::mutex mu;
  static std::map<decltype(g.key()), std::unique_ptr<Prims>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(g.key());
  if (it != cache.end()) return it->second.get();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& e = Engine();
  // The three primitive_descs of one algorithm; activations in the layouts x and y (NHWC for the
  // direct kernels, "any" for Winograd's blocked ones).
  auto make = [&](dnnl::algorithm a, const memory::desc& x, const memory::desc& y) {
    auto fwd = dnnl::convolution_forward::primitive_desc(
        dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, a, x, g.k_any(), y, g.strides(),
                                        g.pad_l(), g.pad_r()),
        attr, e);
    auto data = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(a, x, g.k_any(), y, g.strides(), g.pad_l(), g.pad_r()), attr, e, fwd);
    auto weights = dnnl::convolution_backward_weights::primitive_desc(
        dnnl::convolution_backward_weights::desc(a, x, g.k_any(), y, g.strides(), g.pad_l(), g.pad_r()), attr, e,
        fwd);
    return std::make_tuple(fwd, data, weights);
  };
  auto [fwd_pd, bwd_data_pd, bwd_weights_pd] = make(dnnl::algorithm::convolution_direct, g.x(), g.y());
  bool winograd = false;
  if (UseWinograd(g)) {
    try {
      std::tie(fwd_pd, bwd_data_pd, bwd_weights_pd) = make(dnnl::algorithm::convolution_winograd, g.x_any(), g.y_any());
      winograd = true;
    } catch (const dnnl::error&) {
      // No Winograd kernels for this CPU or shape: the direct ones run.
    }
  }
  auto p = std::unique_ptr<Prims>(new Prims{fwd_pd, bwd_data_pd, bwd_weights_pd, dnnl::convolution_forward(fwd_pd),
                                            dnnl::convolution_backward_data(bwd_data_pd),
                                            dnnl::convolution_backward_weights(bwd_weights_pd), winograd});
  Prims* raw = p.get();
  cache.emplace(g.key(), std::move(p));
  return raw;
}

// Per-thread buffers, grown as needed and never cleared (oneDNN needs no zeros; a fresh zero-filled
// buffer per call cost milliseconds on the large convolutions): slots 0 and 1 for the two operands
// reordered into a primitive's layouts, 2 for its output before the reorder back, 3 for scratch.
// They hold on to the largest Winograd activation each thread has seen (78 MB per slot at the paper
// sizes), as XLA's allocator holds on to its step buffers.
void* Staging(int slot, size_t bytes) {
  struct Buffer {
    void* data = nullptr;
    size_t capacity = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[4];
  Buffer& b = buffers[slot];
  if (bytes > b.capacity) {
    std::free(b.data);
    b.capacity = (bytes + 63) / 64 * 64;
    b.data = std::aligned_alloc(64, b.capacity);
    if (b.data == nullptr) {
      b.capacity = 0;
      throw std::bad_alloc();
    }
  }
  return b.data;
}

// One buffer of a call: XLA's memory (NHWC activations, HWIO kernel) and the layout the primitive
// wants for it (the same for direct kernels' activations; blocked for Winograd's and for kernels).
struct Operand {
  int arg;
  memory user;
  memory::desc want;
};

// Runs `prim` on two inputs and one output, reordering each into (and the output back out of) the
// primitive's layout where it differs from XLA's.
ffi::Error Execute(dnnl::primitive& prim, const memory::desc& scratch_md, const Operand& in0, const Operand& in1,
                   const Operand& out) {
  try {
    dnnl::stream s(Engine());
    std::unordered_map<int, memory> args;
    int slot = 0;
    for (const Operand* in : {&in0, &in1}) {
      if (in->user.get_desc() == in->want) {
        args.insert({in->arg, in->user});
      } else {
        memory staged(in->want, Engine(), Staging(slot, in->want.get_size()));
        dnnl::reorder(in->user, staged).execute(s, const_cast<memory&>(in->user), staged);
        args.insert({in->arg, staged});
      }
      ++slot;
    }
    bool direct_out = out.user.get_desc() == out.want;
    memory result = direct_out ? out.user : memory(out.want, Engine(), Staging(2, out.want.get_size()));
    args.insert({out.arg, result});
    args.insert({DNNL_ARG_SCRATCHPAD, memory(scratch_md, Engine(), Staging(3, scratch_md.get_size()))});
    prim.execute(s, args);
    if (!direct_out) dnnl::reorder(result, out.user).execute(s, result, const_cast<memory&>(out.user));
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("oneDNN conv: out of memory for a staging buffer");
  }
  return ffi::Error::Success();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y, int64_t sh,
                      int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, ffi::DataType type,
                      int64_t winograd) {
  return Geometry{x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2], sh, sw, pt, pb, pl, pr,
                  type == ffi::DataType::BF16 ? dt::bf16 : dt::f32, winograd != 0};
}

// The three buffers of a call: 4-D, sizes that agree, and one element type, float32 or bfloat16.
ffi::Error Check(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const ffi::AnyBuffer& c,
                 ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y) {
  auto type = a.element_type();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16) || b.element_type() != type ||
      c.element_type() != type)
    return ffi::Error::InvalidArgument("onednn conv: expected float32 or bfloat16 buffers, all of one type");
  if (x.size() != 4 || k.size() != 4 || y.size() != 4)
    return ffi::Error::InvalidArgument("onednn conv: expected 4-D NHWC activations and an HWIO kernel");
  if (x[0] != y[0] || x[3] != k[2] || y[3] != k[3])
    return ffi::Error::InvalidArgument("onednn conv: batch or channel sizes of x, kernel and y disagree");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t winograd) {
  if (auto err = Check(x, k, *y, x.dimensions(), k.dimensions(), y->dimensions()); !err.success()) return err;
  Geometry g = MakeGeometry(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr, x.element_type(),
                            winograd);
  try {
    Prims* p = GetPrims(g);
    const auto& pd = p->fwd_pd;
    return Execute(p->fwd, pd.scratchpad_desc(),
                   {DNNL_ARG_SRC, memory(g.x(), Engine(), x.untyped_data()), pd.src_desc()},
                   {DNNL_ARG_WEIGHTS, memory(g.k_plain(), Engine(), k.untyped_data()), pd.weights_desc()},
                   {DNNL_ARG_DST, memory(g.y(), Engine(), y->untyped_data()), pd.dst_desc()});
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

ffi::Error BackwardDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx, int64_t sh,
                            int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t winograd) {
  if (auto err = Check(dy, k, *dx, dx->dimensions(), k.dimensions(), dy.dimensions()); !err.success()) return err;
  Geometry g = MakeGeometry(dx->dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr,
                            dy.element_type(), winograd);
  try {
    Prims* p = GetPrims(g);
    const auto& pd = p->bwd_data_pd;
    return Execute(p->bwd_data, pd.scratchpad_desc(),
                   {DNNL_ARG_DIFF_DST, memory(g.y(), Engine(), dy.untyped_data()), pd.diff_dst_desc()},
                   {DNNL_ARG_WEIGHTS, memory(g.k_plain(), Engine(), k.untyped_data()), pd.weights_desc()},
                   {DNNL_ARG_DIFF_SRC, memory(g.x(), Engine(), dx->untyped_data()), pd.diff_src_desc()});
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

ffi::Error BackwardWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dk, int64_t sh,
                               int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t winograd) {
  if (auto err = Check(x, dy, *dk, x.dimensions(), dk->dimensions(), dy.dimensions()); !err.success()) return err;
  Geometry g = MakeGeometry(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr,
                            x.element_type(), winograd);
  try {
    Prims* p = GetPrims(g);
    const auto& pd = p->bwd_weights_pd;
    return Execute(p->bwd_weights, pd.scratchpad_desc(),
                   {DNNL_ARG_SRC, memory(g.x(), Engine(), x.untyped_data()), pd.src_desc()},
                   {DNNL_ARG_DIFF_DST, memory(g.y(), Engine(), dy.untyped_data()), pd.diff_dst_desc()},
                   {DNNL_ARG_DIFF_WEIGHTS, memory(g.k_plain(), Engine(), dk->untyped_data()),
                    pd.diff_weights_desc()});
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

#define PRELAR_CONV_ATTRS                                                                                   \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")                                                                            \
      .Attr<int64_t>("pad_right")                                                                           \
      .Attr<int64_t>("winograd")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrelarConvForward, ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() PRELAR_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PrelarConvBackwardData, BackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() PRELAR_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PrelarConvBackwardWeights, BackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>() PRELAR_CONV_ATTRS);

// 1 when oneDNN has bfloat16 convolution kernels for this CPU (AVX-512 and newer), else 0; the
// Python side asks once and sends bfloat16 convolutions to XLA where this is 0.
extern "C" int PrelarConvBfloat16Supported() {
  try {
    Geometry g{1, 4, 4, 16, 3, 3, 16, 4, 4, 1, 1, 1, 1, 1, 1, dt::bf16, false};
    GetPrims(g);
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}

// 1 when a float32 3x3 stride-1 'SAME' convolution of a [n, side, side, ci] batch to co channels runs
// Winograd kernels (0 where UseWinograd says no or this CPU has none), -1 on error.
extern "C" int PrelarConvUsesWinograd(int64_t n, int64_t side, int64_t ci, int64_t co) {
  try {
    return GetPrims(Geometry{n, side, side, ci, 3, 3, co, side, side, 1, 1, 1, 1, 1, 1, dt::f32, true})->winograd;
  } catch (const dnnl::error&) {
    return -1;
  }
}

// The handlers' interface version (their attributes): the Python side refuses a library built from
// an older conv.cc instead of failing at the first call. Raise it with every change of attributes.
extern "C" int PrelarConvAbiVersion() { return 2; }
