// Host-only check of the matrix-core lane mappings in kernels/fragment_layout.h.
//
// The hardware instructions are emulated from their documented operand layouts, written out
// the way the vendor documents state them (not with the bit tricks used in the header), in
// host_emu/matrix_isa.h (shared with the host execution backend).
// Each test fills per-lane registers with the header's mapping, executes the emulated
// instruction(s) lane by lane, reads the result back with the header's accumulator mapping and
// compares against a plain matrix product.  A wrong lane mapping cannot pass.
#include <gtest/gtest.h>

#include <array>
#include <random>
#include <set>
#include <utility>

#include "fragment_layout.h"
#include "host_emu/matrix_isa.h"

namespace frag = retention::frag;

namespace {

using Tile = std::array<std::array<double, 16>, 16>;

Tile random_tile(unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(-8, 8);  // small integers: the products are exact
  Tile t{};
  for (auto& row : t)
    for (auto& x : row) x = dist(gen);
  return t;
}

Tile matmul(const Tile& a, const Tile& b) {
  Tile c{};
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      for (int k = 0; k < 16; ++k) c[i][j] += a[i][k] * b[k][j];
  return c;
}

// The instructions as documented (host_emu/matrix_isa.h, written independently of
// fragment_layout.h; the host execution backend runs the kernels on the same emulation).
struct Sm80Regs {
  double a[32][8];
  double b[32][4];
  double c[32][4];
};

void ptx_mma_m16n8k16(Sm80Regs& r) { retention::isa::PtxM16N8K16::execute(r.a, r.b, r.c); }

struct MfmaRegs {
  double a[64][4];
  double b[64][4];
  double c[64][4];
};

void amd_mfma_16x16x16(MfmaRegs& r) { retention::isa::Mfma16x16x16::execute(r.a, r.b, r.c); }

// One 16x16x4 f32 instruction; `slot` is which fragment element each lane feeds it.
void amd_mfma_16x16x4_f32(MfmaRegs& r, int slot) {
  double a[64], b[64];
  for (int lane = 0; lane < 64; ++lane) {
    a[lane] = r.a[lane][slot];
    b[lane] = r.b[lane][slot];
  }
  retention::isa::Mfma16x16x4F32::execute(a, b, r.c);
}

// Every element of the tile is held by exactly one (lane, element) pair.
template <class F>
void expect_bijection(int lanes, int elems, F coord, const char* what) {
  std::set<std::pair<int, int>> seen;
  for (int lane = 0; lane < lanes; ++lane)
    for (int i = 0; i < elems; ++i) {
      const frag::Coord c = coord(lane, i);
      ASSERT_GE(c.row, 0) << what;
      ASSERT_LT(c.row, 16) << what;
      ASSERT_GE(c.col, 0) << what;
      ASSERT_LT(c.col, 16) << what;
      EXPECT_TRUE(seen.insert({c.row, c.col}).second) << what << ": (" << c.row << ", " << c.col << ") twice";
    }
  EXPECT_EQ(seen.size(), 256u) << what;
}

template <class L>
void expect_all_bijections() {
  expect_bijection(L::kLanes, L::kAElems, L::a, "A");
  expect_bijection(L::kLanes, L::kBElems, L::b, "B");
  expect_bijection(L::kLanes, L::kCElems, L::c, "C");
}

}  // namespace

TEST(FragmentLayout, MappingsAreBijections) {
  expect_all_bijections<frag::Sm80>();
  expect_all_bijections<frag::Mfma16>();
  expect_all_bijections<frag::Mfma16F32>();
}

TEST(FragmentLayout, Sm80TwoM16N8K16MakeOne16x16x16) {
  for (unsigned seed = 1; seed <= 8; ++seed) {
    const Tile A = random_tile(seed), B = random_tile(100 + seed), C0 = random_tile(200 + seed);
    Sm80Regs lo{}, hi{};
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 8; ++i) {
        const frag::Coord a = frag::Sm80::a(lane, i), b = frag::Sm80::b(lane, i), c = frag::Sm80::c(lane, i);
        lo.a[lane][i] = hi.a[lane][i] = A[a.row][a.col];
        (i < 4 ? lo.b[lane][i] : hi.b[lane][i - 4]) = B[b.row][b.col];
        (i < 4 ? lo.c[lane][i] : hi.c[lane][i - 4]) = C0[c.row][c.col];
      }
    }
    ptx_mma_m16n8k16(lo);  // columns 0..7
    ptx_mma_m16n8k16(hi);  // columns 8..15
    const Tile ref = matmul(A, B);
    for (int lane = 0; lane < 32; ++lane)
      for (int i = 0; i < 8; ++i) {
        const frag::Coord c = frag::Sm80::c(lane, i);
        const double got = i < 4 ? lo.c[lane][i] : hi.c[lane][i - 4];
        ASSERT_EQ(got, ref[c.row][c.col] + C0[c.row][c.col]) << "lane " << lane << " element " << i;
      }
  }
}

// The accumulator layout equals the A-operand layout, so a C tile can be fed back as A.
TEST(FragmentLayout, Sm80AccumulatorIsAOperandLayout) {
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(frag::Sm80::a(lane, i).row, frag::Sm80::c(lane, i).row);
      EXPECT_EQ(frag::Sm80::a(lane, i).col, frag::Sm80::c(lane, i).col);
    }
}

// tile_mma.h's SIMT fp32 backend hard-codes "element i = row slot (i>>1)&1, column slot
// (i&1) + 2(i>>2)" of the sm80 accumulator layout; make sure that is what Layout::c says.
TEST(FragmentLayout, SimtSlotsMatchSm80Accumulator) {
  for (int lane = 0; lane < 32; ++lane) {
    const int rows[2] = {frag::Sm80::c(lane, 0).row, frag::Sm80::c(lane, 2).row};
    const int cols[4] = {frag::Sm80::c(lane, 0).col, frag::Sm80::c(lane, 1).col, frag::Sm80::c(lane, 4).col,
                         frag::Sm80::c(lane, 5).col};
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(frag::Sm80::c(lane, i).row, rows[(i >> 1) & 1]);
      EXPECT_EQ(frag::Sm80::c(lane, i).col, cols[(i & 1) + 2 * (i >> 2)]);
    }
  }
}

TEST(FragmentLayout, Mfma16x16x16) {
  for (unsigned seed = 1; seed <= 8; ++seed) {
    const Tile A = random_tile(seed), B = random_tile(100 + seed), C0 = random_tile(200 + seed);
    MfmaRegs r{};
    for (int lane = 0; lane < 64; ++lane)
      for (int i = 0; i < 4; ++i) {
        const frag::Coord a = frag::Mfma16::a(lane, i), b = frag::Mfma16::b(lane, i), c = frag::Mfma16::c(lane, i);
        r.a[lane][i] = A[a.row][a.col];
        r.b[lane][i] = B[b.row][b.col];
        r.c[lane][i] = C0[c.row][c.col];
      }
    amd_mfma_16x16x16(r);
    const Tile ref = matmul(A, B);
    for (int lane = 0; lane < 64; ++lane)
      for (int i = 0; i < 4; ++i) {
        const frag::Coord c = frag::Mfma16::c(lane, i);
        ASSERT_EQ(r.c[lane][i], ref[c.row][c.col] + C0[c.row][c.col]) << "lane " << lane << " element " << i;
      }
  }
}

TEST(FragmentLayout, MfmaF32FourK4StepsMakeOne16x16x16) {
  for (unsigned seed = 1; seed <= 8; ++seed) {
    const Tile A = random_tile(seed), B = random_tile(100 + seed);
    MfmaRegs r{};
    for (int lane = 0; lane < 64; ++lane)
      for (int i = 0; i < 4; ++i) {
        const frag::Coord a = frag::Mfma16F32::a(lane, i), b = frag::Mfma16F32::b(lane, i);
        r.a[lane][i] = A[a.row][a.col];
        r.b[lane][i] = B[b.row][b.col];
      }
    for (int step = 0; step < 4; ++step) amd_mfma_16x16x4_f32(r, step);
    const Tile ref = matmul(A, B);
    for (int lane = 0; lane < 64; ++lane)
      for (int i = 0; i < 4; ++i) {
        const frag::Coord c = frag::Mfma16F32::c(lane, i);
        ASSERT_EQ(r.c[lane][i], ref[c.row][c.col]) << "lane " << lane << " element " << i;
      }
  }
}

// A transposed operand is a view with swapped strides; loading B = X^T through the B mapping
// must give the same product as materialising the transpose.
TEST(FragmentLayout, TransposedViewsThroughTheMappings) {
  const Tile A = random_tile(7), X = random_tile(8);
  Tile Xt{};
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) Xt[i][j] = X[j][i];
  MfmaRegs r{};
  for (int lane = 0; lane < 64; ++lane)
    for (int i = 0; i < 4; ++i) {
      const frag::Coord a = frag::Mfma16::a(lane, i), b = frag::Mfma16::b(lane, i);
      r.a[lane][i] = A[a.row][a.col];
      r.b[lane][i] = X[b.col][b.row];  // view (rs, cs) = (1, 16) over X
    }
  amd_mfma_16x16x16(r);
  const Tile ref = matmul(A, Xt);
  for (int lane = 0; lane < 64; ++lane)
    for (int i = 0; i < 4; ++i) {
      const frag::Coord c = frag::Mfma16::c(lane, i);
      ASSERT_EQ(r.c[lane][i], ref[c.row][c.col]);
    }
}

namespace {

// The row / column reductions of tile_mma.h rely on: the lanes sharing an accumulator row are
// the kCRowLanes consecutive lanes of a group, for every element index alike, and lanes of
// different groups never share a row (so the remaining lane bits walk down a column).
template <class L>
void expect_row_groups() {
  static_assert(L::kLanes % L::kCRowLanes == 0, "groups tile the warp");
  for (int lane = 0; lane < L::kLanes; ++lane)
    for (int other = 0; other < L::kLanes; ++other)
      for (int i = 0; i < L::kCElems; ++i) {
        const frag::Coord a = L::c(lane, i), b = L::c(other, i);
        const bool same_group = lane / L::kCRowLanes == other / L::kCRowLanes;
        ASSERT_EQ(a.row == b.row, same_group) << "lanes " << lane << ", " << other << " element " << i;
        // Within a lane, the column of an element is a function of (lane % kCRowLanes, i):
        // lanes of different groups at the same offset hold the same columns.
        if (lane % L::kCRowLanes == other % L::kCRowLanes) {
          ASSERT_EQ(a.col, b.col);
        }
      }
}

}  // namespace

TEST(FragmentLayout, AccumulatorRowGroups) {
  expect_row_groups<frag::Sm80>();
  expect_row_groups<frag::Mfma16>();
  expect_row_groups<frag::Mfma16F32>();
}
