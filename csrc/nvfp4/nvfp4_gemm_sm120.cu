// GeForce Blackwell (sm_120a: RTX 50xx) block-scaled NVFP4 x NVFP4 GEMM from CUTLASS's Sm120
// collective builders: one configuration per file (each instantiation costs minutes of compile
// time). sm_120 has no UMMA / tensor memory: its block-scaled MMA is a warp-level instruction fed
// by TMA, so this is a separate kernel from the sm_100a one (same operands, same scale layout:
// Sm1xxBlkScaledConfig's 128x4 atoms). Tile 128x128x128 (the Sm120 builder's NVFP4 tile),
// cluster 1x1 (sm_120 has no multicast clusters), bf16 output, no C operand, alpha read from
// device memory (no host sync).
#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/detail/sm100_blockscaled_layout.hpp>  // Sm1xxBlkScaledConfig (sm_100 and sm_120)
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "nvfp4/nvfp4_gemm.h"

namespace dcgen {
namespace {

using namespace cute;

using ElementA = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
using ElementB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
using ElementD = cutlass::bfloat16_t;
using ElementAcc = float;
using LayoutA = cutlass::layout::RowMajor;     // A [M, K], K fastest
using LayoutB = cutlass::layout::ColumnMajor;  // B^T: [N, K], K fastest (nn.Linear.weight)
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignAB = 32;  // 16 bytes of E2M1
constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _1, _1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm120, cutlass::arch::OpClassBlockScaledTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, void, LayoutD, kAlignD,
    ElementD, LayoutD, kAlignD, cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm120, cutlass::arch::OpClassBlockScaledTensorOp, ElementA, LayoutA, kAlignAB,
    ElementB, LayoutB, kAlignAB, ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, void>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
using ScaleConfig = typename Kernel::CollectiveMainloop::Sm1xxBlkScaledConfig;

typename Gemm::Arguments make_args(const Nvfp4GemmArgs& p) {
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  const auto shape = make_shape(p.m, p.n, p.k, 1);
  // Packed strides (row stride, unit, batch stride): A and B K-major, D row-major.
  const int64_t m = p.m, n = p.n, k = p.k;
  const StrideA sa = make_stride(k, Int<1>{}, m * k);
  const StrideB sb = make_stride(k, Int<1>{}, n * k);
  const StrideD sd = make_stride(n, Int<1>{}, m * n);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.m, p.n, p.k, 1},
      {static_cast<const typename ElementA::DataType*>(p.a), sa,
       static_cast<const typename ElementB::DataType*>(p.b), sb,
       static_cast<const typename ElementA::ScaleFactorType*>(p.sfa),
       ScaleConfig::tile_atom_to_shape_SFA(shape),
       static_cast<const typename ElementB::ScaleFactorType*>(p.sfb),
       ScaleConfig::tile_atom_to_shape_SFB(shape)},
      {{}, nullptr, sd, static_cast<ElementD*>(p.d), sd}};
  args.epilogue.thread.alpha_ptr = p.alpha;
  args.epilogue.thread.beta = 0.f;
  return args;
}

}  // namespace

size_t nvfp4_gemm_sm120_workspace(const Nvfp4GemmArgs& p) {
  return Gemm::get_workspace_size(make_args(p));
}

const char* nvfp4_gemm_sm120(const Nvfp4GemmArgs& p, void* workspace, cudaStream_t stream) {
  Gemm gemm;
  auto args = make_args(p);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "shape or alignment not supported";
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return "initialize failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "launch failed";
  return nullptr;
}

}  // namespace dcgen
