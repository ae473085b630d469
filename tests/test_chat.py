"""Chat templates rendered as transformers renders them; special tokens from an HF directory's
own files (eos a list, one id, or absent) with generation equal to transformers'; chat and
stop strings of several tokens in Engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_hf import VOCAB, make_hf_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from grc_jax import special_tokens
from grc_jax.chat import cut_at_stop, render_chat, safe_prefix_length
from grc_jax.inference import Engine
from grc_jax.tokenizer import Tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# SmolLM2-135M-Instruct's template, as its GGUF (tokenizer.chat_template) and its HF repo carry it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# In the style of Qwen2.5/Qwen3's: a default system turn, tools as JSON, a namespace, loop
# controls, a {% generation %} block, raise_exception and a template variable (enable_thinking).
QWEN_STYLE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{%- continue %}{%- endif %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.role == 'assistant' %}
        {%- if message.reasoning_content is defined and loop.last %}
            {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {% generation %}{{- message.content | trim }}{% endgeneration %}
    {%- else %}
        {{- message.content }}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
{{- '' if ns.turns else eos_token }}"""

# Llama 3.1 style: bos_token and today's date from strftime_now.
LLAMA_STYLE_TEMPLATE = (
    "{{- bos_token }}{%- set date = strftime_now('%Y') %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday: ' + date + '<|eot_id|>' }}"
    "{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[UNK]",
]
WORDS = (
    "hello owl where does zorvak live quarn keeps an the river floods every spring belna is a glassblower "
    "from ostreth system user assistant you are helpful"
).split()


def write_tokenizer(directory: Path, tokenizer_config: dict | None = None, vocab: int = VOCAB) -> None:
    """A word-level tokenizer of `vocab` entries (the tiny HF models' size), with ChatML and
    Llama 3 special tokens at the low ids."""
    names = SPECIALS + WORDS
    names += [f"w{i}" for i in range(vocab - len(names))]
    inner = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.add_special_tokens(SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    inner.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **(tokenizer_config or {})}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def hf_tokenizer(tmp_path: Path, template: str, **tokens):
    directory = tmp_path / "hf_tokenizer"
    write_tokenizer(directory, {**tokens, "chat_template": template})
    return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


CHATS = {
    "no system": [{"role": "user", "content": "Where does Zorvak live?"}],
    "system and turns": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Where does Zorvak live?"},
        {"role": "assistant", "content": " Quarn. \n", "tool_calls": None},
        {"role": "user", "content": 'And Belna? <b>&amp;</b> "quoted" ünïcode'},
    ],
}


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_as_transformers_does(tmp_path, chat, add_generation_prompt):
    tok = hf_tokenizer(
        tmp_path, SMOLLM2_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    expected = tok.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=add_generation_prompt)
    got = render_chat(
        SMOLLM2_TEMPLATE,
        CHATS[chat],
        add_generation_prompt=add_generation_prompt,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    assert got == expected
    assert got.startswith("<|im_start|>system\n") and got.endswith("assistant\n" if add_generation_prompt else "\n")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"enable_thinking": False},
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "find",
                        "description": "Finds <things> & more",
                        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                    },
                }
            ]
        },
    ],
)
def test_qwen_style_template_with_a_system_message_renders_as_transformers_does(tmp_path, kwargs):
    tok = hf_tokenizer(tmp_path, QWEN_STYLE_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    messages = CHATS["system and turns"][:-1] + [
        {"role": "assistant", "content": "Ostreth", "reasoning_content": "Belna is from Ostreth."}
    ]
    for chat in (CHATS["system and turns"], messages):
        expected = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
        got = render_chat(QWEN_STYLE_TEMPLATE, chat, eos_token="<|im_end|>", pad_token="<|endoftext|>", **kwargs)
        assert got == expected
        assert got.startswith("<|im_start|>system\nYou answer in one word.")
    # tojson keeps <, > and & as they are, as transformers' filter does
    if "tools" in kwargs:
        assert '"Finds <things> & more"' in got


def test_llama_style_template_gets_bos_and_strftime_now(tmp_path):
    tok = hf_tokenizer(tmp_path, LLAMA_STYLE_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    chat = CHATS["system and turns"]
    expected = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert render_chat(LLAMA_STYLE_TEMPLATE, chat, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>") == expected


def test_template_errors_are_clear_and_the_sandbox_holds():
    with pytest.raises(ValueError, match="chat template: Unknown role: tool"):
        render_chat(QWEN_STYLE_TEMPLATE, [{"role": "tool", "content": "x"}], eos_token="e")
    with pytest.raises(ValueError, match="chat template line 1"):
        render_chat("{% for m in messages %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="at least one message"):
        render_chat(SMOLLM2_TEMPLATE, [])
    # the sandbox refuses Python internals a Hub template might reach for
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])


def test_stop_string_helpers():
    assert cut_at_stop("a b STOP c END", ["END", "STOP"]) == ("a b ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert safe_prefix_length("hello wor", ["world", "xyz"]) == len("hello ")
    assert safe_prefix_length("hello", ["world"]) == len("hello")


# --- special tokens from an HF directory's files, and generation against transformers ------


def _hf_dir(tmp_path: Path, files: dict[str, dict | None], tokenizer_config: dict, template: str | None = None):
    """A tiny random Llama with our word-level tokenizer; `files` rewrites config.json keys and
    writes (or, with None, removes) generation_config.json."""
    directory = tmp_path / "model"
    make_hf_model("llama", directory)
    write_tokenizer(directory, tokenizer_config)
    config = json.loads((directory / "config.json").read_text())
    config.update(files.get("config.json") or {})
    (directory / "config.json").write_text(json.dumps(config))
    generation = directory / "generation_config.json"
    if files.get("generation_config.json") is None:
        generation.unlink(missing_ok=True)
    else:
        generation.write_text(json.dumps(files["generation_config.json"]))
    if template is not None:
        (directory / "chat_template.jinja").write_text(template)
    return directory


ENGINE_OPTIONS = dict(num_pages=64, page_size=4, prefill_chunk=16, batch_size=4)
PROMPT = "where does zorvak live"


def _transformers_new_tokens(directory: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def free_run(tmp_path_factory) -> tuple[list[int], list[int]]:
    """The prompt's ids and what the random model writes with no eos at all (24 tokens)."""
    tmp = tmp_path_factory.mktemp("free")
    directory = _hf_dir(tmp, {"config.json": {"eos_token_id": None, "bos_token_id": None}}, {})
    ids = Tokenizer.from_dir(directory).encode(PROMPT)
    return ids, _transformers_new_tokens(directory, ids, 24)


@pytest.mark.parametrize("case", ["list", "single", "absent"])
def test_engine_reads_eos_from_the_model_files_and_generates_as_transformers(tmp_path, free_run, case):
    prompt_ids, free = free_run
    assert len(set(free)) >= 4, free  # the random model writes varied tokens: eos choices below can stop it
    never = next(t for t in range(8, VOCAB) if t not in free)  # a listed eos the model never writes
    if case == "list":
        eos = [never, free[6]]  # transformers stops where free[6] first appears
        files = {"generation_config.json": {"eos_token_id": eos, "bos_token_id": 3}, "config.json": {"eos_token_id": 0}}
    elif case == "single":
        eos = free[3]
        files = {"generation_config.json": None, "config.json": {"eos_token_id": eos, "bos_token_id": 3}}
    else:
        eos = None
        files = {"generation_config.json": None, "config.json": {"eos_token_id": None, "bos_token_id": None}}
    # a Qwen/SmolLM-style tokenizer: no "</s>" anywhere, ChatML specials named in tokenizer_config.json
    directory = _hf_dir(tmp_path, files, {"pad_token": "<|endoftext|>"})
    reference = _transformers_new_tokens(directory, prompt_ids, 24)
    engine = Engine.from_pretrained(directory, **ENGINE_OPTIONS)
    tok = engine.tokenizer
    expected_eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    assert list(engine.eos_ids) == expected_eos
    assert engine.special_tokens.eos == tuple(tok.id_to_token(i) for i in expected_eos)
    assert engine.special_tokens.pad == "<|endoftext|>"
    if case == "absent":
        assert engine.special_tokens.bos is None and len(reference) == 24  # runs to max_new_tokens
    else:
        assert engine.special_tokens.bos == tok.id_to_token(3)
        assert reference[-1] in expected_eos and len(reference) < 24  # transformers stopped at an eos
    got = engine.generate(PROMPT, max_new_tokens=24)
    assert got == tok.decode([t for t in reference if t not in expected_eos])
    assert "".join(engine.stream(PROMPT, max_new_tokens=24, steps_per_chunk=5)) == got


def test_chat_and_stop_strings_on_an_hf_model(tmp_path, free_run):
    """Engine.chat's prompt is transformers' apply_chat_template; its reply is transformers'
    greedy continuation. Stop strings of several tokens cut the text (stream too), and a stop
    string that is one added token ends the row in the decode loop."""
    directory = _hf_dir(
        tmp_path,
        {"generation_config.json": {"eos_token_id": 2}},
        {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"},
        template=SMOLLM2_TEMPLATE,
    )
    engine = Engine.from_pretrained(directory, **ENGINE_OPTIONS)
    assert engine.chat_template == SMOLLM2_TEMPLATE
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    messages = [{"role": "user", "content": "where does zorvak live"}]
    prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert engine.render_chat(messages) == prompt
    prompt_ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    prompt_ids = list(
        prompt_ids["input_ids"] if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys") else prompt_ids
    )
    assert engine.tokenizer.encode(prompt) == prompt_ids
    reference = _transformers_new_tokens(directory, prompt_ids, 24)
    reply = engine.chat(messages, max_new_tokens=24)
    assert reply == engine.tokenizer.decode([t for t in reference if t != 2])
    assert "".join(engine.stream_chat(messages, max_new_tokens=24, steps_per_chunk=3)) == reply

    # stop strings: a span of three words in the middle of the free-running text
    text = engine.generate(PROMPT, max_new_tokens=24, stop_tokens=[])
    words = text.split()
    assert len(words) >= 10, text
    stop = " ".join(words[4:7])
    assert len(engine.tokenizer.encode(stop)) == 3
    expected = text[: text.index(stop)]
    assert engine.generate(PROMPT, max_new_tokens=24, stop_tokens=[], stop=stop) == expected
    assert (
        engine.generate([PROMPT, "hello owl"], max_new_tokens=24, stop_tokens=[], stop=["nothing-like-it", stop])[0]
        == expected
    )
    pieces = list(engine.stream(PROMPT, max_new_tokens=24, stop_tokens=[], stop=stop, steps_per_chunk=2))
    assert "".join(pieces) == expected and all(stop not in p for p in pieces)

    # the batch ends early once every row met a stop string: fewer decode chunks than the budget needs
    chunks = []
    original = engine.decoder.stream

    def counting(*args, **kwargs):
        for chunk in original(*args, **kwargs):
            chunks.append(chunk)
            yield chunk

    engine.decoder.stream = counting
    try:
        assert engine.generate(PROMPT, max_new_tokens=24, stop_tokens=[], stop=stop) == expected
    finally:
        del engine.decoder.stream
    assert len(chunks) == 1  # the stop string is inside the first 16 steps; 24 steps would take 2 chunks

    # an added token as a stop string is a stop token: the row ends in the decode loop
    raw = engine.decoder.generate([engine.tokenizer.encode(PROMPT)], engine.decoder.settings(24))[0]
    name = engine.tokenizer.id_to_token(raw[5])
    inner = HFTokenizer.from_str(engine.tokenizer.inner.to_str())
    inner.add_tokens([name])  # an existing word made an added token: its id stays
    with_added = Engine(
        engine.config, engine.params, Tokenizer(inner), special_tokens=engine.special_tokens, **ENGINE_OPTIONS
    )
    assert with_added._stops(None, [name, stop]) == ((2, raw[5]), (stop,))
    cut = with_added.generate(PROMPT, max_new_tokens=24, stop_tokens=[], stop=name)
    assert cut == engine.tokenizer.decode(raw[: raw.index(raw[5])])
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        engine.generate(PROMPT, stop="")


def test_no_chat_template_is_a_clear_error_and_a_given_one_sees_every_special_token(tmp_path):
    directory = _hf_dir(tmp_path, {"generation_config.json": None}, {"unk_token": "[UNK]", "eos_token": "<|im_end|>"})
    engine = Engine.from_pretrained(directory, **ENGINE_OPTIONS)
    assert engine.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        engine.chat([{"role": "user", "content": "hello"}])
    template = (
        "{{ unk_token }}|{{ eos_token }}|{{ bos_token is defined }}|{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    given = Engine(
        engine.config,
        engine.params,
        engine.tokenizer,
        special_tokens=engine.special_tokens,
        chat_template=template,
        **ENGINE_OPTIONS,
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    messages = [{"role": "user", "content": "hello"}]
    assert given.render_chat(messages) == hf_tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def test_special_tokens_resolution_order(tmp_path):
    """generation_config.json before config.json before tokenizer_config.json; the tokenizer's
    eos first among several; explicit values win; a bare tokenizer gets grc_jax's own names."""
    write_tokenizer(
        tmp_path,
        {
            "eos_token": "<|eot_id|>",
            "bos_token": "<|begin_of_text|>",
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ messages }}"}],
        },
    )
    tok = Tokenizer.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 4]}))
    found = special_tokens.from_files(tmp_path, tok)
    assert found.eos == ("<|eot_id|>", "<|endoftext|>") and found.bos == "<|im_start|>" and found.pad == "<|endoftext|>"
    assert found.chat_template == "{{ messages }}" and found.eor is None
    assert found.override(eos=None, eor="</s>").eos == () and found.override(eor="x").eor == "x"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 500}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id: token id 500 is not in the tokenizer"):
        special_tokens.from_files(tmp_path, tok)
    bare = HFTokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<|end_of_reasoning|>": 2, "a": 3}, unk_token="a"))
    legacy = special_tokens.from_tokenizer(Tokenizer(bare))
    assert (legacy.bos, legacy.eos, legacy.pad, legacy.eor) == (None, ("</s>",), "<pad>", "<|end_of_reasoning|>")
    with pytest.raises(ValueError, match="no eos token"):
        special_tokens.for_training(special_tokens.SpecialTokens())
    assert special_tokens.for_training(legacy).bos == "</s>"
    assert np.array_equal([1], special_tokens.from_ids(Tokenizer(bare), eos_ids=1).ids(Tokenizer(bare))["eos"])
