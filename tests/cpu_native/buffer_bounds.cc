// Runs cnnjax's oneDNN convolutions and max-pools over a sweep of geometries with every buffer (XLA's operands and
// results, and the handler's per-thread scratchpads) ending at an unmapped page, the bytes between its end and the
// page filled with a pattern: a read or write past the page faults, a write short of it changes the pattern. Exits
// 0 with "no access outside any buffer", else 1 (or 2 on a fault) naming the geometry. Built by tests/test_cpu_build.py:
//   g++ -O1 -std=c++17 -I<jax ffi include> -Icnnjax/cpu tests/cpu_native/buffer_bounds.cc -ldnnl -lgomp
// Single-threaded: the handler is called without XLA's pool, so every batch slice runs on this thread.
#define CNNJAX_ONEDNN_TEST_BUFFERS
#include "onednn_kernels.cc"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

constexpr unsigned char kPattern = 0xA5;

// One guarded buffer: [p, p + bytes) in use, [p + bytes, end) patterned, an unmapped page at `end`.
struct Guarded {
  char* map;
  size_t map_bytes;
  char* p;
  size_t bytes;
  char* end;
  std::string what;
};

std::vector<Guarded>& Live() {
  static std::vector<Guarded> live;
  return live;
}

std::string current;  // the geometry being run, for the reports

void* Allocate(size_t bytes, const std::string& what) {
  const size_t page = sysconf(_SC_PAGESIZE), rounded = std::max<size_t>((bytes + 63) / 64 * 64, 64);
  const size_t pages = (rounded + page - 1) / page;
  auto* map = static_cast<char*>(mmap(nullptr, (pages + 1) * page, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (map == MAP_FAILED) {
    std::fprintf(stderr, "mmap failed\n");
    std::exit(3);
  }
  char* end = map + pages * page;
  mprotect(end, page, PROT_NONE);
  char* p = end - rounded;  // 64-byte aligned, as oneDNN wants
  std::memset(map, 0, p - map);
  std::memset(p + bytes, kPattern, end - (p + bytes));
  Live().push_back({map, (pages + 1) * page, p, bytes, end, what});
  return p;
}

// Reports every live buffer whose pattern changed, then unmaps them all. Returns the number of reports.
int CheckAndFree() {
  int reports = 0;
  for (auto& b : Live()) {
    for (char* q = b.p + b.bytes; q < b.end; ++q) {
      if (static_cast<unsigned char>(*q) != kPattern) {
        std::printf("WRITE PAST THE END: %s wrote byte %td of %s, which has %zu\n", current.c_str(), q - b.p,
                    b.what.c_str(), b.bytes);
        ++reports;
        break;
      }
    }
    munmap(b.map, b.map_bytes);
  }
  Live().clear();
  return reports;
}

void OnFault(int, siginfo_t* info, void*) {
  auto* addr = static_cast<char*>(info->si_addr);
  for (auto& b : Live())
    if (addr >= b.end && addr < b.end + sysconf(_SC_PAGESIZE))
      std::printf("FAULT: %s touched byte %td of %s, which has %zu\n", current.c_str(), addr - b.p, b.what.c_str(),
                  b.bytes);
  std::printf("FAULT at %p in %s\n", static_cast<void*>(addr), current.c_str());
  std::fflush(stdout);
  _exit(2);
}

}  // namespace

namespace {
void* TestThreadBuffer(int which, size_t bytes) { return Allocate(bytes, "thread buffer " + std::to_string(which)); }
}  // namespace

namespace {

int64_t OutSize(int64_t in, int64_t k, int64_t s, int64_t lo, int64_t hi, int64_t d) {
  const int64_t extent = (k - 1) * d + 1;
  return in + lo + hi < extent ? 0 : (in + lo + hi - extent) / s + 1;
}

struct Counts {
  int runs = 0, reports = 0;
};

void RunConv(memory::data_type dt, int64_t batch, int64_t h, int64_t w, int64_t ci, int64_t co, int64_t k,
             int64_t s, int64_t lo, int64_t hi, int64_t d, Counts* counts) {
  const int64_t ho = OutSize(h, k, s, lo, hi, d), wo = OutSize(w, k, s, lo, hi, d);
  if (ho <= 0 || wo <= 0) return;
  const size_t es = memory::data_type_size(dt);
  const Geometry g{{batch, ci, h, w}, {co, ci, k, k}, {batch, co, ho, wo}, {s, s}, {d - 1, d - 1}, {lo, lo},
                   {hi, hi}};
  // Kind 2 once for each path a kernel gradient may be asked to take (wgrad 0 native, 1 forward, 2 matmul).
  for (int run = 0; run < 5; ++run) {
    const int kind = std::min(run, 2), wgrad = std::max(run - 2, 0);
    current = std::string(dt == memory::data_type::f32 ? "float32" : "bfloat16") + " conv kind " +
              std::to_string(kind) + " (wgrad " + std::to_string(wgrad) + ") x [" + std::to_string(batch) + "," +
              std::to_string(h) + "," + std::to_string(w) + "," + std::to_string(ci) + "] -> " + std::to_string(co) +
              ", kernel " + std::to_string(k) + ", stride " + std::to_string(s) + ", pads " + std::to_string(lo) +
              "/" + std::to_string(hi) + ", dilation " + std::to_string(d);
    void* x = Allocate(batch * h * w * ci * es, "x");
    void* wt = Allocate(k * k * ci * co * es, "w");
    void* y = Allocate(batch * ho * wo * co * es, "y");
    auto status = Execute(nullptr, kind, dt, g, x, wt, y, static_cast<Wgrad>(wgrad));
    if (status.failure()) {
      std::printf("ERROR: %s failed\n", current.c_str());
      ++counts->reports;
    }
    counts->reports += CheckAndFree();
    ++counts->runs;
  }
}

void RunPool(memory::data_type dt, int64_t batch, int64_t h, int64_t c, int64_t k, int64_t s, int64_t lo,
             int64_t hi, Counts* counts) {
  const int64_t ho = OutSize(h, k, s, lo, hi, 1);
  if (ho <= 0 || lo >= k || hi >= k) return;
  const size_t es = memory::data_type_size(dt);
  const PoolGeometry g{{batch, c, h, h}, {batch, c, ho, ho}, {k, k}, {s, s}, {lo, lo}, {hi, hi}};
  for (bool backward : {false, true}) {
    current = std::string(dt == memory::data_type::f32 ? "float32" : "bfloat16") + " max-pool " +
              (backward ? "backward" : "forward") + " x [" + std::to_string(batch) + "," + std::to_string(h) +
              "," + std::to_string(h) + "," + std::to_string(c) + "], window " + std::to_string(k) + ", stride " +
              std::to_string(s) + ", pads " + std::to_string(lo) + "/" + std::to_string(hi);
    const size_t ws_bytes = batch * ho * ho * c;
    void* src = Allocate(batch * h * h * c * es, backward ? "dx" : "x");
    void* dst = Allocate(ws_bytes * es, backward ? "g" : "y");
    void* ws = Allocate(ws_bytes, "workspace");
    auto status = ExecutePool(nullptr, backward, dt, g, src, dst, ws, ws_bytes);
    if (status.failure()) {
      std::printf("ERROR: %s failed\n", current.c_str());
      ++counts->reports;
    }
    counts->reports += CheckAndFree();
    ++counts->runs;
  }
}

// The pattern check itself: a write one byte past a buffer must be reported.
bool SelfCheck() {
  current = "self-check";
  static_cast<char*>(Allocate(100, "probe"))[100] = 0;
  const int reports = CheckAndFree();
  std::printf("self-check: a write one byte past a buffer gave %d report(s)\n", reports);
  return reports == 1;
}

}  // namespace

int main() {
  struct sigaction action = {};
  action.sa_sigaction = OnFault;
  action.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &action, nullptr);
  sigaction(SIGBUS, &action, nullptr);
  if (!SelfCheck()) return 1;
  std::vector<memory::data_type> dtypes = {memory::data_type::f32};
  if (Bf16Primitives()) dtypes.push_back(memory::data_type::bf16);
  Counts conv, pool;
  for (auto dt : dtypes) {
    for (int64_t hw : {1, 2, 7, 8, 11})
      for (int64_t ci : {1, 2, 3, 5, 8, 16})
        for (int64_t k : {1, 2, 3, 5})
          for (int64_t s : {1, 2, 3})
            for (auto pads : {std::pair<int64_t, int64_t>{0, 0}, {1, 1}, {0, 1}})
              for (int64_t d : {1, 2})
                RunConv(dt, 3, hw, hw, ci, ci == 16 ? 24 : ci + 3, k, s, pads.first, pads.second, d, &conv);
    // Shapes of the zoo: LeNet's and SimpleCNN's greyscale convs, fast_cnn's whitening and widest convs, a ResNet
    // stem and its projection shortcuts.
    RunConv(dt, 3, 32, 32, 1, 6, 5, 1, 0, 0, 1, &conv);
    RunConv(dt, 3, 28, 28, 1, 16, 3, 1, 1, 1, 1, &conv);
    RunConv(dt, 3, 32, 32, 3, 24, 2, 1, 0, 0, 1, &conv);
    RunConv(dt, 3, 15, 15, 64, 256, 3, 1, 1, 1, 1, &conv);
    RunConv(dt, 2, 64, 64, 3, 64, 7, 2, 3, 3, 1, &conv);
    RunConv(dt, 2, 56, 56, 64, 128, 1, 2, 0, 0, 1, &conv);
    RunConv(dt, 2, 28, 28, 128, 256, 1, 2, 0, 0, 1, &conv);
    for (int64_t hw : {2, 7, 8})
      for (int64_t c : {1, 3, 16})
        for (int64_t k : {2, 3})
          for (int64_t s : {1, 2})
            for (auto pads : {std::pair<int64_t, int64_t>{0, 0}, {1, 1}, {0, 1}})
              RunPool(dt, 3, hw, c, k, s, pads.first, pads.second, &pool);
  }
  std::printf("checked %d convolution and %d max-pool executions in %zu dtype(s): ", conv.runs, pool.runs,
              dtypes.size());
  if (conv.reports + pool.reports > 0) {
    std::printf("%d with an access outside a buffer\n", conv.reports + pool.reports);
    return 1;
  }
  std::printf("no access outside any buffer\n");
  return 0;
}
