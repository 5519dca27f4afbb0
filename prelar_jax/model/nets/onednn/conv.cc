// 2-D convolutions (forward, input gradient, weight gradient) through oneDNN, as XLA FFI handlers
// for the CPU backend, in float32 or bfloat16 (all buffers of a call the same type; oneDNN
// accumulates bfloat16 products in float32, as XLA does). Activations are NHWC and kernels HWIO in XLA's default row-major
// layout; oneDNN picks its own blocked kernel layout ("any") and the kernels are reordered on
// each call (they change every update; they are small next to the activations).
//
// Built by prelar_jax/model/nets/onednn/build.py; used through prelar_jax/model/nets/onednn/__init__.py.
#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
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
  std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
             int64_t, int64_t, int64_t, int64_t, int>
  key() const {
    return {n, h, w, ci, kh, kw, co, oh, ow, sh, sw, pt, pb, pl, pr, static_cast<int>(type)};
  }
  memory::desc x() const { return memory::desc({n, ci, h, w}, type, tag::nhwc); }
  memory::desc y() const { return memory::desc({n, co, oh, ow}, type, tag::nhwc); }
  memory::desc k_plain() const { return memory::desc({co, ci, kh, kw}, type, tag::hwio); }
  memory::desc k_any() const { return memory::desc({co, ci, kh, kw}, type, tag::any); }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }
};

// Primitives for one geometry, made once and reused (oneDNN JIT-compiles kernels per shape).
struct Prims {
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
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
  auto fd = dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                            g.x(), g.k_any(), g.y(), g.strides(), g.pad_l(), g.pad_r());
  auto fwd_pd = dnnl::convolution_forward::primitive_desc(fd, attr, e);
  auto bd = dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, g.x(), g.k_any(), g.y(),
                                                  g.strides(), g.pad_l(), g.pad_r());
  auto bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(bd, attr, e, fwd_pd);
  auto wd = dnnl::convolution_backward_weights::desc(dnnl::algorithm::convolution_direct, g.x(), g.k_any(), g.y(),
                                                     g.strides(), g.pad_l(), g.pad_r());
  auto bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(wd, attr, e, fwd_pd);
  auto p = std::unique_ptr<Prims>(new Prims{fwd_pd, bwd_data_pd, bwd_weights_pd, dnnl::convolution_forward(fwd_pd),
                                            dnnl::convolution_backward_data(bwd_data_pd),
                                            dnnl::convolution_backward_weights(bwd_weights_pd)});
  Prims* raw = p.get();
  cache.emplace(g.key(), std::move(p));
  return raw;
}

// `plain` viewed in oneDNN's layout `want`: the same memory when they agree, else a reordered copy.
memory AsLayout(const memory& plain, const memory::desc& want, dnnl::stream& s) {
  if (plain.get_desc() == want) return plain;
  memory out(want, Engine());
  dnnl::reorder(plain, out).execute(s, const_cast<memory&>(plain), out);
  return out;
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, ffi::Span<const int64_t> y, int64_t sh,
                      int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, ffi::DataType type) {
  return Geometry{x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2], sh, sw, pt, pb, pl, pr,
                  type == ffi::DataType::BF16 ? dt::bf16 : dt::f32};
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

ffi::Error Run(dnnl::primitive& prim, const memory::desc& scratch_md, std::unordered_map<int, memory> args) {
  try {
    dnnl::stream s(Engine());
    // One scratch buffer per calling thread, grown as needed and never cleared (oneDNN does not
    // need zeros): a fresh zero-filled buffer per call cost milliseconds on the large convolutions.
    thread_local std::unique_ptr<uint8_t[]> scratch;
    thread_local size_t capacity = 0;
    if (scratch_md.get_size() > capacity) {
      capacity = scratch_md.get_size();
      scratch.reset(new uint8_t[capacity]);
    }
    args.insert({DNNL_ARG_SCRATCHPAD, memory(scratch_md, Engine(), scratch.get())});
    prim.execute(s, args);
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

// The two calls that read the kernel: forward (x -> y) and input gradient (dy -> dx). The kernel is
// reordered to the layout the primitive chose.
template <typename PrimitiveDesc>
ffi::Error RunWithKernel(dnnl::primitive& prim, const PrimitiveDesc& pd, int in_arg, memory in, memory kernel,
                         int out_arg, memory out) {
  dnnl::stream s(Engine());
  memory laid_out = AsLayout(kernel, pd.weights_desc(), s);
  s.wait();
  return Run(prim, pd.scratchpad_desc(), {{in_arg, in}, {DNNL_ARG_WEIGHTS, laid_out}, {out_arg, out}});
}

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw,
                       int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (auto err = Check(x, k, *y, x.dimensions(), k.dimensions(), y->dimensions()); !err.success()) return err;
  Geometry g = MakeGeometry(x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr, x.element_type());
  try {
    Prims* p = GetPrims(g);
    return RunWithKernel(p->fwd, p->fwd_pd, DNNL_ARG_SRC, memory(g.x(), Engine(), x.untyped_data()),
                         memory(g.k_plain(), Engine(), k.untyped_data()), DNNL_ARG_DST,
                         memory(g.y(), Engine(), y->untyped_data()));
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

ffi::Error BackwardDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer k, ffi::Result<ffi::AnyBuffer> dx, int64_t sh,
                            int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (auto err = Check(dy, k, *dx, dx->dimensions(), k.dimensions(), dy.dimensions()); !err.success()) return err;
  Geometry g = MakeGeometry(dx->dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, dy.element_type());
  try {
    Prims* p = GetPrims(g);
    return RunWithKernel(p->bwd_data, p->bwd_data_pd, DNNL_ARG_DIFF_DST, memory(g.y(), Engine(), dy.untyped_data()),
                         memory(g.k_plain(), Engine(), k.untyped_data()), DNNL_ARG_DIFF_SRC,
                         memory(g.x(), Engine(), dx->untyped_data()));
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

ffi::Error BackwardWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dk, int64_t sh,
                               int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (auto err = Check(x, dy, *dk, x.dimensions(), dk->dimensions(), dy.dimensions()); !err.success()) return err;
  Geometry g = MakeGeometry(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, x.element_type());
  try {
    Prims* p = GetPrims(g);
    memory xm(g.x(), Engine(), x.untyped_data());
    memory dym(g.y(), Engine(), dy.untyped_data());
    memory dkm(g.k_plain(), Engine(), dk->untyped_data());
    const memory::desc& want = p->bwd_weights_pd.diff_weights_desc();
    memory dkb = want == dkm.get_desc() ? dkm : memory(want, Engine());
    auto err = Run(p->bwd_weights, p->bwd_weights_pd.scratchpad_desc(),
                   {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, dkb}});
    if (!err.success() || dkb.get_data_handle() == dkm.get_data_handle()) return err;
    dnnl::stream s(Engine());
    dnnl::reorder(dkb, dkm).execute(s, dkb, dkm);
    s.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

#define PRELAR_CONV_ATTRS                                                                                   \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top").Attr<int64_t>("pad_bottom") \
      .Attr<int64_t>("pad_left")                                                                            \
      .Attr<int64_t>("pad_right")

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
    Geometry g{1, 4, 4, 16, 3, 3, 16, 4, 4, 1, 1, 1, 1, 1, 1, dt::bf16};
    GetPrims(g);
    return 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}
