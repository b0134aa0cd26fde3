"""`PhaseLog`: what a dual server measures in each phase of a sync training step, for its log and for the trainer's
`optimal_sampling/server/*` metrics. The server sees the step's phases through verl's calls on it:
  sync     from `wake_up` after the trainer's phase to `finish_weight_update` (the weights arrive)
  rollout  from `finish_weight_update` to `sleep` (the server generates)
  train    from `sleep` to the next `wake_up` (the trainer recomputes log-probs and updates the actor)
Per phase: its wall time and start (Unix seconds, to align with a device-memory timeline), and on CUDA the server
process's peak allocated memory and the device's used memory (all processes: the actor's too) at its end; for the
rollout also the engine's busy seconds, requests and tokens (the rest of `timing_s/gen` is server, agent-loop and
transfer overhead). Knows nothing about models, engines or verl.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

PHASES = ("sync", "rollout", "train")
GIB = 1 << 30


def cuda_memory(device) -> dict[str, float]:
    """GiB now: the server process's allocated, reserved and peak-since-the-last-call memory, and the device's used and
    total memory (every process). Resets the peak. Call it where no CUDA graph is being captured."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    out = {
        "server_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
        "server_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
        "server_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "device_used_gib": (total - free) / GIB,
        "device_total_gib": total / GIB,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out


@dataclass
class PhaseLog:
    """The current phase and the numbers of the last completed one of each kind. read_memory: `cuda_memory` bound to
    the server's device, or None (CPU: times only)."""

    read_memory: Callable[[], dict[str, float]] | None = None
    phase: str = "start"  # before the first weight sync: loading the models, reserving the slots
    started: float = field(default_factory=time.time)
    last: dict[str, float] = field(default_factory=dict)
    _engine: list[float] = field(default_factory=lambda: [0.0, 0, 0])  # busy seconds, requests, tokens

    def count(self, seconds: float, requests: int, tokens: int) -> None:
        """Engine work done in the current phase."""
        self._engine = [self._engine[0] + seconds, self._engine[1] + requests, self._engine[2] + tokens]

    def enter(self, phase: str) -> str | None:
        """End the current phase (record its numbers) and start `phase`; a log line about the ended phase, or None
        when `phase` is already current."""
        assert phase in PHASES, f"{phase=}"
        if phase == self.phase:
            return None
        now, ended = time.time(), self.phase
        record = {"s": now - self.started, "start_unix": self.started}
        if ended == "rollout":
            record.update(zip(("engine_s", "requests", "tokens"), self._engine, strict=True))
        memory = self.read_memory() if self.read_memory else {}
        record.update({k: v for k, v in memory.items() if k != "device_total_gib"})
        if "device_total_gib" in memory:
            self.last["device_total_gib"] = memory["device_total_gib"]
        if ended in PHASES:
            self.last.update({f"{ended}_{k}": float(v) for k, v in record.items()})
        self.phase, self.started, self._engine = phase, now, [0.0, 0, 0]
        return f"{ended} -> {phase} after {record['s']:.2f} s: " + describe(record, memory.get("device_total_gib"))

    def metrics(self, prefix: str) -> dict[str, float]:
        """The last completed phases' numbers, each under `prefix` (e.g. "optimal_sampling/server/")."""
        return {prefix + k: v for k, v in self.last.items()}


def describe(record: dict, total: float | None) -> str:
    parts = []
    if "engine_s" in record:
        engine = record["engine_s"], record["requests"], record["tokens"]
        parts.append("engine {:.2f} s for {:.0f} requests, {:.0f} tokens".format(*engine))
    if "server_peak_gib" in record:
        parts.append(
            f"server peak {record['server_peak_gib']:.2f} GiB (now allocated {record['server_allocated_gib']:.2f}, "
            f"reserved {record['server_reserved_gib']:.2f}); device used {record['device_used_gib']:.2f} of "
            f"{total:.2f} GiB"
        )
    return "; ".join(parts) or "no memory numbers off CUDA"
