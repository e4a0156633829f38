"""bench/loss.py --plan: what each method holds at the GPU shape (labelled rows, hidden sizes, a
151,936-word vocabulary, bf16), computed from the code's constants, nothing measured.
"""

from __future__ import annotations

import math


def plan_rows(n: int, d: int, v: int) -> list[dict]:
    """Per method, at n labelled rows, hidden d, vocab v, bf16 on a CUDA GPU (SM 8.0+), from the code:

    - ours (model/loss.py): C = CHUNK_ELEMENTS // V rows a chunk; a chunk holds its [C, V] logits
      in bf16 and their fp32 upcast at once (then the fp32 gradient and its bf16 copy): 6 B/element.
      Head gradient: an fp32 [V, D] accumulator, each chunk's bf16 [V, D] product added into it,
      cast to bf16 at the end.
    - torch (`LinearCrossEntropyOptions()`: acc_policy auto -> "compact" on CUDA, acc_dtype -> fp32
      for bf16 at SM 8.0+): a [B, V] fp32 logits buffer and its bf16 downcast (input- and
      weight-gradient matmuls): 6 B/element; the head gradient accumulates in bf16 (addmm_ into the
      [V, D] bf16 result, chunk by chunk). B from its chunking heuristic (patches.torch_default_chunk_rows).
    - TRL (ChunkedLogProbFunction with Triton): one [min(N, TOKEN_CHUNK_SIZE), chunk_size] tile in
      the compute dtype (bf16), folded in place by its kernels; fp32 accumulators for the hidden
      states' and head's gradients; the backward recomputes every tile (4 head matmuls, not 3).
    - unfused: [N, V] bf16 logits, their fp32 upcast and the fp32 log-probabilities in the forward;
      the fp32 gradient of the log-probabilities and its bf16 cast in the backward (10 B/element).

    GFLOP: the head's matmuls (2NVD each: 3, or 4 where the backward recomputes the logits).
    [V, D] operand passes: every head matmul over a chunk of rows streams one [V, D] operand (the
    weight, or the weight-gradient accumulator) through memory; counted at 2 bytes an element.
    Small chunks make the head memory-bound on a GPU: the weight is re-read for every chunk.
    """
    import torch
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE

    import model.loss
    from bench.patches import torch_default_chunk_rows, trl_chunk_size

    mib = 2**20
    rows = []
    c_ours = max(1, model.loss.CHUNK_ELEMENTS // v)
    rows.append(dict(method="ours", chunk=f"{min(c_ours, n)} rows", chunks=math.ceil(n / c_ours),
                     logits_mib=min(c_ours, n) * v * 6 / mib, vd_mib=v * d * (4 + 2) / mib,
                     vd_note="fp32 acc + bf16 product/chunk", weight_passes=3 * math.ceil(n / c_ours), head_matmuls=3))
    # device=None resolves acc_policy to "compact", the CUDA pick for bf16; the chunk heuristic is device-independent.
    b_default = torch_default_chunk_rows(n, d, v, torch.bfloat16, None)
    for label, b in (("torch_default", b_default), ("torch_chunk (= ours' rows)", min(c_ours, n))):
        rows.append(dict(method=label, chunk=f"{b} rows", chunks=math.ceil(n / b), logits_mib=b * v * 6 / mib,
                         vd_mib=v * d * 2 / mib, vd_note="bf16 result, accumulated in bf16",
                         weight_passes=3 * math.ceil(n / b), head_matmuls=3))
    tile_cols = min(trl_chunk_size(), v)
    token_chunks = math.ceil(n / TOKEN_CHUNK_SIZE)
    rows.append(dict(method="trl", chunk=f"{min(n, TOKEN_CHUNK_SIZE)} x {tile_cols} tile",
                     chunks=token_chunks * math.ceil(v / tile_cols),
                     logits_mib=min(n, TOKEN_CHUNK_SIZE) * tile_cols * 2 / mib, vd_mib=v * d * (4 + 2) / mib,
                     vd_note="fp32 acc + bf16 cast", weight_passes=4 * token_chunks, head_matmuls=4))
    rows.append(dict(method="unfused", chunk=f"{n} rows", chunks=1, logits_mib=n * v * 10 / mib,
                     vd_mib=v * d * 2 / mib, vd_note="bf16", weight_passes=3, head_matmuls=3))
    for r in rows:
        r.update(rows_n=n, hidden=d, vocab=v, gflop=r["head_matmuls"] * 2 * n * v * d / 1e9,
                 weight_gib=r["weight_passes"] * v * d * 2 / 2**30)
    return rows


def print_plan(args) -> None:
    print(f"# GPU plan: {args.plan_rows} labelled rows, vocab {args.plan_vocab}, bf16, CUDA SM 8.0+ (computed, not measured)")
    print("| hidden | method | chunk | chunks | logits held MiB | [V, D] head-grad buffers MiB | head matmul GFLOP | [V, D] operand passes GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.plan_hiddens:
        for r in plan_rows(args.plan_rows, d, args.plan_vocab):
            print(f"| {d} | {r['method']} | {r['chunk']} | {r['chunks']} | {r['logits_mib']:.1f} | "
                  f"{r['vd_mib']:.0f} ({r['vd_note']}) | {r['gflop']:.0f} | {r['weight_gib']:.1f} |")
