// What the running CPU supports, and which kernel path we use.
#pragma once

#include <string>
#include <vector>

namespace tileattn {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

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
