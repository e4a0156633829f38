"""Training speed, model FLOPs, MFU and peak memory of a recipe; with --peer, against what a user
would pick instead: transformers' LlavaForConditionalGeneration trained by TRL's SFTTrainer.

    python -m scripts.bench --peer                        # cpu_small, every recipe: rows + ours/peer
    python -m scripts.bench --recipe lora                 # one row, ours only
    python -m scripts.bench --shape siglip_so400m_qwen25_05b --peer     # on a GPU (bf16)
    python -m scripts.bench --peer --peer_trainer trainer # the peer through transformers' Trainer
    python -m scripts.bench --shape siglip_so400m_qwen25_05b --dtype bfloat16 --plan_only  # no weights

(from the repository's root, as every script in scripts/ runs).

A shape (configs/shapes/NAME.yaml) is a vision config, an LLM config and a default batch. It is
built once with random weights (seed 0, nothing downloaded) and saved with save_pretrained:
vision/ and llm/ for ours, llava/ for the peer: the same tensors and the same connector start,
so both sides load through from_pretrained as a real run does and their losses agree (the table
prints both sides' first loss and mean training loss).

Both sides run the Trainer's loop (forward, backward, gradient clipping, fused AdamW, zero_grad)
on the same synthetic batches, which have no padding: ours through VLMTrainer (the project's
training path, parameter groups per component), the peer through SFTTrainer (or Trainer). Each
measurement is its own process, the sides alternated (ours, peer, ours, peer, ...); the table
shows medians, so neither side inherits the other's heap and machine drift cancels. Threads are
set alike on both sides (--threads, OMP_NUM_THREADS).

In a process: build, `--warmup_steps` untimed steps, `--steps` timed ones (the median interval
is the step time; the process's CPU time per step is shown beside it, which other processes on a
shared machine do not inflate), then one memory step. Peak memory is counted, not sampled: the
model's parameters and buffers and the optimizer's states (each storage once) plus the peak of
tensor bytes that the memory step allocates on top of them (see `StepMemory`). The plan is our
model's `--dry_run` plan (`tools.memory.plan_memory`) for the same batch. The device's peak
FLOP/s is a large matmul (fp32 on a CPU, bf16 on a GPU) timed in every process; the best counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import yaml
from transformers import HfArgumentParser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = os.path.join(REPO, "configs", "shapes")
# recipe -> ModelArguments flags, as the shipped configs set them.
RECIPES = {
    "full": {"freeze_vit": False, "freeze_qformer": False, "freeze_llm": False},  # configs/demo.yaml
    "frozen_vit": {"freeze_vit": True, "freeze_qformer": False, "freeze_llm": False},  # llava15_finetune
    "lora": {"freeze_vit": True, "freeze_qformer": False, "freeze_llm": True, "lora_enable": True,
             "lora_target": "llm"},  # llava15_lora
    "pretrain": {"freeze_vit": True, "freeze_qformer": False, "freeze_llm": True},  # llava15_pretrain
}
RESULT = "BENCH_RESULT "
MEMORY_STEPS = 1  # after the timed ones (the optimizer's states exist by then); its time is not counted
MIB = 2**20


@dataclass
class BenchArguments:
    recipe: str = field(default="all", metadata={"help": f"{' | '.join(RECIPES)} | all"})
    shape: str = field(default="cpu_small", metadata={"help": "A name in configs/shapes/, or a .yaml path."})
    peer: bool = field(default=False, metadata={"help": "Also run the peer, alternated; print ours/peer."})
    peer_trainer: str = field(
        default="sft",
        metadata={"help": "sft: TRL's SFTTrainer (its chunked LM-head loss); trainer: transformers' Trainer."},
    )
    batch_size: int | None = field(default=None, metadata={"help": "Samples per step; default: the shape's."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per sample, image tokens included."})
    images: int = field(default=1, metadata={"help": "Images per sample."})
    warmup_steps: int = field(default=2, metadata={"help": "Untimed steps first (optimizer states, caches)."})
    steps: int = field(default=5, metadata={"help": "Timed steps per process."})
    repeats: int = field(default=3, metadata={"help": "Processes per side; the table shows the medians."})
    # One thread by default: the 2 cores of the machine this was written on are shared, and two
    # OpenMP threads collapse when the other core is busy. Pass --threads 2 on a quiet machine.
    threads: int = field(default=1, metadata={"help": "torch / OpenMP threads of each side (CPU)."})
    gradient_checkpointing: bool = field(default=False)
    fused_loss: bool = field(default=True, metadata={"help": "Ours: the LM head fused with the loss (model/loss.py)."})
    plan_only: bool = field(
        default=False,
        metadata={"help": "Print each recipe's --dry_run plan, checkpointing off and on, from the shape's configs "
                  "alone (meta device: no weights, no training): a GPU shape planned on a laptop."},
    )
    dtype: str | None = field(default=None, metadata={"help": "Base weights; default float32 on CPU, bfloat16 on GPU."})
    # LoRA: configs/llava15_lora.yaml's r 128, alpha 256 unless the shape scales them down.
    lora_r: int | None = field(default=None, metadata={"help": "Default: the shape's lora_r, else 128."})
    lora_alpha: int | None = field(default=None, metadata={"help": "Default: the shape's lora_alpha, else 256."})
    lora_dropout: float = field(default=0.05)
    learning_rate: float = field(default=2e-5)
    workdir: str | None = field(default=None, metadata={"help": "Where built shapes are kept; default $TMPDIR/vlm_bench."})
    child: str | None = field(default=None, metadata={"help": "Internal: build | ours:RECIPE | peer:RECIPE."})


# --- shapes ---------------------------------------------------------------------------------------


def load_shape(name: str) -> tuple[str, dict]:
    path = name if name.endswith((".yaml", ".yml")) else os.path.join(SHAPES, f"{name}.yaml")
    with open(path) as f:
        shape = yaml.safe_load(f)
    return os.path.splitext(os.path.basename(path))[0], shape


def base_dir(args: BenchArguments, shape_name: str, shape: dict) -> str:
    """One folder per model config and dtype: an edited shape is built again, never reused stale."""
    model = [shape["vision"], shape["llm"], shape.get("vision_feature_layer", -2), args.dtype]
    key = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:10]
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), "vlm_bench")
    return os.path.join(workdir, f"{shape_name}-{key}")


def shape_config(shape: dict, part: str):
    """The transformers config of a shape's `vision` or `llm` section."""
    from transformers import CONFIG_MAPPING

    values = dict(shape[part])
    return CONFIG_MAPPING[values.pop("model_type")](**values)


def image_tokens_per_image(shape: dict) -> int:
    """mlp2x_gelu: one token per patch (a CLIP tower's CLS is dropped on both sides)."""
    return (shape["vision"]["image_size"] // shape["vision"]["patch_size"]) ** 2


def build_base(out: str, shape: dict, dtype_name: str) -> None:
    """vision/, llm/ (ours), connector.safetensors (our MLPProjector's seeded start) and llava/
    (the peer: the same vision, connector and LLM tensors in transformers' Llava layout)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from model.connectors.mlp import MLPProjector

    dtype = getattr(torch, dtype_name)
    vision_config, llm_config = shape_config(shape, "vision"), shape_config(shape, "llm")
    torch.manual_seed(0)
    vision = MODEL_MAPPING[type(vision_config)](vision_config).to(dtype)
    llm = AutoModelForCausalLM.from_config(llm_config).to(dtype)
    connector = MLPProjector(vision_config.hidden_size, llm_config.hidden_size, image_tokens_per_image(shape))  # fp32, as build_model makes it
    vision.save_pretrained(os.path.join(out, "vision"))
    llm.save_pretrained(os.path.join(out, "llm"))
    save_file(connector.state_dict(), os.path.join(out, "connector.safetensors"))

    has_cls = vision_config.model_type.startswith("clip")
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision_config,
            text_config=llm_config,
            image_token_index=peer_image_token(llm_config.vocab_size),
            image_seq_length=image_tokens_per_image(shape),
            projector_hidden_act="gelu",  # nn.GELU(), exact: our MLPProjector's activation
            vision_feature_layer=shape.get("vision_feature_layer", -2),
            # Llava's "default" drops the first token: right for CLIP's CLS, wrong for SigLIP.
            vision_feature_select_strategy="default" if has_cls else "full",
        )
    ).to(dtype)
    llava.model.vision_tower.load_state_dict(vision.state_dict())
    llava.model.multi_modal_projector.load_state_dict(connector.state_dict())
    llava.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    llava.save_pretrained(os.path.join(out, "llava"))
    with open(os.path.join(out, "complete"), "w") as f:
        f.write("built\n")


def write_configs(out: str, shape: dict) -> None:
    """vision/config.json and llm/config.json alone: what build_model(weights=False) reads."""
    for part in ("vision", "llm"):
        shape_config(shape, part).save_pretrained(os.path.join(out, part))


def supervised_positions(batch_size: int, seq_len: int, images: int, image_tokens: int) -> int:
    """Positions whose next token has a label in `synthetic_samples`' batches: the text after the
    images, less the last token, which predicts nothing."""
    return batch_size * (seq_len - 1 - images * image_tokens)


def peer_image_token(vocab_size: int) -> int:
    """Llava marks image positions with a real token id: the last one, which no text uses here."""
    return vocab_size - 1


# --- synthetic batches ----------------------------------------------------------------------------


def synthetic_samples(n: int, seq_len: int, images: int, image_tokens: int, vocab: int, image_size: int,
                      image_token: int):
    """`n` samples of exactly `seq_len` tokens (no padding): one text token, the image slots, then
    text. Labels on the text after the images, as an answer carries them; the image slots and the
    first token carry none. Seeded: both sides train on the same numbers."""
    import torch

    g = torch.Generator().manual_seed(0)
    slots = images * image_tokens
    if seq_len <= slots + 2:
        raise SystemExit(f"--seq_len {seq_len} leaves no text after {images} image(s) of {image_tokens} tokens.")
    input_ids = torch.randint(0, vocab - 1, (n, seq_len), generator=g)  # vocab - 1: the peer's image token
    labels = input_ids.clone()
    input_ids[:, 1 : 1 + slots] = image_token
    labels[:, : 1 + slots] = -100
    pixel_values = torch.randn(n * images, 3, image_size, image_size, generator=g)
    return input_ids, labels, pixel_values


class Collate:
    """Rows of the pre-built samples by index: the same cost on both sides, no padding."""

    def __init__(self, input_ids, labels, pixel_values, images: int):
        self.input_ids, self.labels, self.pixel_values, self.images = input_ids, labels, pixel_values, images

    def __call__(self, rows):
        import torch

        idx = torch.tensor([r["idx"] for r in rows])
        pix = (idx[:, None] * self.images + torch.arange(self.images)).flatten()
        ids = self.input_ids[idx]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[idx],
                "pixel_values": self.pixel_values[pix]}


# --- one side, in its own process -----------------------------------------------------------------


def device_peak_flops(device, dtype) -> float:
    """FLOP/s of a large square matmul, best of a few: the device's practical peak in this process."""
    import torch

    n = 1536 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(4 if device.type == "cpu" else 20):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class StepMemory:
    """The peak of tensor bytes that one training step allocates on top of what was live before
    it (the model, the optimizer's states): on a GPU from the CUDA allocator; on a CPU from the
    profiler's count of allocated tensor bytes (its "Total Allocated", the same definition).

    Not RSS (VmHWM, `ru_maxrss`): the first forward pages in ~50 MiB of libtorch code that is no
    tensor, and glibc keeps freed blocks resident, by up to +30% of a step here. Pinning glibc's
    mmap threshold to make RSS track live tensors, as scripts/bench_memory.py does, made steps
    2x slower here; timing must see the allocator users run."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self.profiler.start()

    def stop(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        self.profiler.stop()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            self.profiler.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        # Counted from the start of profiling: blocks allocated before it are not in it.
        return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def _model_args(args: BenchArguments, base: str, recipe: str, shape: dict):
    from config import ModelArguments

    return ModelArguments(
        vision_model=os.path.join(base, "vision"),
        llm_model=os.path.join(base, "llm"),
        dtype=args.dtype,
        vision_feature_layer=shape.get("vision_feature_layer", -2),
        connector="mlp2x_gelu",
        fused_loss=args.fused_loss,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        **RECIPES[recipe],
    )


def build_ours(args: BenchArguments, base: str, recipe: str, shape: dict):
    """build_model + apply_freeze_policy, as train.py does; the connector starts where the peer's does."""
    from safetensors.torch import load_file

    from model.build import build_model
    from model.freeze import apply_freeze_policy

    model_args = _model_args(args, base, recipe, shape)
    model = build_model(model_args)
    model.connector.load_state_dict(load_file(os.path.join(base, "connector.safetensors")))
    apply_freeze_policy(model, model_args)
    return model


def build_peer(args: BenchArguments, base: str, recipe: str, shape: dict):
    """LlavaForConditionalGeneration.from_pretrained, frozen as the recipe says with requires_grad,
    LoRA by peft on the same LLM linear layers (r, alpha, dropout) with the projector trainable.
    Trainable weights in fp32, frozen ones in the base dtype: what our freeze policy does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    from model.build import linear_module_names

    flags = RECIPES[recipe]
    model = LlavaForConditionalGeneration.from_pretrained(os.path.join(base, "llava"), dtype=getattr(torch, args.dtype))
    trains = {"vision_tower": not flags["freeze_vit"], "multi_modal_projector": not flags["freeze_qformer"],
              "language_model": not flags["freeze_llm"], "lm_head": not flags["freeze_llm"]}
    for name, param in model.named_parameters():
        part = next(p for p in trains if f"{p}." in name)
        param.requires_grad_(trains[part])
    if flags.get("lora_enable"):
        names = "|".join(linear_module_names(model.model.language_model))
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=rf".*language_model\..*\.({names})")
        model = get_peft_model(model, config)
        for param in model.base_model.model.model.multi_modal_projector.parameters():
            param.requires_grad_(True)  # peft froze it; the recipe trains it
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _count(model, component_of) -> dict[str, tuple[int, int]]:
    """component -> (trainable, total) parameters that reach the loss (a tied tensor once)."""
    out: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = component_of(name)
        if part:
            row = out.setdefault(part, [0, 0])
            row[0] += param.numel() * param.requires_grad
            row[1] += param.numel()
    return {k: tuple(v) for k, v in out.items()}


def _peer_component(name: str) -> str | None:
    if "vision_tower." in name:
        return None  # it holds layers past the feature layer (and a pooling head) that ours cuts off
    if "multi_modal_projector." in name:
        return "connector"
    return "llm"


def run_side(args: BenchArguments, side: str, recipe: str) -> dict:
    """In the child: build one side, warm up, train `warmup_steps + steps`, measure."""
    import gc

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from tools.flops import step_flops
    from tools.memory import plan_memory, weight_bytes

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_flops = device_peak_flops(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    memory = StepMemory(device)

    shape_name, shape = load_shape(args.shape)
    base = base_dir(args, shape_name, shape)
    batch_size, seq_len = args.batch_size, args.seq_len
    torch.manual_seed(0)
    ours = build_ours(args, base, recipe, shape) if side == "ours" else None
    model = ours if side == "ours" else build_peer(args, base, recipe, shape)
    model.to(device)

    image_size, vocab = shape["vision"]["image_size"], shape["llm"]["vocab_size"]
    image_tokens = image_tokens_per_image(shape)
    image_token = ours.image_token_index if side == "ours" else peer_image_token(vocab)
    input_ids, labels, pixel_values = synthetic_samples(
        batch_size, seq_len, args.images, image_tokens, vocab, image_size, image_token
    )
    supervised = supervised_positions(batch_size, seq_len, args.images, image_tokens)
    flops = step_flops(ours, batch_size, seq_len, args.images, supervised) if side == "ours" else None
    plan = None
    if side == "ours":
        plan = plan_memory(model, batch_size, seq_len, args.gradient_checkpointing, images_per_sample=args.images,
                           supervised_tokens=supervised, padded=False)
    counts = _count(model, lambda n: n.split(".", 1)[0]) if side == "ours" else _count(model, _peer_component)
    collate = Collate(input_ids, labels, pixel_values, args.images)

    # The first loss, before any step, in eval mode (no dropout): equal on both sides when they
    # compute the same function from the same weights. A sample at a time: eval's logits are
    # [B, L, V] (623 MiB at batch 4 x 256 and a 152k vocabulary), which would set the peak RSS
    # instead of training; every sample has as many labels, so the mean of means is the batch's.
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(batch_size):
            sample = {k: v.to(device) for k, v in collate([{"idx": i}]).items()}
            losses.append(float(model(**sample).loss))
    loss0 = statistics.fmean(losses)
    del sample
    model.train()

    clock, cpu_clock, marks = [], [], {}
    timed_end = args.warmup_steps + args.steps

    class StepClock(TrainerCallback):
        def on_step_begin(self, train_args, state, control, **kwargs):
            if state.global_step == timed_end:  # the memory step
                gc.collect()
                memory.start()

        def on_step_end(self, train_args, state, control, **kwargs):
            _sync(device)
            clock.append(time.perf_counter())
            cpu_clock.append(time.process_time())
            if state.global_step == timed_end + MEMORY_STEPS:
                marks["step_bytes"] = memory.stop()

    dataset = Dataset.from_dict({"idx": [i % batch_size for i in range(batch_size * (timed_end + MEMORY_STEPS))]})
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        per_device_train_batch_size=batch_size,
        max_steps=timed_end + MEMORY_STEPS,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        activation_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=device.type == "cuda",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    if side == "ours":
        from config import TrainArguments
        from run.trainer import VLMTrainer

        trainer = VLMTrainer(model=model, args=TrainArguments(**common), train_dataset=dataset,
                             data_collator=collate, callbacks=[StepClock()])
    elif args.peer_trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        from patches import cap_trl_chunk_size
        from tools.tiny_base import build_tokenizer

        # TRL scores the LM head in tiles 32768 words wide: a fraction of a real vocabulary
        # (Qwen2.5: 151,936) but 8x all of cpu_small's, where the tile's unused columns would
        # count against the peer. No wider than the vocabulary, it costs what it does at a real one.
        cap_trl_chunk_size(vocab)
        config = SFTConfig(**common, gradient_checkpointing=args.gradient_checkpointing,
                           dataset_kwargs={"skip_prepare_dataset": True})
        # SFTTrainer wants a tokenizer; the batches are already token ids, so any one does.
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, data_collator=collate,
                             processing_class=build_tokenizer(["a b c"], vocab_size=300),
                             callbacks=[StepClock()])
    else:
        from transformers import Trainer, TrainingArguments

        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset,
                          data_collator=collate, callbacks=[StepClock()])
    train_loss = trainer.train().training_loss

    def timed(stamps):  # the timed steps' intervals, each from the end of the step before
        return [b - a for a, b in zip(stamps[args.warmup_steps - 1 : timed_end - 1], stamps[args.warmup_steps : timed_end],
                                      strict=True)]

    # CPU time of this process per step: on a shared machine, robust to other processes taking
    # the core (wall time is not); equal to wall time on a quiet machine with one thread.
    intervals, cpu_intervals = timed(clock), timed(cpu_clock)
    weights = sum(weight_bytes(model).values())
    states = _tensor_bytes(v for state in trainer.optimizer.state.values() for v in state.values())
    return {
        "side": side,
        "recipe": recipe,
        "step_s": statistics.median(intervals),
        "intervals": intervals,
        "cpu_s": statistics.median(cpu_intervals),
        "loss0": loss0,
        "train_loss": train_loss,
        # Tensors counted, the rest measured: the model's parameters and buffers and the
        # optimizer's states (each storage once: what a GPU allocator holds for them) plus the
        # peak that a training step adds on top of them (gradients, activations, the loss).
        "peak_bytes": weights + states + marks["step_bytes"],
        # The process's peak resident set (host memory): tensors plus libtorch's code, Python and
        # what glibc keeps after frees. Shown beside the counted peak, for both sides alike.
        "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "weight_bytes": weights,
        "state_bytes": states,
        "step_bytes": marks["step_bytes"],
        "plan_total": plan.total if plan else None,
        "plan_step": plan.gradients + plan.activations if plan else None,
        "flops": flops,
        "device_flops": peak_flops,
        "counts": counts,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "device": str(device),
        "dtype": args.dtype,
    }


def _tensor_bytes(tensors) -> int:
    import torch

    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


# --- the parent: alternate, take medians, print -----------------------------------------------------


def _words(args: BenchArguments, **override) -> list[str]:
    words = []
    for f in dataclasses.fields(args):
        value = override.get(f.name, getattr(args, f.name))
        if value is not None:
            words += [f"--{f.name}", str(value)]
    return words


def _child(args: BenchArguments, what: str) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "scripts.bench", *_words(args, child=what)],
                         cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"bench child {what!r} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :]) if lines else None


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    return f"{model}, {os.cpu_count()} cores"


def summarize(runs: list[dict], device_flops: float) -> dict:
    step = statistics.median(r["step_s"] for r in runs)
    first = runs[0]
    tokens = first["batch_size"] * first["seq_len"]
    return {
        "step_s": step,
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "samples_s": first["batch_size"] / step,
        "tokens_s": tokens / step,
        "peak_mib": statistics.median(r["peak_bytes"] for r in runs) / MIB,
        "step_mib": statistics.median(r["step_bytes"] for r in runs) / MIB,
        "rss_mib": statistics.median(r["rss_bytes"] for r in runs) / MIB,
        "loss0": first["loss0"],
        "train_loss": statistics.median(r["train_loss"] for r in runs),
        "device_flops": device_flops,
    }


HEADER = (f"{'recipe':<11} {'side':<5} {'step_s':>7} {'cpu_s':>7} {'samples/s':>9} {'tokens/s':>8} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>7} {'MFU':>5} {'peak_MiB':>8} {'plan_MiB':>8} {'peak/plan':>9} "
          f"{'step_MiB':>8} {'plan_step':>9} {'rss_MiB':>8} {'loss0':>7} {'loss':>7}")


def format_row(recipe: str, side: str, s: dict, flops: float, plan_total: int, plan_step: int) -> str:
    achieved = flops / s["step_s"]
    return (
        f"{recipe:<11} {side:<5} {s['step_s']:>7.4f} {s['cpu_s']:>7.4f} {s['samples_s']:>9.2f} "
        f"{s['tokens_s']:>8.1f} {flops / 1e9:>10.3f} {achieved / 1e9:>7.2f} {achieved / s['device_flops']:>5.3f} "
        f"{s['peak_mib']:>8.1f} {plan_total / MIB:>8.1f} {s['peak_mib'] * MIB / plan_total:>9.3f} "
        f"{s['step_mib']:>8.1f} {plan_step / MIB:>9.1f} {s['rss_mib']:>8.1f} {s['loss0']:>7.4f} {s['train_loss']:>7.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(BenchArguments, allow_abbrev=False).parse_args_into_dataclasses(args=argv)
    shape_name, shape = load_shape(args.shape)
    # Unset settings from the shape, resolved here so that every child gets the same values.
    if args.dtype is None:
        args.dtype = "bfloat16" if _cuda_available() else "float32"
    args.batch_size = args.batch_size or shape["batch_size"]
    args.seq_len = args.seq_len or shape["seq_len"]
    args.lora_r = args.lora_r or shape.get("lora_r", 128)
    args.lora_alpha = args.lora_alpha or shape.get("lora_alpha", 256)
    if args.peer_trainer not in ("sft", "trainer"):
        raise SystemExit(f"--peer_trainer {args.peer_trainer!r}: choose sft or trainer.")
    if args.plan_only:
        print_plans(args, shape_name, shape)
        return
    if args.child:
        kind, _, recipe = args.child.partition(":")
        if kind == "build":
            build_base(base_dir(args, shape_name, shape), shape, args.dtype)
            return
        print(RESULT + json.dumps(run_side(args, kind, recipe)), flush=True)
        return

    if args.warmup_steps < 1 or args.steps < 1:
        raise SystemExit("--warmup_steps and --steps must be at least 1: a step is timed from the end of the one before.")
    recipes = list(RECIPES) if args.recipe == "all" else [args.recipe]
    if any(r not in RECIPES for r in recipes):
        raise SystemExit(f"--recipe {args.recipe!r}: choose {', '.join(RECIPES)} or all.")
    base = base_dir(args, shape_name, shape)
    if not os.path.isfile(os.path.join(base, "complete")):
        _child(args, "build")

    sides = ["ours", "peer"] if args.peer else ["ours"]
    results = {(r, s): [] for r in recipes for s in sides}
    for recipe in recipes:
        for _ in range(args.repeats):
            for side in sides:  # alternated: ours, peer, ours, peer, ...
                results[recipe, side].append(_child(args, f"{side}:{recipe}"))

    everything = [r for runs in results.values() for r in runs]
    device_flops = max(r["device_flops"] for r in everything)
    first = everything[0]
    batch, seq = first["batch_size"], first["seq_len"]
    load = os.getloadavg()
    print(
        f"bench: shape {shape_name}, batch {batch} x {seq} tokens, {args.images} image(s)/sample, "
        f"{first['dtype']} on {first['device']} ({_device_name()}), {args.threads} thread(s), "
        f"warm-up {args.warmup_steps} + {args.steps} timed steps, {args.repeats} process(es) per side "
        f"(medians), gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"peer {'TRL SFTTrainer' if args.peer_trainer == 'sft' else 'transformers Trainer'} + "
        f"LlavaForConditionalGeneration, device peak {device_flops / 1e9:.1f} GFLOP/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(HEADER)
    ratios = []
    for recipe in recipes:
        ours = results[recipe, "ours"]
        flops = ours[0]["flops"]["total"]
        plan_total, plan_step = ours[0]["plan_total"], ours[0]["plan_step"]
        summary = {side: summarize(results[recipe, side], device_flops) for side in sides}
        if args.peer:
            ours_counts, peer_counts = ours[0]["counts"], results[recipe, "peer"][0]["counts"]
            for part in ("connector", "llm"):  # the same weights train on both sides
                if ours_counts[part] != peer_counts[part]:
                    raise SystemExit(f"{recipe}: {part} trainable/total {ours_counts[part]} (ours) vs "
                                     f"{peer_counts[part]} (peer): the sides do not train the same model.")
        for side in sides:
            print(format_row(recipe, side, summary[side], flops, plan_total, plan_step))
        if args.peer:
            ratios.append(
                f"{recipe} ours/peer step-time {summary['ours']['step_s'] / summary['peer']['step_s']:.3f} "
                f"memory {summary['ours']['peak_mib'] / summary['peer']['peak_mib']:.3f} "
                f"rss {summary['ours']['rss_mib'] / summary['peer']['rss_mib']:.3f}"
            )
    for line in ratios:
        print(line)


def print_plans(args: BenchArguments, shape_name: str, shape: dict) -> None:
    """Each recipe's plan for the shape's batch, built on the meta device from its configs."""
    from model.build import build_model
    from model.freeze import apply_freeze_policy
    from tools.memory import plan_memory

    configs = os.path.join(args.workdir or os.path.join(tempfile.gettempdir(), "vlm_bench"), f"{shape_name}-configs")
    write_configs(configs, shape)
    image_tokens = image_tokens_per_image(shape)
    supervised = supervised_positions(args.batch_size, args.seq_len, args.images, image_tokens)
    print(f"plan: shape {shape_name}, batch {args.batch_size} x {args.seq_len} tokens, {args.images} image(s) of "
          f"{image_tokens} tokens/sample, {supervised} labelled positions, {args.dtype}, AdamW, MiB per device")
    print(f"{'recipe':<11} {'weights':>9} {'grads':>9} {'adamw':>9} {'act_off':>9} {'act_on':>9} {'total_off':>9} {'total_on':>9}")
    recipes = list(RECIPES) if args.recipe == "all" else [args.recipe]
    for recipe in recipes:
        model_args = _model_args(args, configs, recipe, shape)
        model = build_model(model_args, weights=False)
        apply_freeze_policy(model, model_args)
        plan = plan_memory(model, args.batch_size, args.seq_len, False, images_per_sample=args.images,
                           supervised_tokens=supervised, padded=False)
        fixed = plan.weights_total + plan.gradients + plan.optimizer
        print(f"{recipe:<11} " + " ".join(
            f"{value / MIB:>9.1f}" for value in (plan.weights_total, plan.gradients, plan.optimizer,
                                                 plan.activations_no_ckpt, plan.activations_ckpt)
        ) + f" {(fixed + plan.activations_no_ckpt) / MIB:>9.1f} {(fixed + plan.activations_ckpt) / MIB:>9.1f}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
