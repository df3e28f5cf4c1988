"""Chat anatomy on ChatML, Llama-3, Gemma and Mistral-style templates, under left and right padding."""

import pytest
import torch

from steerlab.chat import ChatFormat
from steerlab.errors import ChatTemplateError, EmptyInputError, InvalidValueError, UnknownPositionError
from steerlab.testing import TEMPLATES, tiny_tokenizer

PROMPTS = ["Write a short poem about the sea.", "Hi there", "Tell me a joke about cats, please!"]
SUFFIX = {
    "chatml": "<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<end_of_turn>\n<start_of_turn>model\n",
    "mistral": " [/INST]",
}


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_suffix_and_header_ids(template):
    tok = tiny_tokenizer(template)
    fmt = ChatFormat(tok)
    assert fmt.suffix == SUFFIX[template]
    assert _decode(tok, fmt.header_ids) == SUFFIX[template]


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_anatomy_per_row_under_padding(template, padding_side):
    tok = tiny_tokenizer(template)
    fmt = ChatFormat(tok)
    batch = fmt.encode(PROMPTS, padding_side=padding_side)
    assert batch.input_ids.shape[0] == 3
    for row, prompt in enumerate(PROMPTS):
        ids = batch.input_ids[row]
        t_inst, post, end = int(batch.t_inst[row]), int(batch.post_inst_start[row]), int(batch.prompt_end[row])
        assert post == t_inst + 1 and end == int(batch.last[row]) + 1
        # the instruction ends at t_inst; the template resumes right after it
        real = ids[batch.attention_mask[row].bool()]
        start = int(torch.nonzero(batch.attention_mask[row])[0])
        assert _decode(tok, ids[start : t_inst + 1]).endswith(prompt[-3:])
        assert _decode(tok, ids[post:end]) == SUFFIX[template]
        # alone (no padding) the row has the same tokens and the same anatomy, shifted
        alone = fmt.encode([prompt])
        assert torch.equal(alone.input_ids[0], real)
        assert int(alone.t_inst[0]) == t_inst - start
        # every position index points inside the real tokens
        for name in ("t_inst", "last", "post_inst", -1, -2):
            idx = batch.index(name)[row]
            assert bool(batch.attention_mask[row, idx].all())


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pooled_positions_average_exactly_the_instruction_and_what_follows(template, padding_side):
    tok = tiny_tokenizer(template)
    batch = ChatFormat(tok).encode(PROMPTS, padding_side=padding_side)
    inst, turn = batch.span("inst_mean"), batch.span("inst_to_last_mean")
    x = torch.randn(*batch.input_ids.shape, 5, dtype=torch.float64)
    for row, prompt in enumerate(PROMPTS):
        assert _decode(tok, batch.input_ids[row][inst[row]]) == prompt
        assert _decode(tok, batch.input_ids[row][turn[row]]) == prompt + SUFFIX[template]
        torch.testing.assert_close(batch.take(x, "inst_mean")[row, 0], x[row][inst[row]].mean(0))
        assert batch.tokens("inst_to_last_mean")[row] == torch.nonzero(turn[row]).flatten().tolist()
    with pytest.raises(UnknownPositionError, match="take"):
        batch.index("inst_mean")


def test_pooled_positions_raise_where_the_template_changed_the_instruction():
    tok = tiny_tokenizer("chatml")
    trimming = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    trimming.chat_template = "<|im_start|>user\n{{ messages[-1]['content'] | trim }}<|im_end|>\n<|im_start|>assistant\n"
    batch = ChatFormat(trimming).encode(["Hi there", "  padded with spaces  "])
    assert int(batch.inst_start[0]) >= 0 and int(batch.inst_start[1]) == -1
    with pytest.raises(UnknownPositionError, match=r"unknown in rows \[1\]"):
        batch.take(torch.zeros(2, batch.input_ids.shape[1], 3), "inst_mean")
    assert batch.take(torch.zeros(2, batch.input_ids.shape[1], 3), "t_inst").shape == (2, 1, 3)  # token positions still read


def test_post_inst_is_the_span_before_the_response():
    fmt = ChatFormat(tiny_tokenizer("chatml"))
    batch = fmt.encode(PROMPTS)
    span = batch.index("post_inst")
    assert span.shape == (3, len(fmt.header_ids))
    assert torch.equal(span[:, -1], batch.last)
    assert torch.equal(batch.index(-1)[:, 0], batch.last)
    assert torch.equal(batch.index(-len(fmt.header_ids) - 1)[:, 0], batch.t_inst)


def test_prefilled_response_moves_last_but_not_the_template_positions():
    tok = tiny_tokenizer("llama3")
    fmt = ChatFormat(tok)
    plain = fmt.encode(PROMPTS[:2])
    pre = fmt.encode(PROMPTS[:2], responses=["Sure, here is", "Hello! How"])
    for row in range(2):
        n_resp = int(pre.last[row] - pre.prompt_end[row]) + 1
        assert n_resp >= 2
        assert _decode(tok, pre.input_ids[row, int(pre.prompt_end[row]) : int(pre.last[row]) + 1]).startswith(["Sure", "Hello"][row])
        # distance t_inst -> prompt_end is the template suffix either way
        assert int(pre.prompt_end[row] - pre.t_inst[row]) == int(plain.prompt_end[row] - plain.t_inst[row])


def test_reasoning_end_marker():
    tok = tiny_tokenizer("chatml")
    fmt = ChatFormat(tok, reasoning_end="</think>")
    batch = fmt.encode(PROMPTS[:2], responses=["Let me think. </think> Sure", "Hmm </think>"])
    for row in range(2):
        assert _decode(tok, [batch.input_ids[row, int(batch.reasoning_end[row])]]) == "</think>"
    with pytest.raises(UnknownPositionError, match="reasoning_end"):
        fmt.encode(PROMPTS[:1]).index("reasoning_end")


def test_system_prompt_override():
    tok = tiny_tokenizer("chatml")
    text = ChatFormat(tok, system="Be brief.").render("Hi").text
    assert "Be brief." in text and "test assistant" not in text


def test_raw_prompts_without_chat():
    tok = tiny_tokenizer("chatml")
    fmt = ChatFormat(tok, chat=False)
    batch = fmt.encode(["Hi there", "Write a poem"])
    assert torch.equal(batch.t_inst, batch.last)
    with pytest.raises(UnknownPositionError, match="post-instruction"):
        batch.index("post_inst")


def test_missing_chat_template_is_a_clear_error():
    tok = tiny_tokenizer("chatml")
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    bare.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template.*chat=False"):
        ChatFormat(bare)


def test_content_dependent_suffix_is_rejected():
    tok = tiny_tokenizer("chatml")
    weird = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    weird.chat_template = "{{ messages[0]['content'] }}<|im_end|>{{ messages[0]['content'] | length }}"
    with pytest.raises(ChatTemplateError, match="depends on the instruction"):
        _ = ChatFormat(weird).suffix


@pytest.mark.parametrize("bad", [[], "a single string"])
def test_empty_or_unwrapped_prompts(bad):
    with pytest.raises(EmptyInputError):
        ChatFormat(tiny_tokenizer("chatml")).encode(bad)


@pytest.mark.parametrize("position", [0, 3, "middle", 1.5])
def test_bad_positions(position):
    batch = ChatFormat(tiny_tokenizer("chatml")).encode(PROMPTS)
    with pytest.raises(UnknownPositionError):
        batch.index(position)


def _with_template(template):
    tok = tiny_tokenizer("chatml")
    fresh = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<pad>")
    fresh.chat_template = template
    return fresh


def test_a_template_with_a_syntax_error_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match=r"chat template of \w+ has a Jinja syntax error at line 2 in '\{% if %\}'"):
        ChatFormat(_with_template("{{ messages[0]['content'] }}\n{% if %}"))
    # named templates: the broken one is named
    with pytest.raises(ChatTemplateError, match=r"template 'tool_use'.*syntax error"):
        ChatFormat(_with_template({"default": TEMPLATES["chatml"], "tool_use": "{% for %}"}))


def test_a_template_that_fails_while_rendering_is_a_chat_template_error():
    fmt = ChatFormat(_with_template("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                                    "{{ messages[-1]['content'] }}<|im_end|>"), system="Be brief.")
    with pytest.raises(ChatTemplateError, match=r"failed to render a system\+user conversation: no system role.*system=None"):
        fmt.encode(["Hi"])


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, True, "4"])
def test_bad_batch_sizes(batch_size):
    fmt = ChatFormat(tiny_tokenizer("chatml"))
    with pytest.raises(InvalidValueError, match=r"batch_size must be an int >= 1"):
        list(fmt.batches(fmt.tokenize(PROMPTS), batch_size))


def test_bad_padding_side():
    with pytest.raises(InvalidValueError, match="padding_side must be 'left' or 'right'"):
        ChatFormat(tiny_tokenizer("chatml")).encode(PROMPTS, padding_side="middle")
