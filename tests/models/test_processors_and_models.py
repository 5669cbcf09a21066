import pytest
import torch
from PIL import Image, ImageDraw

from models.logprobs import mm_token_type_ids, token_log_probs


def _image(size: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon([(20 + seed * 10, size - 30), (size - 40, size - 30), (size - 40, 40 + seed * 5)], outline=(0, 0, 0))
    draw.rectangle([seed * 20, seed * 20, seed * 20 + 60, seed * 20 + 30], fill=(200, 30 * seed % 255, 90))
    return image


def _user(text: str, images: int = 1):
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


@pytest.mark.parametrize(
    ("fixture", "pads", "pixel_shape", "grid"),
    [
        ("qwen25_policy", 256, (1024, 1176), [[1, 32, 32]]),
        ("qwen3_policy", 196, (784, 1536), [[1, 28, 28]]),
        ("qwen35_policy", 196, (784, 1536), [[1, 28, 28]]),
    ],
)
def test_processor_shapes_for_448_image(request, fixture, pads, pixel_shape, grid):
    policy = request.getfixturevalue(fixture)
    text = policy.tokenizer.apply_chat_template([_user("Find x.")], tokenize=False, add_generation_prompt=True)
    out = policy.processor(text=[text], images=[_image(448, 1)], return_tensors="pt")
    image_pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad == policy.model.config.image_token_id
    assert int((out["input_ids"] == image_pad).sum()) == pads
    assert tuple(out["pixel_values"].shape) == pixel_shape
    assert out["image_grid_thw"].tolist() == grid


def _generate(policy, inputs, max_new_tokens, seed=0):
    torch.manual_seed(seed)
    out = policy.model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
    scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)
    sampled = scores.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    return out.sequences, new_tokens, sampled


def _valid_until_eos(new_tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Mask of generated positions up to and including the first EOS (later ones are padding)."""
    is_eos = (new_tokens == eos_id).int()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return ~after_eos


def test_generate_log_probs_match_teacher_forcing_batch1(any_policy):
    policy = any_policy
    text = policy.tokenizer.apply_chat_template([_user("Find x.")], tokenize=False, add_generation_prompt=True)
    inputs = policy.processor(text=[text], images=[_image(112, 1)], return_tensors="pt")

    sequences, new_tokens, sampled = _generate(policy, inputs, 12)
    with torch.no_grad():
        forced = token_log_probs(
            policy.model, sequences, new_tokens.shape[1],
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
        )  # fmt: skip
    valid = _valid_until_eos(new_tokens, policy.tokenizer.eos_token_id)
    assert (forced - sampled)[valid].abs().max().item() <= 1e-4


def test_generate_log_probs_match_teacher_forcing_batch4_left_padded(any_policy):
    policy = any_policy
    prompts = ["Find x.", "Find the area of the circle, to the nearest tenth.", "Find y", "What is the angle?"]
    texts = [
        policy.tokenizer.apply_chat_template([_user(p)], tokenize=False, add_generation_prompt=True) for p in prompts
    ]
    images = [_image(112 + 28 * (i % 2), i) for i in range(4)]
    policy.processor.tokenizer.padding_side = "left"
    inputs = policy.processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"][:, 0] == 0).any(), "prompts should need left padding"

    sequences, new_tokens, sampled = _generate(policy, inputs, 10, seed=3)
    attention = torch.cat([inputs["attention_mask"], torch.ones_like(new_tokens)], dim=1)
    with torch.no_grad():
        forced = token_log_probs(
            policy.model, sequences, new_tokens.shape[1], attention_mask=attention,
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
        )  # fmt: skip
    valid = _valid_until_eos(new_tokens, policy.tokenizer.eos_token_id)
    assert (forced - sampled)[valid].abs().max().item() <= 1e-4


def test_two_turn_sequence_with_a_second_image(any_policy):
    policy = any_policy
    tokenizer, processor = policy.tokenizer, policy.processor
    first_text = tokenizer.apply_chat_template([_user("Find x.")], tokenize=False, add_generation_prompt=True)
    first = processor(text=[first_text], images=[_image(112, 1)], return_tensors="pt")

    sequences, turn1, _ = _generate(policy, first, 6, seed=1)
    observation = "<|im_end|>\n<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>Wrong.\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    obs = processor(text=[observation], images=[_image(140, 2)], return_tensors="pt")
    input_ids = torch.cat([sequences, obs["input_ids"]], dim=1)
    pixel_values = torch.cat([first["pixel_values"], obs["pixel_values"]])
    grid = torch.cat([first["image_grid_thw"], obs["image_grid_thw"]])
    second = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
              "image_grid_thw": grid, "mm_token_type_ids": mm_token_type_ids(input_ids, policy.model.config)}  # fmt: skip
    sequences2, turn2, sampled2 = _generate(policy, second, 8, seed=2)
    with torch.no_grad():
        forced = token_log_probs(policy.model, sequences2, turn2.shape[1], pixel_values=pixel_values, image_grid_thw=grid)
    valid = _valid_until_eos(turn2, tokenizer.eos_token_id)
    assert (forced - sampled2)[valid].abs().max().item() <= 1e-4


def test_dropping_mm_token_type_ids_changes_log_probs(qwen25_policy):
    policy = qwen25_policy
    text = policy.tokenizer.apply_chat_template([_user("Find x.")], tokenize=False, add_generation_prompt=True)
    inputs = policy.processor(text=[text + "The answer is 5."], images=[_image(112, 1)], return_tensors="pt")
    with torch.no_grad():
        right = token_log_probs(
            policy.model, inputs["input_ids"], 5,
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
        )  # fmt: skip
        wrong = policy.model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
        ).logits[:, -6:-1].log_softmax(-1)
    wrong = wrong.gather(-1, inputs["input_ids"][:, -5:].unsqueeze(-1)).squeeze(-1)
    assert (right - wrong).abs().max().item() > 1e-2


@pytest.mark.parametrize("fixture", ["qwen3_policy", "qwen35_policy", "qwen35_moe_policy"])
def test_swapping_images_changes_log_probs(request, fixture):
    policy = request.getfixturevalue(fixture)
    text = policy.tokenizer.apply_chat_template([_user("Which is bigger?", images=2)], tokenize=False)
    a, b = _image(112, 1), _image(112, 3)
    scores = []
    for images in ([a, b], [b, a]):
        inputs = policy.processor(text=[text], images=images, return_tensors="pt")
        with torch.no_grad():
            scores.append(token_log_probs(policy.model, inputs["input_ids"], 5, pixel_values=inputs["pixel_values"],
                                          image_grid_thw=inputs["image_grid_thw"]))  # fmt: skip
    assert (scores[0] - scores[1]).abs().max().item() > 1e-3
