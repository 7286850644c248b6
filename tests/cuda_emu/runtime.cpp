// The CUDA emulator's scheduler (see include/cuda_runtime.h): blocks run one
// after another; a block's threads are fibers on one OS thread, switched
// cooperatively at barriers (x86-64: a six-register switch; elsewhere
// ucontext). A barrier waits for every thread of its block (__syncthreads) or
// warp (shuffles); a round in which no waiting thread can move is a deadlock,
// reported as an error naming the threads that never arrived.
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <sstream>
#include <string>
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
// switch_stack(save, next): saves the callee-saved registers and the stack
// pointer into *save, then resumes the context whose stack pointer is next.
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
  movq %rsp, (%rdi)
  movq %rsi, %rsp
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
  char* stack = nullptr;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  Where where = Where::Running;
  unsigned phase = 0;  // which exchange buffer the thread's next shuffle uses
};

struct Block {
  dim3 dims;
  unsigned n = 0;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> slots[2];  // shuffle exchange buffers, double-buffered
  unsigned block_arrived = 0, block_generation = 0;
  std::vector<unsigned> warp_arrived, warp_generation;
  unsigned current = 0;
  bool progress = false;
  const std::function<void()>* body = nullptr;
  std::string error;  // set by a thread that faulted (e.g. a shuffle with a missing lane)
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

void set_thread_index(unsigned t) {
  const dim3 d = g_block->dims;
  threadIdx = dim3(t % d.x, t / d.x % d.y, t / (d.x * d.y));
}

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
  __sanitizer_start_switch_fiber(&fake, b.fibers[t].stack, kStackBytes);
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

void thread_entry() {
  Block& b = *g_block;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack, &b.scheduler_stack_size);
#endif
  set_thread_index(b.current);
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  }
  b.fibers[b.current].where = Where::Done;
  b.progress = true;
  to_scheduler(/*exiting=*/true);
  __builtin_trap();  // a finished fiber is never resumed
}

// A finished fiber's last frames (thread_entry, to_scheduler) never return, so
// their ASan redzones stay in the shadow memory: clear them (near the top of the
// stack; deeper frames returned) before the stack is reused.
void clear_stack_shadow(Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  constexpr size_t kTop = 16 << 10;
  ASAN_UNPOISON_MEMORY_REGION(f.stack + kStackBytes - kTop, kTop);
#else
  (void)f;
#endif
}

#if defined(__x86_64__)
void start_fiber(Fiber& f) {
  // The initial frame qwix_emu_switch_stack pops: six registers, then the return
  // address (thread_entry), entered with the stack aligned as after a call.
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top - 8);
  *sp = nullptr;  // no caller above thread_entry
  *--sp = reinterpret_cast<void*>(&thread_entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;
  f.sp = sp;
}
#else
void start_fiber(Fiber& f) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
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
  const dim3 d = g_block->dims;
  std::ostringstream s;
  s << "(" << t % d.x << "," << t / d.x % d.y << "," << t / (d.x * d.y) << ")";
  return s.str();
}

std::string deadlock_report(const Block& b) {
  std::ostringstream s;
  s << "qwix CUDA emulator: deadlock in block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z
    << "): threads wait at a barrier that other threads never reach (";
  unsigned waiting = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    waiting += f.where == Where::AtBlockBarrier || f.where == Where::AtWarpBarrier;
    done += f.where == Where::Done;
  }
  s << waiting << " waiting, " << done << " exited; e.g.";
  int shown = 0;
  for (unsigned t = 0; t < b.n && shown < 4; ++t) {
    if (b.fibers[t].where == Where::Done) {
      s << " thread " << coords(t) << " exited";
      ++shown;
    }
  }
  s << ")";
  return s.str();
}

struct Stacks {
  char* base = nullptr;
  size_t bytes = 0;
  explicit Stacks(unsigned n) : bytes(size_t(n) * kStackBytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "qwix CUDA emulator: cannot map ", bytes, " bytes of fiber stacks");
    base = static_cast<char*>(p);
  }
  ~Stacks() {
#if defined(__SANITIZE_ADDRESS__)
    ASAN_UNPOISON_MEMORY_REGION(base, bytes);  // the next mapping at these addresses starts clean
#endif
    munmap(base, bytes);
  }
};

}  // namespace

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
  const unsigned t = b.current, warp = t / kWarp, first = warp * kWarp;
  const unsigned lanes = std::min(kWarp, b.n - first);
  const unsigned present = lanes == kWarp ? 0xffffffffu : (1u << lanes) - 1u;
  if ((mask & ~present) != 0 || (mask & (1u << (t % kWarp))) == 0 || (mask & (1u << src)) == 0) {
    std::ostringstream s;
    s << "qwix CUDA emulator: shuffle mask 0x" << std::hex << mask << std::dec << " of thread " << coords(t)
      << " names lanes its warp does not have (" << lanes << " lanes) or leaves out the caller or source lane " << src;
    throw std::runtime_error(s.str());
  }
  Fiber& f = b.fibers[t];
  const unsigned phase = f.phase;
  f.phase ^= 1u;
  b.slots[phase][t] = mine;
  b.progress = true;
  // A barrier of the warp's lanes (every lane's value is published before any is read;
  // the other buffer takes the next shuffle, so no lane overwrites a value still unread).
  const unsigned generation = b.warp_generation[warp];
  if (++b.warp_arrived[warp] == lanes) {
    b.warp_arrived[warp] = 0;
    ++b.warp_generation[warp];
  } else {
    wait_for(b.warp_generation[warp], generation, Where::AtWarpBarrier);
  }
  return b.slots[phase][first + src];
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& thread_body) {
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535,
              "qwix CUDA emulator: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z,
              "): each dimension >= 1, x < 2^31, y and z <= 65535");
  TORCH_CHECK(n >= 1 && n <= 1024 && block.z <= 64, "qwix CUDA emulator: invalid block (", block.x, ", ", block.y,
              ", ", block.z, "): 1 to 1024 threads, z <= 64");
  TORCH_CHECK(g_block == nullptr, "qwix CUDA emulator: a kernel launched from inside a kernel");
  Stacks stacks(static_cast<unsigned>(n));
  Block b;
  b.dims = block;
  b.n = static_cast<unsigned>(n);
  b.fibers.resize(n);
  b.slots[0].resize(n);
  b.slots[1].resize(n);
  b.body = &thread_body;
  const unsigned warps = (b.n + kWarp - 1) / kWarp;
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
        b.block_arrived = 0;
        b.warp_arrived.assign(warps, 0);
        b.warp_generation.assign(warps, 0);
        for (unsigned t = 0; t < b.n; ++t) {
          Fiber& f = b.fibers[t];
          f = Fiber{};
          f.stack = stacks.base + size_t(t) * kStackBytes;
          clear_stack_shadow(f);
          start_fiber(f);
        }
        for (unsigned live = b.n; live > 0;) {
          b.progress = false;
          for (unsigned t = 0; t < b.n; ++t) {
            if (b.fibers[t].where != Where::Done) to_fiber(b, t);
            TORCH_CHECK(b.error.empty(), b.error);
          }
          live = 0;
          for (const Fiber& f : b.fibers) live += f.where != Where::Done;
          TORCH_CHECK(live == 0 || b.progress, deadlock_report(b));
        }
      }
    }
  }
}

}  // namespace qwix_emu
