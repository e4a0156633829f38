"""A released VLM (any transformers `AutoModelForImageTextToText`: llava-hf, Qwen2.5-VL, SmolVLM,
PaliGemma, MiniCPM-V 4.6, ...) as the components `vision`, `connector` and `llm`.

The model keeps its own modules, names and forward; `model/components.py` names its parameters
into the three components, so the freeze policy, LoRA, QLoRA, the fused loss, the delta
checkpoint and the loader are the composed base's, not a copy per family.
"""

from __future__ import annotations

import inspect
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoVideoProcessor,
)

from constants import IGNORE_INDEX
from model.components import COMPONENTS, PREFIX_LM_TYPES, component_of, is_under, layer_index, module_table
from model.packing import is_packed, packed_position_ids
from model.preference import sequence_logps, twice
from model.quantization import load_kwargs, quantize_without_weights
from model.vlm import VLMBase, present_classes, zero_loss_if_all_masked
from patches import keep_4bit_layout


def load_released_processor(args, chat_template_path: str | None = None, need_template: bool = True):
    """The model's own processor: chat template, tokenizer, image (and video) processor; the
    pixel budget from the config where the family has one (Qwen2-VL's min_pixels/max_pixels);
    a .jinja file replaces its chat template (PaliGemma ships none; the model's build needs none)."""
    processor = AutoProcessor.from_pretrained(args.vlm_model, revision=args.vlm_revision, **_with_pixel_budget(args))
    if chat_template_path:
        with open(chat_template_path) as f:
            processor.chat_template = f.read()
    if need_template and not processor.chat_template:
        raise ValueError(f"{args.vlm_model}'s processor has no chat template: pass --chat_template FILE.jinja.")
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return processor


def _with_pixel_budget(args) -> dict:
    """The image (and video) processor loaded with the config's pixel budget, where one is set:
    their own from_pretrained turns it into their `size`. (Given to AutoProcessor instead,
    transformers 5.23 passes it again with every call and warns that this is deprecated.)"""
    budget = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    if not budget:
        return {}
    parts = {"image_processor": AutoImageProcessor.from_pretrained(args.vlm_model, revision=args.vlm_revision, **budget)}
    try:
        parts["video_processor"] = AutoVideoProcessor.from_pretrained(args.vlm_model, revision=args.vlm_revision, **budget)
    except OSError:  # a family without a video processor (llava, PaliGemma)
        pass
    return parts


def component_table(args, config) -> dict[str, str]:
    """{module name: component} of the model `config` describes: its family's entry in
    model/components.py, extended by the config's own flags (`--vision_modules` ...)."""
    return module_table(config.model_type, args.component_modules)


def quantization_skip_modules(args, table: dict[str, str]) -> list[str]:
    """Module names kept out of bitsandbytes: the connector always, the tower unless it has LoRA
    (a frozen tower in 16-bit costs little and stays exact), and the LM head. The same list at
    training and inference (LLaVA #433's size mismatch came from two lists)."""
    keep = ("connector",) if args.lora_on_vit else ("connector", "vision")
    # transformers matches each pattern from the start of a module's full name, up to a dot.
    return [rf"(?:.*\.)?{re.escape(name)}" for name, component in sorted(table.items()) if component in keep] + ["lm_head"]


def unused_vision_modules(model: nn.Module, table: dict[str, str]) -> list[str]:
    """Module names of the tower that never reach the LLM. A family that reads a hidden layer of
    its tower (`config.vision_feature_layer`: llava-hf takes the second to last) leaves the layers
    after it, the final norm and a pooling head out of the forward: trained, or given LoRA, they
    would get no gradient (DDP without find_unused_parameters stops on them)."""
    if getattr(model.config, "vision_feature_layer", None) is None:
        return []
    used = vision_layers_used(model.config)
    unused = []
    for name, _ in model.named_modules():
        if component_of(name, table) != "vision":
            continue
        layer = layer_index(name)  # hidden_states[i + 1] is block i's output
        if (layer is not None and layer >= used) or name.rsplit(".", 1)[-1] in ("post_layernorm", "head"):
            unused.append(name)
    return unused


def vision_layers_used(config) -> int:
    """Blocks of the tower whose output reaches the LLM: all of them, or up to the hidden layer
    the family reads (`vision_feature_layer`, one index or a list; -2 is the second to last)."""
    layer = getattr(config, "vision_feature_layer", None)
    depth = config.vision_config.num_hidden_layers
    if layer is None:
        return depth
    return max(index % (depth + 1) for index in (layer if isinstance(layer, (list, tuple)) else [layer]))


def lora_target_pattern(model: nn.Module, table: dict[str, str], components: set[str], names=None) -> str:
    """A full-name regex of the linear layers in `components` (PEFT matches it whole): a connector
    inside the vision module is not the vision's, the LM head and the tower's unused layers are
    never adapted."""
    unused = unused_vision_modules(model, table)
    chosen = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and component_of(name, table) in components
        and not name.endswith("lm_head")
        and not is_under(name, unused)
        and (names is None or name.rsplit(".", 1)[-1] in names)
    ]
    if not chosen:
        raise ValueError(f"No linear layer in {sorted(components)} for LoRA (lora_modules {names}).")
    return "^(?:" + "|".join(re.escape(name) for name in chosen) + ")$"


def build_released(args, weights: bool = True) -> ReleasedVLM:
    """The released VLM `args.vlm_model`, with LoRA where the config asks; what trains is decided
    by `model.freeze.apply_freeze_policy`. `weights=False`: shapes only, on the meta device."""
    config = AutoConfig.from_pretrained(args.vlm_model, revision=args.vlm_revision)
    table = component_table(args, config)
    dtype = getattr(torch, args.dtype)
    if weights:
        vlm = AutoModelForImageTextToText.from_pretrained(
            args.vlm_model, revision=args.vlm_revision,
            **load_kwargs(args, args.bits < 16, quantization_skip_modules(args, table)),
        )
    else:
        with torch.device("meta"):
            vlm = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        if args.bits < 16:
            vlm = quantize_without_weights(vlm, args, quantization_skip_modules(args, table))
    if args.bits < 16:
        # Norms and embeddings to fp32 (the peers' "expected Float, found BFloat16"); checkpointing
        # is ours to set, non-reentrant (`activation_checkpointing_enable`).
        vlm = prepare_model_for_kbit_training(vlm, use_gradient_checkpointing=False)
        keep_4bit_layout(vlm)
    components = {c for c, on in (("llm", args.lora_on_llm), ("vision", args.lora_on_vit)) if on}
    if components:
        target = lora_target_pattern(vlm, table, components, args.lora_modules)
        vlm = get_peft_model(vlm, LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=target
        ))
    model = ReleasedVLM(vlm, args, table)
    if weights:
        processor = load_released_processor(args, need_template=False)  # with the pixel budget, as the data's
        model.blank_image_inputs = blank_image_inputs(processor)
        model.image_token_index = processor.image_token_id
    return model


def blank_image_inputs(processor) -> dict[str, torch.Tensor]:
    """The vision inputs of one black image, as the processor makes them (pixel_values, and the
    family's grid sizes or masks): what a text-only batch runs through the image path."""
    size = 224
    out = processor.image_processor(images=[Image.new("RGB", (size, size))], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class ReleasedVLM(VLMBase):
    """Child `vlm`: the transformers model (a `PeftModel` around it under LoRA). Its parameters
    keep their transformers names under `vlm.`, so its delta and adapter are the model's own."""

    def __init__(self, vlm: nn.Module, build_args, component_table: dict[str, str]):
        super().__init__(build_args, component_table)
        self.vlm = vlm
        self.unused_modules = unused_vision_modules(self.base, component_table)
        self.blank_image_inputs: dict[str, torch.Tensor] | None = None  # set by build_released
        # For the data check before step 1, which counts a record's text tokens: its processor
        # expands each image to as many tokens as the image needs, known only per image.
        self.image_token_index: int | None = None
        self.num_image_tokens = 1
        # A prefix-LM (PaliGemma) attends bidirectionally over token_type_ids == 0.
        self.prefix_lm = self.config.model_type in PREFIX_LM_TYPES

    @property
    def base(self) -> nn.Module:
        """The transformers model itself (under a PeftModel, with the adapters in its layers)."""
        return self.vlm.get_base_model() if isinstance(self.vlm, PeftModel) else self.vlm

    @property
    def config(self):
        return self.base.config

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes FSDP's auto-wrap policy shards one by one, as the model declares them."""
        return present_classes(self, list(getattr(self.base, "_no_split_modules", None) or []))

    def output_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def base_generation_config(self):
        return self.base.generation_config

    def adapted_modules(self) -> dict[str, tuple[str, nn.Module]]:
        return {"vlm": ("vlm.", self.vlm)} if isinstance(self.vlm, PeftModel) else {}

    def fingerprinted_parts(self) -> dict[str, tuple[nn.Module, object]]:
        # Every component is base here, the connector included (its linear weights too: it is
        # never quantized, and most connectors hold nothing else).
        return {c: (self.base, lambda name, c=c: self.component(name) == c) for c in COMPONENTS}

    def forward(self, labels=None, **inputs):
        """The model's own forward, or in a training step the loss at labelled positions only
        (`VLMBase.loss_at_labels`). `num_items_in_batch` reaches the loss (else DDP doubles it).
        Positions without an attention mask are a packed batch's, restarting at each sample."""
        num_items = inputs.pop("num_items_in_batch", None)
        if inputs.pop("pairs", False):  # a preference batch: each row's answer log-prob
            return sequence_logps(self, self.pair_inputs(inputs), labels)
        if is_packed(inputs):
            # A packed batch (data/packing.py): each family's positions for it (model/packing.py), and
            # no cache: transformers builds the packed mask only without one.
            inputs["position_ids"] = packed_position_ids(self.config.model_type, self.base.model, inputs)
            inputs["use_cache"] = False
        if labels is None or not (self.training and torch.is_grad_enabled()):
            out = self.vlm(**inputs, labels=labels)
            return zero_loss_if_all_masked(out, labels)
        return self.loss_at_labels(inputs, labels, num_items)

    def pair_inputs(self, inputs: dict) -> dict:
        """A preference batch's model inputs: the image features of `pair_vision` (the chosen half's
        vision inputs) computed once by the model's own `get_image_features`, and given to both
        halves as `mm_encoder_outputs`, transformers' input for features computed outside."""
        vision = inputs.pop("pair_vision", None)
        if not vision:
            return inputs
        encoder = self.base.model.get_image_features
        accepted = inspect.signature(encoder).parameters
        features = encoder(**{k: v for k, v in vision.items() if k in accepted}, return_dict=True)
        return {**inputs, "mm_encoder_outputs": {"image": twice(features)}}

    def last_hidden_states(self, inputs: dict) -> torch.Tensor:
        return self.base.model(**inputs).last_hidden_state + self._image_path_touch(inputs)  # [B, L, D]

    def logits_at(self, inputs: dict, keep: torch.Tensor):
        out = self.vlm(**inputs, logits_to_keep=keep)
        # [N, V]; a model that ignores logits_to_keep (MiniCPM-V 4.6) returns [B, L, V].
        out.logits = (out.logits if out.logits.dim() == 2 else out.logits[keep]) + self._image_path_touch(inputs)
        return out

    def probe_logits(self, inputs: dict, labels: torch.Tensor, own: bool) -> torch.Tensor:
        # One text token (a label, never an image's): a one-row product both ways, also for a
        # model that ignores logits_to_keep (two rows' product may round differently).
        first = labels[labels != IGNORE_INDEX][:1][None]  # [1, 1]
        if own:
            return self.base(input_ids=first, logits_to_keep=1).logits[:, -1:]  # [1, 1, V]
        return self.output_head()(self.base.model(input_ids=first).last_hidden_state)

    def _image_path_touch(self, inputs) -> torch.Tensor | float:
        """0.0, or for a text-only batch while the tower or the connector trains, a zero that
        depends on a blank image through the whole image path: under DDP/ZeRO a rank that skips
        the image path leaves the others waiting for its gradients forever."""
        has_images = "mm_encoder_outputs" in inputs or any(key.startswith("pixel_values") for key in inputs)
        if has_images or self.blank_image_inputs is None:
            return 0.0
        if not (self.trains("vision") or self.trains("connector")):
            return 0.0
        device = next(self.parameters()).device
        blank = {k: v.to(device) for k, v in self.blank_image_inputs.items()}
        return 0.0 * sum(t.float().sum() for t in _tensors(self.base.model.get_image_features(**blank)))

    @torch.no_grad()
    def generate(self, **inputs):
        """New token ids only [B, new]: the model echoes the prompt, which is cut off here."""
        prompt_length = inputs["input_ids"].shape[1]
        return self.vlm.generate(**inputs)[:, prompt_length:]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Non-reentrant, always (reentrant needs an input that requires grad: "None of the inputs
        have requires_grad=True"). transformers then hooks every embedding's output to require
        grad, the vision tower's patch embedding included, which would keep a frozen tower's
        activations (the peers' OOM with a frozen ViT); non-reentrant checkpointing needs no such
        hook, so it is removed."""
        ckpt_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False}
        self.base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        self.base.disable_input_require_grads()


def _tensors(output) -> list[torch.Tensor]:
    """Every floating tensor in a model output (a tensor, a tuple or list, or a ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    values = output.values() if hasattr(output, "values") else output if isinstance(output, (list, tuple)) else []
    return [t for value in values for t in _tensors(value)]
