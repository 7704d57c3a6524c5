"""Chat templates of the real checkpoints' shapes, for the tiny fixtures (written from the
behaviour of the released templates, not copied): each family's tiny checkpoint carries the
template its real counterpart ships, so the codec meets the same rendering a user's checkpoint
gives it.

- QWEN2_VL: Qwen2-VL / Qwen2.5-VL (the same template): a default system turn, the role name
  as the turn header (so role "tool" renders `<|im_start|>tool`), images as
  <|vision_start|><|image_pad|><|vision_end|>; it ignores `tools` and `tool_calls`.
- QWEN3_VL: Qwen3-VL-Instruct: no default system turn; `tools` rendered into the system turn
  (the Hermes block); assistant `tool_calls` as <tool_call> JSON; role "tool" as a user turn
  wrapping <tool_response>, consecutive ones merged; images in any role.
- QWEN2_5: Qwen2.5-Instruct text: the default "You are Qwen..." system turn, `tools`, tool role;
  string contents only.
- QWEN3: Qwen3 text (thinking): like QWEN2_5 without a default system turn; an assistant turn
  after the last user query renders its reasoning as <think>...</think>; the generation prompt
  takes `enable_thinking` (False adds an empty think block).
"""
from __future__ import annotations

_HERMES = (
    "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>")
_HERMES_TAIL = (
    "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call>")

QWEN2_VL = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_RENDER = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content is none %}"
    "{% else %}{% for item in content %}"
    "{% if item.type == 'image' or 'image' in item or 'image_url' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item.text }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
)

_CALLS = (
    "{% for call in message.tool_calls or [] %}"
    "{% set f = call.function if call.function is defined else call %}"
    "{% if content or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ f.name }}\", \"arguments\": "
    "{{ f.arguments if f.arguments is string else f.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}"
)

_TOOL_TURN = (
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
)


def _system(default: str) -> str:
    """The system turn: the given system message (or `default`), with the tool block when `tools`."""
    sys = "render(messages[0].content)"
    return (
        "{% if tools %}<|im_start|>system\n"
        "{% if messages[0].role == 'system' %}{{ " + sys + " }}\n\n"
        + ("{% else %}" + default + "\n\n" if default else "") + "{% endif %}"
        "{{ '" + _HERMES + "' }}{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
        "{{ '" + _HERMES_TAIL + "' }}<|im_end|>\n"
        "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ " + sys + " }}<|im_end|>\n"
        + ("{% else %}<|im_start|>system\n" + default + "<|im_end|>\n" if default else "") + "{% endif %}"
    )


def _turns(assistant_head: str) -> str:
    return (
        "{% for message in messages %}"
        "{% set content = render(message.content) %}"
        "{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
        "<|im_start|>{{ message.role }}\n{{ content }}<|im_end|>\n"
        "{% elif message.role == 'assistant' %}" + assistant_head + _CALLS + "<|im_end|>\n"
        + _TOOL_TURN +
        "{% elif message.role != 'system' %}{{ raise_exception('unknown role: ' + message.role) }}"
        "{% endif %}{% endfor %}"
    )


QWEN3_VL = _RENDER + _system("") + _turns("<|im_start|>assistant\n{{ content }}") + \
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

QWEN2_5 = _RENDER + _system("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") + \
    _turns("<|im_start|>assistant\n{{ content }}") + \
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

_QWEN3_ASSISTANT = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% set reasoning = '' %}{% set body = content %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set body = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "<think>\n{{ reasoning }}\n</think>\n\n{{ body }}"
    "{% else %}{{ body }}{% endif %}"
)
QWEN3 = _RENDER + _system("") + _turns(_QWEN3_ASSISTANT) + \
    "{% if add_generation_prompt %}<|im_start|>assistant\n" \
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"



def _keep_newlines(template: str) -> str:
    """transformers renders templates with trim_blocks (the newline right after a block tag is
    dropped), so a literal newline there is written as an expression, as the real templates do."""
    return template.replace("%}\n", "%}{{ '\\n' }}")


QWEN2_VL, QWEN3_VL, QWEN2_5, QWEN3 = (_keep_newlines(t) for t in (QWEN2_VL, QWEN3_VL, QWEN2_5, QWEN3))
TEMPLATES = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_VL, "qwen3_vl": QWEN3_VL, "qwen2": QWEN2_5, "qwen3": QWEN3}
