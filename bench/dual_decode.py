"""Dual-model decode speed: the naive HF lockstep loop vs the fast engine vs the weights-read floor.

Builds Qwen3 architectures from their public configs with random bf16 weights (no download), prefills a prompt
of --context random tokens per row, then times decode steps. One JSON line per configuration goes to --out as
soon as it is measured (a timeout still leaves numbers); `--table FILE` prints the markdown table of a results
file. Run on a GPU host, e.g.
    python bench/dual_decode.py --pairs small,4b-14b --batches 1,16,64,256 --context 1024 --out bench/results.jsonl

Per (pair, batch): naive = `DualSampler` reference path (HF forward per model per token, DynamicCache, eager),
engine = `FastDualEngine` (static caches, fused kernels, one CUDA graph per step), floor = bytes of both models'
weights read per step / read bandwidth measured in the same run (+ KV cache bytes in `floor_kv`), plus the fused
q* step's share (support, alpha, mixing, sampling), each model's decode alone, peak memory and capture time.
Policy-only decode (the on-policy members of a mixed group; the teacher is not run), with --methods
naive_policy_only,policy_only: the reference loop on the policy alone against the engine's policy-only graphs.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.optimal_sampling import SamplerConfig  # noqa: E402
from recipe.optimal_sampling.core.fused import fused_sample  # noqa: E402
from recipe.optimal_sampling.engine import sampler as ref  # noqa: E402
from recipe.optimal_sampling.engine.fast.engine import FastDualEngine, bucket_for  # noqa: E402
from recipe.optimal_sampling.engine.policy_only import policy_only_config  # noqa: E402

# Public Qwen3 configs (hidden, intermediate, layers, heads, kv heads, tied); head_dim 128, vocab 151,936.
ARCH = {
    "0.6b": (1024, 3072, 28, 16, 8, True),
    "1.7b": (2048, 6144, 28, 16, 8, True),
    "4b": (2560, 9728, 36, 32, 8, True),
    "14b": (5120, 17408, 40, 40, 8, False),
}
PAIRS = {"small": ("0.6b", "1.7b"), "4b-14b": ("4b", "14b")}  # (policy, teacher)
VOCAB = 151_936


def build(name: str, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, inter, layers, heads, kv, tied = ARCH[name]
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, tie_word_embeddings=tied,
        max_position_embeddings=40960, rope_theta=1_000_000, rms_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter, except an untied input embedding (only B rows are read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total - (0 if emb is head else emb.numel() * emb.element_size())


def read_bandwidth() -> float:
    """Bytes/s of a large read (sum over 4 GiB of bf16), median of 10 runs."""
    x = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    return x.numel() * 2 / (timed(lambda: x.sum(), 10) / 1e3)


def timed(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events), after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns the replay callable."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_naive(policy, teacher, prompts, cfg, steps: int) -> dict:
    """The reference DualSampler loop (prefill once, then sample_step + one HF forward per model per token);
    teacher None: the reference policy-only loop (`engine.policy_only.generate_policy_only`: the policy's logits in
    both slots of sample_step, one HF forward per token)."""
    gen = torch.Generator("cuda").manual_seed(0)
    states = [ref._prefill(m, prompts, "cuda") for m in (policy, teacher) if m is not None]
    active = torch.ones(len(prompts), dtype=torch.bool, device="cuda")
    state = {"step": 0}

    def one_step():
        logits = [s.logits[:, :VOCAB] for s in states]
        rec = ref.sample_step(logits[0], logits[-1], state["step"], cfg, gen)
        bool(active.all())  # the reference loop syncs once per step to test "all finished"
        for m, s in zip((policy, teacher), states, strict=False):
            ref._decode(m, s, rec.token, active)
        state["step"] += 1

    ms = timed(one_step, steps)
    return {"ms_per_step": ms}


def bench_engine(engine: FastDualEngine, prompts, cfg, steps: int, mode: str = "dual") -> dict:
    B = len(prompts)
    bucket = bucket_for(B)
    ctx = len(prompts[0])
    engine.reserve(bucket, ctx + 2 * steps + 2, 2 * steps + 2)
    t0 = time.perf_counter()
    step_fn = engine._step_fn(bucket, cfg, mode)  # captures on first use of this bucket
    capture_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine._reset((prompts, prompts) if mode == "dual" else (prompts,), bucket, seed=0)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    ms = timed(lambda: step_fn(0), steps)
    st = engine.state
    lt = st.logits[1 if mode == "dual" else 0]
    sample = graphed(lambda: fused_sample(
        st.logits[0][:bucket], lt[:bucket], st.step, st.seed, temperature=cfg.temperature,
        top_p=cfg.teacher_top_p, alpha_method=cfg.alpha_method, fixed_alpha=cfg.fixed_alpha,
        force_teacher_tokens=cfg.force_teacher_tokens,
    ))  # fmt: skip
    tok = st.tokens[:bucket, 0]
    decode = [graphed(lambda m=m, p=p, lg=lg: m.decode(tok, p[:bucket], lg[:bucket]))
              for m, p, lg in zip(engine.models, st.pos, st.logits, strict=True)]  # fmt: skip
    return {
        "ms_per_step": ms,
        "sample_ms": timed(sample, steps),
        "policy_decode_ms": timed(decode[0], steps),
        "teacher_decode_ms": timed(decode[1], steps),
        "capture_s": capture_s,
        "prefill_s": prefill_s,
        "bucket": bucket,
    }


def run(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name()
    meta = {"device": dev, "torch": torch.__version__, "context": args.context, "command": " ".join(sys.argv)}
    print(meta, flush=True)
    bw = read_bandwidth()
    emit(out, {**meta, "kind": "bandwidth", "read_tb_s": bw / 1e12})
    cfg = SamplerConfig.preset(args.preset)
    policy_only = policy_only_config(cfg.temperature, ())  # q* = pi_theta at the preset's temperature
    for pair in args.pairs.split(","):
        p_name, t_name = PAIRS[pair]
        policy, teacher = build(p_name, 0), build(t_name, 1)
        wbytes = weight_bytes(policy) + weight_bytes(teacher)
        kv_per_token = sum(2 * m.config.num_hidden_layers * 8 * 128 * 2 for m in (policy, teacher))
        engine = FastDualEngine(policy, teacher, VOCAB)
        for B in [int(b) for b in args.batches.split(",")]:
            kv_bytes = B * args.context * kv_per_token
            row = {**meta, "kind": "result", "pair": pair, "batch": B, "weight_gb": wbytes / 1e9,
                   "floor_ms": wbytes / bw * 1e3, "floor_kv_ms": (wbytes + kv_bytes) / bw * 1e3}  # fmt: skip
            gen = torch.Generator().manual_seed(B)
            prompts = torch.randint(0, VOCAB, (B, args.context), generator=gen).tolist()
            for method in args.methods.split(","):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                try:
                    if method.startswith("naive") and B > args.naive_max_batch:
                        res = {"error": f"skipped (--naive-max-batch {args.naive_max_batch}: device time)"}
                    elif method == "naive":
                        res = bench_naive(policy, teacher, prompts, cfg, args.naive_steps)
                    elif method == "naive_policy_only":
                        res = bench_naive(policy, None, prompts, policy_only, args.naive_steps)
                    elif method == "policy_only":
                        res = bench_engine(engine, prompts, policy_only, args.steps, mode="policy")
                    else:
                        res = bench_engine(engine, prompts, cfg, args.steps)
                    if "ms_per_step" in res:
                        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                        res["tokens_per_s"] = B / res["ms_per_step"] * 1e3
                except Exception as err:  # noqa: BLE001 - one failed configuration must not lose the others
                    res = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:400]}"}
                    engine.state, engine.graphs = None, {}
                    for m in engine.models:
                        m.k_cache = m.v_cache = None
                res["wall_s"] = time.perf_counter() - t0
                row[method] = res
                print(pair, B, method, json.dumps(res), flush=True)
            emit(out, row)
        del engine, policy, teacher
        torch.cuda.empty_cache()


def emit(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def table(path: str) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    bws = [r for r in rows if r["kind"] == "bandwidth"]
    lines = [
        "| device | pair | batch | naive HF ms/step | engine ms/step | engine tok/s | weights floor ms "
        "| floor+KV ms | engine / floor | speed-up vs naive | q* step ms (share) | policy / teacher decode ms "
        "| peak GB | capture s |",
        "|" + "---|" * 14,
    ]
    f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in (r for r in rows if r["kind"] == "result"):
        naive, eng = r.get("naive", {}), r.get("engine", {})
        if "error" in eng:
            lines.append(f"| {r['device']} | {r['pair']} | {r['batch']} | {f(naive.get('ms_per_step'), 1)} | "
                         f"{eng['error']} |" + " |" * 8 + " - |")  # fmt: skip
            continue
        ms, nms = eng.get("ms_per_step"), naive.get("ms_per_step")
        lines.append(
            f"| {r['device']} | {r['pair']} | {r['batch']} | {f(nms, 1) if nms else naive.get('error', '-')} | "
            f"{f(ms)} | {f(eng.get('tokens_per_s'), 0)} | {f(r['floor_ms'])} | {f(r['floor_kv_ms'])} | "
            f"{f(ms / r['floor_ms']) if ms else '-'}x | {f(nms / ms, 1) if nms and ms else '-'}x | "
            f"{f(eng.get('sample_ms'), 3)} ({f(100 * eng['sample_ms'] / ms, 1) if ms else '-'}%) | "
            f"{f(eng.get('policy_decode_ms'))} / {f(eng.get('teacher_decode_ms'))} | {f(eng.get('peak_gb'), 1)} | "
            f"{f(eng.get('capture_s'), 1)} |"
        )
    bw = ", ".join(f"{b['device']}: {b['read_tb_s']:.2f} TB/s" for b in bws)
    text = "\n".join(lines) + f"\n\nMeasured read bandwidth (sum over 4 GiB of bf16): {bw}\n"
    solo = [r for r in rows if r["kind"] == "result" and "policy_only" in r]
    if solo:
        lines = [
            "| device | pair | batch | reference policy-only ms/step | engine policy-only ms/step | speed-up "
            "| engine dual ms/step | policy decode alone ms |",
            "|" + "---|" * 8,
        ]
        for r in solo:
            eng, nv, dual = r["policy_only"], r.get("naive_policy_only", {}), r.get("engine", {})
            ms, nms = eng.get("ms_per_step"), nv.get("ms_per_step")
            lines.append(
                f"| {r['device']} | {r['pair']} | {r['batch']} | {f(nms, 1) if nms else nv.get('error', '-')} | "
                f"{f(ms) if ms else eng.get('error', '-')} | {f(nms / ms, 1) + 'x' if nms and ms else '-'} | "
                f"{f(dual.get('ms_per_step'))} | {f(eng.get('policy_decode_ms'))} |"
            )
        text += "\nPolicy-only decode (the teacher is not run):\n\n" + "\n".join(lines) + "\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="small,4b-14b", help=f"comma-separated, from {sorted(PAIRS)}")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens per row")
    parser.add_argument("--methods", default="naive,engine", help="naive,engine,naive_policy_only,policy_only")
    parser.add_argument("--steps", type=int, default=30, help="timed engine steps")
    parser.add_argument("--naive-steps", type=int, default=5, help="timed naive steps")
    parser.add_argument("--naive-max-batch", type=int, default=256, help="skip the naive loop above this batch")
    parser.add_argument("--preset", default="balanced")
    parser.add_argument("--out", default="bench/results.jsonl")
    parser.add_argument("--table", metavar="FILE", help="print the markdown table of a results file and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    with torch.no_grad():
        run(args)


if __name__ == "__main__":
    main()
