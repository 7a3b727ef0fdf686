"""Data: byte-level tokenizer, corpora (the Python stdlib by default) and batch samplers."""
from .corpus import (BatchSampler, Corpus, check_length, eval_batches, load_corpus, load_files,
                     load_stdlib, load_text_file, stdlib_files)
from .tokenizer import START_BYTE, VOCAB_SIZE, decode, encode, prompt_ids

__all__ = ["BatchSampler", "Corpus", "check_length", "eval_batches", "load_corpus", "load_files",
           "load_stdlib", "load_text_file", "stdlib_files", "START_BYTE", "VOCAB_SIZE", "decode", "encode",
           "prompt_ids"]
