#pragma once
// Only for `make cuda-check` against a CPU-only torch wheel, which ships the
// c10/cuda headers but not this generated one (its content upstream is this define).
#define C10_CUDA_BUILD_SHARED_LIBS
