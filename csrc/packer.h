// Trajectory packer core of spyglass (no Python here; bound in bindings.cpp).
//
// Packs variable-length sequences into micro-batches of at most `max_tokens` tokens for varlen
// (unpadded) attention. Planning (`pack_bins`) is deterministic and documented in packer.cpp:
// first-fit-decreasing fixes the smallest count, the count is raised to `min_micro_batches` and
// rounded up to a multiple of `multiple_of` (data-parallel ranks), then worst-fit-decreasing
// balances the tokens over that many micro-batches. `fill_micro_batch` writes one micro-batch's
// flat buffers into caller-owned memory (numpy arrays allocated by the bindings: zero copy).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace spyglass {

struct PackOptions {
  int64_t max_tokens = 0;         // >= 1
  int64_t min_micro_batches = 1;  // >= 1
  int64_t multiple_of = 1;        // >= 1: the count is padded to a multiple of it
  bool allow_oversize = false;    // a sequence > max_tokens gets its own micro-batch
};

// Input indices per micro-batch, each list ascending. Throws std::invalid_argument naming the
// offending sequence or value.
std::vector<std::vector<int64_t>> pack_bins(const int64_t* lengths, size_t n,
                                            const PackOptions& options);

// Writes one micro-batch (sequences `bin`, in order) into the output buffers:
// input_ids/loss_mask/position_ids/seq_index [T], cu_seqlens [B+1]. `offsets` [n] gives each
// sequence's start in the flat `tokens`/`masks`. Returns the longest sequence length.
int64_t fill_micro_batch(const std::vector<int64_t>& bin, const int64_t* tokens,
                         const uint8_t* masks, const int64_t* offsets, const int64_t* lengths,
                         int64_t* input_ids, uint8_t* loss_mask, int64_t* position_ids,
                         int32_t* cu_seqlens, int64_t* seq_index);

}  // namespace spyglass
