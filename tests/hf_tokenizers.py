"""Small Hugging Face tokenizers of the three families gptkit reads, built with `tokenizers` and
saved with transformers (`PreTrainedTokenizerFast(tokenizer_object=...).save_pretrained`):
- llama2: SentencePiece-style BPE (`▁` for spaces, <0xNN> byte fallback, <s> added in front);
- llama3: tiktoken-style BPE (Llama 3's split regex, then bytes), <|begin_of_text|> in front;
- bytelevel: GPT-2-style byte-level BPE with ChatML's <|im_start|> / <|im_end|>.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see you're fine.",
    "def encode(self, text: str) -> list[int]:\n    return [self.stoi[c] for c in text]  # ids\n",
    "for (int i = 0; i < n; i++) { sum += x[i] * 2; }\n\tprintf(\"%d\\n\", sum);",
    "héllo wörld — naïve café, crème brûlée, Ærøskøbing, straße, ﬁ ligature",
    "日本語のテキスト、中文文本，한국어 텍스트. Привет, мир! Γειά σου κόσμε.",
    "emoji 😀 🎉 and more: 👍👍 🚀",
    "  leading spaces, trailing spaces   \n\n\nmany newlines\r\nwindows line",
    "<html><body class=\"main\">Hello &amp; goodbye</body></html>",
    "SELECT name, COUNT(*) FROM users WHERE age >= 21 GROUP BY name;",
    "1234567890 numbers 2024-01-31 12:00:00 +0100 0xdeadbeef 1e-10",
] * 40

TEXTS = [
    "Hello world",
    "",
    " ",
    "héllo wörld — naïve café",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 unseen 🦀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937 zero\u200bwidth",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "if (a && b) { return a->next; }\t// tab\r\nint x = 0x1F;",
    "  two leading spaces and trailing  ",
    "\n\nnewlines first",
    "I'm we've they'll you'd she's IT'S",
    "numbers 1234567890 3.14159",
]

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _save(tk, d: Path, **kw) -> Path:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tk, **kw).save_pretrained(str(d))
    return d


def build_llama2(d: Path, vocab_size: int = 600, metaspace: bool = False) -> Path:
    """metaspace: the newer spelling (a Metaspace pre-tokeniser instead of Prepend + Replace)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # learn merges on ▁-prefixed words, then lay the vocab out as Llama 2's is: <unk> <s> </s>,
    # the 256 byte tokens, then the pieces
    t0 = Tokenizer(models.BPE())
    t0.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    t0.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = t0.get_vocab()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for tok, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(t0.to_str())["model"]["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if metaspace:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tk.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                           split=False), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    return _save(tk, d, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True,
                 add_eos_token=False, clean_up_tokenization_spaces=False)


def build_llama3(d: Path, vocab_size: int = 700, chat_template: str | None = None) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    kw = {"chat_template": chat_template} if chat_template else {}
    return _save(tk, d, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                 clean_up_tokenization_spaces=False, **kw)


def build_bytelevel(d: Path, vocab_size: int = 500, chat_template: str | None = None) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    kw = {"chat_template": chat_template} if chat_template else {}
    return _save(tk, d, bos_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                 clean_up_tokenization_spaces=False, **kw)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are helpful. Today is " + strftime_now("%Y") [:0] + "." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception("Conversation roles must be user or assistant, got " + message.role) }}
    {%- endif %}
    {%- if loop.index0 > 20 %}{% break %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{# a tojson check: #}{{ '' if true else ({'a': 'é<b>'}|tojson) }}
"""

# block tags on their own indented lines: only trim_blocks + lstrip_blocks render this as transformers does
ZEPHYR_LIKE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
<|user|>
{{ message['content'] }}{{ eos_token }}
    {% elif message['role'] == 'system' %}
<|system|>
{{ message['content'] }}{{ eos_token }}
    {% else %}
<|assistant|>
{{ message['content'] }}{{ eos_token }}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
<|assistant|>
    {% endif %}
{% endfor %}
"""
