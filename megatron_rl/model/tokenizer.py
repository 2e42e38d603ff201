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
