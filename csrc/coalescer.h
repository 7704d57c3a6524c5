// Call coalescer/batcher core of spyglass (no Python here; bound in bindings.cpp).
//
// Tool calls from many trajectories enter with `submit(tool, canonical_args, now)`. A call whose
// (tool, args) is already in flight (pending or executing) joins that call as one more waiter and
// never runs twice; a new call joins its tool's pending queue. A tool's pending calls become a
// batch when the queue reaches the tool's max batch size (at submit) or when `max_wait` seconds
// have passed since the oldest live pending call (at `poll(now)`). `poll` hands out the ready
// batches; the caller runs them and calls `complete(batch_id)`, which releases the calls and
// returns, per item, the tickets of the callers waiting on it. Time is an explicit argument, so
// the core is deterministic and testable with a fake clock; every method locks one mutex, so the
// object may be shared by threads.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace spyglass {

// A batch ready to run: its id, its tool and its distinct argument strings, in queue order.
struct CoalescerBatch {
  uint64_t id = 0;
  std::string tool;
  std::vector<std::string> args;
};

struct CoalescerStats {
  uint64_t submitted = 0;        // submit() calls
  uint64_t coalesced = 0;        // submits that joined a call already in flight
  uint64_t executed = 0;         // distinct calls put into batches
  uint64_t batches = 0;          // batches formed
  uint64_t batches_by_size = 0;  // formed because the queue reached max batch
  uint64_t batches_by_wait = 0;  // formed because max wait elapsed
  uint64_t batches_by_flush = 0; // formed by flush()
  uint64_t completed = 0;        // batches completed
  uint64_t cancelled = 0;        // waiters withdrawn by cancel()
  uint64_t dropped = 0;          // pending calls removed because every waiter cancelled
  uint64_t max_batch_size = 0;   // largest batch formed
  uint64_t pending = 0;          // calls now queued, not yet in a batch
  uint64_t in_flight = 0;        // calls now pending or executing
  uint64_t waiters = 0;          // tickets now waiting
};

class CoalescerCore {
 public:
  // default_max_batch >= 1 and default_max_wait >= 0 (seconds); checked here and in bindings.
  CoalescerCore(uint64_t default_max_batch, double default_max_wait);

  // Per-tool limits; apply to calls submitted afterwards (a queue already at the new size
  // becomes a batch at its next submit or poll).
  void set_tool_limits(const std::string& tool, uint64_t max_batch, double max_wait);
  std::pair<uint64_t, double> tool_limits(const std::string& tool) const;

  // Returns (ticket, is_new): is_new is false when the call joined one already in flight.
  std::pair<uint64_t, bool> submit(const std::string& tool, const std::string& args, double now);
  // Forms the batches whose wait has expired at `now` and returns every ready batch: first the
  // ones formed by size (in formation order), then those formed now, by (deadline, tool).
  std::vector<CoalescerBatch> poll(double now);
  // Turns every pending queue into batches now and returns all ready batches.
  std::vector<CoalescerBatch> flush();
  // Earliest time at which poll() will form a batch by wait; nullopt when nothing is pending.
  std::optional<double> next_deadline() const;
  // Releases a batch's calls; returns, per item in batch order, the tickets waiting on it.
  std::vector<std::vector<uint64_t>> complete(uint64_t batch_id);
  // Withdraws one waiter. A pending call left with no waiter is dropped from its queue; an
  // executing call keeps running for nobody (its result is discarded). False if unknown.
  bool cancel(uint64_t ticket);

  CoalescerStats stats() const;

 private:
  struct Call {
    std::string key;     // tool + NUL + args
    size_t args_at = 0;  // where args start in key
    double t_submit = 0.0;
    uint64_t batch_id = 0;  // 0 while pending
    std::vector<uint64_t> waiters;
  };
  struct ToolQueue {
    uint64_t max_batch;
    double max_wait;
    std::deque<uint64_t> pending;  // call ids in submit order
  };
  struct BatchRecord {
    std::vector<uint64_t> calls;
  };

  ToolQueue& queue_for(const std::string& tool);
  void form_batch(const std::string& tool, ToolQueue& q, uint64_t n, uint64_t* reason_counter);
  std::vector<CoalescerBatch> take_ready();

  mutable std::mutex mu_;
  uint64_t default_max_batch_;
  double default_max_wait_;
  uint64_t next_ticket_ = 1;
  uint64_t next_call_ = 1;
  uint64_t next_batch_ = 1;
  std::map<std::string, ToolQueue> tools_;            // ordered: deterministic polling
  std::unordered_map<std::string, uint64_t> inflight_;  // key(tool, args) -> call id
  std::unordered_map<uint64_t, Call> calls_;
  std::unordered_map<uint64_t, uint64_t> ticket_call_;  // ticket -> call id
  std::unordered_map<uint64_t, BatchRecord> batches_;   // formed, not completed
  std::vector<CoalescerBatch> ready_;                   // formed, not yet handed out
  CoalescerStats stats_;
};

}  // namespace spyglass
