"""Continuous batching with fixed slots, on top of `FastDualEngine`: requests stream into free slots while the
other slots keep decoding, instead of a batch decoding until its longest member ends.

Owns the host side: the request queue (pulled from a source, so a server can keep adding requests while the
engine decodes), which request sits in which slot, admission (prefill into the freed slots, or a copy of a shared
prompt's prefill: the n responses of a GRPO group prefill their prompt once), harvesting finished rows' traces,
and the loop that alternates them with `check_every` graph replays of `slots.slot_step`:
  1) admit: free slots take the next queued requests (prefilled into those slots, or copied from a slot that
     holds the same prompt, with the prompt's saved next-token logits)
  2) decode: `check_every` steps of every slot (one CUDA graph replay each)
  3) harvest: rows that finished hand their tokens and traces to `deliver`; their slots are free again
Randomness: request r draws from its own stream keyed by (r.seed, its token index), whichever slot it sits in and
whenever it runs (see `slots`). Knows nothing about tokenizers, verl or how prompts were built.
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..checks import FIX_DTYPE
from ..config import SamplerConfig
from ..sampler import DIAGNOSTIC_FIELDS, TEACHER_FIELDS, TRACE_FIELDS, DualSample
from .engine import _ROW, MODES
from .slots import slot_step


@dataclass
class Request:
    """One response to sample. teacher_ids is None in the policy-only modes."""

    policy_ids: list[int]
    teacher_ids: list[int] | None
    max_new_tokens: int
    seed: int
    tag: object = None  # the caller's handle (returned with the result)

    def key(self) -> tuple:
        """Requests with equal keys share a prefill."""
        return tuple(self.policy_ids), None if self.teacher_ids is None else tuple(self.teacher_ids)

    def prompts(self) -> list[list[int]]:
        return [self.policy_ids] if self.teacher_ids is None else [self.policy_ids, self.teacher_ids]


def request_seed(seed: int, index: int) -> int:
    """The seed of request `index` of a call seeded with `seed` (splitmix64, 62 bits: distinct streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**62


class ContinuousBatcher:
    """Serves requests through `slots` fixed rows of `engine`, each row holding up to `slot_len` tokens (prompt +
    response). check_every: steps between host checks (admission and harvest)."""

    def __init__(self, engine, slots: int, slot_len: int, check_every: int = 4):
        if slots < 1 or slot_len < 2 or check_every < 1:
            raise ValueError(f"slots={slots}, slot_len={slot_len}, check_every={check_every}: all must be >= 1 (2)")
        self.engine, self.slots, self.slot_len, self.check_every = engine, slots, slot_len, check_every
        self.steps = 0  # graph replays in the last `serve` (the slot-steps it spent: steps * slots)
        self.prefilled = self.copied = 0  # prompts prefilled / copied from a slot holding the same prompt

    # ------------------------------------------------------------------------------------------------ public
    def run(self, requests: list[Request], config: SamplerConfig, mode: str = "dual") -> DualSample:
        """Every request, in order, as one DualSample (a request's row equals what `serve` delivers for it)."""
        self.check(requests, mode)
        queue, rows = [replace(r, tag=i) for i, r in enumerate(requests)], [None] * len(requests)

        def pull(n: int) -> list[Request]:
            taken, queue[:n] = queue[:n], []
            return taken

        def deliver(request: Request, row: dict) -> None:
            rows[request.tag] = row

        self.serve(pull, deliver, config, mode)
        return _as_sample(rows, self.engine.diagnostics)

    def reserve(self) -> None:
        """Allocate the slots now (MemoryError naming the sizes when they cannot fit); `serve` calls it too."""
        self.engine.reserve(self.slots, self.slot_len + 1, self.slot_len + 1)  # +1: the scratch slot of finished rows

    def check(self, requests: list[Request], mode: str) -> None:
        """Raise a ValueError naming the sizes when a request cannot fit a slot (before any decode)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for i, r in enumerate(requests):
            longest = max(len(p) for p in r.prompts())
            if longest + r.max_new_tokens > self.slot_len:
                raise ValueError(
                    f"request {i} needs {longest} prompt + {r.max_new_tokens} new tokens = "
                    f"{longest + r.max_new_tokens} cache slots but a slot holds {self.slot_len}: raise slot_len "
                    "(the longest prompt + the response length) or shorten the prompt / max_new_tokens"
                )
            if (r.teacher_ids is None) != (mode != "dual"):
                raise ValueError(f"request {i}: teacher_ids must be given in mode 'dual' only (mode {mode!r})")

    @torch.no_grad()
    def serve(
        self,
        pull: Callable[[int], list[Request]],
        deliver: Callable[[Request, dict], None],
        config: SamplerConfig,
        mode: str = "dual",
    ) -> None:
        """Decode until `pull` has nothing left and every slot is free. pull(n) returns up to n new requests (it is
        asked at every host check, so requests may arrive while others decode); deliver(request, row) receives
        each finished request's row (the fields of `DualSample.row`, without text)."""
        self.reserve()
        step = self._step_fn(config, mode)
        self._reset()
        self.steps = 0
        while True:
            # 1) admit
            free = [s for s in range(self.slots) if self.owner[s] is None]
            new = pull(len(free)) if free else []
            self.check(new, mode)
            if new:
                self._admit(list(zip(free, new, strict=False)), mode)
            if all(o is None for o in self.owner):
                return
            # 2) decode
            for _ in range(self.check_every):
                step()
                self.steps += 1
            # 3) harvest
            for request, row in self._harvest(config, mode):
                deliver(request, row)

    # ------------------------------------------------------------------------------------------- internals
    def _step_fn(self, config: SamplerConfig, mode: str):
        eng = self.engine
        if not eng.use_graphs:
            return lambda: slot_step(eng, self.slots, config, mode, self.generators)
        key = (self.slots, config, f"slots:{mode}")
        if key not in eng.graphs:
            eng.graphs[key] = eng.capture(key, lambda: slot_step(eng, self.slots, config, mode))
        return eng.graphs[key].replay

    def _reset(self) -> None:
        """Every slot free; no prompt held."""
        self.engine._zero_state()
        self.owner: list[Request | None] = [None] * self.slots
        self.held: list[tuple | None] = [None] * self.slots  # the prompt key in each slot's cache [0, len)
        self.saved: dict[tuple, list[torch.Tensor]] = {}  # prompt key -> its next-token logits (V,) per model
        self.generators: list[torch.Generator | None] = [None] * self.slots

    def _admit(self, pairs: list[tuple[int, Request]], mode: str) -> None:
        """Put each request in its slot: copy a held prompt or prefill it; then set the slot's per-row state."""
        eng, st = self.engine, self.engine.state
        models = eng.models if mode == "dual" else eng.models[:1]
        fresh, copies = [], []  # (slot, request) to prefill / to copy from a holder (or from itself)
        for slot, r in pairs:
            if self.held[slot] != r.key():
                self.held[slot] = None  # this slot's old prompt is being overwritten
        for slot, r in pairs:
            shared = self._holder(r.key()) is not None or r.key() in {q.key() for _, q in fresh}
            (copies if shared else fresh).append((slot, r))
        # 1) prefill the new prompts into their slots (one batched prefill per model)
        if fresh:
            slots_f = [s for s, _ in fresh]
            for m, (model, logits) in enumerate(zip(models, st.logits, strict=False)):
                out = torch.empty(len(fresh), logits.shape[1], dtype=logits.dtype, device=logits.device)  # (n, V)
                model.prefill([r.prompts()[m] for _, r in fresh], out, rows=slots_f)
                logits[slots_f] = out
            for slot, r in fresh:
                self.held[slot] = r.key()
                self.saved[r.key()] = [lg[slot].clone() for lg in st.logits[: len(models)]]
            self.prefilled += len(fresh)
        # 2) copy the shared prompts from a slot that holds them
        for slot, r in copies:
            src = slot if self.held[slot] == r.key() else self._holder(r.key())
            for m, model in enumerate(models):
                if src != slot:
                    model.copy_rows([src], [slot], [len(r.prompts()[m])])
                st.logits[m][slot] = self.saved[r.key()][m]
            self.held[slot] = r.key()
        self.copied += len(copies)
        # 3) per-row state
        self._set_rows(pairs, models)

    def _holder(self, key: tuple) -> int | None:
        """A slot whose cache holds this prompt and whose logits were saved, or None."""
        if key not in self.saved:
            return None
        return next((s for s in range(self.slots) if self.held[s] == key), None)

    def _set_rows(self, pairs: list[tuple[int, Request]], models) -> None:
        st, dev = self.engine.state, self.engine.device
        slots = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=dev)  # (n,)
        as_dev = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        for m in range(len(models)):
            st.pos[m][slots] = as_dev([len(r.prompts()[m]) for _, r in pairs])
        st.row_step[slots] = 0
        st.row_seed[slots] = as_dev([r.seed for _, r in pairs])
        st.limit[slots] = as_dev([r.max_new_tokens for _, r in pairs])
        st.finished[slots] = False
        for slot, r in pairs:
            self.owner[slot] = r
            if not self.engine.fused:
                self.generators[slot] = torch.Generator(dev).manual_seed(r.seed)

    def _harvest(self, config: SamplerConfig, mode: str) -> list[tuple[Request, dict]]:
        """Rows that finished since the last check: their requests and rows; their slots become free."""
        st = self.engine.state
        finished = st.finished.tolist()  # the one host sync of a check
        done = [s for s in range(self.slots) if finished[s] and self.owner[s] is not None]
        if not done:
            return []
        idx = torch.tensor(done, dtype=torch.long, device=self.engine.device)  # (n,)
        lengths = st.row_step[idx].tolist()
        tokens, trace = st.tokens[idx].tolist(), st.trace[:, idx].cpu()  # (n, T), (F, n, T)
        out = []
        for j, slot in enumerate(done):
            out.append((self.owner[slot], _row(tokens[j], trace[:, j], lengths[j], config, mode)))
            self.owner[slot] = None
            self.generators[slot] = None
        self.saved = {k: v for k, v in self.saved.items() if k in self.held}  # a prompt's logits live while it does
        return out


def _row(tokens: list[int], rec: torch.Tensor, n: int, config: SamplerConfig, mode: str) -> dict:
    """One finished request's tokens and traces. rec: (F, T) float32 on the host; n: tokens generated."""
    rec = rec[:, :n].clone()  # (F, n)
    if mode != "dual":  # the teacher's rows were computed against the policy: not computed (NaN), as the reference
        rec[[_ROW[name] for name in TEACHER_FIELDS]] = float("nan")
    bad = [name for name, row in (("policy", "nan_policy"), ("teacher", "nan_teacher")) if rec[_ROW[row]].any()]
    if bad:
        raise FloatingPointError(
            f"the {' and '.join(bad)} model produced NaN or infinite logits: {FIX_DTYPE}; the sample was discarded"
        )
    tokens = tokens[:n]
    field = lambda name: rec[_ROW[name]].tolist()  # noqa: E731
    row = {"token_ids": tokens, **{name: field(name) for name in (*TRACE_FIELDS, *DIAGNOSTIC_FIELDS)}}
    row["forced"] = [bool(x) for x in field("forced")]
    row["support_size"] = [int(x) for x in field("support_size")]
    row["finish_reason"] = "stop" if tokens and tokens[-1] in set(config.stop_token_ids) else "length"
    return row


def _as_sample(rows: list[dict], diagnostics: bool) -> DualSample:
    """Rows (`_row`) in request order as one DualSample."""
    col = lambda name: [r[name] for r in rows]  # noqa: E731
    return DualSample(
        token_ids=col("token_ids"),
        **{name: col(name) for name in (*TRACE_FIELDS, "forced", "support_size")},
        finish_reasons=col("finish_reason"),
        diagnostics={name: col(name) for name in DIAGNOSTIC_FIELDS} if diagnostics else {},
    )
