// The CUDA emulator's scheduler (see include/cuda_runtime.h): blocks run one
// after another; a block's threads are fibers on one OS thread, switched
// cooperatively at barriers (x86-64: a six-register switch that keeps each
// fiber's MXCSR and x87 control word; elsewhere ucontext). Each warp runs
// until none of its lanes can move, then the next warp (forward order in even
// blocks, backward in odd ones). A pass in which no thread moves is a
// deadlock, reported with the threads that never arrived.
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <exception>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace qwix_emu {
namespace {

#if defined(__x86_64__)
// switch_stack(save, next): saves the callee-saved registers, MXCSR, the x87
// control word and the stack pointer into *save, then resumes the context
// whose stack pointer is next.
extern "C" void qwix_emu_switch_stack(void** save, void* next);
asm(R"(
  .text
  .globl qwix_emu_switch_stack
  .hidden qwix_emu_switch_stack
  .type qwix_emu_switch_stack, @function
qwix_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size qwix_emu_switch_stack, .-qwix_emu_switch_stack
)");
#endif

constexpr size_t kStackBytes = 256 << 10;  // generous: ASan builds use much more stack
constexpr unsigned kWarp = 32;

enum class Where { Running, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  char* stack = nullptr;  // the usable stack (above its guard page)
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  Where where = Where::Running;
  uint64_t shuffled = 0;   // the value its last shuffle received
  bool shuffled_ok = false;  // whether the source lane took part
};

// One shuffle in progress in a warp: the lanes of `mask` that arrived, their values and sources.
struct Shuffle {
  bool active = false;
  unsigned mask = 0, arrived = 0, generation = 0;
  std::array<uint64_t, kWarp> value{};
  std::array<unsigned, kWarp> src{};
};

struct Warp {
  unsigned first = 0, present = 0, exited = 0;
  std::array<Shuffle, kWarp> shuffles;  // at most one per waiting lane
};

struct Block {
  dim3 dims;
  unsigned n = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  unsigned block_arrived = 0, block_generation = 0;
  unsigned current = 0;
  bool progress = false;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;  // the first fault of a thread
  size_t usable_stack = 0;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
#if defined(__SANITIZE_ADDRESS__)
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

Block* g_block = nullptr;
uint64_t g_block_serial = 0;  // counts blocks run, for the per-block __shared__ fill
std::unordered_map<void*, uint64_t> g_shared_filled;
std::recursive_mutex g_launch_mutex;  // one launch at a time (coordinates, __shared__ are global); recursive: a launch from a kernel fails clearly
thread_local std::exception_ptr t_last_error;

// The 3-D index of the block's t-th thread (x fastest, as CUDA numbers them).
dim3 index_of(unsigned t) {
  const dim3 d = g_block->dims;
  return dim3(t % d.x, t / d.x % d.y, t / (d.x * d.y));
}

void set_thread_index(unsigned t) { threadIdx = index_of(t); }

void to_scheduler(bool exiting) {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.current];
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, b.scheduler_stack, b.scheduler_stack_size);
#else
  (void)exiting;
#endif
#if defined(__x86_64__)
  qwix_emu_switch_stack(&f.sp, b.scheduler_sp);
#else
  swapcontext(&f.ctx, &b.scheduler);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  set_thread_index(g_block->current);
}

void to_fiber(Block& b, unsigned t) {
  b.current = t;
  set_thread_index(t);
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, b.fibers[t].stack, b.usable_stack);
#endif
#if defined(__x86_64__)
  qwix_emu_switch_stack(&b.scheduler_sp, b.fibers[t].sp);
#else
  swapcontext(&b.scheduler, &b.fibers[t].ctx);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Completes shuffle s once every non-exited lane of its mask has arrived: each
// arrived lane receives its source lane's value (if that lane took part).
void try_complete(Block& b, Warp& w, Shuffle& s) {
  const unsigned need = s.mask & w.present & ~w.exited;
  if (!s.active || (s.arrived & need) != need) return;
  for (unsigned lane = 0; lane < kWarp; ++lane) {
    if ((s.arrived >> lane & 1u) == 0) continue;
    Fiber& f = b.fibers[w.first + lane];
    f.shuffled_ok = (s.arrived >> s.src[lane] & 1u) != 0;
    f.shuffled = s.value[s.src[lane]];
  }
  s.active = false;
  s.arrived = 0;
  ++s.generation;
  b.progress = true;
}

void thread_entry() {
  Block& b = *g_block;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  set_thread_index(b.current);
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  const unsigned t = b.current;
  b.fibers[t].where = Where::Done;
  b.progress = true;
  Warp& w = b.warps[t / kWarp];
  w.exited |= 1u << (t % kWarp);
  for (Shuffle& s : w.shuffles) try_complete(b, w, s);  // lanes may wait for this one no longer
  to_scheduler(/*exiting=*/true);
  __builtin_trap();  // a finished fiber is never resumed
}

// A finished fiber's last frames (thread_entry, to_scheduler) never return, so
// their ASan redzones stay in the shadow memory: clear them (near the top of the
// stack; deeper frames returned) before the stack is reused.
void clear_stack_shadow(Fiber& f, size_t usable) {
#if defined(__SANITIZE_ADDRESS__)
  constexpr size_t kTop = 16 << 10;
  ASAN_UNPOISON_MEMORY_REGION(f.stack + usable - kTop, kTop);
#else
  (void)f, (void)usable;
#endif
}

#if defined(__x86_64__)
void start_fiber(Fiber& f, size_t usable) {
  // The initial frame qwix_emu_switch_stack pops: MXCSR and the x87 control word
  // (this thread's), six registers, then the return address (thread_entry),
  // entered with the stack aligned as after a call.
  auto top = reinterpret_cast<uintptr_t>(f.stack + usable) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top - 8);
  *sp = nullptr;  // no caller above thread_entry
  *--sp = reinterpret_cast<void*>(&thread_entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;
  --sp;
  uint32_t csr;
  uint16_t cw;
  asm volatile("stmxcsr %0" : "=m"(csr));
  asm volatile("fnstcw %0" : "=m"(cw));
  std::memcpy(reinterpret_cast<char*>(sp), &csr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &cw, 2);
  f.sp = sp;
}
#else
void start_fiber(Fiber& f, size_t usable) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = usable;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &thread_entry, 0);
}
#endif

// Waits (yielding) until `generation` moves past the value it had on arrival.
void wait_for(const unsigned& generation, unsigned arrived_at, Where where) {
  Fiber& f = g_block->fibers[g_block->current];
  f.where = where;
  while (generation == arrived_at) to_scheduler(false);
  f.where = Where::Running;
}

std::string coords(unsigned t) {
  const dim3 i = index_of(t);
  std::ostringstream s;
  s << "(" << i.x << "," << i.y << "," << i.z << ")";
  return s.str();
}

std::string deadlock_report(const Block& b) {
  std::ostringstream s;
  unsigned at_block = 0, at_warp = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    at_block += f.where == Where::AtBlockBarrier;
    at_warp += f.where == Where::AtWarpBarrier;
    done += f.where == Where::Done;
  }
  s << "qwix CUDA emulator: deadlock in block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z
    << "): " << at_block << " threads wait at __syncthreads and " << at_warp << " at a shuffle that " << done
    << " exited threads never reach; e.g.";
  int shown = 0;
  for (unsigned t = 0; t < b.n && shown < 4; ++t) {
    if (b.fibers[t].where == Where::Done) {
      s << " thread " << coords(t) << " exited";
      ++shown;
    }
  }
  return s.str();
}

// The fiber stacks of a launch, each above a guard page (an overflow faults
// instead of writing into the neighbouring stack).
struct Stacks {
  char* base = nullptr;
  size_t bytes = 0, page = 0;
  explicit Stacks(unsigned n) : page(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    bytes = size_t(n) * kStackBytes;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "qwix CUDA emulator: cannot map ", bytes, " bytes of fiber stacks");
    base = static_cast<char*>(p);
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(base, bytes);  // whatever used these addresses before left no poison
#endif
    for (unsigned t = 0; t < n; ++t) mprotect(base + size_t(t) * kStackBytes, page, PROT_NONE);
  }
  char* usable(unsigned t) const { return base + size_t(t) * kStackBytes + page; }
  ~Stacks() {
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(base, bytes);  // the next mapping at these addresses starts clean
#endif
    munmap(base, bytes);
  }
};

void check_config(dim3 grid, dim3 block) {
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535,
              "qwix CUDA emulator: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z,
              "): each dimension >= 1, x < 2^31, y and z <= 65535");
  TORCH_CHECK(n >= 1 && n <= 1024 && block.z <= 64, "qwix CUDA emulator: invalid block (", block.x, ", ", block.y,
              ", ", block.z, "): 1 to 1024 threads, z <= 64");
}

// Runs every block of the grid; the first thread fault is rethrown.
void run_blocks(dim3 grid, dim3 block, const std::function<void()>& thread_body) {
  const unsigned n = block.x * block.y * block.z;
  Stacks stacks(n);
  Block b;
  b.dims = block;
  b.n = n;
  b.fibers.resize(n);
  b.body = &thread_body;
  b.usable_stack = kStackBytes - stacks.page;
  const unsigned warps = (n + kWarp - 1) / kWarp;
  b.warps.resize(warps);
  gridDim = grid;
  blockDim = block;
  g_block = &b;
  struct Reset {
    ~Reset() { g_block = nullptr; }
  } reset;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        ++g_block_serial;
        b.block_arrived = 0;
        for (unsigned w = 0; w < warps; ++w) {
          const unsigned lanes = std::min(kWarp, n - w * kWarp);
          b.warps[w] = Warp{};
          b.warps[w].first = w * kWarp;
          b.warps[w].present = lanes == kWarp ? 0xffffffffu : (1u << lanes) - 1u;
        }
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = b.fibers[t];
          f = Fiber{};
          f.stack = stacks.usable(t);
          clear_stack_shadow(f, b.usable_stack);
          start_fiber(f, b.usable_stack);
        }
        const bool backward = (g_block_serial & 1u) == 0;
        for (unsigned live = n; live > 0;) {
          bool moved_any = false;
          for (unsigned i = 0; i < warps; ++i) {
            const Warp& w = b.warps[backward ? warps - 1 - i : i];
            for (bool moved = true; moved;) {  // the warp runs ahead until none of its lanes can move
              b.progress = false;
              for (unsigned t = w.first; t < std::min(n, w.first + kWarp); ++t) {
                if (b.fibers[t].where != Where::Done) to_fiber(b, t);
                if (b.error) std::rethrow_exception(b.error);
              }
              moved = b.progress;
              moved_any |= moved;
            }
          }
          live = 0;
          for (const Fiber& f : b.fibers) live += f.where != Where::Done;
          TORCH_CHECK(live == 0 || moved_any, deadlock_report(b));
        }
      }
    }
  }
}

}  // namespace

[[noreturn]] void fault(const char* what) { throw std::runtime_error(std::string("qwix CUDA emulator: ") + what); }

void block_barrier() {
  Block& b = *g_block;
  b.progress = true;
  const unsigned generation = b.block_generation;
  if (++b.block_arrived == b.n) {
    b.block_arrived = 0;
    ++b.block_generation;
    return;
  }
  wait_for(b.block_generation, generation, Where::AtBlockBarrier);
}

uint64_t warp_exchange(unsigned mask, uint64_t mine, unsigned src) {
  Block& b = *g_block;
  const unsigned t = b.current, lane = t % kWarp;
  Warp& w = b.warps[t / kWarp];
  if ((mask >> lane & 1u) == 0) {
    std::ostringstream s;
    s << "shuffle mask 0x" << std::hex << mask << std::dec << " of thread " << coords(t)
      << " leaves out the calling lane " << lane;
    fault(s.str().c_str());
  }
  // The lanes of one mask meet in one Shuffle (lanes of different masks shuffle independently).
  Shuffle* s = nullptr;
  for (Shuffle& c : w.shuffles) {
    if (c.active && c.mask == mask) s = &c;
  }
  if (s == nullptr) {
    s = &*std::find_if(w.shuffles.begin(), w.shuffles.end(), [](const Shuffle& c) { return !c.active; });
    s->active = true;
    s->mask = mask;
  }
  s->value[lane] = mine;
  s->src[lane] = src;
  s->arrived |= 1u << lane;
  b.progress = true;
  const unsigned generation = s->generation;
  try_complete(b, w, *s);
  wait_for(s->generation, generation, Where::AtWarpBarrier);
  const Fiber& f = b.fibers[t];
  if (!f.shuffled_ok) {
    std::ostringstream m;
    m << "thread " << coords(t) << " shuffles (mask 0x" << std::hex << mask << std::dec << ") from lane " << src
      << ", which takes no part (exited, absent or outside the mask): its value is undefined on a GPU";
    fault(m.str().c_str());
  }
  return f.shuffled;
}

void check_launch_bounds(long long max_threads) {
  const long long n = static_cast<long long>(blockDim.x) * blockDim.y * blockDim.z;
  if (n > max_threads) {
    std::ostringstream s;
    s << "kernel launched with " << n << " threads per block, over its __launch_bounds__(" << max_threads
      << "): a GPU refuses the launch";
    fault(s.str().c_str());
  }
}

void shared_garbage(void* p, size_t bytes) {
  uint64_t& filled = g_shared_filled[p];
  if (filled != g_block_serial) {
    std::memset(p, 0xA5, bytes);
    filled = g_block_serial;
  }
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body) {
  const std::lock_guard<std::recursive_mutex> lock(g_launch_mutex);
  TORCH_CHECK(g_block == nullptr, "qwix CUDA emulator: a kernel launched from inside a kernel");
  if (t_last_error) {
    std::string what = "(unknown)";
    try {
      std::rethrow_exception(t_last_error);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    t_last_error = nullptr;
    TORCH_CHECK(false, "qwix CUDA emulator: an earlier launch failed and no C10_CUDA_KERNEL_LAUNCH_CHECK raised it: ",
                what);
  }
  try {
    check_config(grid, block);
    run_blocks(grid, block, thread_body);
  } catch (...) {
    t_last_error = std::current_exception();
  }
}

void check_last_launch() {
  if (!t_last_error) return;
  std::exception_ptr e = t_last_error;
  t_last_error = nullptr;
  std::rethrow_exception(e);
}

}  // namespace qwix_emu
