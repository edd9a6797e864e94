// The hyper_batch_ensemble_linear_hp op's double kernels: the forward epilogue and the backward's pass
// over g with e1 / e2 computed per row from the hyperparameters and the embedding (m = 1..8 compiled
// per m, cloned per ISA). One file per dtype so they compile in parallel (rank1_linear_kernels.h).
#include "rank1_linear_kernels.h"

namespace hyperkern {
namespace linear_cpu {

HYPERKERN_DEFINE_ROW_KERNEL_FOR(hyper_epilogue, HyperEpilogueEmbeddedArgs, double, HYPERKERN_CPU_CLONES)
HYPERKERN_DEFINE_TASK_KERNEL_FOR(hyper_grad, HyperGradEmbeddedArgs, double, HYPERKERN_CPU_CLONES)

}  // namespace linear_cpu
}  // namespace hyperkern
