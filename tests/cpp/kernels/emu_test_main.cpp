// main() of the kernel tests under the host execution backend (kernels/host_emu/): GoogleTest
// plus a listener that labels the output digests (RETENTION_EMU_DIGEST) with the test name,
// so the digests of two runs under different schedules can be compared line by line.
#include <gtest/gtest.h>

#include <string>

#include "gpu_compat.h"

namespace {

class DigestLabels : public testing::EmptyTestEventListener {
  void OnTestStart(const testing::TestInfo& info) override {
    const std::string name = std::string(info.test_suite_name()) + "." + info.name();
    retention::emu::digest_begin_test(name.c_str());
  }
};

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  testing::UnitTest::GetInstance()->listeners().Append(new DigestLabels);
  return RUN_ALL_TESTS();
}
