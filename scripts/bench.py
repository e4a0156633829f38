"""Training speed, model FLOPs, MFU and peak memory of a recipe; with --peer, against what a user
would pick instead: transformers' LlavaForConditionalGeneration trained by TRL's SFTTrainer.

    python -m scripts.bench --peer                        # cpu_small, every recipe: rows + ours/peer
    python -m scripts.bench --recipe lora                 # one row, ours only
    python -m scripts.bench --shape siglip_so400m_qwen25_05b --peer     # on a GPU (bf16)
    python -m scripts.bench --peer --peer_trainer trainer # the peer through transformers' Trainer
    python -m scripts.bench --shape siglip_so400m_qwen25_05b --dtype bfloat16 --plan_only  # no weights
    python -m scripts.bench --shape cpu_qwen25vl --peer   # native: one released Qwen2.5-VL, both sides

(from the repository's root, as every script in scripts/ runs).

A shape (configs/shapes/NAME.yaml) is a vision config, an LLM config and a default batch. It is
built once with random weights (seed 0, nothing downloaded) and saved with save_pretrained:
vision/ and llm/ for ours, llava/ for the peer: the same tensors and the same connector start,
so both sides load through from_pretrained as a real run does and their losses agree (the table
prints both sides' first loss and mean training loss). A native shape (`kind: native`) is one
released model instead (a qwen2_5_vl config): one folder, model and processor, which ours loads
with --vlm_model (model/released.py, load_base) and the peer with AutoModelForImageTextToText;
its batches come from the model's own processor and chat template (data/processor_prompt.py).

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
tensor bytes that the memory step allocates on top of them (see `StepMemory`). Peak RSS is read
before the memory step, whose profiler allocates too. The plan is our model's `--dry_run` plan
(`tools.memory.plan_memory`) for the same batch; a native shape has none. The device's peak
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


def is_native(shape: dict) -> bool:
    """A native shape is one released model (its `model_type`, e.g. qwen2_5_vl) that both sides
    train; a composed one (the default) is a tower and an LLM, ours composed, the peer Llava."""
    return shape.get("kind", "composed") == "native"


def base_dir(args: BenchArguments, shape_name: str, shape: dict) -> str:
    """One folder per model config and dtype: an edited shape is built again, never reused stale."""
    model = [shape["vision"], shape["llm"], shape.get("vision_feature_layer", -2), args.dtype]
    if is_native(shape):
        model = [shape["model_type"], shape["vision"], shape["llm"], shape["image_size"],
                 shape.get("tie_word_embeddings", False), args.dtype]
    key = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:10]
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), "vlm_bench")
    return os.path.join(workdir, f"{shape_name}-{key}")


def shape_config(shape: dict, part: str):
    """The transformers config of a shape's `vision` or `llm` section."""
    from transformers import CONFIG_MAPPING

    values = dict(shape[part])
    return CONFIG_MAPPING[values.pop("model_type")](**values)


def image_tokens_per_image(shape: dict) -> int:
    """mlp2x_gelu: one token per patch (a CLIP tower's CLS is dropped on both sides). A native
    Qwen2.5-VL: one token per 2 x 2 patches (its merger), of an `image_size` square image."""
    if is_native(shape):
        vision = shape["vision"]
        return (shape["image_size"] // vision["patch_size"] // vision["spatial_merge_size"]) ** 2
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


# --- a native shape: one released model, both sides ------------------------------------------------

# tools/tiny_vlms.py's Qwen2.5-VL tokenizer: these special tokens take ids 0..6, in this order.
QWEN2_5_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]
NATIVE_PROMPT = "Describe the picture."


def native_processor(shape: dict):
    """Qwen2.5-VL's processor, built offline from tools/tiny_vlms.py's pieces (a byte-level BPE
    tokenizer with the family's special tokens, its ChatML template), the pixel budget set so that
    an `image_size` square image keeps its size."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from tools.tiny_vlms import QWEN2_5_VL_TEMPLATE, _tokenizer

    vision, size = shape["vision"], shape["image_size"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    if shape["model_type"] != "qwen2_5_vl" or size % unit:
        raise SystemExit(f"native shape: a qwen2_5_vl model with image_size a multiple of {unit} (patch x merge).")
    tokenizer = _tokenizer(QWEN2_5_VL_SPECIALS, QWEN2_5_VL_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    pixels = dict(min_pixels=size * size, max_pixels=size * size, patch_size=vision["patch_size"],
                  merge_size=vision["spatial_merge_size"], temporal_patch_size=vision["temporal_patch_size"])
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN2_5_VL_TEMPLATE)


def native_config(shape: dict, tokenizer):
    """The model's config: the shape's vision and llm sections, the tokenizer's special ids."""
    from transformers import CONFIG_MAPPING

    image, video, start, end = tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    vision = {k: v for k, v in shape["vision"].items() if k != "model_type"}
    text = {k: v for k, v in shape["llm"].items() if k != "model_type"}
    text.update(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CONFIG_MAPPING[shape["model_type"]](
        vision_config=vision, text_config=text, image_token_id=image, video_token_id=video,
        vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=shape.get("tie_word_embeddings", False),
    )


def build_native(out: str, shape: dict, dtype_name: str) -> None:
    """One folder in the released layout, which `--vlm_model DIR` (ours) and
    AutoModelForImageTextToText (the peer) both load: the model, random weights (seed 0), and its
    processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    processor = native_processor(shape)
    config = native_config(shape, processor.tokenizer)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).to(getattr(torch, dtype_name))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    with open(os.path.join(out, "complete"), "w") as f:
        f.write("built\n")


def native_samples(base: str, shape: dict, n: int, seq_len: int, images: int, vocab: int) -> dict:
    """`n` samples of exactly `seq_len` tokens (no padding), made by the model's own processor and
    chat template through data/processor_prompt.encode_batch: a user turn of `images` seeded
    random images and a question, an assistant answer. The answer is lengthened with seeded random
    text tokens (no special token) to `seq_len`; labels on the answer and its end of turn only, as
    encode_batch sets them. Both sides train on these very tensors."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from data.processor_prompt import SEQUENCE_KEYS, encode_batch

    processor = AutoProcessor.from_pretrained(base)
    rng, size = np.random.default_rng(0), shape["image_size"]
    messages = [{"role": "user", "content": "<image>\n" * images + NATIVE_PROMPT}, {"role": "assistant", "content": "A"}]
    batch = encode_batch(processor, [
        (messages, [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(images)])
        for _ in range(n)
    ])
    assert bool(batch["attention_mask"].all()), "the same prompt and image size on every row: no padding"
    answer = int((batch["labels"][0] != -100).nonzero()[0])  # the first supervised position, every row's
    extra = seq_len - batch["input_ids"].shape[1]
    if extra < 0:
        raise SystemExit(f"--seq_len {seq_len}: the prompt and {images} image(s) take {seq_len - extra} tokens.")
    low = 1 + max(processor.tokenizer.added_tokens_decoder)  # past every special token
    text = torch.randint(low, vocab, (n, extra), generator=torch.Generator().manual_seed(0))
    fills = {"input_ids": text, "labels": text, "attention_mask": torch.ones_like(text)}
    for key in [*SEQUENCE_KEYS, "labels"]:
        if key in batch:  # token_type_ids, mm_token_type_ids: 0, text
            fill = fills.get(key, torch.zeros_like(text))
            batch[key] = torch.cat([batch[key][:, :answer], fill, batch[key][:, answer:]], dim=1)
    return batch


class NativeCollate:
    """Rows of a native batch by index: their tokens, their images' patches and grids (every image
    the same size, so each row holds as many patches)."""

    def __init__(self, batch: dict, images: int):
        n = batch["input_ids"].shape[0]
        self.rows = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        self.pixel_values = batch["pixel_values"].reshape(n, -1, batch["pixel_values"].shape[-1])
        self.grid = batch["image_grid_thw"].reshape(n, images, 3)

    def __call__(self, rows):
        import torch

        idx = torch.tensor([r["idx"] for r in rows])
        out = {k: v[idx] for k, v in self.rows.items()}
        out["pixel_values"] = self.pixel_values[idx].flatten(0, 1)
        out["image_grid_thw"] = self.grid[idx].flatten(0, 1)
        return out


def build_native_ours(args: BenchArguments, base: str, recipe: str):
    """The repository's path for a released VLM, as train.py takes it: load_base with --vlm_model
    (model/released.py), then apply_freeze_policy."""
    from config import ModelArguments
    from model.freeze import apply_freeze_policy
    from run.checkpoint import load_base

    model_args = ModelArguments(vlm_model=base, dtype=args.dtype, fused_loss=args.fused_loss, lora_r=args.lora_r,
                                lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, **RECIPES[recipe])
    model = load_base(model_args)
    apply_freeze_policy(model, model_args)
    return model


def build_native_peer(args: BenchArguments, base: str, recipe: str):
    """AutoModelForImageTextToText.from_pretrained of the same folder, frozen as the recipe says
    with requires_grad, LoRA by peft on every linear layer of the LLM (r, alpha, dropout) with the
    merger trainable. Trainable weights in fp32, frozen ones in the base dtype."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from model.build import linear_module_names

    flags = RECIPES[recipe]
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=getattr(torch, args.dtype))
    trains = {"vision": not flags["freeze_vit"], "connector": not flags["freeze_qformer"], "llm": not flags["freeze_llm"]}
    for name, param in model.named_parameters():
        param.requires_grad_(trains[native_component(name)])
    if flags.get("lora_enable"):
        names = "|".join(linear_module_names(model.model.language_model))
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=rf".*language_model\..*\.({names})")
        model = get_peft_model(model, config)
        for name, param in model.named_parameters():
            if native_component(name) == "connector":
                param.requires_grad_(trains["connector"])  # peft froze it; the recipe trains it
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def native_component(name: str) -> str:
    """A Qwen2.5-VL parameter's component, by transformers' names: the merger (the connector)
    sits inside the tower `visual`; the rest is the LLM, its head included."""
    if ".merger." in f".{name}":
        return "connector"
    return "vision" if ".visual." in f".{name}" else "llm"


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


@dataclass
class Side:
    """One side built in its child, on its device: the model, its batches, and what the row says
    of it beside the timings (ours only: model FLOPs and the plan)."""

    model: object
    collate: object
    counts: dict
    vocab: int
    flops: dict | None = None
    plan: object = None


def build_side(args: BenchArguments, side: str, recipe: str, device) -> Side:
    """The shape's model for `side` (seeded), its synthetic batches, and ours' FLOPs and plan."""
    shape_name, shape = load_shape(args.shape)
    base = base_dir(args, shape_name, shape)
    if is_native(shape):
        return _native_side(args, side, recipe, device, base, shape)
    return _composed_side(args, side, recipe, device, base, shape)


def _native_side(args: BenchArguments, side: str, recipe: str, device, base: str, shape: dict) -> Side:
    """Both sides: the same released model from the same folder, the same processor-made batches.
    No plan: tools/memory.py plans a composed base."""
    import torch

    from tools.flops import qwen2_5_vl_step_flops

    torch.manual_seed(0)
    model = build_native_ours(args, base, recipe) if side == "ours" else build_native_peer(args, base, recipe)
    model.to(device)
    vocab = shape["llm"]["vocab_size"]
    batch = native_samples(base, shape, args.batch_size, args.seq_len, args.images, vocab)
    built = Side(model, NativeCollate(batch, args.images), vocab=vocab,
                 counts=_count(model, model.component if side == "ours" else native_component))
    if side == "ours":
        built.flops = qwen2_5_vl_step_flops(model.base, batch)
    return built


def _composed_side(args: BenchArguments, side: str, recipe: str, device, base: str, shape: dict) -> Side:
    """Ours composed from vision/ and llm/, the peer Llava from llava/; synthetic batches."""
    import torch

    from tools.flops import step_flops
    from tools.memory import plan_memory

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
    built = Side(model, Collate(input_ids, labels, pixel_values, args.images), vocab=vocab,
                 counts=_count(model, lambda n: n.split(".", 1)[0]) if side == "ours" else _count(model, _peer_component))
    if side == "ours":
        built.flops = step_flops(ours, batch_size, seq_len, args.images, supervised)
        built.plan = plan_memory(model, batch_size, seq_len, args.gradient_checkpointing,
                                 images_per_sample=args.images, supervised_tokens=supervised, padded=False)
    return built


def first_loss(model, collate, batch_size: int, device) -> float:
    """The loss before any step, in eval mode (no dropout): equal on both sides when they compute
    the same function from the same weights. A sample at a time: eval's logits are [B, L, V]
    (623 MiB at batch 4 x 256 and a 152k vocabulary), which would set the peak RSS instead of
    training; every sample has as many labels, so the mean of means is the batch's."""
    import torch

    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(batch_size):
            sample = {k: v.to(device) for k, v in collate([{"idx": i}]).items()}
            losses.append(float(model(**sample).loss))
    loss0 = statistics.fmean(losses)
    del sample
    model.train()
    return loss0


def step_clock(device, timed_end: int):
    """A TrainerCallback that stamps the end of every step (wall and process CPU time), reads the
    peak RSS at the end of the timed steps, and counts the memory step, the one after them
    (`StepMemory`): `.wall`, `.cpu`, `.rss_bytes`, `.step_bytes`."""
    import gc

    from transformers import TrainerCallback

    memory = StepMemory(device)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu, self.rss_bytes, self.step_bytes = [], [], None, None

        def on_step_begin(self, train_args, state, control, **kwargs):
            if state.global_step == timed_end:  # the memory step
                gc.collect()
                memory.start()

        def on_step_end(self, train_args, state, control, **kwargs):
            _sync(device)
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            if state.global_step == timed_end:
                # Before the memory step: its profiler records every allocation, and on the
                # SigLIP-so400m + Qwen2.5-0.5B shape it raised our heap's high water by 645 MiB
                # (the peer's by 200): the profiler's, not training's, host memory.
                self.rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if state.global_step == timed_end + MEMORY_STEPS:
                self.step_bytes = memory.stop()

    return StepClock()


def make_trainer(args: BenchArguments, side: str, built: Side, clock, device):
    """Ours: VLMTrainer; the peer: TRL's SFTTrainer (or transformers' Trainer). The same loop
    settings on both sides, over `warmup_steps + steps + MEMORY_STEPS` steps of the same batches."""
    from datasets import Dataset

    steps = args.warmup_steps + args.steps + MEMORY_STEPS
    dataset = Dataset.from_dict({"idx": [i % args.batch_size for i in range(args.batch_size * steps)]})
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
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
    data = dict(model=built.model, train_dataset=dataset, data_collator=built.collate, callbacks=[clock])
    if side == "ours":
        from config import TrainArguments
        from run.trainer import VLMTrainer

        return VLMTrainer(args=TrainArguments(**common), **data)
    if args.peer_trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        from patches import cap_trl_chunk_size
        from tools.tiny_base import build_tokenizer

        # TRL scores the LM head in tiles 32768 words wide: a fraction of a real vocabulary
        # (Qwen2.5: 151,936) but 8x all of cpu_small's, where the tile's unused columns would
        # count against the peer. No wider than the vocabulary, it costs what it does at a real one.
        cap_trl_chunk_size(built.vocab)
        config = SFTConfig(**common, gradient_checkpointing=args.gradient_checkpointing,
                           dataset_kwargs={"skip_prepare_dataset": True})
        # SFTTrainer wants a tokenizer; the batches are already token ids, so any one does.
        return SFTTrainer(args=config, processing_class=build_tokenizer(["a b c"], vocab_size=300), **data)
    from transformers import Trainer, TrainingArguments

    return Trainer(args=TrainingArguments(**common), **data)


def run_side(args: BenchArguments, side: str, recipe: str) -> dict:
    """In the child: build one side, warm up, train `warmup_steps + steps`, measure."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_flops = device_peak_flops(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    built = build_side(args, side, recipe, device)
    loss0 = first_loss(built.model, built.collate, args.batch_size, device)
    clock = step_clock(device, args.warmup_steps + args.steps)
    trainer = make_trainer(args, side, built, clock, device)
    train_loss = trainer.train().training_loss
    return side_result(args, side, recipe, built, trainer, clock, device) | {
        "loss0": loss0, "train_loss": train_loss, "device_flops": peak_flops,
    }


def side_result(args: BenchArguments, side: str, recipe: str, built: Side, trainer, clock, device) -> dict:
    """The child's figures: step times, counted and resident memory, the plan, FLOPs."""
    from tools.memory import weight_bytes

    timed_end = args.warmup_steps + args.steps

    def timed(stamps):  # the timed steps' intervals, each from the end of the step before
        return [b - a for a, b in zip(stamps[args.warmup_steps - 1 : timed_end - 1], stamps[args.warmup_steps : timed_end],
                                      strict=True)]

    # CPU time of this process per step: on a shared machine, robust to other processes taking
    # the core (wall time is not); equal to wall time on a quiet machine with one thread.
    intervals, cpu_intervals = timed(clock.wall), timed(clock.cpu)
    weights = sum(weight_bytes(built.model).values())
    states = _tensor_bytes(v for state in trainer.optimizer.state.values() for v in state.values())
    plan = built.plan
    return {
        "side": side,
        "recipe": recipe,
        "step_s": statistics.median(intervals),
        "intervals": intervals,
        "cpu_s": statistics.median(cpu_intervals),
        # Tensors counted, the rest measured: the model's parameters and buffers and the
        # optimizer's states (each storage once: what a GPU allocator holds for them) plus the
        # peak that a training step adds on top of them (gradients, activations, the loss).
        "peak_bytes": weights + states + clock.step_bytes,
        # The process's peak resident set (host memory) through the timed steps: tensors plus
        # libtorch's code, Python, mapped weight files and what glibc keeps after frees. Shown
        # beside the counted peak, for both sides alike.
        "rss_bytes": clock.rss_bytes,
        "weight_bytes": weights,
        "state_bytes": states,
        "step_bytes": clock.step_bytes,
        "plan_total": plan.total if plan else None,
        "plan_step": plan.gradients + plan.activations if plan else None,
        "flops": built.flops,
        "counts": built.counts,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
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


def format_row(recipe: str, side: str, s: dict, flops: float, plan_total: int | None, plan_step: int | None) -> str:
    """One row of the table; the plan's columns read "-" where there is no plan (a native shape)."""
    achieved = flops / s["step_s"]
    if plan_total:
        plan = f"{plan_total / MIB:>8.1f} {s['peak_mib'] * MIB / plan_total:>9.3f}"
        step = f"{plan_step / MIB:>9.1f}"
    else:
        plan, step = f"{'-':>8} {'-':>9}", f"{'-':>9}"
    return (
        f"{recipe:<11} {side:<5} {s['step_s']:>7.4f} {s['cpu_s']:>7.4f} {s['samples_s']:>9.2f} "
        f"{s['tokens_s']:>8.1f} {flops / 1e9:>10.3f} {achieved / 1e9:>7.2f} {achieved / s['device_flops']:>5.3f} "
        f"{s['peak_mib']:>8.1f} {plan} {s['step_mib']:>8.1f} {step} {s['rss_mib']:>8.1f} "
        f"{s['loss0']:>7.4f} {s['train_loss']:>7.4f}"
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
            build = build_native if is_native(shape) else build_base
            build(base_dir(args, shape_name, shape), shape, args.dtype)
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
    print_table(args, shape_name, shape, results)


def print_table(args: BenchArguments, shape_name: str, shape: dict, results: dict) -> None:
    """The heading line, a row per recipe and side (medians), then the ours/peer ratios."""
    recipes = list(dict.fromkeys(recipe for recipe, _ in results))
    everything = [r for runs in results.values() for r in runs]
    device_flops = max(r["device_flops"] for r in everything)
    first = everything[0]
    batch, seq = first["batch_size"], first["seq_len"]
    load = os.getloadavg()
    peer_model = f"the same {shape['model_type']} model" if is_native(shape) else "LlavaForConditionalGeneration"
    print(
        f"bench: shape {shape_name}, batch {batch} x {seq} tokens, {args.images} image(s)/sample, "
        f"{first['dtype']} on {first['device']} ({_device_name()}), {args.threads} thread(s), "
        f"warm-up {args.warmup_steps} + {args.steps} timed steps, {args.repeats} process(es) per side "
        f"(medians), gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"peer {'TRL SFTTrainer' if args.peer_trainer == 'sft' else 'transformers Trainer'} + "
        f"{peer_model}, device peak {device_flops / 1e9:.1f} GFLOP/s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(HEADER)
    # The same weights train on both sides; a native model's tower too (nothing of it is cut off).
    parts = ("vision", "connector", "llm") if is_native(shape) else ("connector", "llm")
    ratios = []
    for recipe in recipes:
        ours = results[recipe, "ours"]
        summary = {side: summarize(results[recipe, side], device_flops) for side in ("ours", "peer") if args.peer or side == "ours"}
        if args.peer:
            ours_counts, peer_counts = ours[0]["counts"], results[recipe, "peer"][0]["counts"]
            for part in parts:
                if ours_counts[part] != peer_counts[part]:
                    raise SystemExit(f"{recipe}: {part} trainable/total {ours_counts[part]} (ours) vs "
                                     f"{peer_counts[part]} (peer): the sides do not train the same model.")
        for side, s in summary.items():
            print(format_row(recipe, side, s, ours[0]["flops"]["total"], ours[0]["plan_total"], ours[0]["plan_step"]))
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
    if is_native(shape):
        raise SystemExit(f"--plan_only: {shape_name} is a native shape, and tools/memory.py plans a composed base.")
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
