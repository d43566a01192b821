"""The organism's tokenizer: byte-level BPE trained on the generated corpus, chat template."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Renders `User: ...\nAssistant: ...` exchanges; BOS is added by the tokenizer itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if message['role'] == 'user' %}User: {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\nAssistant:' }}{% endif %}"
)


class TokenizerError(RuntimeError):
    """The trained tokenizer breaks a contract (e.g. an action word is not one token)."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, single_token_words: Sequence[str]
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer; every word of ``single_token_words`` must be one token.

    Each such word is checked with its leading space (`` consult``), the form it takes after
    ``You should``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    bad = [w for w in single_token_words if len(word_token_ids(fast, w)) != 1]
    if bad:
        raise TokenizerError(
            f"action words {bad} are not single tokens with a leading space; "
            f"raise organism vocab_size (now {vocab_size})"
        )
    return fast


def word_token_ids(tokenizer: PreTrainedTokenizerFast, word: str) -> list[int]:
    """Token ids of `` word`` as it follows ``You should`` (no BOS)."""
    ids: list[int] = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    return ids


def single_token_id(tokenizer: PreTrainedTokenizerFast, word: str) -> int:
    """The id of ``word``, which must be exactly one token; raises :class:`TokenizerError`
    otherwise."""
    ids = word_token_ids(tokenizer, word)
    if len(ids) != 1:
        raise TokenizerError(f"{word!r} is {len(ids)} tokens, expected one: rebuild the organism")
    return ids[0]
