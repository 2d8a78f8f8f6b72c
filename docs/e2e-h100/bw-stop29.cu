#include <cstdio>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#define CK(x) do{cudaError_t e=(x); if(e){printf("err %s line %d\n",cudaGetErrorString(e),__LINE__); return 1;}}while(0)
__global__ void read_f4(const float4* __restrict__ x, size_t n4, float* out){
  float s=0; for(size_t i=blockIdx.x*(size_t)blockDim.x+threadIdx.x;i<n4;i+=(size_t)gridDim.x*blockDim.x){float4 v=__ldg(x+i); s+=v.x+v.y+v.z+v.w;}
  if(s==123.456f) out[0]=s;
}
__global__ void read_f4_u4(const float4* __restrict__ x, size_t n4, float* out){
  // 4 independent loads per iteration
  float s=0; size_t st=(size_t)gridDim.x*blockDim.x; size_t i=blockIdx.x*(size_t)blockDim.x+threadIdx.x;
  for(;i+3*st<n4;i+=4*st){float4 a=__ldg(x+i),b=__ldg(x+i+st),c=__ldg(x+i+2*st),d=__ldg(x+i+3*st); s+=a.x+b.y+c.z+d.w+a.y+b.x+c.w+d.z;}
  for(;i<n4;i+=st){float4 v=__ldg(x+i); s+=v.x;}
  if(s==123.456f) out[0]=s;
}
__global__ void write_f4(float4* y, size_t n4){
  for(size_t i=blockIdx.x*(size_t)blockDim.x+threadIdx.x;i<n4;i+=(size_t)gridDim.x*blockDim.x) y[i]=make_float4(1,2,3,4);
}
// current: thread per (img, word, px), 32 strided loads
__global__ void pack_cur(const float* __restrict__ x, unsigned* masks, unsigned* flag, int n, int cin, int hw){
  int words=(cin+31)/32; unsigned idx=blockIdx.x*256+threadIdx.x; unsigned total=n*words*hw; bool odd=false;
  if(idx<total){ int p=idx%hw, w=(idx/hw)%words, img=idx/(hw*words);
    const float* f=x+((size_t)(img*cin+w*32)*hw+p); float v[32];
    #pragma unroll
    for(int j=0;j<32;j++) v[j]=__ldg(f+(size_t)j*hw);
    unsigned m=0;
    #pragma unroll
    for(int j=0;j<32;j++){ m|=(unsigned)(v[j]!=0.f)<<j; odd|= v[j]!=0.f && v[j]!=1.f;}
    masks[idx]=m; }
  if(__any_sync(~0u,odd) && threadIdx.x%32==0) atomicOr(flag,1);
}
// tile: thread per (img, word, 4 px), float4 loads, B loads per batch
template<int PX>
__global__ void pack_vec(const float* __restrict__ x, unsigned* masks, unsigned* flag, int n, int cin, int hw){
  int words=(cin+31)/32; int groups=hw/PX; unsigned idx=blockIdx.x*256+threadIdx.x; unsigned total=n*words*groups; bool odd=false;
  if(idx<total){ int g=idx%groups, w=(idx/groups)%words, img=idx/(groups*words);
    const float* f=x+((size_t)(img*cin+w*32)*hw+g*PX);
    unsigned m[PX]; 
    #pragma unroll
    for(int k=0;k<PX;k++) m[k]=0;
    #pragma unroll
    for(int b=0;b<32;b+=(PX==4?16:8)){
      const int B=(PX==4?16:8);
      float4 v[B*PX/4];
      #pragma unroll
      for(int j=0;j<B;j++)
        #pragma unroll
        for(int q=0;q<PX/4;q++) v[j*(PX/4)+q]=__ldg((const float4*)(f+(size_t)(b+j)*hw)+q);
      #pragma unroll
      for(int j=0;j<B;j++)
        #pragma unroll
        for(int q=0;q<PX/4;q++){ float4 t=v[j*(PX/4)+q]; float e[4]={t.x,t.y,t.z,t.w};
          #pragma unroll
          for(int k=0;k<4;k++){ m[q*4+k]|=(unsigned)(e[k]!=0.f)<<(b+j); odd|=e[k]!=0.f&&e[k]!=1.f; } }
    }
    unsigned* o=masks+((size_t)(img*words+w)*hw+g*PX);
    #pragma unroll
    for(int q=0;q<PX/4;q++) ((uint4*)o)[q]=make_uint4(m[4*q],m[4*q+1],m[4*q+2],m[4*q+3]);
  }
  if(__any_sync(~0u,odd) && threadIdx.x%32==0) atomicOr(flag,1);
}
int main(){
  const int n=128,cin=64,hw=3136; size_t N=(size_t)n*cin*hw; size_t n4=N/4;
  float *x,*y,*out; unsigned *m,*flag;
  CK(cudaMalloc(&x,N*4)); CK(cudaMalloc(&y,N*4)); CK(cudaMalloc(&out,4)); CK(cudaMalloc(&m,N/32*4)); CK(cudaMalloc(&flag,4));
  std::vector<float> h(N); unsigned s=1; for(size_t i=0;i<N;i++){ s=s*1664525u+1013904223u; h[i]=(s>>8)%100==0?1.f:0.f;}
  CK(cudaMemcpy(x,h.data(),N*4,cudaMemcpyHostToDevice));
  int sms; cudaDeviceGetAttribute(&sms,cudaDevAttrMultiProcessorCount,0);
  cudaEvent_t a,b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto run=[&](const char* name, auto launch, bool dirty){
    std::vector<float> t;
    for(int r=0;r<25;r++){ if(dirty) write_f4<<<sms*8,256>>>((float4*)y,n4); else read_f4<<<sms*8,256>>>((float4*)y,n4/2,out);
      cudaEventRecord(a); launch(); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms,a,b); if(r>=5) t.push_back(ms);}
    std::sort(t.begin(),t.end()); float med=t[t.size()/2];
    printf("%-28s %s median %.4f ms min %.4f  %.2f TB/s(of 102.8MB)\n",name,dirty?"dirtyL2":"cleanL2",med,t[0],N*4/med/1e9);
  };
  for(int d=0; d<2; d++){
    bool dirty=d==1;
    run("read_f4 g=sms*8",[&]{read_f4<<<sms*8,256>>>((const float4*)x,n4,out);},dirty);
    run("read_f4 g=sms*32",[&]{read_f4<<<sms*32,256>>>((const float4*)x,n4,out);},dirty);
    run("read_f4_u4 g=sms*8",[&]{read_f4_u4<<<sms*8,256>>>((const float4*)x,n4,out);},dirty);
    run("read_f4_u4 g=sms*16",[&]{read_f4_u4<<<sms*16,256>>>((const float4*)x,n4,out);},dirty);
    run("write_f4 (to y)",[&]{write_f4<<<sms*8,256>>>((float4*)y,n4);},dirty);
    run("write_f4 g=sms*32",[&]{write_f4<<<sms*32,256>>>((float4*)y,n4);},dirty);
    run("pack_cur",[&]{pack_cur<<<(n*2*hw+255)/256,256>>>(x,m,flag,n,cin,hw);},dirty);
    run("pack_vec4",[&]{pack_vec<4><<<(n*2*hw/4+255)/256,256>>>(x,m,flag,n,cin,hw);},dirty);
    run("pack_vec8",[&]{pack_vec<8><<<(n*2*hw/8+255)/256,256>>>(x,m,flag,n,cin,hw);},dirty);
  }
  // check pack variants agree
  std::vector<unsigned> m1(N/32),m2(N/32); pack_cur<<<(n*2*hw+255)/256,256>>>(x,m,flag,n,cin,hw); cudaMemcpy(m1.data(),m,N/8,cudaMemcpyDeviceToHost);
  cudaMemset(m,0,N/8); pack_vec<4><<<(n*2*hw/4+255)/256,256>>>(x,m,flag,n,cin,hw); cudaMemcpy(m2.data(),m,N/8,cudaMemcpyDeviceToHost); printf("vec4 agree %d\n",(int)(m1==m2));
  cudaMemset(m,0,N/8); pack_vec<8><<<(n*2*hw/8+255)/256,256>>>(x,m,flag,n,cin,hw); cudaMemcpy(m2.data(),m,N/8,cudaMemcpyDeviceToHost); printf("vec8 agree %d\n",(int)(m1==m2));
  CK(cudaGetLastError());
  return 0;
}
