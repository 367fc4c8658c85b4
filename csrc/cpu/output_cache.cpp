// The output cache (output_cache.h): a c10::Allocator whose freed blocks wait, per size, for the next output of
// that size (or of up to half less), up to COMPRESSM_CPU_CACHE_MB of idle memory; past it the longest-idle blocks
// are freed.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <pthread.h>

#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <vector>

namespace compressm::cpu {
namespace {

// Smaller tensors come from torch's allocator: below glibc's initial mmap threshold, blocks come from its free
// lists (no fresh pages), and a tensor that small faults in a few dozen pages at most.
constexpr size_t kMinBytes = size_t{128} << 10;
constexpr size_t kPage = 4096;  // blocks are whole pages, so near sizes share them
constexpr int64_t kDefaultLimitMB = 512;

int64_t limit_from_env() {
  const char* env = std::getenv("COMPRESSM_CPU_CACHE_MB");
  if (env == nullptr || env[0] == '\0') return kDefaultLimitMB << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                    "COMPRESSM_CPU_CACHE_MB must be a whole number of MB (0 turns the cache off), got '", env, "'");
  return static_cast<int64_t>(mb) << 20;
}

struct Block {
  void* data;
  size_t bytes;
  uint64_t freed_at = 0;  // when it last became idle, for evicting the longest idle first
};

class OutputCache final : public c10::Allocator {
 public:
  // Never destroyed: a tensor may be freed after static destructors have run.
  static OutputCache& get() {
    static auto* cache = [] {
      auto* c = new OutputCache(limit_from_env());
      // fork() (a DataLoader's workers) while another thread held the lock would leave the child's copy locked
      // for good: the fork waits for the lock, and both sides release it.
      pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); }, [] { get().mutex_.unlock(); });
      return c;
    }();
    return *cache;
  }

  int64_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kPage - 1) / kPage * kPage;
    Block* block = take(bytes);
    if (block == nullptr) block = new Block{fresh(bytes), bytes};
    report(block, static_cast<int64_t>(block->bytes));
    return {block->data, block, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  OutputCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t blocks = 0;
    for (const auto& [bytes, list] : idle_) blocks += static_cast<int64_t>(list.size());
    return {live_bytes_, static_cast<int64_t>(idle_bytes_), blocks, limit_, hits_, misses_};
  }

  void empty() {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [bytes, list] : idle_) freed.insert(freed.end(), list.begin(), list.end());
      idle_.clear();
      idle_bytes_ = 0;
    }
    for (Block* b : freed) destroy(b);
  }

 private:
  explicit OutputCache(int64_t limit) : limit_(limit) {}

  // An idle block for `bytes`, or nullptr: the most recently freed of exactly that size (its pages the likeliest
  // still in cache), else of the next size up to twice it, so that shapes that change from step to step (another L
  // each batch) reuse the blocks of earlier ones instead of leaving them idle.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = idle_.lower_bound(bytes);
    if (it == idle_.end() || it->first / 2 > bytes) {
      ++misses_;
      return nullptr;
    }
    Block* b = it->second.back();
    it->second.pop_back();
    if (it->second.empty()) idle_.erase(it);
    idle_bytes_ -= b->bytes;
    ++hits_;
    return b;
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    get().report(b, -static_cast<int64_t>(b->bytes));
    get().put(b);
  }

  // torch.profiler(profile_memory=True) sees these tensors as it sees those of torch's CPU allocator.
  void report(const Block* b, int64_t delta) {
    int64_t live, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ += delta;
      live = live_bytes_, reserved = live_bytes_ + static_cast<int64_t>(idle_bytes_);
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(b->data, delta, live, reserved, c10::Device(c10::DeviceType::CPU));
    }
  }

  void put(Block* b) {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (b->bytes > static_cast<size_t>(limit_)) {
        freed.push_back(b);
      } else {
        while (idle_bytes_ + b->bytes > static_cast<size_t>(limit_)) freed.push_back(pop_longest_idle());
        b->freed_at = ++clock_;
        idle_[b->bytes].push_back(b);
        idle_bytes_ += b->bytes;
      }
    }
    for (Block* f : freed) destroy(f);  // outside the lock: returning pages to the OS can take a while
  }

  // New memory; when there is none left, the idle blocks are freed and it is tried once more (as a GPU caching
  // allocator does before it reports out of memory).
  void* fresh(size_t bytes) {
    try {
      return c10::alloc_cpu(bytes);
    } catch (const c10::Error&) {
      empty();
      return c10::alloc_cpu(bytes);
    }
  }

  // Each size's list is in the order its blocks were freed, so the longest idle is one of the fronts.
  Block* pop_longest_idle() {
    auto oldest = idle_.begin();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->second.front()->freed_at < oldest->second.front()->freed_at) oldest = it;
    }
    Block* b = oldest->second.front();
    oldest->second.pop_front();
    if (oldest->second.empty()) idle_.erase(oldest);
    idle_bytes_ -= b->bytes;
    return b;
  }

  static void destroy(Block* b) {
    c10::free_cpu(b->data);
    delete b;
  }

  const int64_t limit_;
  std::mutex mutex_;
  std::map<size_t, std::deque<Block*>> idle_;  // by size, oldest first
  size_t idle_bytes_ = 0;  // cached
  int64_t live_bytes_ = 0;  // in tensors
  uint64_t clock_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  if (bytes < kMinBytes || OutputCache::get().limit() == 0) {
    return at::empty(sizes, options.memory_format(c10::MemoryFormat::Contiguous));
  }
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::MemoryFormat::Contiguous);
}

OutputCacheInfo output_cache_info() { return OutputCache::get().info(); }

void empty_output_cache() { OutputCache::get().empty(); }

}  // namespace compressm::cpu
