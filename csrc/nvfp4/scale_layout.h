// The 128x4 swizzled layout of NVFP4 block scales (CUTLASS / cuBLAS on Blackwell, and dcgen's
// GEMMs everywhere): 128-row x 4-block tiles of 512 bytes, row-tile-major, each stored as
// (row % 32) * 16 + ((row % 128) / 32) * 4 + kb % 4. Host-compilable (no CUDA or torch headers).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DCGEN_SCALE_LAYOUT_FN __host__ __device__ __forceinline__
#else
#define DCGEN_SCALE_LAYOUT_FN inline
#endif

namespace dcgen::nvfp4 {

// Byte offset of scale (row, kb) (kb = k / 16) for a matrix with kb_total blocks per row.
DCGEN_SCALE_LAYOUT_FN int64_t swizzled_scale_offset(int row, int kb, int kb_total) {
  const int64_t kb_tiles = (kb_total + 3) / 4;
  return ((int64_t)(row / 128) * kb_tiles + kb / 4) * 512 + (row % 32) * 16 + ((row % 128) / 32) * 4 +
         kb % 4;
}

}  // namespace dcgen::nvfp4
