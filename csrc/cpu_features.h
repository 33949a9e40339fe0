// What the running CPU supports, and which kernel path we use.
#pragma once

#include <string>
#include <vector>

namespace tileattn {

// Each path is one compiled copy of the kernels (kernel_<isa>.cpp).
// avx512_bf16 is avx512 plus the bf16 dot product (vdpbf16ps) for bf16
// products; its float32 and float64 code is avx512's, with the same bits.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

const char* isa_name(Isa isa);
// Paths compiled into this build, best last.
std::vector<Isa> isas_built();
// Paths this build has that this CPU (and OS) can run.
bool cpu_supports(Isa isa);
// The best path this CPU can run.
Isa best_isa();
// Names of the CPU features we test for, with whether they are present.
std::vector<std::pair<std::string, bool>> cpu_feature_list();

}  // namespace tileattn
