"""Tiny tokenizers and text encoders of the real kinds (CLIP, Gemma2, T5, Qwen3), built offline.

The tokenizers are the real classes over small vocabularies: whole-word tokens for the words
digit prompts use, and every other string still tokenizes (bytes for CLIP and Qwen, characters
or byte fallback for Gemma, characters or ``<unk>`` for T5). Text models take their vocabulary
size and special ids from the tokenizer, so padding and pooling behave as in the real encoders.
"""

from __future__ import annotations

from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

WORDS = (
    "a", "an", "the", "of", "photo", "handwritten", "digit", "number", "cat", "dog",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
CLIP_MAX_LEN = 77
SANA_MAX_LEN = 2048  # >= SANA's ~900-token default instruction + max_sequence_length 300
T5_MAX_LEN = 512  # FLUX.1-dev's max_sequence_length (SD3's is 256)


def _chain_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Left-to-right BPE merges that assemble each word (given as symbols) into one token."""
    merges: list[tuple[str, str]] = []
    for symbols in words:
        cur = symbols[0]
        for s in symbols[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur += s
    return merges


def _merge_vocab(base: list[str], merges: list[tuple[str, str]]) -> list[str]:
    out = list(dict.fromkeys(base))
    out += [a + b for a, b in merges if a + b not in out]
    return out


def _words(extra: tuple[str, ...]) -> tuple[str, ...]:
    """The whole-word vocabulary: ``WORDS``, then a teacher's own extra words (ids may move)."""
    return tuple(dict.fromkeys(WORDS + tuple(extra)))


def clip_tokenizer(pad_token: str = "<|endoftext|>", words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """Byte-level BPE: 256 byte symbols (+ end-of-word forms), word merges, specials last;
    ``words``: whole-word tokens beyond ``WORDS`` (e.g. the compositional scenes' colours)."""
    alphabet = sorted(ByteLevel.alphabet())
    merges = _chain_merges([[*w[:-1], w[-1] + "</w>"] for w in _words(words) if len(w) > 1])
    tokens = _merge_vocab(alphabet + [c + "</w>" for c in alphabet], merges)
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # last ids, as in the real CLIP vocab
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LEN
    )


def gemma_tokenizer(words: tuple[str, ...] = ()) -> GemmaTokenizer:
    """Gemma-style BPE: specials, 256 byte-fallback tokens, printable characters, word merges."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    chars = ["▁", "\n"] + [chr(i) for i in range(33, 127)]
    merges = _chain_merges([["▁", *w] for w in _words(words)])
    tokens = _merge_vocab(specials + byte_tokens + chars, merges)
    vocab = {t: i for i, t in enumerate(tokens)}
    return GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, model_max_length=SANA_MAX_LEN
    )


def t5_tokenizer(words: tuple[str, ...] = ()) -> T5Tokenizer:
    """T5's Unigram tokenizer with its special ids (pad 0, eos 1, unk 2), word pieces scored
    above single characters so digit prompts tokenize to words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in _words(words)]
    pieces += [(chr(i), -5.0) for i in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LEN)


def clip_text_config(
    tok: CLIPTokenizer, hidden: int, layers: int, act: str = "quick_gelu"
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LEN,
        hidden_act=act,
        # CLIP pools at the first eos id: it must be the tokenizer's, not CLIP's 49407.
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def gemma_model(tok: GemmaTokenizer, hidden: int, layers: int) -> Gemma2Model:
    cfg = Gemma2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=SANA_MAX_LEN,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return Gemma2Model(cfg)


def t5_encoder(tok: T5Tokenizer, d_model: int, layers: int) -> T5EncoderModel:
    """T5 v1.1 layout (gated GELU, untied relative-position buckets), as SD3's and FLUX's."""
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    return T5EncoderModel(cfg)


QWEN_MAX_LEN = 1024  # >= Z-Image's max_sequence_length (512) plus its chat-template tokens
# Qwen3's chat template, reduced to what text-to-image pipelines render: ChatML turns, the
# assistant prompt, and the empty think block that ``enable_thinking=False`` adds
QWEN_CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def qwen_tokenizer(words: tuple[str, ...] = ()) -> Qwen2Tokenizer:
    """Qwen's byte-level BPE (GPT-2 style: a leading space is 'Ġ'): 256 byte symbols, merges
    that make each space-led word one token, the ChatML specials last (pad <|endoftext|>, eos
    <|im_end|>, as in Qwen3's tokenizer) and the chat template the pipelines render."""
    alphabet = sorted(ByteLevel.alphabet())
    merges = _chain_merges([["Ġ", *w] for w in _words(words)])
    tokens = [*_merge_vocab(alphabet, merges), "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=QWEN_MAX_LEN,
    )


def qwen3_model(tok: Qwen2Tokenizer, hidden: int, layers: int) -> Qwen3Model:
    """Qwen3's layout (grouped-query attention, per-head q/k RMS norm) at toy width."""
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=QWEN_MAX_LEN,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return Qwen3Model(cfg)
