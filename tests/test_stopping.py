"""Stopping, one rule everywhere: training supervises the token that ends an assistant turn in the
template (also where the template writes none after the answer: GLM-4V style, then the next role
marker ends it), and generation (infer.py, evaluation during training, the web page: all through
`run.predict.generate_answers`) stops at every id of `run.predict.stop_token_ids`: the model's own
generation config's eos ids, the tokenizer's eos and that turn end. The export writes the same ids
into its generation_config.json. Checked on the composed tiny base and every tiny released family,
and end to end: a model trained on a small set by the real train.py answers *and stops* through the
real infer.py --data."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import assert_answers_end_with_a_stop, tiny_model_args, train_and_answer
from transformers import AutoTokenizer, GenerationConfig

from data.media import load_image
from data.processor_prompt import as_template, encode_batch
from data.prompt import tokenize_conversation, turn_end_id, turn_end_text
from fixtures.tiny_vlms import FAMILIES
from model.released import load_released_processor
from model.settings import ModelArguments
from run.checkpoint import load_base, load_checkpoint, save_checkpoint
from run.inputs import model_inputs
from run.predict import generate_answers, stop_token_ids
from scripts import export_hf

# Templates that write nothing after an answer but whitespace, GLM-4V style: "<|user|>\nq<|assistant|>\na"
# and then the next role marker. Their markers are tokens the tiny tokenizers already have (ChatML's
# <|im_start|>; else the words "USER:" / "ASSISTANT:", each turn on its line), so a tiny base trains
# on them without new embeddings. Content as a string or as typed parts; IMAGE: the family's placeholder.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ IMAGE }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)
GLM_STYLE_TEMPLATES = {
    "special": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}" + _CONTENT + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "words": (
        "{% for message in messages %}{{ message['role'].upper() + ': ' }}" + _CONTENT + "{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}
CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat color are the shapes?"}, {"role": "assistant", "content": "red"},
    {"role": "user", "content": "What shape is shown?"}, {"role": "assistant", "content": "circle"},
]
ANSWERS = ["red", "circle"]


def glm_style(image_placeholder: str, tokenizer) -> str:
    """A template that writes no end after an answer, with ChatML's markers if `tokenizer` has them."""
    kind = "special" if "<|im_start|>" in tokenizer.get_vocab() else "words"
    return GLM_STYLE_TEMPLATES[kind].replace("IMAGE", repr(image_placeholder))


@pytest.fixture(scope="module")
def composed(tiny_base):
    """(model, tokenizer) of the tiny composed base, as the one loader builds them."""
    model = load_base(tiny_model_args(tiny_base))
    return model, AutoTokenizer.from_pretrained(tiny_base["llm"])


def gemma_style_llm(llm_dir: str, out: str) -> str:
    """A copy of the tiny LLM whose tokenizer's eos is not the token that ends a turn in its template,
    and whose generation config lists both, as Gemma's does ([<eos>, <end_of_turn>]): here
    [<|endoftext|>, <|im_end|>] with eos <|endoftext|> (a Qwen2.5 base's shape)."""
    shutil.copytree(llm_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(out)
    config = GenerationConfig.from_pretrained(out)
    config.eos_token_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config.save_pretrained(out)
    return out


def glm_style_llm(llm_dir: str, out: str) -> str:
    """A copy of the tiny LLM whose chat template writes nothing after an answer."""
    shutil.copytree(llm_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = glm_style("<image>", tokenizer)
    tokenizer.save_pretrained(out)
    return out


# --- the label rule: every answer ends with a stop id ------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1", "glm_style"])
def test_composed_base_labels_each_answer_and_its_stop(template, composed, tiny_tokenizer):
    model, _ = composed
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    if template == "vicuna_v1":
        with open(os.path.join(os.path.dirname(__file__), "..", "configs", "chat_templates", "vicuna_v1.jinja")) as f:
            tokenizer.chat_template = f.read()
    elif template == "glm_style":
        tokenizer.chat_template = glm_style("<image>", tokenizer)
    _, labels = tokenize_conversation(tokenizer, CONVERSATION, num_image_tokens=4, image_token_index=-200)
    stop_ids = stop_token_ids(model, tokenizer)
    assert turn_end_id(tokenizer) in stop_ids
    assert_answers_end_with_a_stop(labels, ANSWERS, stop_ids, tokenizer)


def test_a_template_without_turn_end_labels_the_next_role_marker(tiny_tokenizer):
    """GLM-4V style: what follows an answer is the next turn's marker, supervised in place in the
    middle of a conversation and appended after its last answer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = glm_style("<image>", tokenizer)
    assert turn_end_text(tokenizer) == "<|im_start|>user"
    assert turn_end_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids, labels = tokenize_conversation(tokenizer, CONVERSATION, num_image_tokens=4, image_token_index=-200)
    supervised = tokenizer.decode([t for t in labels if t != -100])
    assert supervised == "red<|im_start|>usercircle<|im_start|>user"
    # The rendered conversation is the template's, with only the closing marker added at its end.
    text = tokenizer.decode([t for t in ids if t != -200])  # the image's 4 positions left out
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False).replace("<image>", "")
    assert text == rendered + "<|im_start|>user"


@pytest.fixture(scope="module")
def images(released_data) -> list:
    return [load_image(os.path.join(released_data["image_folder"], "images", "train-00000.png"))]


@pytest.mark.parametrize("template", ["own", "glm_style"])
@pytest.mark.parametrize("family", FAMILIES)
def test_released_vlm_labels_each_answer_and_its_stop(family, template, released_vlm, images):
    args = ModelArguments(vlm_model=released_vlm(family))
    model, processor = load_base(args), load_released_processor(args)
    if template == "glm_style":
        processor.chat_template = glm_style(processor.image_token, processor.tokenizer)
    batch = encode_batch(processor, [(CONVERSATION, images)], prefix_lm=model.prefix_lm)
    stop_ids = stop_token_ids(model, processor)
    assert turn_end_id(as_template(processor)) in stop_ids
    assert_answers_end_with_a_stop(batch["labels"][0].tolist(), ANSWERS, stop_ids, processor.tokenizer)


# --- generation stops at every stop id ------------------------------------------------------


def test_stop_ids_are_the_generation_configs_the_tokenizers_eos_and_the_turn_end(composed, tiny_tokenizer):
    model, _ = composed
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = glm_style("<image>", tokenizer)
    own = model.base_generation_config().eos_token_id
    try:
        model.base_generation_config().eos_token_id = [7, 9]
        ids = stop_token_ids(model, tokenizer)
    finally:
        model.base_generation_config().eos_token_id = own
    assert ids == [7, 9, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]


def untrained_answer_tokens(model, inputs, prompt) -> list[int]:
    """The new tokens of `prompt`'s greedy answer, up to and including its first stop id."""
    batch = inputs.prompt_batch(prompt)
    return model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=inputs.text_tokenizer.pad_token_id,
                          eos_token_id=stop_token_ids(model, inputs.processing_class))[0].tolist()


@pytest.mark.parametrize("kind", ["composed", "llava"])
def test_generation_stops_at_a_second_eos_of_the_generation_config(kind, composed, released_vlm, images):
    """Gemma's generation config says [<eos>, <end_of_turn>]: an answer ends at either. Here the
    second id is a token the untrained model generates mid-answer: the answer must end before it
    (passing only the tokenizer's eos to `generate`, as before, would run past it)."""
    if kind == "composed":
        model, _ = composed
        args = model.build_args
    else:
        args = ModelArguments(vlm_model=released_vlm("llava"))
        model = load_base(args)
    inputs = model_inputs(model, args)
    text_tokenizer = inputs.text_tokenizer
    model.eval()
    prompt = [([{"role": "user", "content": "<image>\nWhat color are the shapes?"}], images)]
    free = untrained_answer_tokens(model, inputs, prompt)
    stops = stop_token_ids(model, inputs.processing_class)
    # The first token that differs from those before it (the first one, where the untrained model
    # repeats one token): an answer that ends right before it is the first `k` tokens.
    assert free[0] not in stops, "the untrained model stops at once: nothing to cut"
    k = next((k for k in range(1, len(free)) if free[k] not in free[:k] and free[k] not in stops), 0)
    config = model.base_generation_config()
    own = config.eos_token_id
    try:
        config.eos_token_id = [text_tokenizer.eos_token_id, free[k]]
        (answer,) = generate_answers(model, inputs, prompt, max_new_tokens=8)
    finally:
        config.eos_token_id = own
    assert answer == text_tokenizer.decode(free[:k], skip_special_tokens=True).strip()


# --- the export stops where infer.py stops --------------------------------------------------


def test_export_writes_every_stop_id_into_its_generation_config(tiny_base, tmp_path):
    """A Llava export of a base whose generation config has two eos ids and whose tokenizer's eos
    is not the turn end: the exported generation_config.json lists exactly infer.py's stop ids."""
    llm = gemma_style_llm(tiny_base["llm"], str(tmp_path / "llm"))
    model = load_base(tiny_model_args({"vision": tiny_base["vision"], "llm": llm}))
    tokenizer = AutoTokenizer.from_pretrained(llm)
    checkpoint, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    save_checkpoint(model, checkpoint, tokenizer)
    export_hf.main(["--checkpoint", checkpoint, "--out", out])
    loaded, loaded_inputs, _ = load_checkpoint(checkpoint)
    with open(os.path.join(out, "generation_config.json")) as f:
        exported = json.load(f)["eos_token_id"]
    assert exported == stop_token_ids(loaded, loaded_inputs.processing_class)
    assert set(exported) == set(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


def test_released_export_writes_every_stop_id_into_its_generation_config(released_vlm, tmp_path):
    """A released VLM whose generation config stops on a token that is neither its tokenizer's eos
    nor its turn end: the export keeps it and adds the other two."""
    folder = shutil.copytree(released_vlm("smolvlm"), str(tmp_path / "base"))
    config = GenerationConfig.from_pretrained(folder)
    other = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_start|>")
    config.eos_token_id = [other]
    config.save_pretrained(folder)
    args = ModelArguments(vlm_model=folder)
    model, processor = load_base(args), load_released_processor(args)
    checkpoint, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    save_checkpoint(model, checkpoint, processor)
    export_hf.main(["--checkpoint", checkpoint, "--out", out])
    with open(os.path.join(out, "generation_config.json")) as f:
        exported = json.load(f)["eos_token_id"]
    assert exported == stop_token_ids(model, processor)
    assert exported == [other, processor.tokenizer.eos_token_id]  # <end_of_utterance>: eos and turn end
    assert turn_end_id(as_template(processor)) == processor.tokenizer.eos_token_id


# --- end to end: trained on a small set, the model answers and stops -------------------------


@pytest.mark.slow
@pytest.mark.parametrize("base", ["gemma_style_eos", "glm_style_template"])
def test_a_trained_model_answers_and_stops(base, tiny_base, tmp_path):
    """The real train.py on 64 colour questions, then the real infer.py --data on 16 held-out ones.
    gemma_style_eos: the tokenizer's eos is <|endoftext|>, the template ends turns with <|im_end|>,
    the generation config lists both (stopping at the tokenizer's eos alone answers "red" and runs
    on); glm_style_template: the template writes no end after an answer (a label rule that
    supervises the answer alone never teaches the model to stop)."""
    make = gemma_style_llm if base == "gemma_style_eos" else glm_style_llm
    llm = make(tiny_base["llm"], str(tmp_path / "llm"))
    result = train_and_answer(["--vision_model", tiny_base["vision"], "--llm_model", llm], str(tmp_path),
                              "--freeze_llm", "false")
    assert result["accuracy"] >= 0.9, result["predictions"]
