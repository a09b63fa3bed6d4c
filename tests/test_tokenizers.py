"""Tokenizer parity with transformers' CLIPTokenizer and T5Tokenizer.

Vocabularies are trained here, on text written here: a CLIP-style byte-level BPE (laid out
like OpenAI's vocab.json, so "!" is id 0 as in the real one) and a SentencePiece unigram
model with T5's special ids. transformers 5 has one class per model (CLIPTokenizerFast and
T5TokenizerFast are aliases of the tokenizers-backed classes), so those are the reference.
"""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

from dite.engine.errors import CheckpointError, InputError
from dite.models.tokenizers import CLIPTokenizer, T5Tokenizer, TruncationWarning

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

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


CORPUS = make_corpus()
BIG_PROMPT = " ".join(WORDS[i % len(WORDS)] for i in range(5000))


# ------------------------------------------------------------------------ CLIP vocabulary

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


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """clip_l: pads with EOS (tokenizer_config.json); clip_g: pads with "!" (special_tokens_map.json)."""
    root = tmp_path_factory.mktemp("clip")
    vocab = train_clip_files(root / "clip_l")
    assert len(vocab) > 700 and vocab["!"] == 0
    (root / "clip_l" / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": 77, "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
         "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}}))
    (root / "clip_g").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (root / "clip_g" / name).write_bytes((root / "clip_l" / name).read_bytes())
    (root / "clip_g" / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return root


def ref_encode(ref, texts, max_length):
    out = ref(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return out.input_ids, out.attention_mask


def assert_same(ref_ids, ref_mask, ours, texts):
    for k in range(len(texts)):
        assert ours.ids[k].tolist() == ref_ids[k].tolist(), f"prompt {k}: {texts[k]!r}"
        assert ours.mask[k].tolist() == ref_mask[k].tolist(), f"mask of prompt {k}: {texts[k]!r}"


@pytest.mark.parametrize("which,pad", [("clip_l", "<|endoftext|>"), ("clip_g", "!")])
def test_clip_matches_transformers(clip_folders, which, pad):
    ref = transformers.CLIPTokenizer.from_pretrained(clip_folders / which)
    ours = CLIPTokenizer.from_folder(clip_folders / which)
    assert ref.pad_token == pad and ours.pad_id == ref.pad_token_id
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        batch = ours.encode(CORPUS)
    assert batch.ids.shape == batch.mask.shape == (len(CORPUS), 77) and batch.ids.dtype == torch.long
    assert_same(*ref_encode(ref, CORPUS, 77), batch, CORPUS)
    lengths = [len(ref(t).input_ids) for t in CORPUS]
    assert batch.truncated == [n > 77 for n in lengths] and 5 < sum(batch.truncated) < len(CORPUS) // 2
    # saved by transformers as tokenizer.json (+ configs), without vocab.json / merges.txt
    saved = clip_folders / f"{which}_saved"
    ref.save_pretrained(saved)
    (saved / "vocab.json").unlink(missing_ok=True)
    (saved / "merges.txt").unlink(missing_ok=True)
    again = CLIPTokenizer.from_folder(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        assert torch.equal(again.encode(CORPUS).ids, batch.ids)


def bmp_chars() -> list[str]:
    """Every character of the Basic Multilingual Plane but surrogates, sampling the large
    uniform blocks of CJK ideographs and Hangul syllables (letters all alike) to save time."""
    uniform = [(0x3400, 0xA000), (0xAC00, 0xD7A4)]
    return [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000
            and not any(lo <= c < hi and (c - lo) % 61 for lo, hi in uniform)]


def test_clip_every_character(clip_folders):
    # Each character between two letters: normalisation, word splitting, byte-level BPE.
    ref = transformers.CLIPTokenizer.from_pretrained(clip_folders / "clip_g")
    texts = [f"a{c}b" for c in bmp_chars()]
    ours = [e.ids for e in CLIPTokenizer.from_folder(clip_folders / "clip_g")._tok.encode_batch(
        texts, add_special_tokens=False)]
    theirs = ref(texts, add_special_tokens=False).input_ids
    diff = [texts[k] for k in range(len(texts)) if ours[k] != theirs[k]]
    assert not diff, diff[:10]


def test_clip_pad_conventions(clip_folders):
    l, g = CLIPTokenizer.from_folder(clip_folders / "clip_l"), CLIPTokenizer.from_folder(clip_folders / "clip_g")
    a, b = l.encode(["a cat", ""]), g.encode(["a cat", ""])
    eos = l.eos_id
    assert a.ids[1, :3].tolist() == [l.bos_id, eos, eos] and b.ids[1, :3].tolist() == [g.bos_id, eos, 0]
    assert torch.equal(a.mask, b.mask) and a.mask[0].sum() == 4 and a.mask[1].sum() == 2
    # diffusers' bigG tokenizer reads a "!" written in the prompt as its pad token.
    assert g.encode(["wow!"]).ids[0, 4].item() == 0 and l.encode(["wow!"]).ids[0, 4].item() != 0
    assert CLIPTokenizer.from_folder(clip_folders / "clip_l", pad_token="!").pad_id == 0


def test_clip_truncation_warning(clip_folders):
    tok = CLIPTokenizer.from_folder(clip_folders / "clip_l")
    with pytest.warns(TruncationWarning, match=r"reads at most 77") as record:
        batch = tok.encode(["a short one", BIG_PROMPT])
    assert len(record) == 1 and "prompt 1" in str(record[0].message)
    assert batch.truncated == [False, True] and batch.mask[1].all() and batch.ids[1, -1] == tok.eos_id
    ref = transformers.CLIPTokenizer.from_pretrained(clip_folders / "clip_l")
    assert batch.ids[1].tolist() == ref_encode(ref, [BIG_PROMPT], 77)[0][0].tolist()


# -------------------------------------------------------------------------- T5 vocabulary

def _fields(buf: bytes):
    """(field number, value) pairs of a protobuf message: enough to pull one bytes field
    out of a SentencePiece model without the protobuf package."""
    def varint(i):
        value = shift = 0
        while True:
            byte = buf[i]
            value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
            if byte < 0x80:
                return value, i
    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i:i + n], i + n
        else:
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        yield key >> 3, value


def t5_training_text(n: int = 1500) -> list[str]:
    # Latin text, digits and punctuation only: CJK, emoji and rarer letters stay unknown.
    rng = random.Random(2)
    pool = WORDS + PUNCT + ODD[:7] + [str(d) for d in range(10)]
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(3, 20))) for _ in range(n)]


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    """spiece/: the sentencepiece model alone; json/: transformers' tokenizer.json of it."""
    root = tmp_path_factory.mktemp("t5")
    (root / "spiece").mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_training_text()), model_prefix=str(root / "spiece" / "spiece"),
        model_type="unigram", vocab_size=700, hard_vocab_limit=False, character_coverage=0.9995,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, num_threads=2)
    (root / "spiece" / "spiece.vocab").unlink()
    sp = spm.SentencePieceProcessor(model_file=str(root / "spiece" / "spiece.model"))
    # transformers needs protobuf to read spiece.model, so hand it the pieces and the
    # normaliser table (ModelProto.normalizer_spec = 3, NormalizerSpec.precompiled_charsmap = 2).
    normalizer = next(v for n, v in _fields(sp.serialized_model_proto()) if n == 3)
    charsmap = next(v for n, v in _fields(normalizer) if n == 2)
    ref = transformers.T5Tokenizer(vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())],
                                   _spm_precompiled_charsmap=charsmap)
    ref.save_pretrained(root / "json")
    assert not (root / "json" / "spiece.model").exists()
    return root, ref


@pytest.mark.parametrize("layout", ["spiece", "json"])
def test_t5_matches_transformers(t5_folders, layout):
    root, ref = t5_folders
    ours = T5Tokenizer.from_folder(root / layout)
    assert (ours.pad_id, ours.eos_id) == (ref.pad_token_id, ref.eos_token_id) == (0, 1)
    pieces = [ref(t).input_ids for t in CORPUS]
    assert sum(2 in p for p in pieces) > 10, "the corpus should reach unknown characters"
    for max_length in (120, 256, 300):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            batch = ours.encode(CORPUS, max_length)
        assert batch.ids.shape == (len(CORPUS), max_length)
        assert_same(*ref_encode(ref, CORPUS, max_length), batch, CORPUS)
        assert batch.truncated == [len(p) > max_length for p in pieces]
    assert any(batch.truncated)


def test_t5_every_character(t5_folders):
    # Each character between two letters: sentencepiece's NFKC table against the
    # tokenizers pipeline transformers builds around the same table.
    root, ref = t5_folders
    texts = [f"a{c}b" for c in bmp_chars()]
    ours = T5Tokenizer.from_folder(root / "spiece")._pieces(texts)
    theirs = ref(texts, add_special_tokens=False).input_ids
    diff = [texts[k] for k in range(len(texts)) if ours[k] != theirs[k]]
    assert not diff, diff[:10]


def test_t5_truncation_keeps_eos(t5_folders):
    root, _ = t5_folders
    tok = T5Tokenizer.from_folder(root / "spiece")
    with pytest.warns(TruncationWarning, match=r"reads at most 256"):
        batch = tok.encode([BIG_PROMPT, "a cat"], 256)
    assert batch.truncated == [True, False]
    assert batch.ids[0, -1] == tok.eos_id and batch.mask[0].all()
    short = batch.ids[1][batch.mask[1].bool()].tolist()
    assert short[-1] == tok.eos_id and (batch.ids[1][len(short):] == 0).all()
    assert tok.encode([""], 4).ids.tolist() == [[tok.eos_id, 0, 0, 0]]


# ------------------------------------------------------------------------------- errors

def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"vocab\.json and merges\.txt") as info:
        CLIPTokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json, or vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)  # merges.txt still missing
    with pytest.raises(CheckpointError, match=r"spiece\.model or tokenizer\.json") as info:
        T5Tokenizer.from_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        T5Tokenizer.from_folder(tmp_path / "nowhere")


def test_bad_input(clip_folders):
    tok = CLIPTokenizer.from_folder(clip_folders / "clip_l")
    with pytest.raises(InputError, match="prompt 1"):
        tok.encode(["ok", None])
    assert torch.equal(tok.encode("a cat").ids, tok.encode(["a cat"]).ids)
