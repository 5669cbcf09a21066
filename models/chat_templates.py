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
"""

from __future__ import annotations

TEMPLATE_NAMES = ("qwen2.5-vl", "qwen3-vl-instruct", "qwen3-vl-thinking")

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
    thinking = name == "qwen3-vl-thinking"
    default_system = "You are a helpful assistant." if name == "qwen2.5-vl" else None
    parts = [_CONTENT_MACRO, _system_block(default_system)]
    if thinking:
        parts.append(_LAST_QUERY)
    parts += [_TURNS_HEAD, _THINKING_ASSISTANT if thinking else _PLAIN_ASSISTANT, _TOOL_MESSAGE]
    generation_prompt = "<|im_start|>assistant\\n<think>\\n" if thinking else "<|im_start|>assistant\\n"
    parts.append(f"{{%- if add_generation_prompt %}}{{{{- '{generation_prompt}' }}}}{{%- endif %}}\n")
    return "".join(parts)
