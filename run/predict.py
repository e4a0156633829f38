"""Answer questions about images with a loaded model: used by infer.py and by train.py's
held-out accuracy (during training and after it), so all of them generate the same way. (Named
`predict`, not `evaluate`, so it never shadows Hugging Face's `evaluate` package.)"""

from __future__ import annotations

import dataclasses
import random

import torch

from constants import NUM_FRAMES
from data.dataset import record_messages
from data.inputs import ModelInputs, Prompt
from data.media import load_record_media
from data.processor_prompt import as_template
from data.prompt import IMAGE_MARKER, turn_end_id

# One default for infer.py, evaluation in train.py and the web page.
MAX_NEW_TOKENS = 64


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids generation stops at: the one rule of infer.py, evaluation during training, the web
    page and the export's generation_config.json. Every eos id of the model's own generation config
    (Gemma's [<eos>, <end_of_turn>], not just the tokenizer's eos), the tokenizer's eos, and the
    token that ends an assistant turn in the chat template in use, which training supervises
    (`data.prompt.turn_end_id`: "<|im_end|>", or GLM-4V's "<|user|>" where the template writes no
    end after an answer). `model`: either kind of base, or a transformers model; `tokenizer`: a
    composed base's tokenizer or a released VLM's processor (`ModelInputs.processing_class`)."""
    if hasattr(model, "base_generation_config"):
        config = model.base_generation_config()
    else:
        config = model.generation_config
    own = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    template = as_template(tokenizer)
    return list(dict.fromkeys(t for t in [*own, template.eos_token_id, turn_end_id(template)] if t is not None))


def until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """The tokens before the first stop id: the answer (a stop id need not be a special token that
    decoding skips: a template's word marker, "USER:")."""
    stops = [i for i, token in enumerate(tokens) if token in stop_ids]
    return tokens[: stops[0]] if stops else tokens


@torch.no_grad()
def generate_answers(
    model, inputs: ModelInputs, prompts: list[Prompt], max_new_tokens=MAX_NEW_TOKENS, do_sample=False, temperature=1.0,
) -> list[str]:
    """prompts: (messages ending on a user turn, PIL images) pairs -> answer strings, through the
    base's own prompt builder (`inputs`, data/inputs.py), each ended at the first of `stop_token_ids`."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.prompt_batch(prompts).items()}
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    stop_ids = stop_token_ids(model, inputs.processing_class)
    new_tokens = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        pad_token_id=inputs.text_tokenizer.pad_token_id,
        eos_token_id=stop_ids,
        **sampling,
    )  # [B, new]
    return inputs.decode([until_stop(row, stop_ids) for row in new_tokens.tolist()])


def first_question(record: dict, image_folder: str | None, num_frames: int = NUM_FRAMES) -> tuple[list[dict], list, str | None]:
    """(messages up to the first answer, images or video frames, expected answer) of a record: the
    one rule for the question a record asks, in infer.py --data, train.py's evaluation and the web
    page's picker. A system turn before the question is kept."""
    messages = record_messages(record, image_folder, num_frames)
    images = load_record_media(record, image_folder, num_frames)
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    expected = messages[first_answer]["content"] if first_answer < len(messages) else None
    # Images shown in later turns are not part of this question: markers and images go in order.
    shown = sum(m["content"].count(IMAGE_MARKER) for m in messages[:first_answer])
    return messages[:first_answer], images[:shown], expected


def exact_match(prediction: str, answer: str | None) -> bool:
    return answer is not None and prediction.strip().lower() == answer.strip().lower()


def predict_records(
    model, inputs: ModelInputs, records, image_folder, batch_size=32, max_new_tokens=MAX_NEW_TOKENS, num_frames=NUM_FRAMES
):
    """One {"id", "prediction", "answer"} per record, answering its first human turn."""
    results = []
    for start in range(0, len(records), batch_size):
        batch = [records[i] for i in range(start, min(start + batch_size, len(records)))]
        questions = [first_question(r, image_folder, num_frames) for r in batch]
        answers = generate_answers(model, inputs, [(m, imgs) for m, imgs, _ in questions], max_new_tokens)
        for record, (_, _, expected), prediction in zip(batch, questions, answers, strict=True):
            results.append({"id": record.get("id"), "prediction": prediction, "answer": expected})
    return results


def accuracy(results: list[dict]) -> float:
    return sum(exact_match(r["prediction"], r["answer"]) for r in results) / max(len(results), 1)


@dataclasses.dataclass
class HeldOut:
    """Held-out records and what asks them: every argument of `predict_records` but the model.
    The Trainer holds one as its `eval_dataset` (run/trainer.py)."""

    records: list[dict]
    image_folder: str | None
    inputs: ModelInputs
    num_frames: int = NUM_FRAMES

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, size: int, seed: int) -> HeldOut:
        """At most `size` records (0: all), drawn by `seed` and kept in file order: the same ones on
        every rank and at every evaluation of a run, so the points of its accuracy curve compare."""
        if size <= 0 or len(self.records) <= size:
            return self
        picked = sorted(random.Random(seed).sample(range(len(self.records)), size))
        return dataclasses.replace(self, records=[self.records[i] for i in picked])

    def predict(self, model, shard: int = 0, shards: int = 1) -> list[dict]:
        """`predict_records` on every `shards`-th record from `shard` on (one rank's share)."""
        return predict_records(
            model, self.inputs, self.records[shard::shards], self.image_folder,
            num_frames=self.num_frames,
        )
