// runtime.cpp - execution model of the host execution backend (see host_emu.h).
//
// A launch runs its blocks one after another; the threads of a block are fibers
// (Boost.Context's fcontext: a user-space stack switch of a few nanoseconds).  Fibers, not OS
// threads: a block has 128-256 threads and a warp collective (every mma, every shuffle)
// hands control around the whole warp, so a test makes millions of switches; with OS threads
// and a barrier each would be a futex round trip (microseconds), and glibc's swapcontext pays
// a sigprocmask system call per switch.  Fibers are also deterministic (one OS thread), which
// is what makes the schedule a reproducible run-time option.  ASan is told about every stack
// switch (__sanitizer_{start,finish}_switch_fiber), so the sanitizer build works on them.
//
// Scheduling.  A fiber runs until it blocks: at __syncthreads, at a warp collective whose
// other lanes have not arrived, or at its end.  The next fiber to run is always the first
// runnable one in the block's order (RETENTION_EMU_SCHEDULE):
//   forward   threads 0, 1, 2, ...: warp 0 runs to the next barrier before warp 1 starts
//   reverse   the opposite order
//   random:S  a permutation drawn from seed S, redrawn after every barrier
// A kernel that communicates through shared memory without a barrier in between reads
// different data under forward and reverse order (or the NaN poison), so running the suite
// under two orders and comparing the outputs bit for bit finds missing barriers.  The block
// order is a separate option (RETENTION_EMU_BLOCK_ORDER, forward | reverse): a kernel whose
// result depends on it (e.g. floating-point atomics across blocks) is not deterministic on a
// GPU either.
//
// Checks (each stops the launch with kLaunchFailure and a message naming the function and
// line; never a hang):
//   * divergent barrier: threads of a block wait at different __syncthreads, or some wait
//     while others have exited (compute-sanitizer synccheck);
//   * warp collectives from a diverged warp: some lanes at a shuffle / mma while others
//     exited, wait at a barrier or at a different collective;
//   * shared memory beyond the launch's dynamic size (NVIDIA model) or static shared memory
//     over the target's limit (48 KiB NVIDIA static, 64 KiB LDS on CDNA);
//   * launch configurations the target rejects (block size, dynamic shared memory above the
//     48 KiB default without set_max_dynamic_smem, more than 227 KiB).
// Out-of-bounds accesses are found by ASan: device buffers and shared memory are exact-size
// heap allocations, shared memory is filled with all-ones bytes (NaN) before each block.
//
// Output digests: with RETENTION_EMU_DIGEST=path every device-to-host copy appends a line
// "<test> <n> <bytes> <hash>" (the test name comes from emu_test_main.cpp), so two runs under
// different schedules can be compared bit for bit with diff.
#include <boost/context/detail/fcontext.hpp>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gpu_compat.h"
#include "host_emu/matrix_isa.h"
#include "numeric.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define RETENTION_EMU_ASAN 1
#endif

namespace retention::emu {

namespace bctx = boost::context::detail;

ThreadState* g_thread = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {
OpCounts g_op_counts;  // op_counts()

constexpr int kWarp = RETENTION_EMU_WARP;
constexpr std::size_t kStackBytes = std::size_t(1) << 20;  // per fiber; mapped lazily
constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;
constexpr std::size_t kMaxDynamicSmem = 227 * 1024;       // sm_90 opt-in maximum
constexpr std::size_t kMaxStaticSmem = kWarp == 64 ? 64 * 1024 : 48 * 1024;
constexpr int kMaxThreadsPerBlock = 1024;

// ------------------------------------------------------------------------------------------
// Options
// ------------------------------------------------------------------------------------------
enum class Order { kForward, kReverse, kRandom };

struct Options {
  Order order = Order::kForward;
  unsigned seed = 0;
  bool reverse_blocks = false;
  std::string digest_path;
};

bool parse_schedule(const std::string& v, Options& r) {
  if (v == "forward" || v.empty()) {
    r.order = Order::kForward;
  } else if (v == "reverse") {
    r.order = Order::kReverse;
  } else if (v.rfind("random", 0) == 0) {
    r.order = Order::kRandom;
    r.seed = v.size() > 7 ? static_cast<unsigned>(std::strtoul(v.c_str() + 7, nullptr, 10)) : 1u;
  } else {
    return false;
  }
  return true;
}

Options& options() {
  static Options o = [] {
    Options r;
    if (const char* s = std::getenv("RETENTION_EMU_SCHEDULE"); s != nullptr && !parse_schedule(s, r)) {
      std::fprintf(stderr, "RETENTION_EMU_SCHEDULE must be forward, reverse or random:SEED (got '%s')\n", s);
      std::exit(2);
    }
    if (const char* s = std::getenv("RETENTION_EMU_BLOCK_ORDER")) {
      const std::string v = s;
      if (v != "forward" && v != "reverse" && !v.empty()) {
        std::fprintf(stderr, "RETENTION_EMU_BLOCK_ORDER must be forward or reverse (got '%s')\n", s);
        std::exit(2);
      }
      r.reverse_blocks = v == "reverse";
    }
    if (const char* s = std::getenv("RETENTION_EMU_DIGEST")) r.digest_path = s;
    return r;
  }();
  return o;
}

// ------------------------------------------------------------------------------------------
// Fibers
// ------------------------------------------------------------------------------------------
enum class State { kRunnable, kBarrier, kCollective, kDone };

struct Fiber {
  ThreadState ts{};
  bctx::fcontext_t ctx = nullptr;
  void* stack = nullptr;  // lowest address (a guard page), kStackBytes long
  State state = State::kDone;
  int order_pos = 0;        // position in the block's schedule
  const char* file = nullptr;  // where it waits (barrier / collective)
  int line = 0;
  const char* func = nullptr;
  const void* collective = nullptr;  // CollectiveFn of the collective it waits at
#if RETENTION_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct Warp {
  int lanes = 0;     // lanes of this warp that exist in the block
  int arrived = 0;   // at the pending collective
  CollectiveFn fn = nullptr;
  const char* what = nullptr;
  std::vector<unsigned char> in, out;
};

struct Block {
  std::vector<Fiber*> fibers;
  std::vector<int> order;  // fiber indices, schedule order
  std::vector<Warp> warps;
  std::map<const void*, void*> shared;
  std::size_t static_smem = 0;
  std::size_t dynamic_smem_declared = 0;
  int cursor = 0;  // scan position in `order`
  bool failed = false;
  bool asserted = false;  // failed at a device-side assert
  std::string message;
};

struct Launch {
  std::size_t dynamic_smem = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
};

std::vector<Fiber> g_pool;  // stacks are kept across launches
Block* g_block = nullptr;
Launch g_launch;
bctx::fcontext_t g_scheduler = nullptr;
#if RETENTION_EMU_ASAN
const void* g_sched_stack_bottom = nullptr;
std::size_t g_sched_stack_size = 0;
void* g_sched_fake_stack = nullptr;
#endif

std::map<const void*, int> g_max_dynamic_smem;
Error g_last_error = Error::kSuccess;
Error g_sticky_error = Error::kSuccess;
std::string g_last_message;

Fiber* current_fiber() { return reinterpret_cast<Fiber*>(g_thread); }  // ts is the first member

int thread_index(const Fiber* f) {
  return static_cast<int>(f->ts.idx.x + g_block_dim.x * (f->ts.idx.y + g_block_dim.y * f->ts.idx.z));
}

// The next fiber of the block's schedule that can run, or nullptr.
Fiber* next_runnable(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  while (b.cursor < n && b.fibers[b.order[b.cursor]]->state != State::kRunnable) ++b.cursor;
  return b.cursor < n ? b.fibers[b.order[b.cursor]] : nullptr;
}

// Every jump passes the fiber it leaves (nullptr: the scheduler) as data, so the side that
// resumes stores the suspended context where it belongs.
void note_suspended(const bctx::transfer_t& t) {
  if (t.data != nullptr) {
    static_cast<Fiber*>(t.data)->ctx = t.fctx;
  } else {
    g_scheduler = t.fctx;
  }
}

// The running fiber blocks (or ends): switch straight to the next runnable fiber of the
// schedule, or to the scheduler when there is none (it resolves barriers and the end of the
// block).  Direct switches halve the jumps of a warp collective.  Returns when resumed.
void switch_away() {
  Fiber* self = current_fiber();
  Fiber* next = g_block->failed ? nullptr : next_runnable(*g_block);
#if RETENTION_EMU_ASAN
  void** fake = self->state == State::kDone ? nullptr : &self->fake_stack;
  if (next != nullptr) {
    __sanitizer_start_switch_fiber(fake, static_cast<char*>(next->stack) + getpagesize(), kStackBytes - getpagesize());
  } else {
    __sanitizer_start_switch_fiber(fake, g_sched_stack_bottom, g_sched_stack_size);
  }
#endif
  g_thread = next != nullptr ? &next->ts : nullptr;
  const bctx::transfer_t t = bctx::jump_fcontext(next != nullptr ? next->ctx : g_scheduler, self);
  note_suspended(t);
#if RETENTION_EMU_ASAN
  __sanitizer_finish_switch_fiber(self->fake_stack, nullptr, nullptr);
#endif
}


void fiber_entry(bctx::transfer_t t) {
  note_suspended(t);
#if RETENTION_EMU_ASAN
  const void* from_bottom = nullptr;
  std::size_t from_size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &from_bottom, &from_size);
  if (t.data == nullptr) {  // entered from the scheduler: remember its stack
    g_sched_stack_bottom = from_bottom;
    g_sched_stack_size = from_size;
  }
#endif
  Fiber* self = current_fiber();
  g_launch.body(g_launch.ctx);
  self->state = State::kDone;
  switch_away();  // never resumed
  std::abort();
}

// Scheduler -> fiber; returns when some fiber switches back to the scheduler.
void resume(Fiber* f) {
  g_thread = &f->ts;
#if RETENTION_EMU_ASAN
  __sanitizer_start_switch_fiber(&g_sched_fake_stack, static_cast<char*>(f->stack) + getpagesize(),
                                 kStackBytes - getpagesize());
#endif
  const bctx::transfer_t t = bctx::jump_fcontext(f->ctx, nullptr);
  note_suspended(t);
#if RETENTION_EMU_ASAN
  const void* from_bottom = nullptr;
  std::size_t from_size = 0;
  __sanitizer_finish_switch_fiber(g_sched_fake_stack, &from_bottom, &from_size);
#endif
  g_thread = nullptr;
}

void ensure_pool(std::size_t n) {
  while (g_pool.size() < n) g_pool.emplace_back();
  for (std::size_t i = 0; i < n; ++i) {
    Fiber& f = g_pool[i];
    if (f.stack != nullptr) continue;
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("retention emu: mmap of a fiber stack");
      std::abort();
    }
    mprotect(p, getpagesize(), PROT_NONE);  // guard page: a stack overflow faults
    f.stack = p;
  }
}

std::string where(const Fiber* f) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s (%s:%d)", f->func ? f->func : "?", f->file ? f->file : "?", f->line);
  return buf;
}

std::string block_name() {
  char buf[96];
  std::snprintf(buf, sizeof buf, "block (%u, %u, %u)", g_block_idx.x, g_block_idx.y, g_block_idx.z);
  return buf;
}

void record_failure(const std::string& message) {
  if (g_block->failed) return;
  g_block->failed = true;
  g_block->message = "retention emu: " + block_name() + ": " + message;
}

void make_order(Block& b, unsigned phase) {
  const int n = static_cast<int>(b.fibers.size());
  b.order.resize(n);
  for (int i = 0; i < n; ++i) b.order[i] = i;
  const Options& o = options();
  if (o.order == Order::kReverse) {
    std::reverse(b.order.begin(), b.order.end());
  } else if (o.order == Order::kRandom) {
    std::mt19937 gen(o.seed * 2654435761u ^ (g_block_idx.x * 40503u + g_block_idx.y * 977u + phase * 7919u));
    std::shuffle(b.order.begin(), b.order.end(), gen);
  }
  for (int i = 0; i < n; ++i) b.fibers[b.order[i]]->order_pos = i;
  b.cursor = 0;
}

// All fibers are blocked or done: release a barrier, finish, or report why nothing can run.
// Returns false when the block is finished (or failed).
bool resolve_blocked(Block& b, unsigned& phase) {
  int done = 0, at_barrier = 0, at_collective = 0;
  const Fiber* first_barrier = nullptr;
  const Fiber* other_barrier = nullptr;
  const Fiber* first_done = nullptr;
  const Fiber* first_collective = nullptr;
  for (const Fiber* f : b.fibers) {
    if (f->state == State::kDone) {
      ++done;
      if (!first_done) first_done = f;
    } else if (f->state == State::kBarrier) {
      ++at_barrier;
      if (!first_barrier) {
        first_barrier = f;
      } else if (!other_barrier && (f->line != first_barrier->line || f->file != first_barrier->file)) {
        other_barrier = f;
      }
    } else if (f->state == State::kCollective) {
      ++at_collective;
      if (!first_collective) first_collective = f;
    }
  }
  const int n = static_cast<int>(b.fibers.size());
  if (done == n) return false;
  char buf[160];
  if (at_collective > 0) {
    const Fiber* c = first_collective;
    const Warp& w = b.warps[thread_index(c) / kWarp];
    std::snprintf(buf, sizeof buf, ": %d of %d lanes of warp %d arrived; ", w.arrived, w.lanes, thread_index(c) / kWarp);
    std::string msg = std::string("warp collective ") + (w.what ? w.what : "?") + " called from a diverged warp" + buf;
    for (const Fiber* f : b.fibers)
      if (thread_index(f) / kWarp == thread_index(c) / kWarp && f->state != State::kCollective) {
        msg += "thread " + std::to_string(thread_index(f)) +
               (f->state == State::kDone ? std::string(" has exited") : " waits at __syncthreads in " + where(f));
        break;
      }
    record_failure(msg);
    return false;
  }
  if (other_barrier) {
    record_failure("divergent __syncthreads: thread " + std::to_string(thread_index(first_barrier)) + " waits in " +
                   where(first_barrier) + ", thread " + std::to_string(thread_index(other_barrier)) + " in " +
                   where(other_barrier));
    return false;
  }
  if (done > 0) {
    record_failure("__syncthreads in " + where(first_barrier) + " is waited at by " + std::to_string(at_barrier) +
                   " threads while " + std::to_string(done) + " have exited (thread " +
                   std::to_string(thread_index(first_done)) + "): divergent barrier / early exit");
    return false;
  }
  // Everyone is at the same barrier: release it.
  for (Fiber* f : b.fibers) f->state = State::kRunnable;
  ++phase;
  if (options().order == Order::kRandom) {
    make_order(b, phase);
  } else {
    b.cursor = 0;
  }
  return true;
}

void run_block(Block& b, std::size_t nthreads) {
  ensure_pool(nthreads);
  b.fibers.clear();
  for (std::size_t i = 0; i < nthreads; ++i) {
    Fiber& f = g_pool[i];
    const unsigned t = static_cast<unsigned>(i);
    f.ts.idx = {t % g_block_dim.x, (t / g_block_dim.x) % g_block_dim.y, t / (g_block_dim.x * g_block_dim.y)};
    f.state = State::kRunnable;
    f.file = nullptr;
    f.func = nullptr;
    f.line = 0;
    // Stack tops staggered by a few cache lines: stacks 1 MiB apart would otherwise all map
    // to the same cache sets, and a warp collective touches 32-64 of them in a row.
    const std::size_t color = (i % 61) * 4 * 64;
    f.ctx = bctx::make_fcontext(static_cast<char*>(f.stack) + kStackBytes - color,
                                kStackBytes - getpagesize() - color, fiber_entry);
    b.fibers.push_back(&f);
  }
  const int nwarps = static_cast<int>((nthreads + kWarp - 1) / kWarp);
  b.warps.assign(nwarps, Warp{});
  for (int w = 0; w < nwarps; ++w) {
    b.warps[w].lanes = std::min<int>(kWarp, static_cast<int>(nthreads) - w * kWarp);
    b.warps[w].in.resize(kWarp * kSlotBytes);
    b.warps[w].out.resize(kWarp * kSlotBytes);
  }
  unsigned phase = 0;
  make_order(b, phase);

  while (!b.failed) {
    Fiber* next = next_runnable(b);
    if (next == nullptr) {
      if (!resolve_blocked(b, phase)) break;
      continue;
    }
    resume(next);
  }
#if RETENTION_EMU_ASAN
  if (b.failed)  // abandoned fibers leave poisoned stack frames behind
    for (Fiber* f : b.fibers) ASAN_UNPOISON_MEMORY_REGION(static_cast<char*>(f->stack) + getpagesize(), kStackBytes - getpagesize());
#endif
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Device-side entry points
// ------------------------------------------------------------------------------------------
void device_assert(const char* what, const char* file, int line) {
  char buf[512];
  std::snprintf(buf, sizeof buf, "device-side assert at %s:%d: %s", file, line, what);
  if (!g_block->failed) g_block->asserted = true;
  fail(buf);
}

Error sticky_error() { return g_sticky_error; }
void reset_device() { g_sticky_error = g_last_error = Error::kSuccess; }

void fail(const char* message) {
  Fiber* self = current_fiber();
  char buf[64];
  std::snprintf(buf, sizeof buf, "thread %d: ", thread_index(self));
  record_failure(buf + std::string(message));
  self->state = State::kBarrier;  // never released: the block is abandoned
  switch_away();
  std::abort();
}

void syncthreads(const char* file, int line, const char* func) {
  Fiber* self = current_fiber();
  self->state = State::kBarrier;
  self->file = file;
  self->line = line;
  self->func = func;
  switch_away();
}

void warp_collective(const char* what, CollectiveFn compute, const void* in, std::size_t in_bytes, void* out,
                     std::size_t out_bytes) {
  Fiber* self = current_fiber();
  Block& b = *g_block;
  const int t = thread_index(self), lane_index = t % kWarp;
  Warp& w = b.warps[t / kWarp];
  if (w.arrived > 0 && w.fn != compute) {
    record_failure(std::string("warp ") + std::to_string(t / kWarp) + ": lanes meet at different collectives (" +
                   w.what + " and " + what + ")");
    self->state = State::kBarrier;
    switch_away();
    std::abort();
  }
  w.fn = compute;
  w.what = what;
  std::memcpy(w.in.data() + lane_index * kSlotBytes, in, in_bytes);
  if (++w.arrived == w.lanes) {
    compute(w.in.data(), w.out.data(), w.lanes);
    w.arrived = 0;
    int first = b.cursor;
    const int lane0 = t - lane_index;  // fibers are stored in thread order
    for (int l = 0; l < w.lanes; ++l) {
      Fiber* f = b.fibers[lane0 + l];
      if (f->state != State::kCollective) continue;
      f->state = State::kRunnable;
      first = std::min(first, f->order_pos);
    }
    b.cursor = first;
  } else {
    self->state = State::kCollective;
    self->func = what;
    self->file = "warp collective";
    self->line = 0;
    switch_away();
  }
  std::memcpy(out, w.out.data() + lane_index * kSlotBytes, out_bytes);
}

void* block_shared(const void* site, std::size_t bytes, bool dynamic, const char* file, int line) {
  Block& b = *g_block;
  auto it = b.shared.find(site);
  if (it != b.shared.end()) return it->second;
  char buf[256];
  if (dynamic) {
    b.dynamic_smem_declared += bytes;
    if (b.dynamic_smem_declared > g_launch.dynamic_smem) {
      std::snprintf(buf, sizeof buf, "%s:%d: the kernel uses %zu bytes of dynamic shared memory, the launch gave %zu",
                    file, line, b.dynamic_smem_declared, g_launch.dynamic_smem);
      fail(buf);
    }
  } else {
    b.static_smem += bytes;
    if (b.static_smem > kMaxStaticSmem) {
      std::snprintf(buf, sizeof buf, "%s:%d: %zu bytes of static shared memory exceed the target's %zu", file, line,
                    b.static_smem, kMaxStaticSmem);
      fail(buf);
    }
  }
  void* p = std::malloc(bytes == 0 ? 1 : bytes);
  std::memset(p, 0xff, bytes);  // NaN in every floating-point type
  b.shared.emplace(site, p);
  return p;
}

// warp_size-wide ballot.
namespace {
void ballot_compute(const unsigned char* in, unsigned char* out, int lanes) {
  std::uint64_t mask = 0;
  for (int l = 0; l < lanes; ++l) {
    int pred;
    std::memcpy(&pred, in + l * kSlotBytes, sizeof pred);
    if (pred) mask |= std::uint64_t(1) << l;
  }
  for (int l = 0; l < lanes; ++l) std::memcpy(out + l * kSlotBytes, &mask, sizeof mask);
}
std::uint64_t ballot(int pred, const char* what) {
  const int p = pred != 0;
  std::uint64_t mask;
  warp_collective(what, ballot_compute, &p, sizeof p, &mask, sizeof mask);
  return mask;
}
}  // namespace

// ------------------------------------------------------------------------------------------
// Matrix cores: the lanes deposit their registers; one evaluation of the documented
// instruction (matrix_isa.h) computes every lane's accumulators.
// ------------------------------------------------------------------------------------------
namespace {

float f16(std::uint16_t b) { return kernels::host::f16_to_f32(b); }
float bf16(std::uint16_t b) { return kernels::host::bf16_to_f32(b); }

struct PtxIn {
  std::uint32_t a[4], b[2];
  float c[4];
};

template <float (*kDecode)(std::uint16_t)>
void ptx_compute(const unsigned char* in, unsigned char* out, int lanes) {
  using I = isa::PtxM16N8K16;
  float ra[32][8], rb[32][4], rc[32][4];
  for (int l = 0; l < lanes; ++l) {
    PtxIn x;
    std::memcpy(&x, in + l * kSlotBytes, sizeof x);
    // Element i of an operand is half (i & 1) of register i / 2, the lower index in the lower
    // 16 bits (PTX: ".f16x2 ... packed").
    for (int i = 0; i < 8; ++i) ra[l][i] = kDecode(static_cast<std::uint16_t>(x.a[i / 2] >> (16 * (i & 1))));
    for (int i = 0; i < 4; ++i) rb[l][i] = kDecode(static_cast<std::uint16_t>(x.b[i / 2] >> (16 * (i & 1))));
    for (int i = 0; i < 4; ++i) rc[l][i] = x.c[i];
  }
  I::execute(ra, rb, rc);
  for (int l = 0; l < lanes; ++l) std::memcpy(out + l * kSlotBytes, rc[l], sizeof rc[l]);
}

template <float (*kDecode)(std::uint16_t)>
void mma_m16n8k16(const char* what, float& c0, float& c1, float& c2, float& c3, const std::uint32_t (&a)[4],
                  std::uint32_t b0, std::uint32_t b1) {
  if (kWarp != 32) fail("mma.sync needs 32-lane warps");
  PtxIn x{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c0, c1, c2, c3}};
  float c[4];
  warp_collective(what, ptx_compute<kDecode>, &x, sizeof x, c, sizeof c);
  c0 = c[0];
  c1 = c[1];
  c2 = c[2];
  c3 = c[3];
}

struct MfmaIn {
  std::uint16_t a[4], b[4];
  float c[4];
};

template <float (*kDecode)(std::uint16_t)>
void mfma16_compute(const unsigned char* in, unsigned char* out, int lanes) {
  float ra[64][4], rb[64][4], rc[64][4];
  for (int l = 0; l < lanes; ++l) {
    MfmaIn x;
    std::memcpy(&x, in + l * kSlotBytes, sizeof x);
    for (int i = 0; i < 4; ++i) {
      ra[l][i] = kDecode(x.a[i]);
      rb[l][i] = kDecode(x.b[i]);
      rc[l][i] = x.c[i];
    }
  }
  isa::Mfma16x16x16::execute(ra, rb, rc);
  for (int l = 0; l < lanes; ++l) std::memcpy(out + l * kSlotBytes, rc[l], sizeof rc[l]);
}

template <float (*kDecode)(std::uint16_t)>
void mfma16(const char* what, float (&c)[4], const std::uint16_t (&a)[4], const std::uint16_t (&b)[4]) {
  if (kWarp != 64) fail("v_mfma needs 64-lane wavefronts");
  MfmaIn x;
  std::memcpy(x.a, a, sizeof x.a);
  std::memcpy(x.b, b, sizeof x.b);
  std::memcpy(x.c, c, sizeof x.c);
  warp_collective(what, mfma16_compute<kDecode>, &x, sizeof x, c, sizeof c);
}

struct MfmaF32In {
  float a, b, c[4];
};

void mfma_f32_compute(const unsigned char* in, unsigned char* out, int lanes) {
  float ra[64], rb[64], rc[64][4];
  for (int l = 0; l < lanes; ++l) {
    MfmaF32In x;
    std::memcpy(&x, in + l * kSlotBytes, sizeof x);
    ra[l] = x.a;
    rb[l] = x.b;
    std::memcpy(rc[l], x.c, sizeof rc[l]);
  }
  isa::Mfma16x16x4F32::execute(ra, rb, rc);
  for (int l = 0; l < lanes; ++l) std::memcpy(out + l * kSlotBytes, rc[l], sizeof rc[l]);
}

}  // namespace

void mma_m16n8k16_f16(float& c0, float& c1, float& c2, float& c3, const std::uint32_t (&a)[4], std::uint32_t b0,
                      std::uint32_t b1) {
  mma_m16n8k16<f16>("mma.sync.m16n8k16.f16", c0, c1, c2, c3, a, b0, b1);
}
void mma_m16n8k16_bf16(float& c0, float& c1, float& c2, float& c3, const std::uint32_t (&a)[4], std::uint32_t b0,
                       std::uint32_t b1) {
  mma_m16n8k16<bf16>("mma.sync.m16n8k16.bf16", c0, c1, c2, c3, a, b0, b1);
}
void mfma_16x16x16_f16(float (&c)[4], const std::uint16_t (&a)[4], const std::uint16_t (&b)[4]) {
  mfma16<f16>("v_mfma_f32_16x16x16f16", c, a, b);
}
void mfma_16x16x16_bf16(float (&c)[4], const std::uint16_t (&a)[4], const std::uint16_t (&b)[4]) {
  mfma16<bf16>("v_mfma_f32_16x16x16bf16_1k", c, a, b);
}
void mfma_16x16x4_f32(float (&c)[4], float a, float b) {
  if (kWarp != 64) fail("v_mfma needs 64-lane wavefronts");
  MfmaF32In x{a, b, {c[0], c[1], c[2], c[3]}};
  warp_collective("v_mfma_f32_16x16x4f32", mfma_f32_compute, &x, sizeof x, c, sizeof c);
}

// ------------------------------------------------------------------------------------------
// Host-side runtime
// ------------------------------------------------------------------------------------------
const char* error_string(Error e) {
  switch (e) {
    case Error::kSuccess:
      return "no error";
    case Error::kInvalidValue:
      return "invalid argument";
    case Error::kInvalidConfiguration:
    case Error::kLaunchFailure:
    case Error::kAssert:
      return g_last_message.c_str();
  }
  return "unknown error";
}

const char* last_message() { return g_last_message.c_str(); }

std::string set_schedule(const char* schedule) {
  Options& o = options();
  const std::string before = o.order == Order::kForward   ? "forward"
                             : o.order == Order::kReverse ? "reverse"
                                                          : "random:" + std::to_string(o.seed);
  if (!parse_schedule(schedule, o)) {
    std::fprintf(stderr, "retention emu: bad schedule '%s'\n", schedule);
    std::abort();
  }
  return before;
}

Error take_last_error() {
  const Error e = g_last_error;
  g_last_error = Error::kSuccess;
  return e;
}

Error set_max_dynamic_smem(const void* kernel_id, int bytes) {
  if (bytes < 0 || static_cast<std::size_t>(bytes) > kMaxDynamicSmem) return Error::kInvalidValue;
  g_max_dynamic_smem[kernel_id] = bytes;
  return Error::kSuccess;
}

Error launch_grid(dim3 grid, dim3 block, std::size_t dynamic_smem, const void* kernel_id, void (*body)(void*),
                  void* ctx) {
  if (g_sticky_error != Error::kSuccess) return g_last_error = g_sticky_error;
  const std::size_t nthreads = std::size_t(block.x) * block.y * block.z;
  std::size_t smem_limit = kDefaultDynamicSmem;
  if (auto it = g_max_dynamic_smem.find(kernel_id); it != g_max_dynamic_smem.end())
    smem_limit = std::max<std::size_t>(smem_limit, it->second);
  char buf[256];
  if (nthreads == 0 || nthreads > kMaxThreadsPerBlock || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || dynamic_smem > smem_limit) {
    std::snprintf(buf, sizeof buf,
                  "retention emu: invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of "
                  "dynamic shared memory (limit %zu)",
                  grid.x, grid.y, grid.z, block.x, block.y, block.z, dynamic_smem, smem_limit);
    g_last_message = buf;
    std::fprintf(stderr, "%s\n", buf);
    return g_last_error = Error::kInvalidConfiguration;
  }
  ++g_op_counts.launches;
  g_launch = {dynamic_smem, body, ctx};
  g_grid_dim = grid;
  g_block_dim = block;
  const std::size_t nblocks = std::size_t(grid.x) * grid.y * grid.z;
  Block b;
  Error result = Error::kSuccess;
  for (std::size_t i = 0; i < nblocks; ++i) {
    const std::size_t lin = options().reverse_blocks ? nblocks - 1 - i : i;
    g_block_idx = {static_cast<unsigned>(lin % grid.x), static_cast<unsigned>((lin / grid.x) % grid.y),
                   static_cast<unsigned>(lin / (std::size_t(grid.x) * grid.y))};
    b.failed = b.asserted = false;
    b.static_smem = b.dynamic_smem_declared = 0;
    g_block = &b;
    run_block(b, nthreads);
    for (auto& s : b.shared) std::free(s.second);
    b.shared.clear();
    g_block = nullptr;
    if (b.failed) {
      g_last_message = b.message;
      std::fprintf(stderr, "%s\n", b.message.c_str());
      result = b.asserted ? Error::kAssert : Error::kLaunchFailure;
      if (b.asserted) g_sticky_error = Error::kAssert;
      break;
    }
  }
  return g_last_error = result;
}

Error malloc_device(void** p, std::size_t bytes) {
  // 256-byte aligned like cudaMalloc, exactly `bytes` long (ASan's redzone starts right after).
  void* q = nullptr;
  if (posix_memalign(&q, 256, bytes == 0 ? 1 : bytes) != 0) return Error::kInvalidValue;
  std::memset(q, 0xa5, bytes);  // garbage, like fresh device memory (not zero)
  *p = q;
  return Error::kSuccess;
}

Error free_device(void* p) {
  std::free(p);
  return Error::kSuccess;
}

// ------------------------------------------------------------------------------------------
// Output digests
// ------------------------------------------------------------------------------------------
namespace {
std::string g_digest_test = "(none)";
int g_digest_count = 0;
}  // namespace

void digest_begin_test(const char* name) {
  g_digest_test = name;
  g_digest_count = 0;
}

OpCounts op_counts() { return g_op_counts; }
void count_upload() { ++g_op_counts.uploads; }
void count_memset() { ++g_op_counts.memsets; }

void record_download(const void* src, std::size_t bytes) {
  ++g_op_counts.downloads;
  const std::string& path = options().digest_path;
  if (path.empty()) return;
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  const unsigned char* s = static_cast<const unsigned char*>(src);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ s[i]) * 1099511628211ull;
  static FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) {
    std::perror(path.c_str());
    std::exit(2);
  }
  std::fprintf(f, "%s %d %zu %016llx\n", g_digest_test.c_str(), g_digest_count++, bytes,
               static_cast<unsigned long long>(h));
  std::fflush(f);
}

}  // namespace retention::emu

// ------------------------------------------------------------------------------------------
// CUDA / HIP intrinsics that are functions (host_emu.h)
// ------------------------------------------------------------------------------------------
#if RETENTION_EMU_WARP == 32
unsigned __ballot_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) retention::emu::fail("__ballot_sync: only the full lane mask is emulated");
  return static_cast<unsigned>(retention::emu::ballot(pred, "__ballot_sync"));
}
float __half2float(__half h) { return retention::kernels::host::f16_to_f32(h.bits); }
__half __float2half_rn(float f) { return {retention::kernels::host::f32_to_f16(f)}; }
__nv_bfloat16 __float2bfloat16_rn(float f) { return {retention::kernels::host::f32_to_bf16(f)}; }
#else
unsigned long long __ballot(int pred) { return retention::emu::ballot(pred, "__ballot"); }
#endif

// Integer atomicAdd (CUDA programming guide, "atomicAdd"; HIP the same): read-modify-write of
// one naturally aligned 32-bit word, returning the old value, modulo 2^32.  Blocks run one
// after another here and threads never run concurrently, so the read-modify-write is atomic by
// construction; what the hardware rejects is a misaligned address ("misaligned address" on
// CUDA, a memory fault on AMD), which stops the launch here too.
unsigned atomicAdd(unsigned* p, unsigned v) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(unsigned) != 0)
    retention::emu::fail("atomicAdd: misaligned address (32-bit atomics need 4-byte alignment)");
  const unsigned old = *p;
  *p = old + v;
  return old;
}

// __threadfence: device-scope fence (PTX fence.acq_rel.gpu / membar.gl; on CDNA a release
// (buffer_wbl2, s_waitcnt) plus an acquire (buffer_invl2 / vector-cache invalidate)).  It orders
// the calling thread's memory accesses as seen by other blocks.  In this model a block runs to
// completion before the next one starts and every store goes straight to memory, so all stores
// of earlier blocks are visible to later ones with or without the fence: the instruction is a
// no-op here, and a missing fence cannot be detected by running (the cross-block hand-offs of
// the kernels are reviewed for it instead).  What the model does exercise is the order: the
// block that draws the last ticket is the one that runs last, so RETENTION_EMU_BLOCK_ORDER
// changes which block finishes the work.
void __threadfence() {}

namespace retention::emu {
static_assert(sizeof(PtxIn) <= kSlotBytes && sizeof(MfmaIn) <= kSlotBytes && sizeof(MfmaF32In) <= kSlotBytes,
              "collective operands fit a slot");
}  // namespace retention::emu
