"""Scoring responses: log pi(y_t) of every token of given responses, in one parallel prefill over (prompt +
response) per row, not a lockstep decode. `response_logprobs` keeps the graph (a trainer's log pi_theta);
`teacher_logprobs` is the no-grad, memory-lean form for the teacher: its per-token scores of responses it did not
take part in sampling (the policy's own samples: the dense teacher critic / on-policy distillation, DESIGN.md §8).

1) right-pad the rows (prompt + response without its last token: that token is predicted, never read);
2) one forward of the decoder body: last-layer hidden states only (no logits for the whole sequence);
3) the output head at the response positions only, in chunks of `chunk_tokens` rows of (tokens, V) logits;
4) float32 log_softmax at the sampler temperature (the same distribution the dual sampler records for q* tokens),
   gathered at the response tokens.

Knows nothing about q*, servers or verl. Assumes a causal LM whose logits are its output embedding applied to the
decoder's last hidden state (Qwen, Llama and their kin; no logit soft-capping).
"""

import torch
from torch import Tensor, nn


@torch.no_grad()
def teacher_logprobs(
    model: nn.Module,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    pad_id: int = 0,
) -> list[list[float]]:
    """log pi_t(y_t | teacher prompt, y_<t) for every response token, one list per row (float32 maths).
    `vocab_size` cuts padded embedding tables to the shared vocabulary, as the sampler does."""
    assert len(prompt_ids) == len(response_ids), f"{len(prompt_ids)=} {len(response_ids)=}"
    assert temperature > 0, f"{temperature=}"
    device = next(model.parameters()).device
    # 1) right-padded rows; row i predicts response token t at position len(prompt_i) - 1 + t
    ids, mask, rows, positions, targets = _pack(prompt_ids, response_ids, device, pad_id)
    # 2) the decoder body once over every row
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
    picked = hidden[rows, positions]  # (N, H): N response tokens over all rows
    # 3) + 4) head, float32 log_softmax and gather, chunk by chunk
    head = model.get_output_embeddings()
    out = torch.empty(len(targets), dtype=torch.float32, device=device)  # (N,)
    for start in range(0, len(targets), chunk_tokens):
        end = start + chunk_tokens
        out[start:end] = _score_chunk(head, picked[start:end], targets[start:end], temperature, vocab_size)
    return [chunk.tolist() for chunk in out.split([len(r) for r in response_ids])]


def _pack(prompt_ids, response_ids, device, pad_id: int):
    """(B, L) ids and mask, and the flat (N,) row, position and target of every response token."""
    seqs = [list(p) + list(r[:-1]) for p, r in zip(prompt_ids, response_ids, strict=True)]
    assert all(len(p) > 0 for p in prompt_ids), "every row needs a prompt (the first response token is predicted)"
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)  # (B, L)
    rows, positions, targets = [], [], []
    for i, (seq, p, r) in enumerate(zip(seqs, prompt_ids, response_ids, strict=True)):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq, dtype=torch.long), 1
        rows += [i] * len(r)
        positions += range(len(p) - 1, len(p) - 1 + len(r))
        targets += list(r)
    flat = (torch.tensor(x, dtype=torch.long, device=device) for x in (rows, positions, targets))
    return ids.to(device), mask.to(device), *flat


def _score_chunk(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, vocab_size: int | None):
    # hidden: (n, H), targets: (n,) -> (n,) float32 log-probs; float32 because bf16 log_softmax over a 150k
    # vocabulary loses the small probabilities the critic compares
    logits = head(hidden)[:, :vocab_size].float() / temperature  # (n, V)
    logp = logits.log_softmax(dim=-1)  # (n, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)


def response_logprobs(
    model: nn.Module, prompts: list[list[int]], responses: list[list[int]]
) -> tuple[Tensor, Tensor]:
    """log pi(y_t | prompt, y_<t) of every response token, with its graph, right-padded, and the response mask:
    (B, T), (B, T) float32 on the model's device (0 past each response). One forward over (prompt + response)."""
    device = next(model.parameters()).device
    ids, mask, rows, positions, targets = _pack(prompts, responses, device, pad_id=0)
    logp_all = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (B, L, V)
    picked = logp_all[rows, positions].gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    T = max(map(len, responses))
    logp = torch.zeros(len(responses), T, device=device)  # (B, T)
    resp_mask = torch.zeros(len(responses), T, device=device)  # (B, T)
    cols = torch.cat([torch.arange(len(r), device=device) for r in responses])  # (N,)
    logp = logp.index_put((rows, cols), picked)  # (B, T)
    resp_mask[rows, cols] = 1.0
    return logp, resp_mask
