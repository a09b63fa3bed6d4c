"""Prompt tokenizers: CLIP's byte-level BPE and T5's SentencePiece, reproducing the ids that
transformers' CLIPTokenizer / T5Tokenizer give diffusers' SD3 and PixArt pipelines.

Both return a TokenBatch padded to a fixed length. A prompt longer than the model reads is
cut (CLIP: BOS + 75 + EOS; T5: max_length − 1 + EOS, keeping the EOS as transformers does)
with a TruncationWarning naming the limit and the text that was dropped.

CLIP follows transformers, not OpenAI's reference tokenizer: NFC, whitespace runs to one
space, lower case, no ftfy and no HTML unescaping ("&amp;" stays as written). Special tokens
written in a prompt are read as special tokens, including the pad token: SD3's bigG
tokenizer pads with "!", so there a "!" in the prompt becomes id 0 instead of "!</w>", as
it does in diffusers (the SD3 reference and ComfyUI do not do this).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dite.engine.errors import CheckpointError, InputError

# CLIP's word splitter (OpenAI's simple_tokenizer): special tokens, English contractions, runs
# of letters, single digits, runs of anything else that is not a space.
_CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TruncationWarning(UserWarning):
    """A prompt was longer than the text encoder reads and was cut."""


@dataclass
class TokenBatch:
    """ids and mask: LongTensor [B, L] (mask 1 on real tokens, BOS/EOS included, 0 on
    padding); truncated[k]: whether prompt k was cut."""

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: list[bool]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise InputError(f"prompts must be strings; prompt {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def _pack(rows: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[k, :len(row)] = 1
    return ids, mask


def _warn_truncated(name: str, index: int, limit: int, total: int, dropped: str) -> None:
    if len(dropped) > 80:
        dropped = dropped[:77] + "..."
    warnings.warn(f"prompt {index} is {total} tokens long but {name} reads at most {limit} "
                  f"(special tokens included); this part was cut: {dropped!r}", TruncationWarning, stacklevel=3)


def _token_config(folder: Path) -> dict:
    """Special tokens and limits from tokenizer_config.json and special_tokens_map.json (the
    latter wins where both name a token); AddedToken dicts reduced to their strings."""
    merged: dict = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            try:
                merged.update(json.loads(path.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"tokenizer file {path} is not valid JSON: {e}") from e
    for key, value in list(merged.items()):
        if isinstance(value, dict) and "content" in value:  # serialised AddedToken
            merged[key] = value["content"]
    return merged


def _require_folder(folder: Path, what: str, needs: str) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"{what} folder {folder} does not exist; it needs {needs}")


# ----------------------------------------------------------------------------------- CLIP

class CLIPTokenizer:
    """CLIP's BPE: vocab (token -> id) and merges (ranked pairs), byte-level with "</w>"
    closing each word. pad_token None pads with EOS (CLIP-L); SD3's bigG uses "!"."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, bos_token: str = "<|startoftext|>",
                 eos_token: str = "<|endoftext|>", pad_token: str | None = None, max_length: int = 77) -> None:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        pad_token = pad_token or eos_token
        missing = [t for t in (bos_token, eos_token, pad_token) if t not in vocab]
        if missing:
            raise CheckpointError(f"CLIP vocabulary has no {', '.join(map(repr, missing))} token")
        if max_length < 2:
            raise InputError(f"CLIP max_length must hold BOS and EOS, got {max_length}")
        self.bos_id, self.eos_id, self.pad_id = vocab[bos_token], vocab[eos_token], vocab[pad_token]
        self.max_length = max_length

        tok = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                            unk_token=eos_token, fuse_unk=False, dropout=None))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),  # keep the matches
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # transformers registers every special token as an added token, matched verbatim in
        # the raw prompt before normalisation; the pad token too.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys((bos_token, eos_token, pad_token))])
        self._tok = tok

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> "CLIPTokenizer":
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        # The first line is a "#version: 0.2" header; pairs are "left right".
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise CheckpointError(f"{merges_txt}: expected 'left right' merge lines, found {' '.join(bad)!r}")
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **kwargs) -> "CLIPTokenizer":
        """Vocabulary and merges of a tokenizers `tokenizer.json`; the pipeline around them is
        CLIP's own, whatever the file says (transformers rebuilds it the same way)."""
        model = json.loads(Path(path).read_text(encoding="utf-8")).get("model", {})
        if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
            raise CheckpointError(f"{path} does not hold a BPE vocabulary with merges (not a CLIP tokenizer)")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(model["vocab"], merges, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> "CLIPTokenizer":
        """A transformers CLIP tokenizer folder: tokenizer.json, or vocab.json + merges.txt;
        special tokens and model_max_length from tokenizer_config.json / special_tokens_map.json.
        Keyword arguments override what the folder says."""
        folder = Path(folder)
        needs = "tokenizer.json, or vocab.json and merges.txt"
        _require_folder(folder, "CLIP tokenizer", needs)
        config = _token_config(folder)
        for key in ("bos_token", "eos_token", "pad_token"):
            if isinstance(config.get(key), str):
                kwargs.setdefault(key, config[key])
        limit = config.get("model_max_length")
        if isinstance(limit, int) and 2 <= limit <= 4096:  # transformers writes 1e30 for "no limit"
            kwargs.setdefault("max_length", limit)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json", **kwargs)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return cls.from_files(folder / "vocab.json", folder / "merges.txt", **kwargs)
        raise CheckpointError(f"no CLIP tokenizer in {folder}: it needs {needs}")

    def encode(self, texts: list[str]) -> TokenBatch:
        """[B, max_length] ids: BOS, up to max_length − 2 prompt tokens, EOS, then padding."""
        texts = _check_texts(texts)
        keep = self.max_length - 2
        rows, truncated = [], []
        for k, enc in enumerate(self._tok.encode_batch(texts, add_special_tokens=False)):
            ids = enc.ids
            truncated.append(len(ids) > keep)
            if truncated[-1]:
                _warn_truncated("CLIP", k, self.max_length, len(ids) + 2, self.decode(ids[keep:]))
            rows.append([self.bos_id, *ids[:keep], self.eos_id])
        ids, mask = _pack(rows, self.max_length, self.pad_id)
        return TokenBatch(ids, mask, truncated)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False).replace("</w>", " ").strip()


# ------------------------------------------------------------------------------------ T5

class T5Tokenizer:
    """T5's SentencePiece unigram model (spiece.model), or a tokenizers `tokenizer.json` when
    that is all a folder has. No BOS; EOS appended; padded with pad (id 0 in T5)."""

    def __init__(self, spiece_model: str | Path | None = None, tokenizer_json: str | Path | None = None, *,
                 eos_token: str = "</s>", pad_token: str = "<pad>", unk_token: str = "<unk>") -> None:
        if (spiece_model is None) == (tokenizer_json is None):
            raise ValueError("give exactly one of spiece_model and tokenizer_json")
        self._sp = self._tok = None
        if spiece_model is not None:
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_model))
            lookup = self._sp.piece_to_id
            unk = self._sp.unk_id()
            # transformers reads the special tokens written in a prompt as special tokens;
            # sentencepiece alone would spell them out character by character.
            specials = [t for t in dict.fromkeys((eos_token, pad_token, unk_token)) if lookup(t) != unk or t == unk_token]
            self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        else:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(tokenizer_json))
            lookup, unk = self._tok.token_to_id, None
        self.eos_id, self.pad_id = lookup(eos_token), lookup(pad_token)
        for name, token, id_ in (("EOS", eos_token, self.eos_id), ("pad", pad_token, self.pad_id)):
            if id_ is None or (id_ == unk and token != unk_token):
                raise CheckpointError(f"T5 vocabulary has no {name} token {token!r}")

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> "T5Tokenizer":
        """A transformers T5 tokenizer folder: spiece.model (preferred) or tokenizer.json."""
        folder = Path(folder)
        needs = "spiece.model or tokenizer.json"
        _require_folder(folder, "T5 tokenizer", needs)
        config = _token_config(folder)
        for key in ("eos_token", "pad_token", "unk_token"):
            if isinstance(config.get(key), str):
                kwargs.setdefault(key, config[key])
        if (folder / "spiece.model").is_file():
            return cls(spiece_model=folder / "spiece.model", **kwargs)
        if (folder / "tokenizer.json").is_file():
            return cls(tokenizer_json=folder / "tokenizer.json", **kwargs)
        raise CheckpointError(f"no T5 tokenizer in {folder}: it needs {needs}")

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        if self._tok is not None:
            return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]
        rows = []
        for text in texts:
            # transformers' pipeline splits words on U+0085 (Unicode White_Space); T5's NFKC
            # table does not map it to a space, so sentencepiece alone would read it as unknown.
            parts = self._specials.split(text.replace("\x85", " "))
            row: list[int] = []
            for i, part in enumerate(parts):
                if i % 2:  # a special token
                    row.append(self._sp.piece_to_id(part))
                elif part:
                    row.extend(self._sp.encode(part))
            rows.append(row)
        return rows

    def encode(self, texts: list[str], max_length: int) -> TokenBatch:
        """[B, max_length] ids: up to max_length − 1 prompt tokens, EOS, then padding
        (SD3 256, PixArt-α 120, PixArt-Σ 300)."""
        texts = _check_texts(texts)
        if max_length < 1:
            raise InputError(f"T5 max_length must be at least 1, got {max_length}")
        keep = max_length - 1
        rows, truncated = [], []
        for k, ids in enumerate(self._pieces(texts)):
            truncated.append(len(ids) > keep)
            if truncated[-1]:
                _warn_truncated("T5", k, max_length, len(ids) + 1, self.decode(ids[keep:]))
            rows.append([*ids[:keep], self.eos_id])
        ids, mask = _pack(rows, max_length, self.pad_id)
        return TokenBatch(ids, mask, truncated)

    def decode(self, ids: list[int]) -> str:
        if self._tok is not None:
            return self._tok.decode(list(ids), skip_special_tokens=False)
        return self._sp.decode(list(ids))
