// The multi-tensor work table shared by the fused optimizer kernels (docs/architecture.md, "Design
// contracts", and docs/cpu-kernels.md), and what the kernels need around it: tensor checks, a layout
// every kernel can stream and deterministic lane sums.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace curvkern {

// One tensor's elements [start, start + length) inside one work unit.
struct Segment {
  int64_t tensor;
  int64_t start;
  int64_t length;
};

// The tensors of a list laid end to end and cut every `chunk` elements into work units, so a unit
// may hold the tail of one tensor and the heads of the next ones: a thousand small tensors cost the
// same per byte as one large one. A unit's segments are consecutive, and so are a tensor's, which
// lets per-tensor sums be reduced from per-segment partials in a fixed order: the result does not
// depend on how many threads ran the units. Empty tensors have no segment.
class ChunkTable {
 public:
  ChunkTable(const std::vector<int64_t>& numels, int64_t chunk) : tensor_first_(numels.size() + 1) {
    int64_t offset = 0;  // position in the concatenation
    for (size_t t = 0; t < numels.size(); ++t) {
      tensor_first_[t] = static_cast<int64_t>(segments_.size());
      for (int64_t start = 0; start < numels[t];) {
        const int64_t unit = offset / chunk;
        const int64_t length = std::min(numels[t] - start, (unit + 1) * chunk - offset);
        if (unit_first_.size() <= static_cast<size_t>(unit))
          unit_first_.push_back(static_cast<int64_t>(segments_.size()));
        segments_.push_back({static_cast<int64_t>(t), start, length});
        start += length;
        offset += length;
      }
    }
    tensor_first_[numels.size()] = static_cast<int64_t>(segments_.size());
    unit_first_.push_back(static_cast<int64_t>(segments_.size()));
  }

  int64_t num_units() const { return static_cast<int64_t>(unit_first_.size()) - 1; }
  int64_t num_segments() const { return static_cast<int64_t>(segments_.size()); }
  const Segment& segment(int64_t s) const { return segments_[s]; }
  // Segments [unit_begin(u), unit_begin(u + 1)) form unit u.
  int64_t unit_begin(int64_t u) const { return unit_first_[u]; }
  // Segments [tensor_begin(t), tensor_begin(t + 1)) cover tensor t.
  int64_t tensor_begin(int64_t t) const { return tensor_first_[t]; }

  // Per-tensor sums of per-segment partials (`width` values per segment), in segment order.
  std::vector<double> reduce_per_tensor(const std::vector<double>& partials, int width) const {
    const int64_t num_tensors = static_cast<int64_t>(tensor_first_.size()) - 1;
    std::vector<double> sums(num_tensors * width, 0.0);
    for (int64_t t = 0; t < num_tensors; ++t) {
      for (int64_t s = tensor_first_[t]; s < tensor_first_[t + 1]; ++s) {
        for (int k = 0; k < width; ++k) sums[t * width + k] += partials[s * width + k];
      }
    }
    return sums;
  }

 private:
  std::vector<Segment> segments_;
  std::vector<int64_t> unit_first_;
  std::vector<int64_t> tensor_first_;
};

// Calls body(s, table.segment(s)) for the segments s of work unit `unit`, in order.
template <typename Body>
CURVKERN_INLINE void for_each_segment(const ChunkTable& table, int64_t unit, Body&& body) {
  for (int64_t s = table.unit_begin(unit); s < table.unit_begin(unit + 1); ++s) body(s, table.segment(s));
}

// Elements per work unit: 16 Ki elements keep a unit's arrays (up to eight of them) within a
// core's L2 cache while leaving thousands of units to share between threads at 40 M elements.
constexpr int64_t kChunkElements = 16384;

// Sums in kLanes independent accumulators, lane l taking the elements i ≡ l (mod kLanes), folded in
// a fixed tree: the same bits from the AVX-512, AVX2 and baseline clones (which would each reduce in
// a different order if left to `omp simd reduction`). A lane adds in the state type S over a stage
// of kStageBlocks blocks, then into float64: nearly float64 accuracy at the cost of S additions.
constexpr int kLanes = 16;
constexpr int64_t kStageBlocks = 16;

// The lanes of S one vector register of `vector_bytes` holds, at most kLanes: stream_and_sum's group width.
template <typename S>
constexpr int lanes_per_register(std::size_t vector_bytes) {
  return static_cast<int>(std::min<std::size_t>(kLanes, vector_bytes / sizeof(S)));
}

template <int kWidth, typename S>
struct LaneSums {
  S staged[kWidth][kLanes] = {};
  double lane[kWidth][kLanes] = {};

  void flush() {
    for (int k = 0; k < kWidth; ++k) {
      for (int l = 0; l < kLanes; ++l) {
        lane[k][l] += static_cast<double>(staged[k][l]);
        staged[k][l] = S(0);
      }
    }
  }

  // The totals, folded pairwise (lane l with l + 8, then + 4, + 2, + 1).
  void fold(double* out) {
    flush();
    for (int k = 0; k < kWidth; ++k) {
      double v[kLanes];
      for (int l = 0; l < kLanes; ++l) v[l] = lane[k][l];
      for (int half = kLanes / 2; half > 0; half /= 2) {
        for (int l = 0; l < half; ++l) v[l] += v[l + half];
      }
      out[k] = v[0];
    }
  }
};

// How far ahead the passes prefetch each array they stream. On this project's benchmark machine (a VM)
// the hardware prefetcher falls behind any loop with real work per element: reading gradients for
// Σ|tanh g| ran at 2.4 ns per element from DRAM and 0.6 from cache, and at 0.6 from DRAM with
// software prefetches 4 KiB ahead.
constexpr int64_t kPrefetchElements = 1024;

// Calls body(i, l) for every i in [0, n), l being i's lane: blocks of kLanes elements go through one
// vector loop (a lane can own an accumulator), the tail to the first lanes. Before each block,
// prefetch(i + kPrefetchElements) requests the arrays ahead.
template <typename Prefetch, typename Body>
CURVKERN_INLINE void stream_in_blocks(int64_t n, Prefetch&& prefetch, Body&& body) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch(i + kPrefetchElements);
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) body(i + l, l);
  }
  for (int l = 0; i + l < n; ++l) body(i + l, l);
}

// stream_and_sum for a body with a cheap form that holds for some inputs only (BiostatisV6's |tanh g|,
// a short polynomial while every |g| is small): each stage, and the tail, calls
// body(i, acc, l, std::true_type{}) for its elements where cheap_form_holds(begin, length) is true of
// elements [begin, begin + length), and body(i, acc, l, std::false_type{}) otherwise. The choice depends on
// the stage's elements only, not on the ISA or the thread count: every version still computes the same bits.
template <int kGroupLanes, int kWidth, typename S, typename Prefetch, typename CheapFormHolds, typename Body>
CURVKERN_INLINE void stream_and_sum_in_two_forms(int64_t n, LaneSums<kWidth, S>& sums, Prefetch&& prefetch,
                                                 CheapFormHolds&& cheap_form_holds, Body&& body) {
  static_assert(kGroupLanes > 0 && kLanes % kGroupLanes == 0, "a lane group must divide kLanes");
  constexpr int64_t kStage = kStageBlocks * kLanes;
  auto stage = [&](int64_t base, auto form) CURVKERN_INLINE_LAMBDA {
    for (int group = 0; group < kLanes; group += kGroupLanes) {
      S acc[kWidth][kGroupLanes] = {};  // the stage's first additions: staged is 0 after each flush
      for (int64_t block = base + group; block < base + kStage; block += kLanes) {
#pragma omp simd
        for (int l = 0; l < kGroupLanes; ++l) body(block + l, acc, l, form);
      }
      for (int k = 0; k < kWidth; ++k) {
        for (int l = 0; l < kGroupLanes; ++l) sums.staged[k][group + l] = acc[k][l];
      }
    }
  };
  auto tail = [&](int64_t base, auto form) CURVKERN_INLINE_LAMBDA {
    stream_in_blocks(
        n - base, [&](int64_t ahead) CURVKERN_INLINE_LAMBDA { prefetch(base + ahead); },
        [&](int64_t i, int l) CURVKERN_INLINE_LAMBDA { body(base + i, sums.staged, l, form); });
  };
  int64_t base = 0;
  for (; base + kStage <= n; base += kStage) {
    for (int64_t block = 0; block < kStage; block += kLanes) prefetch(base + block + kPrefetchElements);
    if (cheap_form_holds(base, kStage)) {
      stage(base, std::true_type{});
    } else {
      stage(base, std::false_type{});
    }
    sums.flush();
  }
  if (cheap_form_holds(base, n - base)) {
    tail(base, std::true_type{});
  } else {
    tail(base, std::false_type{});
  }
  sums.flush();
}

// stream_in_blocks over [0, n) for a body that adds element i into lane l of an accumulator array,
// body(i, acc, l) with acc[k][l] (sum k), flushed to float64 every stage.
// kGroupLanes (a divisor of kLanes) is how many lanes one vector register of the calling ISA holds:
// within a stage, each group of lanes walks all the stage's blocks in a local array before the next
// group starts, so one register per sum is live. With all 16 lanes at once, AVX2 needs two registers
// per sum, and pass A's six sums, two each, plus its constants outgrow the 16 registers and spill on
// every block. Every lane still adds its elements in the same order: the same bits for any group width.
template <int kGroupLanes, int kWidth, typename S, typename Prefetch, typename Body>
CURVKERN_INLINE void stream_and_sum(int64_t n, LaneSums<kWidth, S>& sums, Prefetch&& prefetch, Body&& body) {
  stream_and_sum_in_two_forms<kGroupLanes>(
      n, sums, prefetch, [](int64_t, int64_t) CURVKERN_INLINE_LAMBDA { return false; },
      [&](int64_t i, auto& acc, int l, auto) CURVKERN_INLINE_LAMBDA { body(i, acc, l); });
}

// The one dtype a list of parameters (or gradients) shares; one the kernels are built for.
inline at::ScalarType common_dtype(at::TensorList tensors, const char* op, const char* what) {
  TORCH_CHECK(!tensors.empty(), op, ": expected at least one tensor");
  const at::ScalarType dtype = tensors[0].scalar_type();
  TORCH_CHECK(is_kernel_dtype(dtype), op, ": expected float16, bfloat16, float32 or float64 ", what, ", got ", dtype);
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.scalar_type() == dtype, op, ": all ", what, " of a group must share one dtype, got ", dtype, " and ",
                t.scalar_type(), "; put parameters of different dtypes in different param groups");
  }
  return dtype;
}

// A parameter's optimizer state has the dtype its arithmetic runs in: fp32 for bf16 and fp16 parameters.
inline void check_state(const at::Tensor& state, at::ScalarType param_dtype, const char* op, const char* name) {
  const at::ScalarType state_dtype = opmath_dtype(param_dtype);
  TORCH_CHECK(state.scalar_type() == state_dtype, op, ": ", name, " of a ", param_dtype, " parameter must be ",
              state_dtype, ", got ", state.scalar_type());
}

// The optimizers' lr arrives as a tensor (a float becomes one in the wrapper) so a scheduler may keep
// it in one; its value is read here, on the host, and used as the double a Python float would be.
inline double learning_rate(const at::Tensor& lr, const char* op) {
  TORCH_CHECK(lr.device().is_cpu() && lr.numel() == 1 && lr.is_floating_point(), op,
              ": lr must be a 1-element floating-point CPU tensor, got ", lr.sizes(), " ", lr.scalar_type(), " on ",
              lr.device());
  return lr.item<double>();
}

inline std::vector<int64_t> numels_of(at::TensorList tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const at::Tensor& t : tensors) numels.push_back(t.numel());
  return numels;
}

// Checks one element of a multi-tensor call (a parameter, its gradient and its state tensors) and
// makes it streamable: the kernels walk each tensor's storage in memory order, which needs every
// tensor of the element dense, non-overlapping and with the parameter's strides. An element that is
// not (a sliced parameter, a gradient in another memory format, state loaded in another layout) is
// handed to the kernel as contiguous copies, and the mutated ones are copied back afterwards.
class StreamableTensors {
 public:
  explicit StreamableTensors(const char* op) : op_(op) {}

  // `mutated` are written by the kernel; `read` only read. Returns them in streamable form, in order.
  std::vector<at::Tensor> prepare(int64_t index, const std::vector<at::Tensor>& mutated,
                                  const std::vector<at::Tensor>& read) {
    const at::Tensor& reference = mutated.empty() ? read.front() : mutated.front();
    bool streamable = reference.is_non_overlapping_and_dense();
    for (const auto* list : {&mutated, &read}) {
      for (const at::Tensor& t : *list) {
        TORCH_CHECK(t.device().is_cpu(), op_, ": expected CPU tensors, got one on ", t.device(), " (tensor ", index,
                    ")");
        TORCH_CHECK(t.sizes() == reference.sizes(), op_, ": tensor ", index, " has shape ", reference.sizes(),
                    " but one of its companions has shape ", t.sizes());
        streamable = streamable && t.strides() == reference.strides();
      }
    }
    std::vector<at::Tensor> out;
    out.reserve(mutated.size() + read.size());
    for (const at::Tensor& t : mutated) {
      if (streamable) {
        out.push_back(t);
      } else {
        at::Tensor copy = t.contiguous();
        if (!copy.is_same(t)) write_back_.emplace_back(t, copy);
        out.push_back(copy);
      }
    }
    for (const at::Tensor& t : read) out.push_back(streamable ? t : t.contiguous());
    return out;
  }

  void write_back() {
    for (auto& [original, copy] : write_back_) original.copy_(copy);
    write_back_.clear();
  }

 private:
  const char* op_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;
};

}  // namespace curvkern
