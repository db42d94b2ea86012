"""Offline data: a byte corpus from the running Python's standard library and synthetic
long-range tasks (key-value recall, needle in a haystack, variable tracking).

Corpus. Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (``site-packages``
excluded), enumerated in sorted relative-path order and read as raw bytes. The *set* of files
differs between Python versions (3.12 dropped ``distutils``, ``asynchat``, ``imp``...; 3.13
dropped ``lib2to3``...) and so do the contents of files present in both, so the corpus is
reproducible per Python version, not across versions. The held-out split is pinned by path:
``HELDOUT_PATHS`` is a fixed list of 48 non-test modules (>= 4 KB) that exist in both 3.11 and
3.12 (~1.4 MB), picked once by ``sha256("thrift-heldout:" + path) % 8 == 0`` over that
intersection. Training uses every other file whose path does not hash into the held-out bucket
(``_hash_heldout``), so a file that exists in only one version never leaks from one side of the
split to the other. Documents are joined with ``b"\\n\\n"`` into one byte stream per split.

Tokens. Byte ``b`` is token ``b``; ``BOS=256``, ``EOS=257``, ``PAD=258`` (see
``thrift_vllm.quality.model`` for the tokenizer files). A sequence of length ``L`` is ``[BOS]``
plus ``L - 1`` bytes.

Tasks. Each generator takes a ``numpy.random.Generator`` (seeded by the caller) and a target
length in bytes and returns a :class:`Task`: ``prompt`` and ``answer`` bytes (the answer follows
the prompt directly), the needle ``depth`` in [0, 1] (relative byte position of the fact that
answers the query) and ``text = prompt + answer`` for training.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

BOS, EOS, PAD = 256, 257, 258
N_BYTE_TOKENS = 256
DOC_SEP = b"\n\n"

HELDOUT_PATHS: tuple[str, ...] = (
    "__future__.py", "_osx_support.py", "abc.py", "ast.py", "asyncio/proactor_events.py",
    "asyncio/staggered.py", "bz2.py", "collections/__init__.py", "concurrent/futures/_base.py",
    "copyreg.py", "email/feedparser.py", "ensurepip/__init__.py", "ftplib.py", "hashlib.py",
    "hmac.py", "html/entities.py", "idlelib/calltip_w.py", "idlelib/codecontext.py",
    "idlelib/debugger_r.py", "idlelib/grep.py", "idlelib/pyparse.py", "importlib/_bootstrap.py",
    "inspect.py", "json/__init__.py", "lib2to3/pytree.py", "lib2to3/refactor.py", "locale.py",
    "multiprocessing/connection.py", "multiprocessing/reduction.py",
    "multiprocessing/sharedctypes.py", "netrc.py", "operator.py", "pprint.py", "pydoc.py",
    "shelve.py", "tabnanny.py", "tarfile.py", "timeit.py", "tkinter/dnd.py",
    "turtledemo/__main__.py", "turtledemo/bytedesign.py", "unittest/loader.py",
    "unittest/main.py", "unittest/mock.py", "urllib/parse.py", "webbrowser.py",
    "wsgiref/handlers.py", "xml/etree/ElementInclude.py",
)


def _hash_heldout(rel: str) -> bool:
    return int(hashlib.sha256(("thrift-heldout:" + rel).encode()).hexdigest(), 16) % 8 == 0


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Relative posix paths of the stdlib ``*.py`` files, sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel or not f.is_file():
            continue
        out.append(rel)
    return sorted(out)


@dataclass
class Corpus:
    """Train and held-out byte streams (numpy uint8) plus the file lists behind them."""

    root: str
    train_files: list[str]
    heldout_files: list[str]
    train: np.ndarray
    heldout: np.ndarray

    def describe(self) -> dict:
        return {"root": self.root, "n_train_files": len(self.train_files),
                "n_heldout_files": len(self.heldout_files), "train_bytes": int(self.train.size),
                "heldout_bytes": int(self.heldout.size),
                "train_sha256": hashlib.sha256(self.train.tobytes()).hexdigest(),
                "heldout_sha256": hashlib.sha256(self.heldout.tobytes()).hexdigest()}


def _join(root: Path, rels: list[str]) -> np.ndarray:
    parts = []
    for rel in rels:
        parts.append((root / rel).read_bytes())
    return np.frombuffer(DOC_SEP.join(parts), dtype=np.uint8).copy()


@lru_cache(maxsize=4)
def load_corpus(root: str | None = None) -> Corpus:
    """The stdlib corpus of the running Python (or of ``root``), split as documented above."""
    root_p = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root_p)
    pinned = set(HELDOUT_PATHS)
    heldout = [f for f in files if f in pinned]
    train = [f for f in files if f not in pinned and not _hash_heldout(f)]
    return Corpus(str(root_p), train, heldout, _join(root_p, train), _join(root_p, heldout))


def lm_window(stream: np.ndarray, n_bytes: int, rng: np.random.Generator) -> bytes:
    """``n_bytes`` contiguous bytes at a random offset of ``stream``."""
    hi = max(1, stream.size - n_bytes)
    off = int(rng.integers(0, hi))
    return stream[off:off + n_bytes].tobytes()


def heldout_windows(stream: np.ndarray, n_bytes: int, n: int) -> list[bytes]:
    """``n`` evaluation windows of ``n_bytes``, evenly spaced over the held-out stream
    (deterministic; they overlap when the stream is shorter than ``n * n_bytes``)."""
    hi = max(0, stream.size - n_bytes)
    offs = [0] if n == 1 else [round(i * hi / (n - 1)) for i in range(n)]
    return [stream[o:o + n_bytes].tobytes() for o in offs]


# --------------------------------------------------------------------------- synthetic tasks

@dataclass
class Task:
    kind: str
    prompt: bytes
    answer: bytes
    depth: float
    nominal_depth: float | None = None  # the depth asked for (eval_tasks), None if random

    @property
    def text(self) -> bytes:
        return self.prompt + self.answer


_ALNUM = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", dtype=np.uint8)
_ALPHA = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


def _word(rng: np.random.Generator, n: int, alphabet=_ALNUM) -> str:
    return alphabet[rng.integers(0, alphabet.size, n)].tobytes().decode()


def _number(rng: np.random.Generator, n: int) -> str:
    return str(int(rng.integers(10 ** (n - 1), 10 ** n)))


def _unique_words(rng, count: int, n: int, alphabet=_ALNUM, first=_ALPHA) -> list[str]:
    seen: set[str] = set()
    out = []
    while len(out) < count:
        w = _word(rng, 1, first) + _word(rng, n - 1, alphabet)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def kv_recall(rng: np.random.Generator, length: int, depth: float | None = None,
              n_queries: int = 1) -> Task:
    """Lines ``"key: value\\n"`` (key 6 alphanumerics, value 6 digits), then after ``"\\n"``
    ``n_queries`` lines ``"key: "`` + value; the prompt ends right after the last ``"key: "``.
    The last query asks for the pair at relative position ``depth`` (random if None); earlier
    queries (training form) ask for random pairs and are answered in the prompt."""
    header = b"Recall the values.\n"
    line = 15  # "abcdef: 123456\n"
    n_pairs = max(2, (length - len(header) - 1 - n_queries * line) // line)
    keys = _unique_words(rng, n_pairs, 6)
    vals = [_number(rng, 6) for _ in range(n_pairs)]
    if depth is None:
        depth = float(rng.random())
    target = min(n_pairs - 1, max(0, round(depth * (n_pairs - 1))))
    body = header + "".join(f"{k}: {v}\n" for k, v in zip(keys, vals, strict=True)).encode() + b"\n"
    for _ in range(n_queries - 1):
        i = int(rng.integers(0, n_pairs))
        body += f"{keys[i]}: {vals[i]}\n".encode()
    prompt = body + f"{keys[target]}: ".encode()
    pos = len(header) + target * line
    return Task("kv", prompt, vals[target].encode(), pos / max(1, len(prompt)))


def needle(rng: np.random.Generator, length: int, haystack: np.ndarray,
           depth: float | None = None) -> Task:
    """Corpus text with one line ``"# the secret number of NAME is NUMBER\\n"`` inserted at a line
    boundary near relative position ``depth``; the prompt ends with
    ``"\\n# the secret number of NAME is "``, the answer is NUMBER (7 digits)."""
    name = _word(rng, 6, _ALPHA)
    num = _number(rng, 7)
    fact = f"\n# the secret number of {name} is {num}\n".encode()
    query = f"\n# the secret number of {name} is ".encode()
    n_hay = max(16, length - len(fact) - len(query) - len(num))
    hay = lm_window(haystack, n_hay, rng)
    if depth is None:
        depth = float(rng.random())
    cut = int(depth * len(hay))
    nl = hay.rfind(b"\n", 0, cut)
    cut = nl + 1 if nl >= 0 and cut - nl < min(200, len(hay) // 32) else cut
    prompt = hay[:cut] + fact + hay[cut:] + query
    return Task("needle", prompt, num.encode(), cut / max(1, len(prompt)))


def var_tracking(rng: np.random.Generator, length: int, depth: float | None = None,
                 hops: int = 2) -> Task:
    """Python-like assignments: the target chain ``v0 = NUMBER`` (at relative position
    ``depth``), then ``v1 = v0``, ... ``v{hops} = v{hops-1}`` at random later lines, among
    distractor chains of the same form. The prompt ends with ``"print(v{hops})  # "`` and the
    answer is NUMBER (5 digits)."""
    header = b"# variable tracking\n"
    # "abcd = 12345\n" is 13 bytes, "abcd = wxyz\n" 12: at most 13 per line
    n_lines = max(hops + 2, (length - len(header) - 40) // 13)
    names = _unique_words(rng, n_lines, 4, first=_ALPHA)
    if depth is None:
        depth = float(rng.random())
    root_at = min(n_lines - hops - 1, max(0, round(depth * (n_lines - 1))))
    rest = np.arange(root_at + 1, n_lines)
    hop_at = np.sort(rng.choice(rest, size=hops, replace=False))
    lines: list[str | None] = [None] * n_lines
    chain = names[:hops + 1]
    value = _number(rng, 5)
    lines[root_at] = f"{chain[0]} = {value}\n"
    for h, at in enumerate(hop_at):
        lines[int(at)] = f"{chain[h + 1]} = {chain[h]}\n"
    defined: list[str] = []
    free = iter(names[hops + 1:])
    for i in range(n_lines):
        if lines[i] is not None:
            continue
        nm = next(free)
        if defined and rng.random() < 0.4:
            src = defined[int(rng.integers(0, len(defined)))]
            lines[i] = f"{nm} = {src}\n"
        else:
            lines[i] = f"{nm} = {_number(rng, 5)}\n"
        defined.append(nm)
    body = "".join(lines)  # type: ignore[arg-type]
    pos = len(header) + len("".join(lines[:root_at]))  # type: ignore[arg-type]
    prompt = header + body.encode() + f"print({chain[-1]})  # ".encode()
    return Task("var", prompt, value.encode(), pos / max(1, len(prompt)))


TASK_KINDS = ("kv", "needle", "var")


def make_task(kind: str, rng: np.random.Generator, length: int, haystack: np.ndarray,
              depth: float | None = None, train: bool = False) -> Task:
    """One task of ``kind`` whose ``text`` is at most ``length`` bytes (approximately filling
    it). ``train=True`` gives the training form (several kv queries)."""
    if kind == "kv":
        return kv_recall(rng, length, depth, n_queries=8 if train else 1)
    if kind == "needle":
        return needle(rng, length, haystack, depth)
    if kind == "var":
        return var_tracking(rng, length, depth)
    raise ValueError(f"unknown task kind {kind!r}; known: {TASK_KINDS}")


def eval_tasks(kind: str, length: int, n: int, haystack: np.ndarray, seed: int = 1234,
               depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> list[Task]:
    """``n`` evaluation tasks of ``kind`` whose ``prompt + answer`` fits ``length - 1`` bytes
    (one slot for BOS); sample ``i`` uses depth ``depths[i % len(depths)]`` and its own seed."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, length, TASK_KINDS.index(kind), i])
        t = make_task(kind, rng, length - 1, haystack, depths[i % len(depths)])
        t.nominal_depth = depths[i % len(depths)]
        assert len(t.text) <= length - 1, (kind, len(t.text), length)
        out.append(t)
    return out


def training_sequence(rng: np.random.Generator, length: int, corpus_train: np.ndarray,
                      mix: dict[str, float]) -> np.ndarray:
    """One training sequence of exactly ``length`` token ids: items (``[BOS] + bytes``) packed
    back to back and truncated. Each item is a corpus window (``"lm"``) or a task, drawn from
    ``mix``; a task's length is uniform in [length/8, length] so that depths and distances vary."""
    kinds = list(mix)
    p = np.array([mix[k] for k in kinds], dtype=np.float64)
    p /= p.sum()
    out: list[np.ndarray] = []
    n = 0
    while n < length:
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        room = length - n - 1
        if kind == "lm" or room < 64:
            data = lm_window(corpus_train, max(1, room), rng)
        else:
            tl = int(rng.integers(max(32, length // 8), length + 1))
            data = make_task(kind, rng, min(tl, room), corpus_train, train=True).text
        item = np.empty(len(data) + 1, dtype=np.int64)
        item[0] = BOS
        item[1:] = np.frombuffer(data, dtype=np.uint8)
        out.append(item)
        n += item.size
    return np.concatenate(out)[:length]
