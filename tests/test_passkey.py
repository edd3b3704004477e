"""Passkey task generation and scoring; retrieval inside the trained context on the stock cache."""

import pytest

import pyllama_inf as pi
from pyllama_inf import passkey
from pyllama_inf.cli import main


def words(text):
    return len(text.split())


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_sits_at_the_requested_depth(depth):
    task = passkey.make_task(2000, depth, seed=3, count_tokens=words)
    filler = task.prompt[len(passkey.INTRO):task.prompt.index(passkey.QUESTION)]
    at = filler.index("pass key is") / len(filler)
    assert abs(at - depth) < 0.05
    assert abs(task.n_tokens - 2000) <= 25 and task.n_tokens == words(task.prompt)


def test_tasks_are_deterministic_per_seed():
    a = passkey.make_task(500, 0.5, seed=1, count_tokens=words)
    assert a == passkey.make_task(500, 0.5, seed=1, count_tokens=words)
    assert a.answer != passkey.make_task(500, 0.5, seed=2, count_tokens=words).answer
    assert a.prompt.count(a.answer) == 2


def test_scoring_takes_the_first_number():
    task = passkey.make_task(200, 0.5, seed=0, count_tokens=words)
    assert passkey.is_correct(task, f" {task.answer}. The")
    assert not passkey.is_correct(task, " 12345 or " + task.answer)
    assert not passkey.is_correct(task, " I do not know")


def test_bad_depth():
    with pytest.raises(ValueError):
        passkey.make_task(100, 1.5, seed=0, count_tokens=words)


def test_stock_cache_retrieves_within_trained_context(smollm2):
    with pi.Model(smollm2, n_ctx=2048, n_threads=2, flash_attn=True) as m:
        results = passkey.run(m, 1500, [0.2, 0.8], trials=1)
    assert [abs(r.n_tokens - 1500) < 40 for r in results] == [True, True]
    assert all(r.correct for r in results), [r.output for r in results]


def test_passkey_cli(smollm2, capsys):
    assert main(["passkey", "-m", smollm2, "--length", "600", "--depths", "0.5", "-t", "2"]) == 0
    assert "accuracy: 1.000" in capsys.readouterr().out
