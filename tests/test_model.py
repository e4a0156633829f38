"""model/: forward and backward for every connector and tower, the masked write of image
features, the vision tower's feature selection, multi-image batches, and logits equal to
transformers' own LlavaForConditionalGeneration for the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model_args
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from data.dataset import Collator, supervised_dataset
from model.freeze import apply_freeze_policy
from model.vision import VisionTower, load_vision_encoder
from model.vlm import IMAGE_TOKEN_INDEX
from run.checkpoint import load_base

IMAGE_SIZE = 48  # the tiny towers' input size
NUM_PATCHES = 64  # (48 / 6) ** 2


def build(base: dict, **overrides):
    torch.manual_seed(0)  # the connector is freshly initialised
    args = tiny_model_args(base, **overrides)
    return load_base(args), args


def random_pixels(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def sequence(num_image_tokens: int, before: int, after: int, seed: int) -> list[int]:
    """Random ordinary token ids (ids 0-3 are special) around one image block."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 300, (before + after,), generator=generator).tolist()
    return text[:before] + [IMAGE_TOKEN_INDEX] * num_image_tokens + text[before:]


@pytest.fixture(scope="module")
def clip_mlp_model(tiny_base):
    model, _ = build(tiny_base)
    return model.eval()


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "resampler"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_forward_and_backward(request, tower, connector):
    base = request.getfixturevalue("tiny_base" if tower == "clip" else "tiny_base_siglip")
    model, args = build(
        base,
        connector=connector,
        resampler_num_queries=16,
        freeze_vit=False,
        freeze_qformer=False,
        freeze_llm=False,
    )
    apply_freeze_policy(model, args)
    expected_tokens = 16 if connector == "resampler" else NUM_PATCHES
    assert model.num_image_tokens == expected_tokens

    input_ids = torch.tensor(
        [sequence(model.num_image_tokens, 3, 9, seed=1), sequence(model.num_image_tokens, 7, 5, seed=2)]
    )
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, -100)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=random_pixels(2, seed=0),
        labels=labels,
    )
    assert out.logits is None  # a training step runs the LM head fused with the loss
    assert torch.isfinite(out.loss)
    assert out.loss.item() > 0

    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".", 1)[0] for n in trainable} == {"vision", "connector", "llm"}
    # Every trainable tensor gets a real gradient: a tower cut at the feature layer leaves
    # no parameter outside the graph, and the image features reach the loss.
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())


@pytest.mark.parametrize("num_items_in_batch", [None, 11])
def test_head_at_labelled_positions_gives_the_full_heads_loss_and_gradients(tiny_base, num_items_in_batch):
    """A training step runs the LM head only where the next token has a label, fused with the
    loss (model/loss.py), or as logits of those rows where the LLM changes its logits after the
    head. Both give the same loss and gradients as the head at every position (the LLM's own
    loss over [B, L, V] logits); with the Trainer's `num_items_in_batch` too. Unlabelled rows:
    the image block, the prompt, padding."""
    model, args = build(tiny_base, freeze_vit=False, freeze_qformer=False, freeze_llm=False)
    apply_freeze_policy(model, args)
    model.train()  # the tiny base has no dropout: train mode is deterministic
    input_ids = torch.tensor(
        [sequence(model.num_image_tokens, 3, 9, seed=1), sequence(model.num_image_tokens, 7, 5, seed=2)]
    )
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, -100)
    labels[:, :2] = -100  # a prompt
    labels[1, -3:] = -100  # padding at the end of the second row
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=random_pixels(2, seed=0),
        labels=labels,
    )
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    rows = int((labels[:, 1:] != -100).sum())

    def loss_and_grads(path: str):
        model.head_at_labels_only = path != "every position"
        model.fused_loss = path == "fused"
        model.zero_grad()
        out = model(**batch, **extra)
        out.loss.backward()
        logits_shape = {"every position": (*input_ids.shape, model.llm.config.vocab_size),
                        "labelled rows": (rows, model.llm.config.vocab_size), "fused": None}[path]
        assert (None if out.logits is None else tuple(out.logits.shape)) == logits_shape
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    assert model.head_at_labels_only  # a transformers causal LM takes a boolean logits_to_keep
    lora, _ = build(tiny_base, lora_enable=True)
    assert type(lora.llm).__name__.startswith("Peft") and lora.head_at_labels_only  # and under PEFT
    full_loss, full_grads = loss_and_grads("every position")
    for path in ("labelled rows", "fused"):
        loss, grads = loss_and_grads(path)
        torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6, msg=path)
        for name, grad in full_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{path}: {name}")


def test_image_features_are_written_at_image_positions(clip_mlp_model):
    model = clip_mlp_model
    before = 5
    input_ids = torch.tensor([sequence(model.num_image_tokens, before, 6, seed=3)])
    image_mask = input_ids[0] == IMAGE_TOKEN_INDEX
    pixels_a, pixels_b = random_pixels(1, seed=1), random_pixels(1, seed=2)

    with torch.no_grad():
        embeds = model.embed_inputs(input_ids, pixels_a)  # [1, L, D]
        image_embeds = model.embed_images(pixels_a)  # [1, T, D]
        text_embeds = model.llm.get_input_embeddings()(input_ids[0, ~image_mask])
        assert torch.equal(embeds[0, image_mask], image_embeds[0])
        assert torch.equal(embeds[0, ~image_mask], text_embeds)

        logits_a = model(input_ids=input_ids, pixel_values=pixels_a).logits[0]  # [L, V]
        logits_b = model(input_ids=input_ids, pixel_values=pixels_b).logits[0]
    change = (logits_a - logits_b).abs().amax(dim=-1)  # [L]
    # Text before the image cannot see it (causal); every position from the image on does.
    assert torch.all(change[:before] == 0)
    assert torch.all(change[before:] > 1e-5)


@pytest.mark.parametrize(
    "strategy, num_tokens, keeps_cls", [("default", NUM_PATCHES, False), ("full", NUM_PATCHES + 1, True)]
)
def test_clip_tower_drops_cls_only_with_default_strategy(tiny_base, strategy, num_tokens, keeps_cls):
    pixels = random_pixels(2, seed=4)
    reference = AutoModel.from_pretrained(tiny_base["vision"]).eval()  # full, uncut tower
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # [2, 65, C]

    tower = VisionTower(load_vision_encoder(tiny_base["vision"]), -2, strategy).eval()
    assert tower.has_cls
    assert tower.num_tokens == num_tokens
    with torch.no_grad():
        features = tower(pixels)
    assert features.shape == (2, num_tokens, tower.hidden_size)
    torch.testing.assert_close(features, expected if keeps_cls else expected[:, 1:], rtol=0, atol=1e-6)
    # Layers after the feature layer are cut: 3 layers, features of layer 2.
    assert len(tower.encoder.encoder.layers) == 2


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_siglip_tower_has_no_cls(tiny_base_siglip, strategy):
    pixels = random_pixels(2, seed=5)
    reference = AutoModel.from_pretrained(tiny_base_siglip["vision"]).eval()
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # [2, 64, C]
    tower = VisionTower(load_vision_encoder(tiny_base_siglip["vision"]), -2, strategy).eval()
    assert not tower.has_cls
    assert tower.num_tokens == NUM_PATCHES
    with torch.no_grad():
        features = tower(pixels)
    assert features.shape == (2, NUM_PATCHES, tower.hidden_size)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_queries", [16, 32])
def test_resampler_gives_num_queries_tokens_per_image(tiny_base, num_queries):
    model, _ = build(tiny_base, connector="resampler", resampler_num_queries=num_queries, resampler_num_heads=4)
    assert model.num_image_tokens == num_queries
    with torch.no_grad():
        image_embeds = model.eval().embed_images(random_pixels(3, seed=6))
    assert image_embeds.shape == (3, num_queries, model.llm.config.hidden_size)


def test_multi_image_batch_through_dataset_and_collator(clip_mlp_model, tiny_base, demo_data, tmp_path):
    model = clip_mlp_model
    with open(demo_data["train"]) as f:
        images = [r["image"] for r in json.load(f)[:2]]
    records = [
        {
            "id": "two-images",
            "image": images,
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nHow many shapes are there?"},
                {"from": "gpt", "value": "2"},
            ],
        },
        {
            "id": "no-image",
            "conversations": [
                {"from": "human", "value": "What color are the shapes?"},
                {"from": "gpt", "value": "red"},
            ],
        },
    ]
    data_path = tmp_path / "mixed.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])
    image_processor = AutoImageProcessor.from_pretrained(tiny_base["vision"])
    dataset = supervised_dataset(
        str(data_path), demo_data["image_folder"], tokenizer, model.num_image_tokens, model.image_token_index, max_length=512,
    )
    assert len(dataset) == 2
    examples = [dataset[0], dataset[1]]
    assert [len(e["images"]) for e in examples] == [2, 0]

    batch = Collator(tokenizer.pad_token_id, image_processor)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(dim=1).tolist() == [2 * model.num_image_tokens, 0]
    short = lengths.index(min(lengths))
    assert batch["attention_mask"][short].sum() == min(lengths)
    assert torch.all(batch["labels"][short, min(lengths) :] == -100)
    assert torch.all(batch["input_ids"][short, min(lengths) :] == tokenizer.pad_token_id)

    with torch.no_grad():
        out = model(**batch)
        assert torch.isfinite(out.loss)
        # The first block holds the first image, the second block the second.
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        image_embeds = model.embed_images(batch["pixel_values"])  # [2, T, D]
        mask = batch["input_ids"][0] == IMAGE_TOKEN_INDEX
        torch.testing.assert_close(embeds[0, mask], image_embeds.reshape(-1, image_embeds.shape[-1]))
        # Batching changes nothing: each row's logits equal its own run alone.
        for row, example in enumerate(examples):
            alone = model(**Collator(tokenizer.pad_token_id, image_processor)([example])).logits[0]
            torch.testing.assert_close(out.logits[row, : lengths[row]], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "num_blocks, num_images",
    [(1, 2), (2, 1), (1, 0), (0, 1)],
    ids=["1-block-2-images", "2-blocks-1-image", "no-pixels", "pixels-without-block"],
)
def test_image_token_and_image_count_mismatch_raises(clip_mlp_model, num_blocks, num_images):
    model = clip_mlp_model
    ids = [5, 6, 7] + [IMAGE_TOKEN_INDEX] * (model.num_image_tokens * num_blocks) + [8, 9]
    pixels = random_pixels(num_images, seed=7) if num_images else None
    with torch.no_grad(), pytest.raises(ValueError, match="image"):
        model(input_ids=torch.tensor([ids]), pixel_values=pixels)


def llava_with_our_weights(model, base: dict, image_token_id: int) -> LlavaForConditionalGeneration:
    """transformers' Llava built from the tiny configs, holding exactly our model's weights."""
    config = LlavaConfig(
        vision_config=AutoConfig.from_pretrained(base["vision"]),
        text_config=AutoConfig.from_pretrained(base["llm"]),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    llava = LlavaForConditionalGeneration(config).eval()
    # Our tower is cut after the feature layer and has no post_layernorm: Llava gets the
    # original saved tower, which must give the same layer -2 features.
    llava.model.vision_tower.load_state_dict(AutoModel.from_pretrained(base["vision"]).state_dict())
    llava.model.multi_modal_projector.load_state_dict(model.connector.state_dict())
    llava.model.language_model.load_state_dict(model.llm.model.state_dict())
    llava.lm_head.load_state_dict(model.llm.lm_head.state_dict())
    return llava


def test_logits_match_transformers_llava(clip_mlp_model, tiny_base):
    model = clip_mlp_model
    tokenizer = AutoTokenizer.from_pretrained(tiny_base["llm"])
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_id != tokenizer.unk_token_id
    llava = llava_with_our_weights(model, tiny_base, image_token_id)
    assert llava.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32

    # Two rows, one image each, at different places; text on both sides.
    ours = torch.tensor(
        [sequence(model.num_image_tokens, 4, 8, seed=8), sequence(model.num_image_tokens, 9, 3, seed=9)]
    )
    theirs = ours.masked_fill(ours == IMAGE_TOKEN_INDEX, image_token_id)
    pixels = random_pixels(2, seed=10)
    attention_mask = torch.ones_like(ours)
    with torch.no_grad():
        our_logits = model(input_ids=ours, attention_mask=attention_mask, pixel_values=pixels).logits
        llava_logits = llava(input_ids=theirs, attention_mask=attention_mask, pixel_values=pixels).logits
    assert our_logits.shape == llava_logits.shape
    torch.testing.assert_close(our_logits, llava_logits, rtol=0, atol=1e-5)
    # Not trivially equal: the logits depend on the image in both models.
    with torch.no_grad():
        other = llava(input_ids=theirs, attention_mask=attention_mask, pixel_values=random_pixels(2, 11)).logits
    assert (other - llava_logits).abs().max() > 1e-3


def test_an_all_masked_batch_gives_zero_loss_not_nan(model_args):
    model = load_base(model_args(freeze_llm=False))
    input_ids = torch.randint(0, 100, (2, 10))
    labels = torch.full_like(input_ids, -100)
    labels[:, 0] = input_ids[:, 0]  # nothing left to predict after the shift
    for extra in ({}, {"num_items_in_batch": torch.tensor(0)}):
        loss = model(input_ids=input_ids, labels=labels, **extra).loss
        assert torch.isfinite(loss) and loss.item() == 0.0
        loss.backward()
    labels[:, 5] = input_ids[:, 5]
    assert model(input_ids=input_ids, labels=labels).loss.item() > 0
