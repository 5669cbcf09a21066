import pytest
import tokenizers
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


# Qwen3.5: its own 248,044-token vocabulary, the XML tool-call form and thinking on by default.
# transformers' Qwen3.5 tokenizer test pins these ids for the released Qwen3.5-9B tokenizer.
QWEN3_5_INTEGRATION_TEXT = (
    "This is a test 😊\nI was born in 92000, and this is falsé.\n生活的真谛是\nHi  Hello\nHi   Hello\n\n \n  \n"
    " Hello\n<s>\nhi<s>there\nThe following string should be properly encoded: Hello.\nBut ird and ปี   ird   ด\n"
    "Hey how are you doing"
)
QWEN3_5_INTEGRATION_IDS = [
    1919, 369, 264, 1228, 25677, 232, 198, 40, 557, 8950, 303, 220, 24, 17, 15, 15, 15, 11, 321, 411, 369, 30882,
    933, 13, 198, 103815, 132339, 95761, 198, 12675, 220, 21251, 198, 12675, 256, 21251, 271, 46813, 21251, 198,
    42589, 29, 198, 5834, 42589, 29, 17977, 198, 760, 2614, 886, 1220, 381, 9971, 19873, 25, 21251, 13, 198, 3850,
    220, 2517, 321, 170827, 256, 220, 2517, 256, 149027, 198, 18103, 1204, 513, 488, 3604,
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen35_tokenizer(qwen35_policy):
    return qwen35_policy.tokenizer


@pytest.mark.skipif(
    tuple(int(x) for x in tokenizers.__version__.split(".")[:2]) < (0, 23),
    reason="tokenizers < 0.23 (slime's image has 0.22) splits combining marks out of words in Qwen3.5's "
    "pre-tokenizer regex, so no build of this vocabulary, the released one included, gives these ids there",
)
def test_qwen35_vocabulary_matches_the_released_tokenizer(qwen35_tokenizer):
    tok = qwen35_tokenizer
    assert len(tok) == 248077
    assert tok.encode(QWEN3_5_INTEGRATION_TEXT) == QWEN3_5_INTEGRATION_IDS
    assert tok.decode(QWEN3_5_INTEGRATION_IDS) == QWEN3_5_INTEGRATION_TEXT
    # Combining marks stay inside words (Qwen3.5's pre-tokenizer): one piece per word here.
    assert len(tok.tokenize("नमस्ते")) < len(build_tokenizer(PRESETS["tiny-qwen2.5-vl"]).tokenize("नमस्ते"))
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        ("<|endoftext|>", 248044),
        ("<|im_start|>", 248045),
        ("<|im_end|>", 248046),
        ("<|vision_start|>", 248053),
        ("<|vision_end|>", 248054),
        ("<|image_pad|>", 248056),
        ("<|video_pad|>", 248057),
        ("<tool_call>", 248058),
        ("</tool_call>", 248059),
        ("<tool_response>", 248066),
        ("<think>", 248068),
        ("</think>", 248069),
        ("<|audio_pad|>", 248076),
    ],
)
def test_qwen35_added_tokens_at_real_ids(qwen35_policy, token, token_id):
    assert qwen35_policy.tokenizer.convert_tokens_to_ids(token) == token_id
    config = qwen35_policy.model.config
    expected = {"<|image_pad|>": config.image_token_id, "<|vision_start|>": config.vision_start_token_id}
    assert expected.get(token, token_id) == token_id


def test_qwen35_renders_xml_tool_calls_and_thinking(full_tokenizer):
    conversations, _ = _conversations()
    text = full_tokenizer.apply_chat_template(
        conversations["with_system"], tokenize=False, add_generation_prompt=True,
        chat_template=chat_template("qwen3.5"), tools=TOOLS,
    )  # fmt: skip
    # Tools first, taught in the XML form; the caller's system message after them.
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n" in text
    assert "</IMPORTANT>\n\nYou solve geometry problems.<|im_end|>\n<|im_start|>user\n" in text
    # The turn after the query keeps its reasoning; its call is XML; images in the tool turn.
    assert (
        "<|im_start|>assistant\n<think>\nThe legs are 3 and 4.\n</think>\n\nLet me check.\n\n<tool_call>\n"
        "<function=calc_score>\n<parameter=answer>\n5\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nIncorrect.<|vision_start|><|image_pad|><|vision_end|>\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"
    ) in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")


def test_qwen35_enable_thinking_false_closes_an_empty_block(full_tokenizer):
    conversations, _ = _conversations()
    kwargs = dict(tokenize=False, add_generation_prompt=True, chat_template=chat_template("qwen3.5"))
    off = full_tokenizer.apply_chat_template(conversations["one_turn"], enable_thinking=False, **kwargs)
    on = full_tokenizer.apply_chat_template(conversations["one_turn"], enable_thinking=True, **kwargs)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert on == full_tokenizer.apply_chat_template(conversations["one_turn"], **kwargs)


def test_qwen35_history_before_the_last_query_loses_reasoning_tool_turns_keep_it(full_tokenizer):
    template = chat_template("qwen3.5")
    first = {"role": "user", "content": "Q1"}
    answer = {"role": "assistant", "content": "<think>\nsecret\n</think>\n\nA1"}
    tool = {"role": "tool", "content": "Wrong."}
    second = {"role": "user", "content": "Q2"}
    text = full_tokenizer.apply_chat_template([first, answer, second], tokenize=False, chat_template=template)
    assert "secret" not in text and "<|im_start|>assistant\nA1<|im_end|>" in text
    text = full_tokenizer.apply_chat_template([first, answer, tool], tokenize=False, chat_template=template)
    assert "<|im_start|>assistant\n<think>\nsecret\n</think>\n\nA1<|im_end|>" in text
    # No reasoning at all still renders an (empty) block after the query.
    plain = {"role": "assistant", "content": "A1"}
    text = full_tokenizer.apply_chat_template([first, plain], tokenize=False, chat_template=template)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nA1<|im_end|>\n")


def test_qwen35_rejects_images_in_the_system_turn(full_tokenizer):
    system = {"role": "system", "content": [{"type": "image"}, {"type": "text", "text": "Look."}]}
    with pytest.raises(Exception, match="system messages cannot hold images"):
        full_tokenizer.apply_chat_template(
            [system, {"role": "user", "content": "Q"}], tokenize=False, chat_template=chat_template("qwen3.5")
        )
