// fragment_layout.h - which lane holds which element of a 16x16x16 matrix-core tile.
//
// Plain C++ (no GPU headers) so the mappings can be checked on the host against an emulation
// of the hardware instructions (tests/cpp/kernels/test_fragment_layout.cpp).  The device
// backends in tile_mma.h load and store fragments exclusively through these functions.
//
// Every atom computes D[16x16] += A[16x16] * B[16x16] for one warp/wavefront.  Coordinates:
// A element = (m, k), B element = (k, n), C/D element = (m, n).  Element i of a lane is the
// i-th value of that lane's fragment, in the order the instruction consumes it.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RT_LAYOUT_FN __host__ __device__ constexpr
#else
#define RT_LAYOUT_FN constexpr
#endif

namespace retention::frag {

struct Coord {
  int row;
  int col;
};

// Accumulator row groups (used by the row / column reductions of tile_mma.h): in every layout
// below, the lanes holding the elements of one accumulator row are kCRowLanes consecutive
// lanes, l / kCRowLanes equal, and element i of those lanes lies in the same row.  So a row
// reduction is a butterfly over lane masks < kCRowLanes, and a column reduction one over lane
// masks >= kCRowLanes.  test_fragment_layout checks this property for each layout.

// NVIDIA mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, issued twice (n = 0..7
// and n = 8..15).  PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type":
// lanes form 8 groups of 4 (group = lane / 4, thread-in-group = lane % 4).  Elements are
// packed two per 32-bit register, lower half first; elements 0..3 of B and C belong to the
// n = 0..7 instruction, 4..7 to the n = 8..15 one.
struct Sm80 {
  static constexpr int kLanes = 32;
  static constexpr int kAElems = 8;
  static constexpr int kBElems = 8;
  static constexpr int kCElems = 8;
  static constexpr int kCRowLanes = 4;

  static RT_LAYOUT_FN Coord a(int lane, int i) {
    return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
  }
  static RT_LAYOUT_FN Coord b(int lane, int i) {
    return {2 * (lane & 3) + (i & 1) + 8 * ((i >> 1) & 1), (lane >> 2) + 8 * (i >> 2)};
  }
  // Same pattern as A: an accumulator tile can be re-fed as an A operand without shuffles.
  static RT_LAYOUT_FN Coord c(int lane, int i) {
    return {(lane >> 2) + 8 * ((i >> 1) & 1), 2 * (lane & 3) + (i & 1) + 8 * (i >> 2)};
  }
};

// AMD CDNA v_mfma_f32_16x16x16f16 / v_mfma_f32_16x16x16bf16_1k (one instruction, wave64).
// Lanes form 4 groups of 16: lane % 16 indexes the row of A / the column of B and D, lane / 16
// selects a block of 4 consecutive k (A, B) or 4 consecutive rows (D).
struct Mfma16 {
  static constexpr int kLanes = 64;
  static constexpr int kAElems = 4;
  static constexpr int kBElems = 4;
  static constexpr int kCElems = 4;
  static constexpr int kCRowLanes = 16;

  static RT_LAYOUT_FN Coord a(int lane, int i) { return {lane & 15, 4 * (lane >> 4) + i}; }
  static RT_LAYOUT_FN Coord b(int lane, int i) { return {4 * (lane >> 4) + i, lane & 15}; }
  static RT_LAYOUT_FN Coord c(int lane, int i) { return {4 * (lane >> 4) + i, lane & 15}; }
};

// AMD CDNA v_mfma_f32_16x16x4f32 issued four times (k = 0..3, 4..7, ...): true fp32 matrix
// math, used for fp32 inputs.  Each instruction takes one A and one B value per lane; lane / 16
// is the k index inside the instruction.  Element i of the fragment feeds instruction i.
struct Mfma16F32 {
  static constexpr int kLanes = 64;
  static constexpr int kAElems = 4;
  static constexpr int kBElems = 4;
  static constexpr int kCElems = 4;
  static constexpr int kCRowLanes = Mfma16::kCRowLanes;

  static RT_LAYOUT_FN Coord a(int lane, int i) { return {lane & 15, 4 * i + (lane >> 4)}; }
  static RT_LAYOUT_FN Coord b(int lane, int i) { return {4 * i + (lane >> 4), lane & 15}; }
  static RT_LAYOUT_FN Coord c(int lane, int i) { return Mfma16::c(lane, i); }
};

}  // namespace retention::frag
