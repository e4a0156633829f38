"""Packed batches against padded ones, on the same samples: supervised tokens/s, the share of
padding in a step, peak tensor memory and the mean loss, for a composed tiny base and a released
fixture (Qwen2.5-VL).

    python -m bench.packing                                  # both bases, the defaults below
    python -m bench.packing --bases composed --samples 128   # quicker

The records have a LLaVA-665K shape (its own small generator here: 1 + Poisson(2.2) turns, mean
3.2; answers of 1-400 words, log-normal, median ~25; 6% text-only), written as a LLaVA file and
read through the real dataset (`inputs.training_set`), so lengths are the tokenizer's and the
image expansion's. Three orders of the same samples, one pass each, from the same weights:
`padded-random` (batches of --batch samples in random order, padded to the longest),
`padded-grouped` (`--group_by_modality_length`'s sampler) and `packed` (`--packing true`: rows of
--max_length tokens, --rows rows a step). A step is forward, backward and an AdamW step, timed
alone (collation is the DataLoader workers' job); 2 untimed warm-up steps first. Peak memory is
the tensor bytes of the step holding the most tokens (fixtures/tensor_peak.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.exit("Run the benchmarks as modules, from the repository's root: python -m bench.packing --help")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from config import DataArguments  # noqa: E402
from constants import IGNORE_INDEX  # noqa: E402
from data.packing import PackedBatchSampler  # noqa: E402
from data.sampler import ModalityLengthGroupedSampler  # noqa: E402
from fixtures.synthetic import vocabulary  # noqa: E402
from fixtures.tensor_peak import TensorPeak  # noqa: E402
from fixtures.tiny_base import make_tiny_base  # noqa: E402
from fixtures.tiny_vlms import make_tiny_vlm  # noqa: E402
from model.freeze import apply_freeze_policy  # noqa: E402
from model.settings import ModelArguments  # noqa: E402
from run.checkpoint import load_base  # noqa: E402
from run.inputs import model_inputs  # noqa: E402

MIB = 2**20


def llava_like_records(n: int, seed: int) -> list[dict]:
    """`n` records of LLaVA-665K's shape, words from the demo's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    words = " ".join(vocabulary()).replace("<image>", "").split()

    def text(count: int) -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (count,), generator=g).tolist())

    records = []
    for k in range(n):
        turns = 1 + int(torch.poisson(torch.tensor(2.2), generator=g))
        with_image = float(torch.rand(1, generator=g)) >= 0.06
        conversations = []
        for t in range(turns):
            answer = int(min(400, max(1, math.exp(3.2 + 1.1 * float(torch.randn(1, generator=g))))))
            question = text(int(torch.randint(4, 20, (1,), generator=g)))
            conversations += [{"from": "human", "value": ("<image>\n" if t == 0 and with_image else "") + question},
                              {"from": "gpt", "value": text(answer)}]
        records.append({"id": str(k), "conversations": conversations, **({"image": "image.png"} if with_image else {})})
    return records


def base_args(name: str, folder: str) -> ModelArguments:
    if name == "composed":
        paths = make_tiny_base(os.path.join(folder, "base"), vocabulary(), seed=0)
        return ModelArguments(vision_model=paths["vision"], llm_model=paths["llm"], freeze_llm=False)
    return ModelArguments(vlm_model=make_tiny_vlm(name, os.path.join(folder, name), seed=0), freeze_llm=False)


def orders(dataset, args) -> dict[str, list[list[int]]]:
    """Each mode's batches (sample indices) for one pass over the same samples."""
    # A released VLM's samples are cut to max_length only at collation (the data check drops the
    # longer ones before training): keep those the sampler's estimate leaves a margin for.
    keep = [i for i, n in enumerate(dataset.lengths()) if n <= 0.85 * args.max_length]
    n, lengths, multimodal = len(keep), [dataset.lengths()[i] for i in keep], [dataset.multimodal()[i] for i in keep]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    grouped = list(ModalityLengthGroupedSampler(lengths, multimodal, args.batch, seed=args.seed))
    modes = {
        "padded-random": [perm[k : k + args.batch] for k in range(0, n, args.batch)],
        "padded-grouped": [grouped[k : k + args.batch] for k in range(0, n, args.batch)],
        "packed": list(PackedBatchSampler(lengths, args.max_length, args.rows, seed=args.seed)),
    }
    return {mode: [[keep[i] for i in batch] for batch in batches] for mode, batches in modes.items()}


def run_mode(margs, inputs, dataset, batches, packed: bool, args) -> dict:
    torch.manual_seed(0)
    model = load_base(margs)
    apply_freeze_policy(model, margs)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data_args = DataArguments(max_length=args.max_length, packing=packed)
    collate = inputs.packing_collator(data_args, args.rows) if packed else inputs.collator(args.max_length)
    made = [collate([dataset[i] for i in idx]) for idx in batches]

    def step(batch):
        items = (batch["labels"] != IGNORE_INDEX).sum()
        loss = model(**batch, num_items_in_batch=items).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for batch in made[:2]:
        step(batch)
    seconds, losses = 0.0, []
    for batch in made:
        start = time.perf_counter()
        losses.append(step(batch))
        seconds += time.perf_counter() - start
    tokens = sum(b["input_ids"].numel() for b in made)
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else _unpadded(b) for b in made)
    supervised = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in made)
    biggest = max(made, key=lambda b: b["input_ids"].numel())
    peak = TensorPeak(torch.device("cpu")).of(lambda: step(biggest))
    return {"steps": len(made), "supervised_tokens_per_s": supervised / seconds, "padding_share": 1 - real / tokens,
            "peak_tensor_MiB": peak / MIB, "mean_loss": sum(losses) / len(losses), "seconds": seconds}


def _unpadded(batch) -> int:
    """A packed batch's real tokens: all but each row's unlabelled tail (the padding sample)."""
    positions, ids = batch["position_ids"], batch["input_ids"]
    tail = 0
    for row in range(ids.shape[0]):
        starts = (positions[row] == 0).nonzero().flatten().tolist()
        last = starts[-1]
        tail += ids.shape[1] - last if bool((batch["labels"][row, last:] == IGNORE_INDEX).all()) else 0
    return ids.numel() - tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", default="composed,qwen2_5_vl")
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--rows", type=int, default=2, help="rows per packed batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        Image.new("RGB", (48, 48), (200, 30, 30)).save(os.path.join(folder, "image.png"))
        with open(os.path.join(folder, "records.json"), "w") as f:
            json.dump(llava_like_records(args.samples, args.seed), f)
        for name in args.bases.split(","):
            margs = base_args(name, folder)
            inputs = model_inputs(load_base(margs), margs)
            data = DataArguments(data_path=os.path.join(folder, "records.json"), image_folder=folder,
                                 max_length=args.max_length)
            dataset = inputs.training_set(data, set())
            batches = orders(dataset, args)
            kept = [i for batch in batches["padded-random"] for i in batch]
            print(f"\n{name}: {len(kept)} samples, mean {sum(dataset.lengths()[i] for i in kept) / len(kept):.0f} "
                  f"tokens (as the sampler counts them), max_length {args.max_length}")
            print(f"{'mode':<16}{'steps':>6}{'sup tok/s':>11}{'padding':>9}{'peak MiB':>10}{'mean loss':>11}{'x random':>10}")
            results = {}
            for mode, mode_batches in batches.items():
                results[mode] = r = run_mode(margs, inputs, dataset, mode_batches, mode == "packed", args)
                ratio = r["supervised_tokens_per_s"] / results["padded-random"]["supervised_tokens_per_s"]
                print(f"{mode:<16}{r['steps']:>6}{r['supervised_tokens_per_s']:>11.0f}{r['padding_share']:>9.1%}"
                      f"{r['peak_tensor_MiB']:>10.1f}{r['mean_loss']:>11.4f}{ratio:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
