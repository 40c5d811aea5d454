"""The embedded model's prompt vocabulary: Fashion-MNIST class names and a CLIP tokenizer over them."""

from __future__ import annotations

# Fashion-MNIST label order; the prompt for label i is CLASS_NAMES[i].
CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 8


def _words() -> list[str]:
    # CLIP's pre-tokenizer splits "t-shirt" into "t", "-", "shirt" and "ankle boot" at the space.
    words: set[str] = set()
    for name in CLASS_NAMES:
        for part in name.replace("-", " - ").split():
            words.add(part)
    # Longest first: a long word's merges then outrank the short words' pairs inside it ("an" in "sandal").
    return sorted(words, key=lambda w: (-len(w), w))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and BPE merges of a CLIP tokenizer that spells every class word as one token.

    "t-shirt" is three words to CLIP's pre-tokenizer and "ankle boot" two.

    The merges build each word left to right (`s n`, `sn e`, ...), so every intermediate piece is in the vocabulary
    and any other word falls back to letters instead of failing.
    """
    vocab: list[str] = [BOS, EOS]
    for ch in "abcdefghijklmnopqrstuvwxyz-/":
        vocab += [ch, ch + "</w>"]
    merges: list[tuple[str, str]] = []
    for word in _words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged = merged + piece
            if merged not in vocab:
                vocab.append(merged)
    return {tok: i for i, tok in enumerate(vocab)}, list(dict.fromkeys(merges))


def build_clip_tokenizer():
    """A `CLIPTokenizer` over the class-name vocabulary, padding with the end token as Stable Diffusion's does."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH, pad_token=EOS)
