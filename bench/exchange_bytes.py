"""Bytes a remote teacher must send per lockstep decode step so that the policy's GPU can draw from q*, and what the
exchange costs over NVLink 4 and over a 400 Gb/s network, next to the measured decode step times (docs/scaling.md).

Per row and step the teacher sends one of:
  full fp32          the teacher's log-probs over the whole vocabulary, float32 (V x 4 B)
  full bf16          the teacher's logits as the model computes them, bfloat16 (V x 2 B): the same numbers the
                     co-located engine reads (its logits buffers hold the model's dtype), so exact
  top-p, k <= K      the teacher's top-p set S as K slots of (int32 token id, bf16 logit) + the row's log Z (fp32,
                     logsumexp over the whole vocabulary) + |S| (int32): exact for the presets with a top-p
                     constraint (q*, alpha and every diagnostic live on S) while |S| <= K
and the policy's GPU sends back each row's sampled token (int32), which the teacher decodes next.
Link peaks assumed (not measured here): NVLink 4 (H100 / H200 SXM) 900 GB/s bidirectional per GPU (18 links x
50 GB/s, NVIDIA's H100 and H200 datasheets), i.e. 450 GB/s each way; a 400 Gb/s InfiniBand NDR / RoCE NIC per GPU,
50 GB/s each way; --latency-us per message (default 20 us, an assumption for a NCCL send/recv, not measured).
Step times are read from the committed benchmark results. No GPU needed:
    python bench/exchange_bytes.py
"""

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QWEN3_VOCAB = 151_936
LINKS_GB_S = {"NVLink 4 (450 GB/s each way)": 450.0, "400 Gb/s IB/RoCE (50 GB/s)": 50.0}
TOKEN_ID, BF16, FP32 = 4, 2, 4  # bytes


def row_bytes(payload: str, vocab: int) -> int:
    """Bytes per row the teacher sends: 'full_fp32', 'full_bf16' or 'top_p_K' (K slots, see the module docstring)."""
    if payload == "full_fp32":
        return vocab * FP32
    if payload == "full_bf16":
        return vocab * BF16
    k = int(payload.removeprefix("top_p_"))
    assert 1 <= k <= vocab, f"{payload=}: K must be in [1, {vocab}]"
    return k * (TOKEN_ID + BF16) + FP32 + TOKEN_ID  # K (id, logit) slots + log Z + |S|


def exchange(payload: str, vocab: int, batch: int) -> dict:
    """Bytes of one step's exchange: teacher -> policy (rows) and policy -> teacher (sampled tokens)."""
    return {
        "payload": payload,
        "batch": batch,
        "to_policy": batch * row_bytes(payload, vocab),
        "to_teacher": batch * TOKEN_ID,
    }


def exchange_ms(ex: dict, gb_s: float) -> float:
    """Wire time of one step's exchange at `gb_s` GB/s each way (the two directions do not overlap: lockstep)."""
    return (ex["to_policy"] + ex["to_teacher"]) / (gb_s * 1e9) * 1e3


def split_step_ms(m: dict, ex: dict, gb_s: float, latency_us: float) -> float:
    """One lockstep step with the teacher on its own GPU: both models decode the last token in parallel, the teacher's
    rows cross (wire + latency), the policy's GPU runs the q* step, the sampled tokens cross back (wire + latency).
    m: a measured_steps() row with the decode and q* times of the same batch."""
    wire = lambda n: n / (gb_s * 1e9) * 1e3 + latency_us / 1e3  # noqa: E731  ms for n bytes
    return max(m["policy_ms"], m["teacher_ms"] + wire(ex["to_policy"])) + m["qstar_ms"] + wire(ex["to_teacher"])


def measured_steps() -> list[dict]:
    """Decode step times (ms) of 4B + 14B from the committed runs: the dual engine's step, the teacher's decode alone
    and the q* step (H100, bench/dual_decode.py), and the H200 GRPO-step rollout's time per step (continuous)."""
    out = []
    for name, batch, context in (("h100_ctx1024_v2.jsonl", 64, 1024), ("h100_ctx256_b256_v2.jsonl", 256, 256)):
        for r in map(json.loads, (RESULTS / name).open()):
            if r.get("pair") == "4b-14b" and r.get("batch") == batch and "ms_per_step" in r.get("engine", {}):
                e = r["engine"]
                out.append({"device": r["device"], "batch": batch, "context": context, "dual_ms": e["ms_per_step"],
                            "teacher_ms": e["teacher_decode_ms"], "policy_ms": e["policy_decode_ms"],
                            "qstar_ms": e["sample_ms"], "source": name})  # fmt: skip
    for r in map(json.loads, (RESULTS / "grpo_rollout_h200.jsonl").open()):
        if r["method"] == "continuous":
            out.append({"device": r["device"], "batch": r["slots"], "context": "GRPO step", "dual_ms":
                        1e3 * r["wall_s"] / r["steps"], "teacher_ms": None, "policy_ms": None, "qstar_ms": None,
                        "source": "grpo_rollout_h200.jsonl"})  # fmt: skip
    return out


def split_table(vocab: int, payloads: list[str], latency_us: float) -> list[str]:
    """Estimated step of a policy GPU + a teacher GPU (same batch) per link, next to the co-located measured step."""
    lines = ["", f"| device | batch | payload | co-located step ms | split: {' | split: '.join(LINKS_GB_S)} |"]
    lines.append("|---" * (4 + len(LINKS_GB_S)) + "|")
    for m in measured_steps():
        if m["teacher_ms"] is None:
            continue
        for p in payloads:
            ex = exchange(p, vocab, m["batch"])
            ms = " | ".join(f"{split_step_ms(m, ex, gb, latency_us):.2f}" for gb in LINKS_GB_S.values())
            lines.append(f"| {m['device']} | {m['batch']} | {p} | {m['dual_ms']:.2f} | {ms} |")
    return lines


def tables(vocab: int, batches: list[int], payloads: list[str], latency_us: float) -> str:
    lines = ["| batch | payload | to policy per step | to teacher | " + " | ".join(LINKS_GB_S) + " |"]
    lines.append("|---" * (4 + len(LINKS_GB_S)) + "|")
    for b in batches:
        for p in payloads:
            ex = exchange(p, vocab, b)
            ms = " | ".join(f"{1e3 * exchange_ms(ex, gb):,.1f} us" for gb in LINKS_GB_S.values())
            lines.append(f"| {b} | {p} | {ex['to_policy'] / 1e6:,.3f} MB | {ex['to_teacher']:,} B | {ms} |")
    lines += [
        "",
        "| device | batch | context | dual engine step ms | teacher decode ms | policy decode ms | q* step ms |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    fmt = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    for m in measured_steps():
        cells = (m["dual_ms"], m["teacher_ms"], m["policy_ms"], m["qstar_ms"])
        lines.append(f"| {m['device']} | {m['batch']} | {m['context']} | " + " | ".join(map(fmt, cells)) + " |")
    return "\n".join(lines + split_table(vocab, payloads, latency_us))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=QWEN3_VOCAB)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--payloads", default="full_fp32,full_bf16,top_p_1024,top_p_256,top_p_64")
    p.add_argument("--latency-us", type=float, default=20.0, help="assumed latency per message (not measured)")
    args = p.parse_args(argv)
    text = tables(args.vocab, [int(b) for b in args.batches.split(",")], args.payloads.split(","), args.latency_us)
    print(text)
    return text


if __name__ == "__main__":
    main()
