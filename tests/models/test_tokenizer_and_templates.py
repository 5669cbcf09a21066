import pytest
from transformers import Qwen2Tokenizer

from models.chat_templates import TEMPLATE_NAMES, chat_template
from models.loader import PRESETS, build_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calc_score",
            "description": "Check an answer.",
            "parameters": {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def full_tokenizer() -> Qwen2Tokenizer:
    return build_tokenizer(PRESETS["tiny-qwen2.5-vl"])


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        ("<|endoftext|>", 151643),
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
        ("<|vision_start|>", 151652),
        ("<|vision_end|>", 151653),
        ("<|image_pad|>", 151655),
        ("<|video_pad|>", 151656),
        ("<tool_call>", 151657),
        ("</tool_call>", 151658),
        ("<tool_response>", 151665),
        ("<think>", 151667),
        ("</think>", 151668),
    ],
)
def test_added_tokens_at_real_ids(full_tokenizer, token, token_id):
    assert full_tokenizer.convert_tokens_to_ids(token) == token_id


def test_known_encodings(full_tokenizer):
    assert len(full_tokenizer) == 151669
    assert full_tokenizer.encode("Hello world") == [9707, 1879]
    system_turn = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert full_tokenizer.encode(system_turn) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert full_tokenizer.eos_token_id == 151645
    assert full_tokenizer.pad_token_id == 151643


def test_round_trip_of_unusual_text(full_tokenizer):
    text = "  x = 2\\sqrt{3}°\n\n\tÜber 日本語 🙂 <tool_call>{\"a\": 1}</tool_call>"
    assert full_tokenizer.decode(full_tokenizer.encode(text)) == text


def test_small_vocab_shares_added_tokens():
    small = build_tokenizer(PRESETS["tiny-qwen2.5-vl-small-vocab"])
    full_added = ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<tool_call>", "</think>"]
    offset = len(small) - 26
    assert [small.convert_tokens_to_ids(t) - offset for t in full_added] == [1, 2, 12, 14, 25]
    assert len(small) < 4096
    text = 'Find x.<tool_call>{"name": "calc_score", "arguments": {"answer": "12"}}</tool_call>'
    assert small.decode(small.encode(text)) == text


def _conversations():
    image = {"type": "image"}
    user = {"role": "user", "content": [image, {"type": "text", "text": "Find x. Round to the nearest tenth."}]}
    call = {
        "role": "assistant",
        "content": "<think>\nThe legs are 3 and 4.\n</think>\n\nLet me check.",
        "tool_calls": [{"type": "function", "function": {"name": "calc_score", "arguments": {"answer": "5"}}}],
    }
    tool_with_image = {"role": "tool", "content": [{"type": "text", "text": "Incorrect."}, image]}
    final = {"role": "assistant", "content": "<think>\nRecheck.\n</think>\n\nAnswer: \\boxed{5}"}
    system = {"role": "system", "content": "You solve geometry problems."}
    return {
        "one_turn": [user],
        "with_tool_turn": [user, call, tool_with_image],
        "with_system": [system, user, call, tool_with_image],
    }, final


@pytest.mark.parametrize("template_name", TEMPLATE_NAMES)
@pytest.mark.parametrize("conversation_name", ["one_turn", "with_tool_turn", "with_system"])
@pytest.mark.parametrize("with_tools", [False, True])
def test_generation_prompt_is_a_prefix_of_the_next_turn(
    full_tokenizer, template_name, conversation_name, with_tools
):
    conversations, final = _conversations()
    messages = conversations[conversation_name]
    kwargs = dict(chat_template=chat_template(template_name), tools=TOOLS if with_tools else None)
    prompt = full_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    extended = full_tokenizer.apply_chat_template(messages + [final], tokenize=False, **kwargs)
    assert extended.startswith(prompt)
    assert len(extended) > len(prompt)
    prompt_ids = full_tokenizer.encode(prompt)
    extended_ids = full_tokenizer.encode(extended)
    assert extended_ids[: len(prompt_ids)] == prompt_ids


def test_qwen25_renders_default_system_and_tool_turns(full_tokenizer):
    conversations, _ = _conversations()
    text = full_tokenizer.apply_chat_template(
        conversations["with_tool_turn"], tokenize=False, add_generation_prompt=True,
        chat_template=chat_template("qwen2.5-vl"), tools=TOOLS,
    )  # fmt: skip
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "calc_score"' in text
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert (
        '<tool_call>\n{"name": "calc_score", "arguments": {"answer": "5"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nIncorrect.<|vision_start|><|image_pad|><|vision_end|>\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in text


def test_qwen3_templates_differ_in_system_and_thinking(full_tokenizer):
    conversations, final = _conversations()
    messages = conversations["one_turn"]
    instruct = full_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template("qwen3-vl-instruct")
    )
    thinking = full_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=chat_template("qwen3-vl-thinking")
    )
    assert instruct.startswith("<|im_start|>user\n")
    assert instruct.endswith("<|im_start|>assistant\n")
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")


def test_thinking_template_strips_reasoning_before_the_last_query(full_tokenizer):
    first = {"role": "user", "content": "Q1"}
    answer = {"role": "assistant", "content": "<think>\nsecret\n</think>\n\nA1"}
    second = {"role": "user", "content": "Q2"}
    text = full_tokenizer.apply_chat_template(
        [first, answer, second], tokenize=False, chat_template=chat_template("qwen3-vl-thinking")
    )
    assert "secret" not in text
    assert "<|im_start|>assistant\nA1<|im_end|>" in text
