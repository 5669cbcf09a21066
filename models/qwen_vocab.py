"""Qwen's byte-level BPE vocabulary, rebuilt offline into a Hugging Face ``tokenizers`` object.

No model hub is reachable from CI, but the PyPI wheel ``dashscope==2.0.2`` ships
``qwen.tiktoken``: the 151,643 BPE ranks shared by Qwen2/2.5/3 and their VL models. We download
that wheel with pip (never install it: it pulls a web stack), check its sha256, recover the merges
from the ranks and add Qwen's added tokens at their real ids. A small-vocabulary variant (same
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


def ranks_file() -> Path:
    """Path to a verified copy of ``qwen.tiktoken``, downloading the wheel with pip if needed."""
    target = cache_dir() / "qwen.tiktoken"
    if target.is_file() and _sha256(target) == RANKS_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", DASHSCOPE_WHEEL, "--no-deps", "--quiet", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("dashscope-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise VocabularyUnavailable(
                f"could not download {DASHSCOPE_WHEEL} from the package index (needed for Qwen's BPE ranks).\n"
                f"command: {' '.join(cmd)}\n{proc.stderr.strip()}\n"
                f"Fix: allow access to PyPI once, or place a verified qwen.tiktoken at {target}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(RANKS_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise VocabularyUnavailable(f"{RANKS_MEMBER} has sha256 {digest}, expected {RANKS_SHA256}")
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_RANKS:
        raise VocabularyUnavailable(f"{path} holds {len(ranks)} ranks, expected {NUM_RANKS}")
    return ranks


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Run BPE on ``token`` allowing only merges ranked below ``max_rank``: for a regular token
    this stops at exactly the two parts whose merge created it."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_index, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            return parts
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def _byte_level_tokenizer(bpe: models.BPE) -> Tokenizer:
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _add_qwen_added_tokens(tokenizer: Tokenizer) -> None:
    # One at a time, so each gets the next id in order.
    for content in SPECIAL_TOKENS:
        tokenizer.add_special_tokens([AddedToken(content, special=True, normalized=False)])
    for content in NON_SPECIAL_ADDED_TOKENS:
        tokenizer.add_tokens([AddedToken(content, special=False, normalized=False)])


def build_full_vocab_tokenizer() -> Tokenizer:
    """Qwen's real 151,669-token tokenizer (ids identical to the released checkpoints)."""
    ranks = load_ranks(ranks_file())
    byte_map = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split_by_lower_ranks(token, ranks, rank)
        if len(parts) != 2:
            raise VocabularyUnavailable(f"rank {rank} does not decompose into one merge: {parts!r}")
        merges.append((to_str(parts[0]), to_str(parts[1])))
    tokenizer = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    _add_qwen_added_tokens(tokenizer)
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

def build_small_vocab_tokenizer(vocab_size: int = 2048) -> Tokenizer:
    """A byte-level BPE with Qwen's pre-tokenizer and added tokens but only ~``vocab_size`` regular
    tokens, so that tiny models spend their parameters on something other than the embedding."""
    tokenizer = _byte_level_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_small_vocab_corpus(), trainer=trainer)
    _add_qwen_added_tokens(tokenizer)
    return tokenizer
