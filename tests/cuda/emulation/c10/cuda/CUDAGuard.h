// Host stand-in (tests/cuda/emulation): one emulated device, nothing to switch.
#pragma once
namespace c10 {
namespace cuda {
struct CUDAGuard {
  template <typename Device>
  explicit CUDAGuard(const Device&) {}
};
}  // namespace cuda
}  // namespace c10
