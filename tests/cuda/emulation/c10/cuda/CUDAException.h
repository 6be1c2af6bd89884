// Host stand-in (tests/cuda/emulation): launches are synchronous host calls, nothing to check.
#pragma once
#include <cuda_runtime.h>
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#define C10_CUDA_CHECK(expr) ((void)(expr))
