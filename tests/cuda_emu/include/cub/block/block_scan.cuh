// cub::BlockScan for the emulator: the sums cub computes (ExclusiveSum / InclusiveSum, with the
// block aggregate), through a staged array and one barrier; every thread must reach it.
#pragma once
#include "../../../emu.h"

namespace cub {
template <typename T, int BLOCK_THREADS>
class BlockScan {
 public:
  struct TempStorage {
    T v[BLOCK_THREADS];
  };
  explicit BlockScan(TempStorage& t) : t_(t) {}
  void ExclusiveSum(T in, T& out) {
    T agg;
    ExclusiveSum(in, out, agg);
  }
  void ExclusiveSum(T in, T& out, T& aggregate) {
    const int tid = static_cast<int>(threadIdx.x);
    t_.v[tid] = in;
    __syncthreads();
    T acc{};
    for (int i = 0; i < tid; ++i) acc = acc + t_.v[i];
    T all = acc;
    for (int i = tid; i < BLOCK_THREADS; ++i) all = all + t_.v[i];
    // No barrier after the reads: like cub, a second use of the same TempStorage needs the
    // caller's __syncthreads() first (without it, a resume order exposes the overwrite).
    out = acc;
    aggregate = all;
  }
  void InclusiveSum(T in, T& out) {
    T agg;
    InclusiveSum(in, out, agg);
  }
  void InclusiveSum(T in, T& out, T& aggregate) {
    ExclusiveSum(in, out, aggregate);
    out = out + in;
  }

 private:
  TempStorage& t_;
};
}  // namespace cub
