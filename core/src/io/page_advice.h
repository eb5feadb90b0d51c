#pragma once
// madvise over the whole pages inside [begin, begin + bytes): the pages a range shares with its
// neighbours are left alone. Internal to libneva_core (safetensors.cpp, weights.cpp).
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

namespace neva::detail {

inline void advise_whole_pages(const void* begin, std::size_t bytes, int advice) {
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto start = reinterpret_cast<std::uintptr_t>(begin);
  const std::uintptr_t first = (start + page - 1) / page * page, last = (start + bytes) / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, advice);
}

}  // namespace neva::detail
