"""The device side of continuous batching: one token step over fixed slots, each slot decoding its own request.

Owns `slot_step`, the step a CUDA graph captures per (slots, config, mode): like `FastDualEngine._step`, but every
row carries its own request's state in the engine's `_State` (row_step: tokens generated, row_seed, limit:
max_new_tokens; pos per model; finished = free or done), so rows join and leave at any step without touching the
graph:
  1) one token per row from q* of that row (`fused_sample` with per-row streams: row b's draws are keyed by
     (row_seed[b], row_step[b]) alone, so a request samples the same tokens in any slot and at any time as it
     would alone in a batch of one with that seed)
  2) bookkeeping: finished rows get token 0 and keep their step and positions (they write one scratch cache slot
     past their data, never read); the record goes to column row_step[b] of row b's trace; a stop token or the
     row's limit finishes it
  3) both models (the policy alone in the policy-only modes) decode the tokens at each row's own position
On CPU (no Triton) step 1) is `sample_step` row by row with one torch.Generator per request (seeded with its
seed), which is what `FastDualEngine.generate` does for a batch of one. Knows nothing about queues, prompts or
which request sits in which slot (`scheduler`).
"""

import torch
from torch import Tensor

from ...core.fused import RECORD_FIELDS
from ..config import SamplerConfig
from .engine import fused_config_sample, greedy_record, reference_record


def slot_step(engine, slots: int, config: SamplerConfig, mode: str, generators: list | None = None) -> None:
    """One token for each of the first `slots` rows of engine.state. generators: one torch.Generator (or None for
    a free slot) per row, used only without Triton."""
    st, S = engine.state, slots
    logits = [lg[:S] for lg in st.logits]  # (S, V) each
    pos = [p[:S] for p in st.pos]  # (S,) each
    step, seed, limit, finished = st.row_step[:S], st.row_seed[:S], st.limit[:S], st.finished[:S]  # (S,) each
    if mode != "dual":  # q* = pi_theta: the policy's logits stand in for the teacher's, which alpha = 0 ignores
        logits = [logits[0], logits[0]]
    # 1) one token per row from q* of that row
    if engine.fused:
        token, record = fused_config_sample(logits, step, seed, config, engine.diagnostics)  # (S,), (F, S)
    else:
        token, record = _rows_reference(logits, config, step, finished, generators)
    if mode == "greedy":
        token = greedy_record(logits[0], record)
    # 2) bookkeeping: record at each row's own column; stop tokens and limits finish rows
    active = ~finished  # (S,)
    token = torch.where(active, token, torch.zeros_like(token))  # (S,)
    rows = torch.arange(S, device=token.device)  # (S,)
    st.trace[:, rows, step] = record  # (F, S) into (F, B, T)
    st.tokens[rows, step] = token
    done = step + 1 >= limit  # (S,)
    if config.stop_token_ids:
        done |= torch.isin(token, engine._stop_ids(config))
    # 3) the models read the tokens at each row's position; only active rows advance
    models = engine.models if mode == "dual" else engine.models[:1]
    for model, p, out in zip(models, pos, logits, strict=False):  # models: 1 or 2
        model.decode(token, p, out)
        p += active
    step += active
    finished |= done


def _rows_reference(
    logits: list[Tensor], config: SamplerConfig, step: Tensor, finished: Tensor, generators: list
) -> tuple[Tensor, Tensor]:
    """Without Triton: each active row through `reference_record` alone, with its request's generator (so that a
    row's draws do not depend on the others). Finished rows draw nothing; their record is zeros."""
    S = logits[0].shape[0]
    token = torch.zeros(S, dtype=torch.long, device=logits[0].device)  # (S,)
    record = torch.zeros(len(RECORD_FIELDS), S, dtype=torch.float32, device=logits[0].device)  # (F, S)
    for b in (~finished).nonzero()[:, 0].tolist():
        one = [lg[b : b + 1] for lg in logits]  # (1, V) each
        token[b : b + 1], record[:, b : b + 1] = reference_record(one, config, step[b], generators[b])
    return token, record
