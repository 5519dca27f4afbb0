#include <oneapi/dnnl/dnnl.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
using namespace dnnl;
using tag = memory::format_tag; using dt = memory::data_type;
double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
int main(int argc, char** argv){
  int N=atoi(argv[1]), H=atoi(argv[2]), C=atoi(argv[3]); std::string mode=argv[4]; int K=3;
  bool wino = mode.find("wino")!=std::string::npos; bool bf = mode.find("bf16")!=std::string::npos; bool anyact = mode.find("any")!=std::string::npos;
  dt d = bf? dt::bf16: dt::f32;
  engine eng(engine::kind::cpu,0); stream s(eng);
  memory::dims src{N,C,H,H}, wei{C,C,K,K}, dst{N,C,H,H}, str{1,1}, pad{1,1};
  auto src_md=memory::desc(src,d,anyact?tag::any:tag::nhwc), dst_md=memory::desc(dst,d,anyact?tag::any:tag::nhwc);
  auto wmd=memory::desc(wei,d,tag::any);
  auto alg = wino? algorithm::convolution_winograd : algorithm::convolution_direct;
  try {
  auto fpd=convolution_forward::primitive_desc(convolution_forward::desc(prop_kind::forward_training, alg, src_md, wmd, dst_md, str, pad, pad),eng);
  auto bdpd=convolution_backward_data::primitive_desc(convolution_backward_data::desc(alg, src_md, wmd, dst_md, str, pad, pad),eng,fpd);
  auto bwpd=convolution_backward_weights::primitive_desc(convolution_backward_weights::desc(alg, src_md, wmd, dst_md, str, pad, pad),eng,fpd);
  printf("%s impl fwd=%s bwdd=%s bwdw=%s\n", mode.c_str(), fpd.impl_info_str(), bdpd.impl_info_str(), bwpd.impl_info_str());
  memory xm(fpd.src_desc(),eng), ym(fpd.dst_desc(),eng), wk(fpd.weights_desc(),eng), wk2(bdpd.weights_desc(),eng), dxm(bdpd.diff_src_desc(),eng), dym(bwpd.diff_dst_desc(),eng), dwk(bwpd.diff_weights_desc(),eng), xm2(bwpd.src_desc(),eng);
  auto fp=convolution_forward(fpd); auto bp=convolution_backward_data(bdpd); auto wp=convolution_backward_weights(bwpd);
  double fl=2.0*N*H*H*9*C*C;
  for(int rep=0;rep<2;rep++){
    double t0=now(); for(int i=0;i<4;i++){ fp.execute(s,{{DNNL_ARG_SRC,xm},{DNNL_ARG_WEIGHTS,wk},{DNNL_ARG_DST,ym}}); s.wait();} double t1=now();
    for(int i=0;i<4;i++){ bp.execute(s,{{DNNL_ARG_DIFF_DST,ym},{DNNL_ARG_WEIGHTS,wk2},{DNNL_ARG_DIFF_SRC,dxm}}); s.wait();} double t2=now();
    for(int i=0;i<4;i++){ wp.execute(s,{{DNNL_ARG_SRC,xm2},{DNNL_ARG_DIFF_DST,dym},{DNNL_ARG_DIFF_WEIGHTS,dwk}}); s.wait();} double t3=now();
    if(rep) printf("%dx%dx%dx%d fwd %.1f ms (%.0f) bwd_data %.1f ms (%.0f) bwd_w %.1f ms (%.0f)\n",N,H,H,C,(t1-t0)/4e-3,fl/((t1-t0)/4)/1e9,(t2-t1)/4e-3,fl/((t2-t1)/4)/1e9,(t3-t2)/4e-3,fl/((t3-t2)/4)/1e9);
  }
  } catch (dnnl::error& e) { printf("%s: unsupported (%s)\n", mode.c_str(), e.what()); }
}
