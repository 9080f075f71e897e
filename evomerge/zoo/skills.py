"""Synthetic skills of the demo zoo and the character-level tokenizer they share.

Every skill is a deterministic generator of ``{"prompt", "answer"}`` pairs: the model reads ``prompt`` and
must continue with ``answer`` followed by a newline. Two skills (addition, reversal) are sprinkled into the
base model's pre-training so the base half-knows them; two (sorting, a fixed substitution cipher) appear
only in the specialists' fine-tuning data, so the base does not know them at all.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
TERMINATOR = "\n"
CHARS: tuple[str, ...] = (TERMINATOR, " ", *string.digits, *string.ascii_lowercase, "+", "=", ".", ",")
SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character) wrapped for transformers, pad/bos/eos set."""

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=256,
    )
    return fast


@dataclass(frozen=True)
class Skill:
    """One synthetic skill: ``make(rng)`` returns (input, answer); ``in_pretraining`` says the base saw some."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    in_pretraining: bool
    finetune_scale: float = 1.0  # multiplies the zoo's fine-tuning steps (addition needs longer to click)

    def example(self, rng: random.Random) -> dict[str, str]:
        inp, ans = self.make(rng)
        return {"prompt": f"{self.name} {inp}=", "answer": ans}


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(0, 9)
    return f"{a}+{b}", str(a + b)


def _rev(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 6)
    return w, w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    return w, "".join(sorted(w))


# A fixed substitution cipher (its own seed, independent of the build seed, so every zoo teaches the same map).
_CIPHER_SRC = "abcdefghijklmnop"
_CIPHER_DST = "".join(random.Random(1234).sample(_CIPHER_SRC, len(_CIPHER_SRC)))
CIPHER = dict(zip(_CIPHER_SRC, _CIPHER_DST))


def _enc(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 6, _CIPHER_SRC)
    return w, "".join(CIPHER[c] for c in w)


SKILLS: tuple[Skill, ...] = (
    Skill("add", "two-digit plus one-digit addition, half-known by the base", _add, True, finetune_scale=2.0),
    Skill("rev", "reverse a 3-6 letter string, half-known by the base", _rev, True),
    Skill("sort", "sort the letters of a 3-7 letter string, unknown to the base", _sort, False),
    Skill("enc", "fixed substitution cipher over a-p (a lookup table), unknown to the base", _enc, False),
)
SKILL_NAMES: tuple[str, ...] = tuple(s.name for s in SKILLS)

# The hard zoo: the same four skills, but the base half-knows three of them (add, rev and the cipher) and never
# sees sorting. The three half-known specialists move little from the base, sort's moves a lot alone, so naive
# merges (and searches that rank by the mean) keep the three and lose sort: a poorly mergeable skill that only a
# breeding search which values rare items can keep.
HARD_SKILLS: tuple[Skill, ...] = (
    Skill("add", "two-digit plus one-digit addition, half-known by the base", _add, True, finetune_scale=2.0),
    Skill("rev", "reverse a 3-6 letter string, half-known by the base", _rev, True),
    Skill("sort", "sort the letters of a 3-7 letter string, never seen by the base (the poorly mergeable skill)",
          _sort, False),
    Skill("enc", "fixed substitution cipher over a-p, half-known by the base", _enc, True),
)
# which skills a zoo kind trains (every kind has the same skill names, so tasks and specialists line up)
SKILL_SETS: dict[str, tuple[Skill, ...]] = {"demo": SKILLS, "hard": HARD_SKILLS}


def get_skill(name: str) -> Skill:
    for s in SKILLS:
        if s.name == name:
            return s
    raise KeyError(f"unknown skill {name!r}; known: {', '.join(SKILL_NAMES)}")


def skill_splits(skill: Skill, n_search: int, n_test: int, seed: int, n_train: int = 0
                 ) -> dict[str, list[dict[str, str]]]:
    """Deterministic disjoint splits (by prompt) of one skill: ``train``, ``search`` and held-out ``test``.

    Evaluation splits are drawn first from their own stream, so the same seed gives the same search/test
    sets whatever the training size; training examples never repeat an evaluation prompt.
    """
    rng = random.Random(f"{seed}:{skill.name}:eval")
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {"search": [], "test": [], "train": []}
    for split, n in (("search", n_search), ("test", n_test)):
        tries = 0
        while len(out[split]) < n:
            ex = skill.example(rng)
            tries += 1
            if tries > 100 * (n + 10):
                raise RuntimeError(f"skill {skill.name}: cannot draw {n} distinct {split} examples")
            if ex["prompt"] in seen:
                continue
            seen.add(ex["prompt"])
            out[split].append(ex)
    rng = random.Random(f"{seed}:{skill.name}:train")
    while len(out["train"]) < n_train:
        ex = skill.example(rng)
        if ex["prompt"] not in seen:
            out["train"].append(ex)
    return out


_WORDS = tuple(
    ["the", "a", "an", "one", "some", "every", "small", "big", "red", "blue", "green", "old", "new", "quick", "slow", "happy", "sad", "cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "cloud", "road", "child", "farmer", "king", "queen", "robot", "teacher", "sees", "finds", "likes", "eats", "builds", "moves", "carries", "paints", "counts", "opens", "near", "under", "over", "with", "without", "and", "but", "then", "because", "while", "today", "tomorrow", "here", "there", "quietly", "loudly"]
)


def text_line(rng: random.Random) -> str:
    """One line of filler prose: short sentences over a small lexicon (gives the base general LM skill)."""
    sentences = []
    for _ in range(rng.randint(1, 2)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 8))]
        sentences.append(" ".join(words) + rng.choice([".", ".", ","]))
    return " ".join(sentences)
