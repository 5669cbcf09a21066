"""Chat templates in Qwen's format, written for this project (the released ones live on the hub).

Three variants, all ChatML with images as ``<|vision_start|><|image_pad|><|vision_end|>`` in any
turn (tool responses included), tools listed as JSON inside ``<tools></tools>`` in the system turn,
assistant tool calls as ``<tool_call>{json}</tool_call>`` and ``tool`` messages as
``<tool_response>...</tool_response>`` inside a user turn:

- ``qwen2.5-vl``: a default system turn ("You are a helpful assistant.") when none is given.
- ``qwen3-vl-instruct``: no default system turn.
- ``qwen3-vl-thinking``: the generation prompt opens ``<think>\\n``; assistant turns after the last
  user query are normalized to ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}`` and earlier ones lose
  their reasoning. A multi-turn trajectory trained token-by-token therefore differs from a fresh
  rendering of the same conversation wherever the model's own spacing around ``</think>`` differs
  from the normalized form (see rollout.observation).

``qwen3.5`` (Qwen3.5 and its MoE variant) differs from the above in ways that matter for tool use:

- tools are taught in the XML form ``<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n
  </parameter>\\n</function>\\n</tool_call>`` (what SGLang's ``qwen3_coder`` detector reads), with the
  tool list first in the system turn and the caller's system message after it;
- thinking is on by default: the generation prompt is ``<|im_start|>assistant\\n<think>\\n``, and
  ``enable_thinking=False`` closes an empty block instead (``<think>\\n\\n</think>\\n\\n``);
- every assistant turn after the last user query renders ``<think>\\n{reasoning}\\n</think>\\n\\n``
  (an empty block when it has none), earlier ones lose their reasoning; tool responses are not user
  queries, so within one multi-turn episode every turn keeps its reasoning;
- message contents and reasoning are trimmed of surrounding whitespace; system messages take no
  images.
"""

from __future__ import annotations

TEMPLATE_NAMES = ("qwen2.5-vl", "qwen3-vl-instruct", "qwen3-vl-thinking", "qwen3.5")

_CONTENT_MACRO = r"""
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is none -%}
{%- else -%}
{%- for part in content -%}
{%- if part is string -%}{{ part }}
{%- elif part.type == 'image' or 'image' in part or 'image_url' in part -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'video' or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in part -%}{{ part.text }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

_TOOLS_BLOCK = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)


def _system_block(default_system: str | None) -> str:
    has_default = default_system is not None
    default_with_tools = f"{default_system}\\n\\n" if has_default else ""
    default_alone = (
        f"{{{{- '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}" if has_default else ""
    )
    return (
        "{%- if tools %}\n"
        "{{- '<|im_start|>system\\n' }}\n"
        "{%- if messages and messages[0].role == 'system' %}"
        "{{- render_content(messages[0].content) + '\\n\\n' }}"
        f"{{%- else %}}{{{{- '{default_with_tools}' }}}}{{%- endif %}}\n"
        f"{{{{- {_TOOLS_BLOCK!r} }}}}\n"
        "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}\n"
        f"{{{{- {_TOOLS_FOOTER!r} + '<|im_end|>\\n' }}}}\n"
        "{%- elif messages and messages[0].role == 'system' %}"
        "{{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}\n"
        f"{{%- else %}}{default_alone}\n"
        "{%- endif %}\n"
    )


_TOOL_CALLS = r"""
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
"""

_TOOL_MESSAGE = r"""
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + render_content(message.content) + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
"""

_PLAIN_ASSISTANT = r"""
{%- elif message.role == 'assistant' %}
{%- set content = render_content(message.content) %}
{{- '<|im_start|>assistant\n' + content }}
""" + _TOOL_CALLS

_THINKING_ASSISTANT = r"""
{%- elif message.role == 'assistant' %}
{%- set content = render_content(message.content) %}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query_index %}
{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
{%- else %}
{{- '<|im_start|>assistant\n' + content }}
{%- endif %}
""" + _TOOL_CALLS

_LAST_QUERY = r"""
{%- set ns = namespace(last_query_index=-1) %}
{%- for message in messages %}
{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}
{%- endfor %}
"""

_TURNS_HEAD = r"""
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'user' or message.role == 'system' %}
{{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' }}
"""


def chat_template(name: str) -> str:
    """The Jinja chat template called ``name`` (one of TEMPLATE_NAMES)."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    if name == "qwen3.5":
        return _QWEN3_5_TEMPLATE
    thinking = name == "qwen3-vl-thinking"
    default_system = "You are a helpful assistant." if name == "qwen2.5-vl" else None
    parts = [_CONTENT_MACRO, _system_block(default_system)]
    if thinking:
        parts.append(_LAST_QUERY)
    parts += [_TURNS_HEAD, _THINKING_ASSISTANT if thinking else _PLAIN_ASSISTANT, _TOOL_MESSAGE]
    generation_prompt = "<|im_start|>assistant\\n<think>\\n" if thinking else "<|im_start|>assistant\\n"
    parts.append(f"{{%- if add_generation_prompt %}}{{{{- '{generation_prompt}' }}}}{{%- endif %}}\n")
    return "".join(parts)


# Qwen3.5: the format of the released template, written out for this project. The instructions the
# system turn gives for tools are the model's own words (the model was trained on them), the
# Jinja around them is ours.
_QWEN3_5_TOOL_INSTRUCTIONS = (
    "\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n"
    "</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\n"
    "that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be "
    "nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the "
    "function call, but NOT after\n- If there is no function call available, answer the question like "
    "normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>"
)

_QWEN3_5_TEMPLATE = (
    r"""
{%- macro part_text(content, where) -%}
{%- if content is string -%}{{ content }}
{%- elif content is none or content is undefined -%}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is string -%}{{ part }}
{%- elif part.type == 'image' or 'image' in part or 'image_url' in part -%}
{%- if where == 'system' %}{{ raise_exception('Qwen3.5 system messages cannot hold images.') }}{% endif -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'video' or 'video' in part -%}
{%- if where == 'system' %}{{ raise_exception('Qwen3.5 system messages cannot hold videos.') }}{% endif -%}
<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in part -%}{{ part.text }}
{%- else -%}{{ raise_exception('a content part is neither text, image nor video') }}
{%- endif -%}
{%- endfor -%}
{%- else -%}{{ raise_exception('message content must be a string or a list of parts') }}
{%- endif -%}
{%- endmacro -%}
{%- if not messages %}{{ raise_exception('no messages to render') }}{% endif %}
{%- set has_system = messages[0].role == 'system' %}
{%- set system_text = part_text(messages[0].content, 'system') | trim if has_system else '' %}
{%- if tools and tools is iterable and tools is not mapping %}
{{- '<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>' }}
{{- """
    + repr(_QWEN3_5_TOOL_INSTRUCTIONS)
    + r""" }}
{%- if system_text %}{{- '\n\n' + system_text }}{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif has_system %}
{{- '<|im_start|>system\n' + system_text + '<|im_end|>\n' }}
{%- endif %}
{#- The last real user query: tool responses wrapped in a user turn do not count. -#}
{%- set query = namespace(index=-1) %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- set text = part_text(message.content, 'user') | trim %}
{%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
{%- set query.index = loop.index0 %}
{%- endif %}
{%- endif %}
{%- endfor %}
{%- if query.index < 0 %}{{ raise_exception('no user query among the messages') }}{% endif %}
{%- for message in messages %}
{%- set text = part_text(message.content, message.role) | trim %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{ raise_exception('a system message may only come first') }}{% endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\n' + text + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
{%- if message.reasoning_content is not string and '</think>' in text %}
{%- set reasoning = text.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
{%- set text = text.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{{- '<|im_start|>assistant\n' }}
{%- if loop.index0 > query.index %}{{- '<think>\n' + (reasoning | trim) + '\n</think>\n\n' }}{%- endif %}
{{- text }}
{%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
{%- for call in message.tool_calls %}
{%- set call = call.function if call.function is defined else call %}
{%- if not loop.first %}{{- '\n' }}{%- elif text | trim %}{{- '\n\n' }}{%- endif %}
{{- '<tool_call>\n<function=' + call.name + '>\n' }}
{%- if call.arguments is mapping %}
{%- for key, value in call.arguments.items() %}
{%- set shown = value | tojson if value is mapping or (value is iterable and value is not string) else value | string %}
{{- '<parameter=' + key + '>\n' + shown + '\n</parameter>\n' }}
{%- endfor %}
{%- elif call.arguments %}{{ raise_exception('Qwen3.5 tool call arguments must be a mapping, not a JSON string') }}
{%- endif %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + text + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- else %}{{ raise_exception('unexpected message role ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}
{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}
"""
)
