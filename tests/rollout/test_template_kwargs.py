"""slime's --apply-chat-template-kwargs render every turn, not only the first (docs/pitfalls.md#chat-template-kwargs-on-every-turn).

Two templates that react to ``enable_thinking``: tiny-qwen3.5's own (thinking on by default, its
generation prompt opens ``<think>\n``), and tiny-qwen3-vl with a Qwen3-style switch written here
(``enable_thinking: false`` gives ``<|im_start|>assistant\n<think>\n\n</think>\n\n``, otherwise
``<|im_start|>assistant\n``; earlier assistant turns re-render as
``<think>\n{reasoning}\n</think>\n\n`` + content, the Qwen3 Thinking history)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

import rollout
from models.chat_templates import chat_template
from models.loader import preset_dir
from rollout.observation import ObservationEncoder
from rollout.prompts import build_sample, chat_template_kwargs
from rollout.runtime import default_runtime
from rollout.sample import Sample

from .conftest import TEST_ENVS, ScriptedEngine, diagram, make_args

Status = Sample.Status

_QWEN3_GENERATION_PROMPT = (
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}\n"
)


def thinking_switch_template() -> str:
    base = chat_template("qwen3-vl-thinking")
    head = base[: base.rindex("{%- if add_generation_prompt %}")]
    assert "<think>" in base[len(head) :], "the thinking template's generation prompt moved; update this test"
    return head + _QWEN3_GENERATION_PROMPT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny-qwen3-vl's tokenizer and processor with the template above (no weights needed)."""
    target = tmp_path_factory.mktemp("qwen3-thinking-switch")
    for path in preset_dir("tiny-qwen3-vl").iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "chat_template.jinja":
            shutil.copy(path, target / path.name)
    (target / "chat_template.jinja").write_text(thinking_switch_template())
    return str(target)


@pytest.fixture(scope="module")
def processing(checkpoint):
    processing = default_runtime().processing.get(checkpoint)
    assert processing.tokenizer.chat_template == thinking_switch_template()
    return processing


USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}
OBSERVATION = {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "Look at this."}]}


def test_the_template_reacts_to_enable_thinking(processing):
    tok = processing.tokenizer
    off = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n") and off == on + "<think>\n\n</think>\n\n"


def test_observation_pieces_are_learned_per_template_kwargs(processing):
    encoder = ObservationEncoder(processing)
    plain = encoder.pieces("tool")
    off = encoder.pieces("tool", template_kwargs={"enable_thinking": False})
    assert plain.after.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert off.after == plain.after + "<think>\n\n</think>\n\n" and off.before == plain.before
    assert encoder.pieces("tool", template_kwargs={"enable_thinking": False}) is off  # cached per kwargs
    assert encoder.pieces("tool", template_kwargs={}) is plain
    encoded = encoder.encode_message({"role": "tool", "content": "ok"}, None, {"enable_thinking": False})
    assert encoded.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def _turns(tok, kwargs) -> tuple[list[str], list[str]]:
    """Three model turns (what the engine returns) and the assistant contents that re-render them:
    the template's generation prompt may already open (or open and close) the think block."""
    opened = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True, **kwargs)
    suffix = opened[len(tok.apply_chat_template([USER], tokenize=False)) + len("<|im_start|>assistant\n") :]
    replies = []
    for turn in (1, 2, 3):
        if suffix == "":
            reply = f"<think>\nStep {turn}.\n</think>\n\nAnswer {turn}."
        elif suffix.endswith("<think>\n"):
            reply = f"Step {turn}.\n</think>\n\nAnswer {turn}."
        else:
            reply = f"Answer {turn}."
        replies.append(reply)
    return [reply + "<|im_end|>" for reply in replies], [suffix + reply for reply in replies]


@pytest.mark.parametrize("prompt_as", ["text", "messages"])
@pytest.mark.parametrize("kwargs", [{"enable_thinking": False}, {"enable_thinking": True}, {}], ids=str)
@pytest.mark.parametrize("template", ["thinking-switch", "tiny-qwen3.5"])
async def test_every_turn_equals_the_template_rendering_with_the_same_kwargs(checkpoint, template, kwargs, prompt_as):
    """Each request (what the model is conditioned on at that turn) and the final sequence equal the
    template's rendering of the whole conversation so far, with slime's kwargs."""
    if template != "thinking-switch":
        checkpoint = template
    tok = default_runtime().processing.get(checkpoint).tokenizer
    replies, contents = _turns(tok, kwargs)
    engine = ScriptedEngine(tok, replies)
    args = make_args(engine, checkpoint=checkpoint, rollout_interaction_env_path=TEST_ENVS,
                     env_kwargs={"kind": "image"}, apply_chat_template_kwargs=kwargs)  # fmt: skip
    # slime renders the first prompt with the kwargs (or hands over the messages, which we render).
    prompt = tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True, **kwargs)
    sample = Sample(prompt=prompt if prompt_as == "text" else [USER], multimodal_inputs={"images": [diagram()]})
    out = await rollout.generate(args, sample, {"temperature": 1.0})
    assert out.status == Status.COMPLETED and out.metadata["num_turns"] == 3, out.metadata["status_reason"]
    assert len(engine.requests) == 3

    messages = [USER]
    for turn, content in enumerate(contents):
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        assert engine.requests[turn]["input_ids"] == tok.encode(rendered, add_special_tokens=False), turn + 1
        messages = messages + [{"role": "assistant", "content": content}]
        if turn < 2:
            messages.append(OBSERVATION)
    whole = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert whole == prompt + out.response + "\n"  # the template's separator after the last <|im_end|>
    if kwargs == {"enable_thinking": False}:
        assert out.response.count("<|im_start|>assistant\n<think>\n\n</think>\n\n") == 2


def test_chat_template_kwargs_are_read_from_args_and_checked():
    class Args:
        pass

    args = Args()
    assert chat_template_kwargs(args) == {}
    args.apply_chat_template_kwargs = None
    assert chat_template_kwargs(args) == {}
    args.apply_chat_template_kwargs = {"enable_thinking": False}
    assert chat_template_kwargs(args) == {"enable_thinking": False}
    args.apply_chat_template_kwargs = '{"enable_thinking": false}'  # the flag's text, unparsed
    assert chat_template_kwargs(args) == {"enable_thinking": False}
    args.apply_chat_template_kwargs = '{"enable_thinking": fals}'
    with pytest.raises(ValueError, match="apply_chat_template_kwargs is not valid JSON"):
        chat_template_kwargs(args)
    args.apply_chat_template_kwargs = ["enable_thinking"]
    with pytest.raises(ValueError, match="must be a mapping of template variables"):
        chat_template_kwargs(args)
    args.apply_chat_template_kwargs = {"add_generation_prompt": False, "enable_thinking": False}
    with pytest.raises(ValueError, match="sets add_generation_prompt, which the rollout sets itself"):
        chat_template_kwargs(args)


def test_prompts_built_by_the_plugin_use_the_kwargs(processing):
    image = Image.new("RGB", (64, 64))
    off = build_sample("<image>Find x.", [image], "5", processing.tokenizer, template_kwargs={"enable_thinking": False})
    on = build_sample("<image>Find x.", [image], "5", processing.tokenizer)
    assert off.prompt == on.prompt + "<think>\n\n</think>\n\n"
