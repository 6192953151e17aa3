"""
Tasks, answers and the tokenizer: everything nanostar knows about text lives here.

Every task is a list of `Example(question, answer, rationale)` for train and test, and every
task writes a solution the same way, so the scripts never special-case a task:

    prompt:       "Q: <question>\\nA:\\n"
    hint prompt:  "Q: <question>\\nHint: the answer is <answer>\\nA:\\n"   (STaR's rationalization)
    completion:   "<rationale, one step per line>\\n#### <answer>" then <|endoftext|>

- `arithmetic` (default, offline): n-digit addition with a line-per-digit scratchpad.
- `gsm8k`: grade-school math, from the hub via `datasets` or from a local directory.

Model output and dataset text are untrusted: answers are parsed as numbers with a regex and
compared as Decimals; nothing is ever evaluated.
"""

import json
import os
import random
import re
import socket
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import tiktoken
import torch

# -----------------------------------------------------------------------------
# tokenizer: byte-level tiktoken Encoding built in code (no download, ever)

SPECIAL_TOKENS = ["<|endoftext|>", "<|startthought|>", "<|endthought|>", "<|pad|>"]


class Tokenizer:
    """256 byte tokens + the special tokens above: vocab 260. Digits are single tokens."""

    def __init__(self):
        ranks = {bytes([i]): i for i in range(256)}  # no merges: every byte is its own token
        specials = {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(
            name="nanostar-bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=specials
        )
        self.eot, self.start_thought, self.end_thought, self.pad = (specials[s] for s in SPECIAL_TOKENS)
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        """Encode untrusted text: a literal '<|endoftext|>' in it stays plain text, never a special token."""
        return self.enc.encode(text, disallowed_special=())

    def encode_with_specials(self, text):
        """Encode text we wrote ourselves, where special-token strings mean the special tokens."""
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.enc.decode(list(ids))


# -----------------------------------------------------------------------------
# the one solution format shared by every task

ANSWER_MARK = "#### "


@dataclass
class Example:
    question: str
    answer: str  # the final answer, as text ("14196", "-3", "0.5")
    rationale: str = ""  # the gold steps, one per line, without the answer line


def prompt(question):
    return f"Q: {question}\nA:\n"


def hint_prompt(question, answer):
    """The rationalization prompt: the question with its correct answer given as a hint."""
    return f"Q: {question}\nHint: the answer is {answer}\nA:\n"


def completion(rationale, answer):
    """What the model writes after the prompt: the steps, then the answer line."""
    return f"{rationale}\n{ANSWER_MARK}{answer}" if rationale else f"{ANSWER_MARK}{answer}"


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text):
    """The first number in text as a Decimal ('1,234' -> 1234, '$5.50' -> 5.50), or None."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    try:
        return Decimal(m.group(0).replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def extract_answer(text):
    """The number after the last '#### ' of a generated completion, or None if there is none."""
    i = text.rfind(ANSWER_MARK.strip())
    if i < 0:
        return None
    line = text[i + len(ANSWER_MARK.strip()) :].strip().split("\n")[0]
    return parse_number(line)


def answers_match(pred, gold):
    """pred, gold: Decimals or strings; equal as numbers. A missing prediction is wrong."""
    pred = parse_number(pred) if isinstance(pred, str) else pred
    gold = parse_number(gold) if isinstance(gold, str) else gold
    return pred is not None and gold is not None and pred == gold


def is_correct(completion_text, gold_answer):
    return answers_match(extract_answer(completion_text), gold_answer)


def split_steps(text):
    """A completion's steps: one per line, each keeping its newline, so ''.join(steps) == text."""
    return text.splitlines(keepends=True)


def strip_answer(text):
    """The rationale part of a completion (everything before the answer line)."""
    i = text.rfind(ANSWER_MARK.strip())
    return text[:i].rstrip("\n") if i >= 0 else text


_ANNOTATION = re.compile(r"<<([^<>]*)>>")


def reasoning_path(rationale):
    """
    What makes two solutions the same path, for RFT's de-duplication: the GSM8K calculator
    annotations '<<48/2=24>>' in order when there are any, else the non-empty step lines.
    """
    eqs = _ANNOTATION.findall(rationale)
    if eqs:
        return tuple(e.replace(" ", "") for e in eqs)
    return tuple(line.strip() for line in rationale.splitlines() if line.strip())


# -----------------------------------------------------------------------------
# task: arithmetic (n-digit addition with a scratchpad)


def addition_rationale(a, b):
    """
    The scratchpad, one line per digit from the right, in the spirit of STaR's arithmetic task.
    Each line is the state after adding one column: what is left of both operands, the carry,
    and the digits of the sum found so far. 4821+9375:

        482+937 c0 6
        48+93 c0 96
        4+9 c1 196
        0+0 c1 4196
        #### 14196

    Every line depends only on the line above (drop a digit, add the dropped digits and carry),
    so a small model can do a long addition one column at a time.
    """
    lines, carry, digits = [], 0, ""
    while a > 0 or b > 0 or not lines:
        s = a % 10 + b % 10 + carry
        a, b, carry, digits = a // 10, b // 10, s // 10, str(s % 10) + digits
        lines.append(f"{a}+{b} c{carry} {digits}")
    return "\n".join(lines)


def _random_number(rng, min_digits, max_digits):
    n = rng.randint(min_digits, max_digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)


def arithmetic_task(n_train=4000, n_test=500, min_digits=1, max_digits=8, seed=0):
    """
    Train/test sets of a+b with each operand's length uniform in [min_digits, max_digits].
    Deterministic in seed; the test set is drawn first and no train question repeats a test one.
    """
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    rng = random.Random(f"arithmetic-{seed}")

    def draw(n, exclude):
        out, seen = [], set(exclude)
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            a, b = _random_number(rng, min_digits, max_digits), _random_number(rng, min_digits, max_digits)
            if (a, b) not in seen:
                seen.add((a, b))
                out.append(Example(f"{a}+{b}", str(a + b), addition_rationale(a, b)))
        if len(out) < n:
            raise ValueError(f"only {len(out)} distinct questions with {min_digits}-{max_digits} digits, asked for {n}")
        return out, seen

    test, seen = draw(n_test, ())
    train, _ = draw(n_train, seen)
    return train, test


# -----------------------------------------------------------------------------
# task: gsm8k


def gsm8k_example(record, where):
    """A GSM8K record {'question', 'answer'} -> Example; `where` names the file:line for errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{where}: missing or non-text field '{key}'")
    text = record["answer"]
    i = text.rfind(ANSWER_MARK.strip())
    if i < 0 or parse_number(text[i:]) is None:
        raise ValueError(f"{where}: answer has no '#### <number>' final line")
    answer = text[i + len(ANSWER_MARK.strip()) :].strip().replace(",", "")
    return Example(record["question"].strip(), answer, text[:i].strip())


def read_jsonl(path):
    """Examples from a GSM8K-format JSONL file, with an error naming file and line for bad input."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append(gsm8k_example(record, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: the file is empty")
    return out


HUB_HOST = "huggingface.co"


def hub_reachable(timeout=3.0):
    """One TCP connect to the hub, so an offline machine fails in seconds, not after datasets' retries."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def gsm8k_task(data_dir=None):
    """GSM8K train/test: from data_dir/{train,test}.jsonl, else from the hub via `datasets`."""
    if data_dir:
        return read_jsonl(os.path.join(data_dir, "train.jsonl")), read_jsonl(os.path.join(data_dir, "test.jsonl"))
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    if not offline and not hub_reachable():
        raise ConnectionError(
            f"cannot reach {HUB_HOST} to download openai/gsm8k; pass --data_dir DIR with a local "
            "train.jsonl and test.jsonl (GSM8K's own format) instead"
        )
    from datasets import load_dataset

    ds = load_dataset("openai/gsm8k", "main")
    return tuple([gsm8k_example(r, f"openai/gsm8k {split}[{i}]") for i, r in enumerate(ds[split])] for split in ("train", "test"))


# -----------------------------------------------------------------------------
# the command-line face of the tasks, shared by every script


def add_task_args(parser):
    g = parser.add_argument_group("task")
    g.add_argument("--dataset", default="arithmetic", choices=["arithmetic", "gsm8k"], help="which task to learn")
    g.add_argument("--data_dir", default=None, help="gsm8k: local directory with train.jsonl and test.jsonl (skips the hub)")
    g.add_argument("--n_train", type=int, default=4000, help="training questions used (gsm8k: at most this many)")
    g.add_argument("--n_test", type=int, default=500, help="test questions evaluated (gsm8k: the first this many)")
    g.add_argument("--min_digits", type=int, default=1, help="arithmetic: fewest digits per operand")
    g.add_argument("--max_digits", type=int, default=5, help="arithmetic: most digits per operand")
    g.add_argument("--data_seed", type=int, default=0, help="arithmetic: seed of the generated train/test sets")
    return g


def task_from_args(args):
    """(train, test) lists of Examples for the parsed args."""
    if args.dataset == "arithmetic":
        return arithmetic_task(args.n_train, args.n_test, args.min_digits, args.max_digits, args.data_seed)
    train, test = gsm8k_task(args.data_dir)
    return train[: args.n_train], test[: args.n_test]


# -----------------------------------------------------------------------------
# batching


def check_fits(length, block_size, what="sequence"):
    if length > block_size:
        raise ValueError(f"{what} of {length} tokens is longer than the model's block_size of {block_size}")


def collate(pairs, block_size, device="cpu"):
    """
    pairs: list of (prompt_ids, completion_ids). Returns x, y (B, T) for next-token training,
    right-padded; y is -1 on prompt tokens and padding, so only the completion is learned.
    """
    seqs = [p + c for p, c in pairs]
    T = max(len(s) for s in seqs) - 1
    check_fits(T, block_size, "training sequence (minus its last token)")
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, ((p, c), s) in enumerate(zip(pairs, seqs)):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(p) - 1 : len(s) - 1] = torch.tensor(c)
    return x.to(device), y.to(device)


def encode_example(tok, question, completion_text, hint=None):
    """(prompt_ids, completion_ids + [eot]) for one training example; hint: the answer to show."""
    p = hint_prompt(question, hint) if hint is not None else prompt(question)
    return tok.encode(p), tok.encode(completion_text) + [tok.eot]
