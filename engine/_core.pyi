"""Type stub of spyglass.engine._core, the C++ core (csrc/bindings.cpp)."""
import numpy as np
import numpy.typing as npt

ABI_VERSION: int

# ---- coalescer ----
class CoalescerCore:
    """Deterministic, thread-safe call coalescer/batcher core with an explicit clock (seconds).

    Batches are (batch_id, tool, [distinct args in queue order])."""

    def __init__(self, max_batch: int = 16, max_wait: float = 0.002) -> None: ...
    def set_tool_limits(self, tool: str, max_batch: int, max_wait: float) -> None: ...
    def tool_limits(self, tool: str) -> tuple[int, float]: ...
    def submit(self, tool: str, args: str, now: float) -> tuple[int, bool]:
        """(ticket, is_new); is_new is False when an identical call is in flight."""
    def poll(self, now: float) -> list[tuple[int, str, list[str]]]:
        """Ready batches: formed by size, then by max wait expired at `now`."""
    def flush(self) -> list[tuple[int, str, list[str]]]: ...
    def next_deadline(self) -> float | None: ...
    def complete(self, batch_id: int) -> list[list[int]]:
        """Release a batch; per item, the tickets waiting on it."""
    def cancel(self, ticket: int) -> bool: ...
    def stats(self) -> dict[str, int]: ...

# ---- packer ----
def pack_bins(lengths: npt.NDArray[np.integer], max_tokens: int, min_micro_batches: int = 1,
              multiple_of: int = 1, allow_oversize: bool = False) -> list[list[int]]: ...
def pack(tokens: npt.NDArray[np.integer], masks: npt.NDArray[np.bool_],
         lengths: npt.NDArray[np.integer], max_tokens: int, min_micro_batches: int = 1,
         multiple_of: int = 1, allow_oversize: bool = False
         ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.int64],
                         npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.int64],
                         int]]:
    """Per micro-batch: (input_ids [T], loss_mask [T], position_ids [T], cu_seqlens [B+1],
    seq_index [T], indices [B], max_seqlen)."""
