"""bench/loss.py --bf16: each method's loss and gradients in bf16 (bf16 weights, and fp32 weights
under bf16 autocast) against float64, in this process, at a small size: what the fp32 table
cannot show.
"""

from __future__ import annotations

from bench.loss_methods import loss_function, make_inputs
from constants import IGNORE_INDEX


def bf16_accuracy(args) -> list[dict]:
    """Each method in bf16 against float64 on the same bf16-rounded operands: the loss it returns
    (its dtype and its error) and the relative error (Frobenius) of the head's and the hidden
    states' gradients. Two precisions: bf16 weights, and fp32 weights under bf16 autocast (the
    Trainer's --bf16). In this process, small: --bf16_rows x --bf16_hidden x --bf16_vocab, every
    chunked method at the same --bf16_chunk rows (ours through CHUNK_ELEMENTS), torch's defaults
    too. What differs is where the chunks' head gradients are summed: ours and TRL in fp32, torch
    in the input dtype."""
    import torch
    import torch.nn.functional as F

    import model.loss

    torch.set_num_threads(args.threads)
    n, d, v, c = args.bf16_rows, args.bf16_hidden, args.bf16_vocab, args.bf16_chunk
    hidden0, head, labels = make_inputs(n, d, v, args.ignore_frac, args.seed)
    hidden0 = hidden0.detach()
    model.loss.CHUNK_ELEMENTS = c * v  # ours at --bf16_chunk rows, as torch_chunk
    rows = []
    for precision in ("bf16 weights", "fp32 weights, bf16 autocast"):
        autocast = precision.endswith("autocast")
        # float64 on the operands the bf16 matmuls see
        h64 = hidden0.bfloat16().double().requires_grad_()
        w64 = head.weight.detach().bfloat16().double().requires_grad_()
        ref_loss = F.cross_entropy(h64 @ w64.T, labels, ignore_index=IGNORE_INDEX)
        ref_loss.backward()
        for method in ("ours", "torch_default", "torch_chunk", "trl_nll", "unfused"):
            dtype = torch.float32 if autocast else torch.bfloat16
            hidden = hidden0.to(dtype).clone().requires_grad_()
            method_head = torch.nn.Linear(d, v, bias=False).to(dtype)
            method_head.weight.data.copy_(head.weight.detach())
            fn = loss_function(method, hidden, method_head, labels, c, min(v, 32768))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fn()
            loss.backward()
            rows.append({
                "precision": precision,
                "method": method,
                "loss_dtype": str(loss.dtype).replace("torch.", ""),
                "loss_err": abs(float(loss.detach()) - float(ref_loss.detach())),
                "weight_grad_err": float((method_head.weight.grad.double() - w64.grad).norm() / w64.grad.norm()),
                "hidden_grad_err": float((hidden.grad.double() - h64.grad).norm() / h64.grad.norm()),
                "weight_grad_dtype": str(method_head.weight.grad.dtype).replace("torch.", ""),
            })
    return rows


def print_bf16(args) -> None:
    print(f"# bf16 accuracy: {args.bf16_rows} rows, hidden {args.bf16_hidden}, vocab {args.bf16_vocab}, "
          f"chunks of {args.bf16_chunk} rows (torch_default: its own), against float64")
    print("| precision | method | loss dtype | abs loss error | head grad rel error | hidden grad rel error |")
    print("|---|---|---|---|---|---|")
    for r in bf16_accuracy(args):
        print(f"| {r['precision']} | {r['method']} | {r['loss_dtype']} | {r['loss_err']:.1e} | "
              f"{r['weight_grad_err']:.2e} | {r['hidden_grad_err']:.2e} |")
