// matrix_isa.h - the matrix-core instructions the kernels use, as their vendors document them.
//
// Written from the ISA documents, NOT from fragment_layout.h: the layout header is what the
// kernels believe; this file is what the hardware does.  Two users:
//   * tests/cpp/kernels/test_fragment_layout.cpp checks fragment_layout.h against it;
//   * the host execution backend (host_emu.h) executes mma.sync / v_mfma with it, on the
//     registers that the kernels' own load code filled.
//
// Sources:
//   * NVIDIA PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type".
//   * AMD CDNA ISA / matrix instruction calculator, v_mfma_f32_16x16x16f16 (same layout for
//     v_mfma_f32_16x16x16bf16_1k) and v_mfma_f32_16x16x4f32.
//
// Each instruction is D = A * B + C on one warp / wavefront; `execute` takes the per-lane
// register values (already unpacked to numbers: element i of lane l) and returns D in the same
// per-lane form.  Products are accumulated in the value type V (double: exact for the small
// integers of the layout test; float: fp32 accumulation as the hardware does).
#pragma once

#include <cmath>

namespace retention::isa {

struct RowCol {
  int row;
  int col;
};

// NVIDIA mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   groupID = %laneid >> 2, threadID_in_group = %laneid % 4
//   A (16x16), a0..a7: row = groupID for a0, a1, a4, a5 and groupID + 8 for a2, a3, a6, a7;
//              col = threadID_in_group * 2 + (i & 0x1) for i < 4, and that + 8 for i >= 4
//   B (16x8), b0..b3: row = threadID_in_group * 2 + (i & 0x1) for b0, b1 and that + 8 for b2, b3;
//              col = groupID
//   C/D (16x8), c0..c3: row = groupID for c0, c1 and groupID + 8 for c2, c3;
//              col = threadID_in_group * 2 + (i & 0x1)
//   Registers: A is four .f16x2/.bf16x2 registers {a0,a1}, {a2,a3}, {a4,a5}, {a6,a7}, B two
//   {b0,b1}, {b2,b3}; the element with the lower index sits in the lower 16 bits.
struct PtxM16N8K16 {
  static constexpr int kLanes = 32, kA = 8, kB = 4, kC = 4;

  static RowCol a(int lane, int i) {
    const int group = lane >> 2, tig = lane % 4;
    const bool upper_rows = (i == 2 || i == 3 || i == 6 || i == 7);
    return {upper_rows ? group + 8 : group, i < 4 ? tig * 2 + (i & 0x1) : tig * 2 + (i & 0x1) + 8};
  }
  static RowCol b(int lane, int i) {
    const int group = lane >> 2, tig = lane % 4;
    return {i < 2 ? tig * 2 + (i & 0x1) : tig * 2 + (i & 0x1) + 8, group};
  }
  static RowCol c(int lane, int i) {
    const int group = lane >> 2, tig = lane % 4;
    return {i < 2 ? group : group + 8, tig * 2 + (i & 0x1)};
  }

  template <class V>
  static void execute(const V (&ra)[kLanes][kA], const V (&rb)[kLanes][kB], V (&rc)[kLanes][kC]) {
    V A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int i = 0; i < kA; ++i) A[a(lane, i).row][a(lane, i).col] = ra[lane][i];
      for (int i = 0; i < kB; ++i) B[b(lane, i).row][b(lane, i).col] = rb[lane][i];
      for (int i = 0; i < kC; ++i) C[c(lane, i).row][c(lane, i).col] = rc[lane][i];
    }
    for (int lane = 0; lane < kLanes; ++lane)
      for (int i = 0; i < kC; ++i) {
        const RowCol d = c(lane, i);
        V acc = C[d.row][d.col];
        for (int k = 0; k < 16; ++k) acc = std::fma(A[d.row][k], B[k][d.col], acc);
        rc[lane][i] = acc;
      }
  }
};

// AMD v_mfma_f32_16x16x16f16 / v_mfma_f32_16x16x16bf16_1k (wave64), four 16-bit items per
// lane for A and B (a 4-vector register pair), four fp32 for C/D:
//   A[i][k] is item k % 4 of lane i + 16 * (k / 4)
//   B[k][j] is item k % 4 of lane j + 16 * (k / 4)
//   D[i][j] is item i % 4 of lane j + 16 * (i / 4)
struct Mfma16x16x16 {
  static constexpr int kLanes = 64, kA = 4, kB = 4, kC = 4;

  template <class V>
  static void execute(const V (&ra)[kLanes][kA], const V (&rb)[kLanes][kB], V (&rc)[kLanes][kC]) {
    V D[16][16];
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        V acc = rc[j + 16 * (i / 4)][i % 4];
        for (int k = 0; k < 16; ++k) acc = std::fma(ra[i + 16 * (k / 4)][k % 4], rb[j + 16 * (k / 4)][k % 4], acc);
        D[i][j] = acc;
      }
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) rc[j + 16 * (i / 4)][i % 4] = D[i][j];
  }
};

// AMD v_mfma_f32_16x16x4f32 (wave64): one fp32 A and one fp32 B value per lane,
//   A[i][k] is the value of lane i + 16 k, B[k][j] the value of lane j + 16 k (k < 4),
//   D as for 16x16x16.
struct Mfma16x16x4F32 {
  static constexpr int kLanes = 64, kC = 4;

  template <class V>
  static void execute(const V (&ra)[kLanes], const V (&rb)[kLanes], V (&rc)[kLanes][kC]) {
    V D[16][16];
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        V acc = rc[j + 16 * (i / 4)][i % 4];
        for (int k = 0; k < 4; ++k) acc = std::fma(ra[i + 16 * k], rb[j + 16 * k], acc);
        D[i][j] = acc;
      }
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) rc[j + 16 * (i / 4)][i % 4] = D[i][j];
  }
};

}  // namespace retention::isa
