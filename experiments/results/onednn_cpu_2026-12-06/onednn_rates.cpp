#include <oneapi/dnnl/dnnl.hpp>
#include <chrono>
#include <cstdio>
#include <vector>
using namespace dnnl;
using tag = memory::format_tag; using dt = memory::data_type;
double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
int main(int argc, char** argv){
  int N=atoi(argv[1]), H=atoi(argv[2]), C=atoi(argv[3]); int K=3;
  engine eng(engine::kind::cpu,0); stream s(eng);
  memory::dims src{N,C,H,H}, wei{C,C,K,K}, dst{N,C,H,H}, str{1,1}, pad{1,1};
  auto src_md=memory::desc(src,dt::f32,tag::nhwc), dst_md=memory::desc(dst,dt::f32,tag::nhwc);
  auto wei_md=memory::desc(wei,dt::f32,tag::hwio);
  auto wei_any=memory::desc(wei,dt::f32,tag::any);
  std::vector<float> x((size_t)N*H*H*C,0.01f), y((size_t)N*H*H*C), w(C*C*9,0.02f), dw(C*C*9), dx((size_t)N*H*H*C);
  memory xm(src_md,eng,x.data()), ym(dst_md,eng,y.data()), wm(wei_md,eng,w.data()), dwm(wei_md,eng,dw.data()), dxm(src_md,eng,dx.data());
  for (int plain=1; plain>=0; --plain){
  auto wmd = plain? wei_md : wei_any;
  auto fd=convolution_forward::desc(prop_kind::forward_training, algorithm::convolution_direct, src_md, wmd, dst_md, str, pad, pad);
  auto fpd=convolution_forward::primitive_desc(fd,eng);
  auto bdd=convolution_backward_data::desc(algorithm::convolution_direct, src_md, wmd, dst_md, str, pad, pad);
  auto bdpd=convolution_backward_data::primitive_desc(bdd,eng,fpd);
  auto bwd=convolution_backward_weights::desc(algorithm::convolution_direct, src_md, wmd, dst_md, str, pad, pad);
  auto bwpd=convolution_backward_weights::primitive_desc(bwd,eng,fpd);
  printf("plain=%d impl fwd=%s bwdd=%s bwdw=%s wfmt_same=%d\n", plain, fpd.impl_info_str(), bdpd.impl_info_str(), bwpd.impl_info_str(), fpd.weights_desc()==wei_md);
  memory wk = (fpd.weights_desc()==wei_md)? wm : memory(fpd.weights_desc(),eng);
  memory dwk = (bwpd.diff_weights_desc()==wei_md)? dwm : memory(bwpd.diff_weights_desc(),eng);
  memory wk2 = (bdpd.weights_desc()==wei_md)? wm : memory(bdpd.weights_desc(),eng);
  auto fp=convolution_forward(fpd); auto bp=convolution_backward_data(bdpd); auto wp=convolution_backward_weights(bwpd);
  double fl=2.0*N*H*H*9*C*C;
  for(int rep=0;rep<2;rep++){
    double t0=now(); for(int i=0;i<5;i++){ fp.execute(s,{{DNNL_ARG_SRC,xm},{DNNL_ARG_WEIGHTS,wk},{DNNL_ARG_DST,ym}}); s.wait();} double t1=now();
    for(int i=0;i<5;i++){ bp.execute(s,{{DNNL_ARG_DIFF_DST,ym},{DNNL_ARG_WEIGHTS,wk2},{DNNL_ARG_DIFF_SRC,dxm}}); s.wait();} double t2=now();
    for(int i=0;i<5;i++){ wp.execute(s,{{DNNL_ARG_SRC,xm},{DNNL_ARG_DIFF_DST,ym},{DNNL_ARG_DIFF_WEIGHTS,dwk}}); s.wait();} double t3=now();
    printf("%dx%dx%dx%d fwd %.1f ms (%.0f) bwd_data %.1f ms (%.0f) bwd_w %.1f ms (%.0f)\n",N,H,H,C,(t1-t0)/5e-3,fl/((t1-t0)/5)/1e9,(t2-t1)/5e-3,fl/((t2-t1)/5)/1e9,(t3-t2)/5e-3,fl/((t3-t2)/5)/1e9);
  }}
}
