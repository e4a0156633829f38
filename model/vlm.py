"""The vision-language model: vision tower -> connector -> causal LLM, in one small module."""

from __future__ import annotations

import inspect

import torch
from peft import PeftModel
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from constants import IGNORE_INDEX
from model.components import component_of, module_table
from model.loss import linear_cross_entropy
from model.packing import is_packed
from model.preference import sequence_logps

# Image positions in `input_ids` hold this id (LLaVA's convention). It never reaches the
# embedding table, so the base vocabulary and embeddings stay untouched.
IMAGE_TOKEN_INDEX = -200


class VLMBase(nn.Module):
    """What every model this repo trains shares, a composed base (`VisionLanguageModel`) or a
    released VLM (`model.released.ReleasedVLM`): parameters named into the components `vision`,
    `connector` and `llm`, the training loss at labelled positions only (fused with the LM head
    where its logits are plain), and what a checkpoint records of the model."""

    def __init__(self, build_args=None, component_table: dict[str, str] | None = None):
        super().__init__()
        self.component_table = component_table or module_table()
        # Modules the forward never reaches (a released tower's layers after its feature layer):
        # never trained, never adapted. A composed tower is cut at its feature layer instead.
        self.unused_modules: list[str] = []
        # The LM head fused with the loss in training steps (model/loss.py): decided on the
        # first training step by `head_is_plain`; False keeps the model's own head and loss.
        self.fused_loss: bool | None = None if build_args is None or build_args.fused_loss else False
        # What a checkpoint records of this model: the ModelArguments it was built from (they
        # rebuild it), the fingerprint of its base weights (`run.checkpoint.load_base`), and the
        # non-LoRA tensors a parent stage's delta put on that base (`run.checkpoint.load_delta`).
        self.build_args = build_args
        self.base_fingerprint: dict[str, str] | None = None
        self.inherited_delta: set[str] = set()

    def component(self, name: str) -> str | None:
        """`vision`, `connector` or `llm` for a parameter name of this model (None: unmapped)."""
        return component_of(name, self.component_table)

    def component_parameters(self, component: str):
        return [(n, p) for n, p in self.named_parameters() if self.component(n) == component]

    def trains(self, component: str) -> bool:
        return any(p.requires_grad for _, p in self.component_parameters(component))

    # Supplied by each kind of model:
    def output_head(self) -> nn.Module:
        """The LM head, for `loss_at_labels`."""
        raise NotImplementedError

    def adapted_modules(self) -> dict[str, tuple[str, nn.Module]]:
        """{adapter name: (its name prefix in this model, the PeftModel)}: what a checkpoint saves
        as PEFT adapter folders."""
        raise NotImplementedError

    def fingerprinted_parts(self) -> dict[str, tuple[nn.Module, object]]:
        """{component: (module, keep(name) or None)}: the base weights a delta depends on."""
        raise NotImplementedError

    def base_generation_config(self):
        """The transformers generation config the base came with (not named `generation_config`:
        the Trainer's `align_special_tokens` would then edit it)."""
        raise NotImplementedError

    def last_hidden_states(self, inputs: dict) -> torch.Tensor:
        """[B, L, D]: the LLM's last hidden states for a training step's `inputs`."""
        raise NotImplementedError

    def logits_at(self, inputs: dict, keep: torch.Tensor):
        """The model's own output for `inputs`, its logits [N, V] at the `keep` [B, L] positions."""
        raise NotImplementedError

    def probe_logits(self, inputs: dict, labels: torch.Tensor, own: bool) -> torch.Tensor:
        """[1, 1, V]: one position's logits, by the model's own head (`own`) or by `output_head()`
        applied to its last hidden state: `head_is_plain` compares the two."""
        raise NotImplementedError

    def loss_at_labels(self, inputs: dict, labels: torch.Tensor, num_items):
        """The causal-LM loss of a training step, the LM head computed only where the next token
        has a label (image tokens and prompt, most of a VLM sample, have none). Fused with the
        loss, chunk by chunk, and no logits returned, when the model's logits are its head's
        output and nothing more (`head_is_plain`); otherwise its own head's logits [N, V].
        `inputs` is what the subclass's `last_hidden_states` / `logits_at` / `probe_logits` read.
        """
        shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, L]; t predicts t + 1
        keep = shift_labels != IGNORE_INDEX  # [B, L]
        if self.fused_loss is None:
            self.fused_loss = self.head_is_plain(inputs, labels)
        if self.fused_loss:
            hidden = self.last_hidden_states(inputs)[keep]  # [N, D]
            return CausalLMOutputWithPast(loss=linear_cross_entropy(hidden, self.output_head(), shift_labels[keep], num_items))
        out = self.logits_at(inputs, keep)  # logits [N, V]
        out.loss = ForCausalLMLoss(
            out.logits, None, out.logits.shape[-1], num_items_in_batch=num_items, shift_labels=shift_labels[keep]
        )
        return zero_loss_if_all_masked(out, labels)

    def head_may_be_plain(self) -> bool:
        """What can be told without running the model: its head is a plain `nn.Linear` (not
        LoRA-wrapped or quantized)."""
        return type(self.output_head()) is nn.Linear

    def head_is_plain(self, inputs: dict, labels: torch.Tensor) -> bool:
        """Whether the model's logits are its `nn.Linear` head applied to its last hidden states,
        and nothing more, so that the fused loss may take the head's place. Most are; some change
        the logits after the head (Gemma's soft-capping, Cohere's and Granite's scaling), which
        the fused loss would silently drop. Checked once, on the first training step (every rank
        alike), by computing one position both ways, dropout off."""
        if not self.head_may_be_plain():
            return False
        was_training = self.training
        self.eval()
        with torch.no_grad():
            theirs, ours = self.probe_logits(inputs, labels, own=True), self.probe_logits(inputs, labels, own=False)
        self.train(was_training)
        return theirs.shape == ours.shape and torch.equal(theirs, ours)


def present_classes(model: nn.Module, declared: list[str]) -> list[str]:
    """The declared layer class names that exist in `model`: accelerate refuses a name it cannot
    find, and a model declares its relatives' too (llava-hf's CLIP tower: `CLIPTextEmbeddings`)."""
    present = {type(m).__name__ for m in model.modules()}
    return sorted(set(declared) & present)


def zero_loss_if_all_masked(out, labels):
    if labels is not None and not (labels[:, 1:] != IGNORE_INDEX).any():
        # Every label masked (after the shift): the loss is 0/0 = NaN, which would poison the
        # weights. A zero that keeps the graph (every rank still syncs) instead.
        out.loss = out.logits.sum() * 0.0
    return out


class VisionLanguageModel(VLMBase):
    """Children: `vision` (VisionTower), `connector` (projector or resampler), `llm` (causal LM).

    Image features are written into the image-token positions of the text embeddings with a
    masked write, in order: batch row by batch row, images in the order they appear.
    """

    def __init__(self, vision: nn.Module, connector: nn.Module, llm: nn.Module, num_image_tokens: int, build_args=None):
        super().__init__(build_args)
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.num_image_tokens = num_image_tokens
        self.image_token_index = IMAGE_TOKEN_INDEX
        # transformers' causal LMs take a boolean [B, L] `logits_to_keep` (slice_logits_to_keep);
        # an LLM whose forward lacks it gets the LM head at every position.
        # (PEFT's wrapper forwards it; its own forward only says **kwargs.)
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        self.head_at_labels_only = "logits_to_keep" in inspect.signature(type(base).forward).parameters

    @property
    def _no_split_modules(self) -> list[str]:
        """Layer classes that FSDP's default auto-wrap policy shards one by one: the LLM's decoder
        layers and the tower's encoder layers (the names each model declares that exist here)."""
        declared = [
            *(getattr(self.llm, "_no_split_modules", None) or []),
            *(getattr(self.vision.encoder, "_no_split_modules", None) or []),
        ]
        return present_classes(self, declared)

    def vision_trains(self) -> bool:
        return any(p.requires_grad for p in self.vision.parameters())

    def _image_path_trains(self) -> bool:
        return self.vision_trains() or any(p.requires_grad for p in self.connector.parameters())

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A frozen tower runs without autograd: no activations are kept for what cannot learn.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision_trains()):
            features = self.vision(pixel_values)  # [N, P, C]
        return self.connector(features.to(self.connector_dtype()))  # [N, T, D]

    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, copies: int = 1):
        """`copies`: the rows hold the images' token slots that many times over, in order (a
        preference batch's chosen and rejected halves: model/preference.py); the tower and the
        connector still run once per image."""
        image_mask = input_ids == self.image_token_index  # [B, L]
        embed_tokens = self.llm.get_input_embeddings()
        embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))  # [B, L, D]
        num_slots = int(image_mask.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if num_slots:
                raise ValueError(f"{num_slots} image-token positions but no pixel_values.")
            if self.training and self._image_path_trains():
                # A text-only batch must still touch every trainable weight: under DDP/ZeRO a
                # rank that skips the vision path leaves the others waiting for its gradients
                # forever. A blank image, weighted zero, changes nothing else.
                blank = embeds.new_zeros(1, 3, self.vision.image_size, self.vision.image_size)
                embeds = embeds + 0.0 * self.embed_images(blank).sum()
            return embeds
        image_embeds = self.embed_images(pixel_values).repeat(copies, 1, 1)  # [copies * N, T, D]
        if num_slots != image_embeds.shape[0] * image_embeds.shape[1]:
            raise ValueError(
                f"{num_slots} image-token positions for {image_embeds.shape[0]} images of "
                f"{image_embeds.shape[1]} tokens: the prompt and the images disagree."
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        """Returns the LLM's output: logits [B, L, V], and the loss when labels are given.

        A training step (labels, gradients on, training mode) computes the LM head only where the
        next token has a label, the positions its loss reads (image tokens and prompt, most of a
        LLaVA sample, have none): fused with the loss, chunk by chunk, and no logits returned
        (`model.loss.linear_cross_entropy`), when the LLM's logits are its head's output and
        nothing more; otherwise as logits [N, V] of those N positions.

        `**kwargs` carries the Trainer's `num_items_in_batch` to the loss: dropping it makes the
        Trainer scale the loss by the world size (loss doubled under 2-rank DDP).
        """
        if kwargs.pop("pairs", False):  # a preference batch: each row's answer log-prob
            embeds = self.embed_inputs(input_ids, pixel_values, copies=2)
            return sequence_logps(self, {"inputs_embeds": embeds, "attention_mask": attention_mask}, labels)
        embeds = self.embed_inputs(input_ids, pixel_values)
        if is_packed({"attention_mask": attention_mask, **kwargs}):
            kwargs["use_cache"] = False  # transformers builds a packed batch's mask only without a cache
        if labels is None or not (self.training and torch.is_grad_enabled() and self.head_at_labels_only):
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)
            return zero_loss_if_all_masked(out, labels)
        num_items = kwargs.pop("num_items_in_batch", None)
        return self.loss_at_labels({"inputs_embeds": embeds, "attention_mask": attention_mask, **kwargs}, labels, num_items)

    def last_hidden_states(self, inputs: dict) -> torch.Tensor:
        return self.llm.get_decoder()(**inputs).last_hidden_state  # [B, L, D]

    def logits_at(self, inputs: dict, keep: torch.Tensor):
        return self.llm(**inputs, logits_to_keep=keep)

    def probe_logits(self, inputs: dict, labels: torch.Tensor, own: bool) -> torch.Tensor:
        first = inputs["inputs_embeds"][:1, :2].detach()  # [1, 2, D]
        if own:
            return self.llm(inputs_embeds=first, logits_to_keep=1).logits  # [1, 1, V]
        return self.output_head()(self.llm.get_decoder()(inputs_embeds=first).last_hidden_state[:, -1:])

    def output_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def base_generation_config(self):
        """The LLM's own generation config (its eos ids: run.predict.stop_token_ids)."""
        return self.llm.generation_config

    def adapted_modules(self) -> dict[str, tuple[str, nn.Module]]:
        modules = {"llm": ("llm.", self.llm), "vision": ("vision.encoder.", self.vision.encoder)}
        return {k: v for k, v in modules.items() if isinstance(v[1], PeftModel)}

    def fingerprinted_parts(self) -> dict[str, tuple[nn.Module, object]]:
        # The connector is not base: it starts fresh (seeded), and the delta always holds it.
        return {"vision": (self.vision, None), "llm": (self.llm, None)}

    def head_may_be_plain(self) -> bool:
        """Also: the LLM takes `logits_to_keep`, as transformers' own causal LMs do."""
        return self.head_at_labels_only and super().head_may_be_plain()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, **generate_kwargs):
        """New token ids only [B, new] (the prompt is passed as embeddings, so it is not echoed)."""
        embeds = self.embed_inputs(input_ids, pixel_values)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Called by the Trainer for `--activation_checkpointing true` (transformers 5's name for gradient checkpointing).

        Always non-reentrant: reentrant checkpointing needs an input that requires grad, which a
        frozen tower does not give ("None of the inputs have requires_grad=True", and vision
        LoRA silently left without gradients). A frozen tower is not checkpointed: it keeps no
        activations to begin with.
        """
        ckpt_kwargs = {**(activation_checkpointing_kwargs or {}), "use_reentrant": False}
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        if self.vision_trains():
            self.vision.encoder.activation_checkpointing_enable(
                activation_checkpointing_kwargs=ckpt_kwargs, **kwargs
            )
