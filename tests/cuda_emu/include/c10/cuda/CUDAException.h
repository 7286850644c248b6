#pragma once
// CUDA emulator stand-in: raises the last launch's error (an invalid
// configuration or a fault found while it ran), as the real check does.
#include <cuda_runtime.h>
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::qwix_emu::check_last_launch()
