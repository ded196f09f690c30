// A CPU allocator for torch that keeps freed large blocks for the next request of about the same size.
//
// Why: layer-sequential pruning runs the same block forward over the same calibration batches block after block,
// so it asks for the same few large sizes (a batch's hidden state, its FFN intermediates) thousands of times.
// glibc serves them in one of two ways, both bad here: from its heap (the default, once its mmap threshold has
// risen), where the interleaved lifetimes of the batches fragment it and the resident peak grows by hundreds of MB
// of free but unreturnable pages; or from a fresh memory map per request (a fixed threshold), where every byte is
// faulted in and zeroed by the kernel again: 70 GB of page faults for one pruning run of the 135M default model.
// Here a freed block of at least `min_bytes` is kept (resident, no zeroing) for a later request of the same
// page-rounded size or up to an eighth smaller. Kept blocks are given back (least recently freed first) whenever
// keeping them would put the mapped total above the most that has been alive at once; a freed block only turns
// from live to kept, so this is checked when a block is mapped anew. The resident peak is then the peak of live
// memory, as with a map per request, without most of the faults. Smaller requests go to c10's own allocation
// functions.
//
// The allocator is installed for a scope (`recycle_large_allocations` / `stop_recycling`); blocks alive when the
// scope ends are returned to the system when freed.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace sf {
namespace {

class RecyclingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* ptr = n >= min_bytes_ ? take(round_to_pages(n)) : c10::alloc_cpu(n);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static RecyclingAllocator& instance() {
    static RecyclingAllocator allocator;  // never destroyed: blocks may be freed at interpreter exit
    return allocator;
  }

  void start(int64_t min_bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    min_bytes_ = size_t(std::max<int64_t>(min_bytes, 1));
    hits_ = misses_ = 0;
    max_live_ = mapped_bytes_ - kept_bytes_;
    active_ = true;
  }

  void stop() {
    std::lock_guard<std::mutex> lock(mutex_);
    active_ = false;
    min_bytes_ = SIZE_MAX;  // a request that arrives before torch sees the previous allocator again: not pooled
    while (!kept_.empty()) evict_oldest();
  }

  // [requests served from kept blocks, requests that mapped new memory, bytes kept now, bytes mapped now]
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(hits_), int64_t(misses_), int64_t(kept_bytes_), int64_t(mapped_bytes_)};
  }

 private:
  struct Kept {
    void* ptr;
    size_t bytes;
  };
  using Order = std::list<Kept>;  // least recently freed first

  static size_t round_to_pages(size_t n) {
    static const size_t page = size_t(sysconf(_SC_PAGESIZE));
    return (n + page - 1) / page * page;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // the smallest kept block that fits, if it is at most an eighth larger (SparseGPT's solve asks for a long
      // run of slowly shrinking sizes: each is served by the one freed before it)
      auto found = by_size_.lower_bound(bytes);
      if (found != by_size_.end() && found->first - bytes <= bytes / 8) {
        Order::iterator entry = found->second.back();
        void* ptr = entry->ptr;
        forget(found, entry);
        max_live_ = std::max(max_live_, mapped_bytes_ - kept_bytes_);
        ++hits_;
        return ptr;
      }
      ++misses_;
      // Mapping anew while other sizes are kept: if this is more than has ever been alive at once, those kept
      // blocks would raise the resident peak, so they go first (kept memory never exceeds the peak of live memory).
      max_live_ = std::max(max_live_, mapped_bytes_ - kept_bytes_ + bytes);
      while (kept_bytes_ > 0 && mapped_bytes_ + bytes > max_live_) evict_oldest();
    }
    void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(ptr != MAP_FAILED, "sparseforge: could not map ", bytes, " bytes: ", std::strerror(errno));
    std::lock_guard<std::mutex> lock(mutex_);
    mapped_[ptr] = bytes;
    mapped_bytes_ += bytes;
    return ptr;
  }

  static void release(void* ptr) { instance().give_back(ptr); }

  void give_back(void* ptr) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto found = mapped_.find(ptr);
    if (found == mapped_.end()) {
      lock.unlock();
      c10::free_cpu(ptr);
      return;
    }
    const size_t bytes = found->second;
    if (!active_) {
      unmap(found);
      return;
    }
    kept_.push_back({ptr, bytes});
    by_size_[bytes].push_back(std::prev(kept_.end()));
    kept_bytes_ += bytes;
  }

  void evict_oldest() {
    void* ptr = kept_.front().ptr;
    forget(by_size_.find(kept_.front().bytes), kept_.begin());
    unmap(mapped_.find(ptr));
  }

  // `entry` (in the list of its size, `same`) is no longer kept
  void forget(std::map<size_t, std::vector<Order::iterator>>::iterator same, Order::iterator entry) {
    auto& list = same->second;
    list.erase(std::find(list.begin(), list.end(), entry));
    if (list.empty()) by_size_.erase(same);
    kept_bytes_ -= entry->bytes;
    kept_.erase(entry);
  }

  void unmap(std::unordered_map<void*, size_t>::iterator entry) {
    munmap(entry->first, entry->second);
    mapped_bytes_ -= entry->second;
    mapped_.erase(entry);
  }

  std::mutex mutex_;
  bool active_ = false;
  std::atomic<size_t> min_bytes_{SIZE_MAX};  // read without the lock by every allocation
  Order kept_;
  std::map<size_t, std::vector<Order::iterator>> by_size_;
  std::unordered_map<void*, size_t> mapped_;  // every live or kept block of ours, with its size
  size_t kept_bytes_ = 0, mapped_bytes_ = 0, max_live_ = 0, hits_ = 0, misses_ = 0;
};

c10::Allocator* previous = nullptr;

bool recycle_large_allocations(int64_t min_bytes) {
  RecyclingAllocator& pool = RecyclingAllocator::instance();
  if (c10::GetCPUAllocator() != &pool) previous = c10::GetCPUAllocator();
  pool.start(min_bytes);
  c10::SetCPUAllocator(&pool, /*priority=*/UINT8_MAX);
  return c10::GetCPUAllocator() == &pool;
}

void stop_recycling() {
  RecyclingAllocator& pool = RecyclingAllocator::instance();
  if (previous != nullptr && c10::GetCPUAllocator() == &pool) c10::SetCPUAllocator(previous, UINT8_MAX);
  pool.stop();
}

std::vector<int64_t> recycling_stats() { return RecyclingAllocator::instance().stats(); }

}  // namespace
}  // namespace sf

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, lib) {
  lib.def("recycle_large_allocations(int min_bytes) -> bool", &sf::recycle_large_allocations);
  lib.def("stop_recycling() -> ()", &sf::stop_recycling);
  lib.def("recycling_stats() -> int[]", &sf::recycling_stats);
}
