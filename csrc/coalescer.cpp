// Call coalescer/batcher core: see coalescer.h for the contract. Pure C++, one mutex.
#include "coalescer.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace spyglass {

namespace {

// Key for (tool, args): tool names hold no NUL (checked in set_tool_limits/submit), so
// tool + NUL + args is unambiguous. Call::args_at is where the args start in it.
std::string make_key(const std::string& tool, const std::string& args) {
  std::string key;
  key.reserve(tool.size() + 1 + args.size());
  key.append(tool);
  key.push_back('\0');
  key.append(args);
  return key;
}

void check_tool(const std::string& tool) {
  if (tool.empty() || tool.find('\0') != std::string::npos) {
    throw std::invalid_argument("tool name must be a non-empty string without NUL, got '" +
                                tool + "'");
  }
}

void check_limits(uint64_t max_batch, double max_wait) {
  if (max_batch < 1) {
    throw std::invalid_argument("max_batch must be >= 1, got " + std::to_string(max_batch));
  }
  if (!(max_wait >= 0.0) || !std::isfinite(max_wait)) {
    throw std::invalid_argument("max_wait must be a finite number >= 0, got " +
                                std::to_string(max_wait));
  }
}

}  // namespace

CoalescerCore::CoalescerCore(uint64_t default_max_batch, double default_max_wait)
    : default_max_batch_(default_max_batch), default_max_wait_(default_max_wait) {
  check_limits(default_max_batch, default_max_wait);
  inflight_.reserve(1024);
  calls_.reserve(1024);
  ticket_call_.reserve(4096);
}

CoalescerCore::ToolQueue& CoalescerCore::queue_for(const std::string& tool) {
  auto it = tools_.find(tool);
  if (it == tools_.end()) {
    it = tools_.emplace(tool, ToolQueue{default_max_batch_, default_max_wait_, {}}).first;
  }
  return it->second;
}

void CoalescerCore::set_tool_limits(const std::string& tool, uint64_t max_batch,
                                    double max_wait) {
  check_tool(tool);
  check_limits(max_batch, max_wait);
  std::lock_guard<std::mutex> lock(mu_);
  ToolQueue& q = queue_for(tool);
  q.max_batch = max_batch;
  q.max_wait = max_wait;
}

std::pair<uint64_t, double> CoalescerCore::tool_limits(const std::string& tool) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = tools_.find(tool);
  if (it == tools_.end()) return {default_max_batch_, default_max_wait_};
  return {it->second.max_batch, it->second.max_wait};
}

void CoalescerCore::form_batch(const std::string& tool, ToolQueue& q, uint64_t n,
                               uint64_t* reason_counter) {
  CoalescerBatch batch;
  batch.id = next_batch_++;
  batch.tool = tool;
  batch.args.reserve(n);
  BatchRecord record;
  record.calls.reserve(n);
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t call_id = q.pending.front();
    q.pending.pop_front();
    Call& call = calls_.at(call_id);
    call.batch_id = batch.id;
    batch.args.emplace_back(call.key, call.args_at);
    record.calls.push_back(call_id);
  }
  batches_.emplace(batch.id, std::move(record));
  stats_.executed += n;
  stats_.batches += 1;
  *reason_counter += 1;
  stats_.max_batch_size = std::max<uint64_t>(stats_.max_batch_size, n);
  ready_.push_back(std::move(batch));
}

std::vector<CoalescerBatch> CoalescerCore::take_ready() {
  std::vector<CoalescerBatch> out;
  out.swap(ready_);
  return out;
}

std::pair<uint64_t, bool> CoalescerCore::submit(const std::string& tool, const std::string& args,
                                                double now) {
  check_tool(tool);
  std::string key = make_key(tool, args);
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t ticket = next_ticket_++;
  stats_.submitted += 1;
  auto [slot, inserted] = inflight_.try_emplace(std::move(key), next_call_);
  if (!inserted) {
    calls_.find(slot->second)->second.waiters.push_back(ticket);
    ticket_call_.emplace(ticket, slot->second);
    stats_.coalesced += 1;
    return {ticket, false};
  }
  const uint64_t call_id = next_call_++;
  Call& call = calls_[call_id];
  call.key = slot->first;
  call.args_at = tool.size() + 1;
  call.t_submit = now;
  call.waiters.push_back(ticket);
  ticket_call_.emplace(ticket, call_id);
  ToolQueue& q = queue_for(tool);
  q.pending.push_back(call_id);
  if (q.pending.size() >= q.max_batch) form_batch(tool, q, q.max_batch, &stats_.batches_by_size);
  return {ticket, true};
}

std::vector<CoalescerBatch> CoalescerCore::poll(double now) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::pair<double, ToolQueue*>> due;
  std::vector<const std::string*> due_tools;
  for (auto& [tool, q] : tools_) {
    while (q.pending.size() >= q.max_batch) {  // limits lowered since these calls queued
      form_batch(tool, q, q.max_batch, &stats_.batches_by_size);
    }
    if (q.pending.empty()) continue;
    const double deadline = calls_.at(q.pending.front()).t_submit + q.max_wait;
    if (now >= deadline) {
      due.emplace_back(deadline, &q);
      due_tools.push_back(&tool);
    }
  }
  std::vector<size_t> order(due.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  // tools_ is ordered by name, so a stable sort by deadline orders by (deadline, tool).
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return due[a].first < due[b].first; });
  for (size_t i : order) {
    ToolQueue& q = *due[i].second;
    form_batch(*due_tools[i], q, q.pending.size(), &stats_.batches_by_wait);
  }
  return take_ready();
}

std::vector<CoalescerBatch> CoalescerCore::flush() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [tool, q] : tools_) {
    while (!q.pending.empty()) {
      const uint64_t n = std::min<uint64_t>(q.pending.size(), q.max_batch);
      form_batch(tool, q, n, &stats_.batches_by_flush);
    }
  }
  return take_ready();
}

std::optional<double> CoalescerCore::next_deadline() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::optional<double> best;
  for (const auto& [tool, q] : tools_) {
    if (q.pending.empty()) continue;
    const double deadline = calls_.at(q.pending.front()).t_submit + q.max_wait;
    if (!best || deadline < *best) best = deadline;
  }
  return best;
}

std::vector<std::vector<uint64_t>> CoalescerCore::complete(uint64_t batch_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = batches_.find(batch_id);
  if (it == batches_.end()) {
    throw std::invalid_argument("unknown or already completed batch id " +
                                std::to_string(batch_id));
  }
  std::vector<std::vector<uint64_t>> out;
  out.reserve(it->second.calls.size());
  for (uint64_t call_id : it->second.calls) {
    auto call_it = calls_.find(call_id);
    Call& call = call_it->second;
    for (uint64_t ticket : call.waiters) ticket_call_.erase(ticket);
    inflight_.erase(call.key);
    out.push_back(std::move(call.waiters));
    calls_.erase(call_it);
  }
  batches_.erase(it);
  stats_.completed += 1;
  return out;
}

bool CoalescerCore::cancel(uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ticket_call_.find(ticket);
  if (it == ticket_call_.end()) return false;
  const uint64_t call_id = it->second;
  ticket_call_.erase(it);
  Call& call = calls_.at(call_id);
  call.waiters.erase(std::find(call.waiters.begin(), call.waiters.end(), ticket));
  stats_.cancelled += 1;
  if (call.batch_id == 0 && call.waiters.empty()) {
    ToolQueue& q = tools_.at(call.key.substr(0, call.args_at - 1));
    q.pending.erase(std::find(q.pending.begin(), q.pending.end(), call_id));
    inflight_.erase(call.key);
    calls_.erase(call_id);
    stats_.dropped += 1;
  }
  return true;
}

CoalescerStats CoalescerCore::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  CoalescerStats s = stats_;
  s.pending = 0;
  for (const auto& [tool, q] : tools_) s.pending += q.pending.size();
  s.in_flight = calls_.size();
  s.waiters = ticket_call_.size();
  return s;
}

}  // namespace spyglass
