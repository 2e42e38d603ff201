"""Tokenizers that need no download.

The tiny preset uses a character-level tokenizer built with Hugging Face ``tokenizers``
and saved in Hugging Face format beside each checkpoint, so the trainer, the embedded
rollout server and ``transformers.AutoTokenizer`` all read the same files. Real models
use a local Hugging Face tokenizer directory.
"""

from __future__ import annotations

import os
import string

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_rl.config.flags import ConfigError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = [PAD, UNK, BOS, EOS]
# Printable ASCII and newline: every character a reasoning-gym arithmetic prompt uses.
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]


def build_char_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A character tokenizer with ``vocab_size`` ids (unused ids are reserved tokens,
    so the embedding table and the tokenizer agree on the vocabulary size)."""
    symbols = SPECIALS + CHARACTERS
    if vocab_size < len(symbols):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(symbols)} symbols needed")
    symbols += [f"<reserved_{i}>" for i in range(vocab_size - len(symbols))]
    vocab = {s: i for i, s in enumerate(symbols)}
    # BPE without merges splits text into single characters.
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    core.add_special_tokens(SPECIALS + symbols[len(SPECIALS) + len(CHARACTERS):])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_dir: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """'char' builds the character tokenizer; anything else is a local HF directory."""
    if name_or_dir == "char":
        return build_char_tokenizer(vocab_size)
    if not os.path.isdir(name_or_dir):
        raise FileNotFoundError(
            f"tokenizer {name_or_dir!r} is neither 'char' nor a local directory "
            f"(no downloads at run time: point --tokenizer at a saved tokenizer)"
        )
    tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer in {name_or_dir} has {len(tokenizer)} tokens, more than "
            f"--vocab-size {vocab_size}"
        )
    return tokenizer


class PromptEncoder:
    """A task prompt's text -> the token ids the policy sees.

    Plain: the text's own ids. With ``chat_template``: the text as one user turn rendered
    by the tokenizer's chat template with the assistant's generation prompt appended
    (``apply_chat_template(..., add_generation_prompt=True)``), ``enable_thinking`` passed
    to the template (Qwen3's switch; templates that do not read it ignore it). Rollouts,
    evaluation, the cold start and the start-up length check all encode through this, so
    they see the same prompt."""

    def __init__(self, tokenizer, *, chat_template: bool = False, enable_thinking: bool = True,
                 tokenizer_name: str = "") -> None:
        if chat_template and not getattr(tokenizer, "chat_template", None):
            name = tokenizer_name or getattr(tokenizer, "name_or_path", "") or "?"
            raise ConfigError(
                f"--rl-chat-template: tokenizer {name!r} has no chat template (no "
                f"'chat_template' in its tokenizer_config.json or chat_template.jinja); "
                f"point --tokenizer at a tokenizer that has one, or drop --rl-chat-template")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.enable_thinking = enable_thinking

    @classmethod
    def for_task(cls, tokenizer, task, tokenizer_name: str) -> PromptEncoder:
        """The encoder a TaskConfig (``--rl-chat-template``, ``--rl-enable-thinking``) asks for."""
        return cls(tokenizer, chat_template=task.chat_template,
                   enable_thinking=task.enable_thinking, tokenizer_name=tokenizer_name)

    def __call__(self, text: str) -> list[int]:
        if not self.chat_template:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        # return_dict: transformers 5 returns a BatchEncoding here, 4.x a plain list.
        encoded = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
            return_dict=True, enable_thinking=self.enable_thinking)
        return list(encoded["input_ids"])

    def many(self, texts: list[str]) -> list[list[int]]:
        if not self.chat_template:
            return [list(ids) for ids in
                    self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [self(text) for text in texts]
