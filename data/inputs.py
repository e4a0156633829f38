"""How each kind of base turns records and questions into model inputs, and tokens back into text:
one object per kind, used alike by training, infer.py, evaluation and the web page.

- `ComposedInputs`: a composed base (tower + connector + LLM). The LLM's tokenizer renders the chat
  template, each `<image>` becomes the model's `num_image_tokens` slots of `image_token_index`
  (data/prompt.py), and the tower's image processor makes `pixel_values`.
- `ReleasedInputs`: a released VLM. Its own processor renders, expands every image to the tokens
  the image needs, and makes the family's vision inputs (data/processor_prompt.py).

What differs between the two lives here, behind the same methods; nothing else asks which kind a
base is. The objects take what they need of the model as plain values (`data/` never imports
`model/`); `run.inputs.model_inputs` builds the right one for a model.
"""

from __future__ import annotations

from functools import cached_property

import torch

from data.chunk_check import PassSettings
from data.dataset import Collator, SupervisedDataset
from data.packing import PackingCollator
from data.preference_batch import PairCollator, ProcessorPairCollator
from data.processor_prompt import (
    ImageTokenCount,
    ProcessorCollator,
    ProcessorDataset,
    ProcessorTemplate,
    encode_batch,
)
from data.prompt import tokenize_prompt
from data.validate import check_training_data

Prompt = tuple[list[dict], list]  # (messages ending on a user turn, PIL images in marker order)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L]), padded on the left so that every prompt ends
    where generation starts."""
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq) :] = torch.tensor(seq)
        mask[row, longest - len(seq) :] = 1
    return ids, mask


class ModelInputs:
    """What both kinds share: the text tokenizer, and decoding."""

    @property
    def text_tokenizer(self):
        """The tokenizer of the text: pad and eos ids, decoding, the Trainer's processing_class."""
        raise NotImplementedError

    @property
    def processing_class(self):
        """What the Trainer holds and a checkpoint saves the chat template of: the tokenizer, or
        a released VLM's processor."""
        raise NotImplementedError

    def checked_pass(self, data_args, output_dir: str | None):
        """(the one pass over --data_path, the positions of the records to leave out): checked and
        tokenized in one go (data/validate.py), cached and memory-mapped; refuses bad data as the
        check says. `output_dir`: where the skipped records are listed (None on ranks that do not
        save)."""
        return check_training_data(data_args, self.pass_settings(data_args), output_dir)

    def training_set(self, data_args, output_dir: str | None):
        """The checked samples of --data_path, as this kind's dataset (`samples`)."""
        prepared, skip = self.checked_pass(data_args, output_dir)
        return self.samples(prepared, data_args, skip)

    def packing_collator(self, data_args, rows_per_device: int) -> PackingCollator:
        """`--packing true`'s collator: this kind's own, its samples then laid end to end into rows
        of `data_args.row_length` tokens (data/packing.py)."""
        return PackingCollator(
            self.collator(data_args.max_length), data_args.row_length, rows_per_device, self.text_tokenizer.pad_token_id or 0
        )

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """New tokens [B, new] -> answers, special tokens dropped."""
        return [text.strip() for text in self.text_tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


class ComposedInputs(ModelInputs):
    """A composed base's inputs: `tokenizer` (the LLM's, with the chat template in use) and
    `image_processor` (the tower's); every image is `num_image_tokens` slots of `image_token_index`."""

    def __init__(self, tokenizer, image_processor, num_image_tokens: int, image_token_index: int):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens, self.image_token_index = num_image_tokens, image_token_index

    @property
    def text_tokenizer(self):
        return self.tokenizer

    @property
    def processing_class(self):
        return self.tokenizer

    def pass_settings(self, data_args) -> PassSettings:
        """How the one pass reads this base's records: the chat template, each image as
        `num_image_tokens` slots."""
        return PassSettings(self.tokenizer, self.num_image_tokens, self.image_token_index, data_args.max_length,
                            data_args.image_folder, data_args.num_frames)

    def samples(self, prepared, data_args, skip) -> SupervisedDataset:
        return SupervisedDataset(prepared, data_args.image_folder, skip, data_args.num_frames)

    def collator(self, max_length: int) -> Collator:
        """Samples are already cut to max_length when tokenized."""
        return Collator(self.tokenizer.pad_token_id, self.image_processor)

    def pair_collator(self, max_length: int) -> PairCollator:
        """Preference pairs (data/preference_batch.py): 2B rows, the images once."""
        return PairCollator(self.collator(max_length))

    def prompt_batch(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded inputs of prompts awaiting their answers: input_ids, attention_mask [B, L]
        and pixel_values [N, 3, H, W] of every image in order."""
        sequences, images = [], []
        for messages, prompt_images in prompts:
            sequences.append(tokenize_prompt(self.tokenizer, messages, self.num_image_tokens, self.image_token_index))
            images += prompt_images
        input_ids, attention_mask = left_pad(sequences, self.tokenizer.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            batch["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return batch


class ReleasedInputs(ModelInputs):
    """A released VLM's inputs: everything through its `processor` (chat template, image
    expansion, vision inputs). `image_token_index`: the processor's image token; `prefix_lm`: the
    family attends bidirectionally over its prompt (PaliGemma)."""

    def __init__(self, processor, image_token_index: int | None, prefix_lm: bool = False):
        self.processor, self.image_token_index, self.prefix_lm = processor, image_token_index, prefix_lm

    @cached_property
    def image_tokens(self) -> ImageTokenCount:
        """The processor's tokens per image size, shared by the check and the sampler: made on
        first use (it runs one probe sample), so infer.py and the export never pay for it."""
        return ImageTokenCount(self.processor)

    @property
    def text_tokenizer(self):
        return self.processor.tokenizer

    @property
    def processing_class(self):
        return self.processor

    def pass_settings(self, data_args) -> PassSettings:
        # A record's text is rendered by the processor's template, each image one token in the
        # stored ids; its images count as the processor expands them (`image_tokens`), and the
        # whole record is kept: the processor renders it again per batch.
        return PassSettings(ProcessorTemplate(self.processor), 1, self.image_token_index, data_args.max_length,
                            data_args.image_folder, data_args.num_frames, self.image_tokens, keep_records=True)

    def samples(self, prepared, data_args, skip) -> ProcessorDataset:
        return ProcessorDataset(prepared, data_args.image_folder, self.processor, skip, data_args.num_frames)

    def collator(self, max_length: int) -> ProcessorCollator:
        """Images are expanded per batch, so a sample's length is known, and cut, only there."""
        return ProcessorCollator(self.processor, max_length, self.prefix_lm)

    def pair_collator(self, max_length: int) -> ProcessorPairCollator:
        return ProcessorPairCollator(self.collator(max_length), self.processor.tokenizer.pad_token_id)

    def prompt_batch(self, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
        return encode_batch(self.processor, prompts, add_generation_prompt=True)
