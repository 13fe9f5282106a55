// Large outputs a kernel is about to write fault in as 2 MiB pages rather than 4 KiB ones, where Linux
// transparent huge pages run in "madvise" mode (the common default). A fresh output is untouched
// memory, and on the benchmark VM faulting in 206 MB took 42 ms with 4 KiB pages and 16 ms with 2 MiB
// pages, longer than the kernel itself. Only the kernel's paging advice changes, never a value.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace curvkern {

inline void prefer_huge_pages(const at::Tensor& output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (!output.device().is_cpu() || !output.is_contiguous()) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(output.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (start + output.numel() * output.element_size()) & ~(kHugePage - 1);
  // Advice only: a failure (THP disabled, an old kernel) leaves the pages as they were.
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)output;
#endif
}

}  // namespace curvkern
