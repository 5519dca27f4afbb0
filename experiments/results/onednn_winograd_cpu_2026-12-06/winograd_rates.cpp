// oneDNN float32 3x3 convolution at one shape, per direction: direct kernels on NHWC against Winograd
// kernels with the reorders in and out of the blocked layout that a call from XLA needs.
// g++ -O2 -std=c++17 winograd_rates.cpp -ldnnl -o rates && ./rates N SIDE CIN COUT
#include <oneapi/dnnl/dnnl.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_map>
using namespace dnnl;
using tag = memory::format_tag; using dt = memory::data_type;
double now(){return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();}
memory as(memory& m, const memory::desc& want, engine& e, stream& s){ if(m.get_desc()==want) return m; memory o(want,e); reorder(m,o).execute(s,m,o); return o; }
int main(int argc, char** argv){
  int N=atoi(argv[1]), H=atoi(argv[2]), Ci=atoi(argv[3]), Co=atoi(argv[4]);
  engine e(engine::kind::cpu,0); stream s(e);
  memory::dims src{N,Ci,H,H}, wei{Co,Ci,3,3}, dst{N,Co,H,H}, st{1,1}, pad{1,1};
  auto xn=memory::desc(src,dt::f32,tag::nhwc), yn=memory::desc(dst,dt::f32,tag::nhwc), wn=memory::desc(wei,dt::f32,tag::hwio);
  auto xa=memory::desc(src,dt::f32,tag::any), ya=memory::desc(dst,dt::f32,tag::any), wa=memory::desc(wei,dt::f32,tag::any);
  memory X(xn,e), Y(yn,e), W(wn,e), DX(xn,e), DY(yn,e), DW(wn,e);
  for(auto* m: {&X,&Y,&W,&DY}) memset(m->get_data_handle(),0,m->get_desc().get_size());
  for(int wino=0; wino<2; wino++){
    auto alg = wino? algorithm::convolution_winograd: algorithm::convolution_direct;
    auto xd = wino? xa: xn; auto yd = wino? ya: yn;
    auto fpd=convolution_forward::primitive_desc(convolution_forward::desc(prop_kind::forward_training,alg,xd,wa,yd,st,pad,pad),e);
    auto bpd=convolution_backward_data::primitive_desc(convolution_backward_data::desc(alg,xd,wa,yd,st,pad,pad),e,fpd);
    auto wpd=convolution_backward_weights::primitive_desc(convolution_backward_weights::desc(alg,xd,wa,yd,st,pad,pad),e,fpd);
    convolution_forward f(fpd); convolution_backward_data b(bpd); convolution_backward_weights w(wpd);
    double tf=1e9,tb=1e9,tw=1e9, rf=0;
    for(int rep=0;rep<4;rep++){
      double t0=now();
      { memory x=as(X,fpd.src_desc(),e,s), k=as(W,fpd.weights_desc(),e,s); memory y = fpd.dst_desc()==yn? Y: memory(fpd.dst_desc(),e);
        f.execute(s,{{DNNL_ARG_SRC,x},{DNNL_ARG_WEIGHTS,k},{DNNL_ARG_DST,y}}); if(y.get_data_handle()!=Y.get_data_handle()) reorder(y,Y).execute(s,y,Y); s.wait(); }
      double t1=now();
      { memory dy=as(DY,bpd.diff_dst_desc(),e,s), k=as(W,bpd.weights_desc(),e,s); memory dx = bpd.diff_src_desc()==xn? DX: memory(bpd.diff_src_desc(),e);
        b.execute(s,{{DNNL_ARG_DIFF_DST,dy},{DNNL_ARG_WEIGHTS,k},{DNNL_ARG_DIFF_SRC,dx}}); if(dx.get_data_handle()!=DX.get_data_handle()) reorder(dx,DX).execute(s,dx,DX); s.wait(); }
      double t2=now();
      { memory x=as(X,wpd.src_desc(),e,s), dy=as(DY,wpd.diff_dst_desc(),e,s); memory dk = wpd.diff_weights_desc()==wn? DW: memory(wpd.diff_weights_desc(),e);
        w.execute(s,{{DNNL_ARG_SRC,x},{DNNL_ARG_DIFF_DST,dy},{DNNL_ARG_DIFF_WEIGHTS,dk}}); if(dk.get_data_handle()!=DW.get_data_handle()) reorder(dk,DW).execute(s,dk,DW); s.wait(); }
      double t3=now();
      if(rep){ tf=std::min(tf,t1-t0); tb=std::min(tb,t2-t1); tw=std::min(tw,t3-t2);}    }
    printf("%dx%dx%dx%d->%d %s fwd %.1f bwd_data %.1f bwd_w %.1f total %.1f ms [%s]\n",N,H,H,Ci,Co,wino?"wino+reorders":"direct nhwc",tf*1e3,tb*1e3,tw*1e3,(tf+tb+tw)*1e3, fpd.impl_info_str());
  }
}
