// Trajectory packer core: see packer.h. The plan, step by step (the Python reference in
// engine/packer_ref.py follows the same steps and must give identical bins):
//   1. Sequences longer than max_tokens are an error naming the first one, or, with
//      allow_oversize, each becomes a micro-batch of its own (appended last, by index).
//   2. The rest, ordered by (length descending, index ascending), go through first-fit-decreasing
//      (leftmost micro-batch with room; a segment tree over remaining room makes it O(n log n)):
//      its count m0 is the smallest this plan uses.
//   3. The target count m = max(m0 + oversize, min_micro_batches) rounded up to a multiple of
//      multiple_of; m larger than the number of sequences is an error (no empty micro-batches).
//   4. Worst-fit-decreasing over the m - oversize micro-batches (each sequence, same order, goes
//      to the least-loaded one, ties to the lowest position) balances the tokens. If a sequence
//      does not fit there, the first-fit-decreasing bins are kept and split up to the count:
//      repeatedly the micro-batch with the most sequences (then most tokens, then lowest
//      position) gives its shortest sequence (ties: highest index) to a new micro-batch.
//   5. Each micro-batch lists its input indices ascending.
#include "packer.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>

namespace spyglass {

namespace {

using Bins = std::vector<std::vector<int64_t>>;

// Max-segment tree over the remaining room of opened bins (unopened leaves hold 0).
class RoomTree {
 public:
  explicit RoomTree(size_t leaves) {
    size_ = 1;
    while (size_ < leaves) size_ <<= 1;
    tree_.assign(2 * size_, 0);
  }
  // Leftmost leaf with room >= need, or -1.
  int64_t leftmost(int64_t need) const {
    if (tree_[1] < need) return -1;
    size_t node = 1;
    while (node < size_) node = tree_[2 * node] >= need ? 2 * node : 2 * node + 1;
    return static_cast<int64_t>(node - size_);
  }
  void set(size_t leaf, int64_t room) {
    size_t node = leaf + size_;
    tree_[node] = room;
    for (node >>= 1; node >= 1; node >>= 1) {
      tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
    }
  }

 private:
  size_t size_;
  std::vector<int64_t> tree_;
};

Bins first_fit_decreasing(const std::vector<int64_t>& order, const int64_t* lengths,
                          int64_t max_tokens) {
  Bins bins;
  std::vector<int64_t> room;
  RoomTree tree(std::max<size_t>(order.size(), 1));
  for (int64_t idx : order) {
    const int64_t len = lengths[idx];
    int64_t b = tree.leftmost(len);
    if (b < 0) {
      b = static_cast<int64_t>(bins.size());
      bins.emplace_back();
      room.push_back(max_tokens);
    }
    bins[b].push_back(idx);
    room[b] -= len;
    tree.set(static_cast<size_t>(b), room[b]);
  }
  return bins;
}

// False when some sequence does not fit the least-loaded bin.
bool worst_fit_decreasing(const std::vector<int64_t>& order, const int64_t* lengths,
                          int64_t max_tokens, size_t count, Bins* out) {
  using Entry = std::pair<int64_t, size_t>;  // (load, bin position)
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (size_t b = 0; b < count; ++b) heap.emplace(0, b);
  Bins bins(count);
  for (int64_t idx : order) {
    const int64_t len = lengths[idx];
    Entry top = heap.top();
    if (top.first + len > max_tokens) return false;
    heap.pop();
    bins[top.second].push_back(idx);
    heap.emplace(top.first + len, top.second);
  }
  *out = std::move(bins);
  return true;
}

void split_to(Bins* bins, size_t count, const int64_t* lengths) {
  while (bins->size() < count) {
    size_t best = bins->size();
    int64_t best_tokens = -1;
    for (size_t b = 0; b < bins->size(); ++b) {
      const auto& bin = (*bins)[b];
      if (bin.size() < 2) continue;
      int64_t tokens = 0;
      for (int64_t idx : bin) tokens += lengths[idx];
      if (best == bins->size() || bin.size() > (*bins)[best].size() ||
          (bin.size() == (*bins)[best].size() && tokens > best_tokens)) {
        best = b;
        best_tokens = tokens;
      }
    }
    if (best == bins->size()) throw std::logic_error("packer: no micro-batch left to split");
    auto& bin = (*bins)[best];
    size_t pick = 0;
    for (size_t j = 1; j < bin.size(); ++j) {
      const int64_t lj = lengths[bin[j]], lp = lengths[bin[pick]];
      if (lj < lp || (lj == lp && bin[j] > bin[pick])) pick = j;
    }
    const int64_t moved = bin[pick];
    bin.erase(bin.begin() + static_cast<std::ptrdiff_t>(pick));
    bins->push_back({moved});
  }
}

void check_options(const PackOptions& o) {
  if (o.max_tokens < 1) {
    throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(o.max_tokens));
  }
  if (o.min_micro_batches < 1) {
    throw std::invalid_argument("min_micro_batches must be >= 1, got " +
                                std::to_string(o.min_micro_batches));
  }
  if (o.multiple_of < 1) {
    throw std::invalid_argument("multiple_of must be >= 1, got " + std::to_string(o.multiple_of));
  }
}

}  // namespace

Bins pack_bins(const int64_t* lengths, size_t n, const PackOptions& options) {
  check_options(options);
  if (n == 0) throw std::invalid_argument("no sequences to pack");
  std::vector<int64_t> order, oversize;
  for (size_t i = 0; i < n; ++i) {
    if (lengths[i] < 1) {
      throw std::invalid_argument("sequence " + std::to_string(i) + " is empty (length " +
                                  std::to_string(lengths[i]) + ")");
    }
    if (lengths[i] > options.max_tokens) {
      if (!options.allow_oversize) {
        throw std::invalid_argument(
            "sequence " + std::to_string(i) + " has " + std::to_string(lengths[i]) +
            " tokens > max_tokens " + std::to_string(options.max_tokens) +
            " (allow_oversize=True gives it a micro-batch of its own)");
      }
      oversize.push_back(static_cast<int64_t>(i));
    } else {
      order.push_back(static_cast<int64_t>(i));
    }
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  Bins ffd = first_fit_decreasing(order, lengths, options.max_tokens);
  const int64_t k = static_cast<int64_t>(oversize.size());
  int64_t m = std::max<int64_t>(static_cast<int64_t>(ffd.size()) + k, options.min_micro_batches);
  m = (m + options.multiple_of - 1) / options.multiple_of * options.multiple_of;
  if (m > static_cast<int64_t>(n)) {
    throw std::invalid_argument(
        "cannot form " + std::to_string(m) + " non-empty micro-batches from " +
        std::to_string(n) + " sequences (max_tokens needs " + std::to_string(ffd.size() + k) +
        ", min_micro_batches=" + std::to_string(options.min_micro_batches) +
        ", multiple_of=" + std::to_string(options.multiple_of) + ")");
  }
  const size_t count = static_cast<size_t>(m - k);
  Bins bins;
  if (!worst_fit_decreasing(order, lengths, options.max_tokens, count, &bins)) {
    bins = std::move(ffd);
    split_to(&bins, count, lengths);
  }
  for (int64_t idx : oversize) bins.push_back({idx});
  for (auto& bin : bins) std::sort(bin.begin(), bin.end());
  return bins;
}

int64_t fill_micro_batch(const std::vector<int64_t>& bin, const int64_t* tokens,
                         const uint8_t* masks, const int64_t* offsets, const int64_t* lengths,
                         int64_t* input_ids, uint8_t* loss_mask, int64_t* position_ids,
                         int32_t* cu_seqlens, int64_t* seq_index) {
  int64_t pos = 0, longest = 0;
  cu_seqlens[0] = 0;
  for (size_t j = 0; j < bin.size(); ++j) {
    const int64_t idx = bin[j];
    const int64_t len = lengths[idx];
    const int64_t start = offsets[idx];
    std::memcpy(input_ids + pos, tokens + start, static_cast<size_t>(len) * sizeof(int64_t));
    std::memcpy(loss_mask + pos, masks + start, static_cast<size_t>(len));
    for (int64_t t = 0; t < len; ++t) {
      position_ids[pos + t] = t;
      seq_index[pos + t] = idx;
    }
    pos += len;
    cu_seqlens[j + 1] = static_cast<int32_t>(pos);
    longest = std::max(longest, len);
  }
  return longest;
}

}  // namespace spyglass
