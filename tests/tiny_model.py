"""Tiny GPT-2 model directories for the hf engine's tests, built on the spot: nothing is downloaded.

- The tokenizer is a byte-level BPE trained on :data:`CORPUS` with the ``tokenizers`` library.
  Every byte is in its alphabet, so any text encodes; merges learnt from the corpus bring the
  vocabulary to about :data:`VOCAB_SIZE`. It is saved as a ``PreTrainedTokenizerFast`` whose
  ``<|endoftext|>`` is the bos, eos and pad token.
- The model is a ``GPT2LMHeadModel`` (2 layers, 2 heads, 32 dimensions, :data:`N_POSITIONS`
  positions) with random weights drawn from a fixed seed, saved with ``save_pretrained``.

:func:`build_tiny_model` makes a model that never ends by itself under greedy decoding: the
end-of-sequence token's (tied) embedding is zero, so its logit is exactly 0 while the largest
of the others is positive, and a greedy answer runs to ``max_tokens``. ``always_eos=True`` makes
the opposite, a model whose first token is end-of-sequence whatever the prompt.

torch, transformers and tokenizers are imported when a model is built (typed ``Any``), so this
module imports without them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
VOCAB_SIZE = 400
N_POSITIONS = 1024
SEED = 1234

CORPUS = """\
The worker streams tokens from the model to the router, and the router streams them on.
A request names a model, a prompt and sampling parameters; the answer carries text and counts.
Least-loaded routing sends each request to the worker with the fewest requests in flight.
The cache keeps deterministic answers, so that a repeated question is answered at once.
Small models are quick to build and quick to run, which makes them good for tests.
Multi-byte text must never be split: café crème, naïve façade, Ελληνικά, 日本語のテキスト, 12 €.
"""


def build_tokenizer(directory: Path) -> Any:
    """Train the byte-level BPE tokenizer and save it in ``directory``; the fast tokenizer."""
    tokenizers = importlib.import_module("tokenizers")
    transformers = importlib.import_module("transformers")
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = byte_level(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=byte_level.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS
    )
    fast.save_pretrained(str(directory))
    return fast


def build_tiny_model(directory: Path, *, always_eos: bool = False) -> Path:
    """Write a tokenizer and a random tiny GPT-2 into ``directory`` (created); the directory."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    transformers.utils.logging.disable_progress_bar()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    eos = int(tokenizer.eos_token_id)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=N_POSITIONS,
        vocab_size=len(tokenizer),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        # Larger than GPT-2's 0.02, so that greedy answers vary instead of repeating one token.
        initializer_range=0.3,
        tie_word_embeddings=not always_eos,
    )
    torch.manual_seed(SEED)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        if always_eos:
            # Every position's final hidden state becomes the all-ones vector, and the EOS row of
            # the (untied) output layer scores it far above any other token.
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.fill_(1.0)
            model.lm_head.weight[eos].fill_(1.0)
        else:
            model.transformer.wte.weight[eos].zero_()
    model.save_pretrained(str(directory))
    return directory


__all__ = ["CORPUS", "EOS", "N_POSITIONS", "build_tiny_model", "build_tokenizer"]
