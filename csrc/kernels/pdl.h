// Programmatic dependent launch (PDL, Hopper): every kernel of this library is launched with the
// programmatic-stream-serialization attribute, so it may start while the kernel before it in the
// stream is still running. Each kernel begins with pdl_wait() (griddepcontrol.wait: blocks until
// the previous grid has completed and its writes are visible) before it reads anything another
// kernel wrote or writes anything at all; only reads of constant data (weights) may come before
// it, and what another kernel wrote is never read through __ldg (ld.global.nc is an invariant load
// to the compiler, which may hoist it above the wait: a MoE kernel did, and read the previous
// step's routing under graph replay); weights may be. Right after, pdl_trigger() lets the next
// kernel launch. A step of decode is ~300 small
// dependent launches: this hides each one's launch latency and prologue behind its predecessor.
// On by default where the device is sm_90 (the sm_90a build has the waits); set_pdl(false) turns it
// off for the process (launches are then plain stream-ordered launches; the Python package does so
// for GPTOSS_PDL=0).
#pragma once
#include <cuda_runtime.h>

#include <atomic>

namespace gptoss {

// Whether launches may use PDL (where the device supports it); returns the previous setting.
inline std::atomic<bool>& pdl_mode() {
  static std::atomic<bool> on{true};
  return on;
}

inline bool set_pdl(bool on) { return pdl_mode().exchange(on); }

// Whether the current device is sm_90 (it runs this build's sm_90a code: waits, clusters, bulk copies).
inline bool device_is_sm90() {
  static int major_of[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (major_of[dev] == 0) {
    int major = -1;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) major = -1;
    major_of[dev] = major;
  }
  return major_of[dev] == 9;
}

inline bool pdl_enabled() {
  const bool mode = pdl_mode().load(std::memory_order_relaxed);
  // Only sm_90 runs the sm_90a code that has the waits (a newer GPU JIT-compiles the sm_80 PTX,
  // which has none, so it must not be launched with the attribute).
  return mode && device_is_sm90();
}

#if defined(__CUDACC__)
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute when enabled; cluster > 0:
// thread-block clusters of `cluster` CTAs along x (sm_90).
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel_cluster(int cluster, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                  cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (pdl_enabled()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}

template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  return launch_kernel_cluster(0, kernel, grid, block, smem, stream, static_cast<Args&&>(args)...);
}
#endif

}  // namespace gptoss
