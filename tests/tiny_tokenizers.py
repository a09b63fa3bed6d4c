"""Tokenizer files trained here, on text written here, for the tokenizer and pipeline tests.

A CLIP-style byte-level BPE (vocab.json + merges.txt laid out like OpenAI's, so "!" is id 0
as in the real one) and a SentencePiece unigram model with T5's special ids, plus the
transformers T5 tokenizer built from it (transformers needs protobuf to read spiece.model,
so it is handed the pieces and the normaliser table instead).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from t5_reference_tokenizer import t5_reference_tokenizer  # noqa: E402,F401  (one builder for tests and export)

WORDS = ("a photo of cat dog sitting on the red blue green wooden chair table astronaut riding horse in space "
         "painting by van gogh oil canvas highly detailed render portrait woman man city night rain neon "
         "lights castle mountain lake sunset golden hour cinematic lighting sharp focus").split()
ODD = ["café", "naïve", "résumé", "Über", "façade", "smörgåsbord", "ﬁne", "ＡＢＣ", "①", "e\u0301te",
       "猫", "東京タワー", "서울", "🐱", "👩‍🚀", "🚀🌕", "Ωmega", "ß", "İstanbul", "ǅ", "ｶﾀｶﾅ", "\u200b"]
PUNCT = [",", ".", "!", "?", ";", ":", "'", '"', "(", ")", "--", "...", "!!", "?!", "&amp;", "#1", "@", "%", "$"]
SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\u3000", "\u00a0", "\r\n"]


def make_corpus(seed: int = 0, n: int = 240) -> list[str]:
    rng = random.Random(seed)
    prompts = ["", " ", "   \t\n", "a", "A", "!", "!!!", "it's a cat's toy, isn't it? we'll see; they'd've",
               "<|startoftext|> a cat <|endoftext|> dog", "x </s> y</s>z", "<pad> and <unk>", "100%", "3.14159",
               "1920x1080, 8k, 35mm f/1.8", "WOW!!! AMAZING!!!", "e\u0301", "Mr. O'Neil's café -- ¡hola! ¿qué?"]
    while len(prompts) < n:
        parts = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            word = rng.choice(WORDS)
            if r < 0.10:
                word = word.upper()
            elif r < 0.15:
                word = word.capitalize()
            elif r < 0.25:
                word = rng.choice(ODD)
            elif r < 0.35:
                word = word + rng.choice(PUNCT)
            elif r < 0.42:
                word = str(rng.randint(0, 10**rng.randint(1, 6)))
            parts.append(word)
            parts.append(rng.choice(SPACES) if rng.random() < 0.15 else " ")
        text = "".join(parts)
        if rng.random() < 0.1:  # well past 77 CLIP tokens and 120/256 T5 tokens
            text = (text + " ") * rng.randint(5, 20)
        prompts.append(text.strip() if rng.random() < 0.5 else text)
    return prompts


BIG_PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(5000))


def byte_chars() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table, in the order CLIP's vocab.json lists it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def train_clip_files(folder):
    """BPE merges learned with tokenizers on a caption corpus, written in CLIP's layout:
    256 byte chars, the same with "</w>", merge results in rank order, then BOS and EOS."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    split = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=900, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  end_of_word_suffix="</w>", show_progress=False)
    tok.train_from_iterator(make_corpus(seed=1, n=600), trainer)
    merges = [m if isinstance(m, list) else m.split(" ") for m in json.loads(tok.to_str())["model"]["merges"]]
    chars = byte_chars()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab


def t5_training_text(n: int = 1500) -> list[str]:
    # Latin text, digits and punctuation only: CJK, emoji and rarer letters stay unknown.
    rng = random.Random(2)
    pool = WORDS + PUNCT + ODD[:7] + [str(d) for d in range(10)]
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(3, 20))) for _ in range(n)]


def train_t5_spiece(folder: Path) -> Path:
    """Train `folder/spiece.model` (T5's ids: pad 0, EOS 1, unk 2, no BOS) and return its path."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_training_text()), model_prefix=str(folder / "spiece"),
        model_type="unigram", vocab_size=700, hard_vocab_limit=False, character_coverage=0.9995,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, num_threads=2)
    (folder / "spiece.vocab").unlink()
    return folder / "spiece.model"
