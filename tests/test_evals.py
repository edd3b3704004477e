"""Long-context eval tasks: generation, scoring, the resumable grid, and the loss on a text."""

import json
import math
import re

import numpy as np
import pytest

import pyllama_inf as pi
from pyllama_inf import evals
from pyllama_inf.cli import main


def words(text):
    return len(text.split())


def haystack(task):
    """The prompt between the intro and the question."""
    q = task.prompt.rindex("\n\n")
    return task.prompt[:q]


@pytest.mark.parametrize("name", evals.TASKS)
@pytest.mark.parametrize("length", [300, 3000])
def test_task_length_answers_and_determinism(name, length):
    t = evals.make_task(name, length, 0.5, seed=4, count_tokens=words)
    assert t.name == name and t.n_tokens == words(t.prompt)
    assert abs(t.n_tokens - length) <= max(12, 0.01 * length)
    for a in t.answers:
        assert a in haystack(t)          # every fact the answer needs is in the text
    assert t == evals.make_task(name, length, 0.5, seed=4, count_tokens=words)
    other = evals.make_task(name, length, 0.5, seed=5, count_tokens=words)
    assert other.answers != t.answers


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_asked_fact_sits_at_its_depth(depth):
    for name, marker in [("passkey", "pass key is {}"), ("multikey", "is {}."), ("multivalue", "is {}."),
                         ("vartrack", "= {}."), ("kv", '"{}"')]:
        t = evals.make_task(name, 4000, depth, seed=1, count_tokens=words)
        text = haystack(t)
        # the asked fact: its answer (kv: the key, which precedes the value)
        needle = t.prompt.rsplit('Key: "', 1)[1].split('"')[0] if name == "kv" else t.answers[0]
        if name == "vartrack":
            needle = re.search(r"assigned the value (\d+)\?", t.prompt).group(1)
        at = text.index(marker.format(needle)) / len(text)
        assert abs(at - depth) < 0.06, (name, at)


def test_multikey_has_competing_keys_and_kv_distinct_pairs():
    t = evals.make_task("multikey", 2000, 0.5, seed=2, count_tokens=words)
    found = re.findall(r"The special magic number for (\w+) is (\d+)\.", haystack(t))
    assert len(found) == 4 and len({w for w, _ in found}) == 4 and len({n for _, n in found}) == 4
    asked = re.search(r"What is the special magic number for (\w+)\?", t.prompt).group(1)
    assert dict(found)[asked] == t.answers[0]
    kv = evals.make_task("kv", 2000, 0.5, seed=2, count_tokens=words)
    pairs = re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', kv.prompt)
    assert len(pairs) > 20 and len({k for k, _ in pairs}) == len(pairs)
    key = kv.prompt.rsplit('Key: "', 1)[1].split('"')[0]
    assert dict(pairs)[key] == kv.answers[0]


def test_vartrack_chain_leads_to_the_value():
    t = evals.make_task("vartrack", 2000, 0.2, seed=7, count_tokens=words)
    text = haystack(t)
    value = re.search(r"assigned the value (\d+)\?", t.prompt).group(1)
    holds = set(re.findall(r"VAR ([A-Z]{5}) = " + value + r"\.", text))
    for lhs, rhs in re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", text):   # in text order
        if rhs in holds:
            holds.add(lhs)
    assert holds == set(t.answers) and len(holds) == 4
    # in text order: each assignment after the one it copies
    assert [text.index(f"VAR {a} ") for a in t.answers] == sorted(text.index(f"VAR {a} ") for a in t.answers)


def test_scoring():
    pk = evals.make_task("passkey", 300, 0.5, seed=1, count_tokens=words)
    assert evals.is_correct(pk, f" {pk.answers[0]}.") and not evals.is_correct(pk, " 1 then " + pk.answers[0])
    mv = evals.make_task("multivalue", 300, 0.5, seed=1, count_tokens=words)
    assert evals.is_correct(mv, " " + ", ".join(reversed(mv.answers)))
    assert not evals.is_correct(mv, " " + ", ".join(mv.answers[:3]))
    kv = evals.make_task("kv", 300, 0.5, seed=1, count_tokens=words)
    assert evals.is_correct(kv, kv.answers[0] + '"') and not evals.is_correct(kv, kv.answers[0][:-1] + 'x"')
    vt = evals.make_task("vartrack", 300, 0.5, seed=1, count_tokens=words)
    assert evals.is_correct(vt, " " + " ".join(vt.answers)) and not evals.is_correct(vt, " " + vt.answers[0])


def test_recall_is_the_share_of_asked_values_named():
    assert evals.recall("multivalue", ["111111", "222222", "333333", "444444"], ": 222222, 999999, 444444.") == 0.5
    assert evals.recall("multivalue", ["111111", "222222"], " 1111112") == 0.0   # whole numbers only
    assert evals.recall("vartrack", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"], "\n1. VAR ABCDE\n2. VAR KLMNO") == 0.5
    assert evals.recall("vartrack", ["ABCDE", "FGHIJ"], " ABCDE FGHIJ") == 1.0
    assert evals.recall("passkey", ["12345"], " 12345.") == 1.0 and evals.recall("multikey", ["7"], " 8 7") == 0.0
    assert evals.recall("kv", ["a-b"], ' a-b"') == 1.0 and evals.recall("kv", ["a-b"], " x a-b") == 0.0
    with pytest.raises(ValueError):
        evals.recall("nope", ["1"], "1")
    with pytest.raises(ValueError):
        evals.recall("multivalue", [], "1")
    # summaries score the recall of each record again from its output: (2/4 + 4/4) / 2 trials
    rec = dict(model="m", cache="full", setup="full", task="multivalue", length=100, n_tokens=100, depth=0.5,
               seed=0, answers=["1", "2", "3", "4"], seconds=1.0)
    s, = evals.summarize([evals.EvalRecord(trial=0, output="1 and 2", correct=False, **rec),
                          evals.EvalRecord(trial=1, output="4 3 2 1", correct=True, **rec)])
    assert (s.correct, s.trials, s.accuracy, s.recall) == (1, 2, 0.5, 0.75)
    assert "50% (1/2), recall 75%" in evals.markdown([s])
    assert evals.EvalSummary("m", "full", "kv", 100, 1, 4).recall == 0.25   # recall = exact match by default


@pytest.mark.parametrize("bad", [dict(name="nope"), dict(depth=1.5), dict(n_tokens=10),
                                 dict(name="kv", n_tokens=100, count_tokens=len)])
def test_bad_task_arguments(bad):
    kw = dict(name="passkey", n_tokens=500, depth=0.5, seed=0, count_tokens=words)
    kw.update(bad)
    with pytest.raises(ValueError):
        evals.make_task(**kw)


def test_sequence_nll_matches_arithmetic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype(np.float32) * 30
    t = [0, 6, 3, 3, 1]
    want = sum(math.log(sum(math.exp(float(v)) for v in row)) - float(row[k]) for row, k in zip(x, t)) / 5
    assert evals.sequence_nll(x, t) == pytest.approx(want, rel=1e-9)


def test_grid_runs_resumes_and_skips_the_stock_cache_past_its_length(tiny_model, tmp_path):
    cfg = pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2, rewind=0)
    kw = dict(tasks=["passkey", "kv"], lengths=[600, 900], depths=[0.5], trials=2, out=tmp_path, infllm=cfg,
              threads=2, full_max_length=700)
    said = []
    s = evals.evaluate(tiny_model, log=said.append, **kw)
    recs = evals.read_records(tmp_path / "records.jsonl")
    # full: 1 length x 2 tasks x 2 trials; infllm: 2 lengths x 2 tasks x 2 trials
    assert len(recs) == 4 + 8
    assert {(r.cache, r.length) for r in recs} == {("full", 600), ("infllm", 600), ("infllm", 900)}
    assert any("900 tokens skipped" in m for m in said)
    assert {(x.cache, x.task, x.length): x.trials for x in s} == {
        ("full", "passkey", 600): 2, ("full", "kv", 600): 2, ("infllm", "passkey", 600): 2,
        ("infllm", "kv", 600): 2, ("infllm", "passkey", 900): 2, ("infllm", "kv", 900): 2}
    # same prompts for both caches: same seeds give the same answers
    by = {(r.cache, r.task, r.length, r.trial): r.answers for r in recs}
    assert by[("full", "kv", 600, 1)] == by[("infllm", "kv", 600, 1)]
    for r in recs:
        assert abs(r.n_tokens - r.length) <= 40
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert len(doc["summaries"]) == 6 and "| passkey | full |" in (tmp_path / "eval.md").read_text()

    # a run that stopped: the last trial lost (and a torn line); only it runs again
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text("\n".join(lines[:-1]) + '\n{"model": "tr')
    evals.evaluate(tiny_model, **kw)
    again = evals.read_records(tmp_path / "records.jsonl")
    assert len(again) == 12 and again[-1].key() == recs[-1].key()
    # other InfLLM settings are another setup: run in full, the stock trials are kept
    evals.evaluate(tiny_model, **dict(kw, infllm=pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=1,
                                                                  rewind=0)))
    assert len(evals.read_records(tmp_path / "records.jsonl")) == 12 + 8


@pytest.mark.parametrize("family, cache", [("llama", "infllm"), ("llama", "full"), ("gemma3", "infllm")])
def test_shared_prefixes_give_the_same_answers_with_less_evaluated(tiny_model, tmp_path, family, cache):
    if family == "gemma3":   # sliding-window layers: their window-size cache cannot go back either
        from families import write_random_family
        tiny_model = str(write_random_family(tmp_path / "g3.gguf", "gemma3", seed=0))
    # rewind 0: the InfLLM cache alone cannot go back to a prefix an earlier prompt shared
    cfg = pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2, rewind=0)
    kw = dict(caches=[cache], tasks=["passkey", "multikey"], lengths=[900], depths=[0.3, 0.7], trials=3, infllm=cfg,
              threads=2, n_ubatch=64, scratch_dir=str(tmp_path))
    said = {}
    for share in (False, True):
        said[share] = []
        evals.evaluate(tiny_model, out=tmp_path / str(share), share_prefixes=share, log=said[share].append, **kw)
    recs = {s: {r.key(): r for r in evals.read_records(tmp_path / str(s) / "records.jsonl")} for s in said}
    assert len(recs[True]) == 12 and recs[True].keys() == recs[False].keys()
    for key, r in recs[False].items():
        assert recs[True][key].output == r.output and recs[True][key].answers == r.answers
    counts = {}
    for s, lines in said.items():
        m = [re.match(r"\w+: (\d+) tokens evaluated for 12 prompts of (\d+) tokens", x) for x in lines]
        (new, total), = [tuple(map(int, x.groups())) for x in m if x]
        counts[s] = new, total
    prompt_tokens = sum(r.n_tokens for r in recs[True].values())   # BOS included
    assert counts[True][1] == counts[False][1] == prompt_tokens
    # the filler before a needle (passkey: the same at every trial and depth) is evaluated once
    if cache == "infllm":
        assert counts[False][0] == prompt_tokens
    assert counts[True][0] < 0.75 * prompt_tokens
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("pyllama-inf-eval-")] == []
    # the saved contexts go under scratch_dir: one that does not exist is an error, not ignored
    with pytest.raises(FileNotFoundError):
        evals.evaluate(tiny_model, out=tmp_path / "x", **dict(kw, scratch_dir=str(tmp_path / "missing")))


@pytest.mark.parametrize("bad", [dict(caches=["paged"]), dict(tasks=["x"]), dict(depths=[2.0]), dict(trials=0),
                                 dict(lengths=[10])])
def test_bad_grid(tiny_model, tmp_path, bad):
    with pytest.raises(ValueError):
        evals.evaluate(tiny_model, out=tmp_path, **dict(dict(lengths=[200]), **bad))


def test_perplexity_chunks_are_exact_and_scored_tokens_are_shared(tiny_model):
    text = " ".join(f"word{i % 97} item{i % 13}" for i in range(3000))
    with pi.Model(tiny_model, n_ctx=1024, n_threads=2) as m:
        toks = m.tokenize(text, add_special=False, parse_special=False)
        a = evals.perplexity(m, toks, [384, 1024], target=256, rows_per_call=100)
        b = evals.perplexity(m, toks, [1024], target=256, rows_per_call=1000)
        # one context scored against a later end: the window is the 384 tokens before it
        c = evals.perplexity(m, toks[:-7], [384], target=256, end=1024)
        assert c[0].nll == pytest.approx(a[0].nll, rel=1e-6)
        # the same computation in one call: logits of the whole window, scored by hand
        head = m.tokenize("", add_special=True)
        window = head + toks[1024 - 1024 + len(head):1024]
        lg = m.logits(window[:-1], last_n=256).astype(np.float64)
        lse = lg.max(1) + np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1))
        want = float(np.mean(lse - lg[np.arange(256), window[-256:]]))
    assert [p.context for p in a] == [384, 1024]
    assert a[1].nll == pytest.approx(want, rel=1e-6) and b[0].nll == pytest.approx(want, rel=1e-6)
    assert a[1].ppl == pytest.approx(math.exp(want), rel=1e-6)
    with pytest.raises(ValueError):
        evals.perplexity(m, toks, [200], target=256)


def test_eval_and_perplexity_commands(tiny_model, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "-m", tiny_model, "--tasks", "multikey", "--lengths", "600", "--depths", "0.5",
                 "--caches", "infllm", "--n-local", "64", "--block-size", "16", "--n-init", "16", "--topk", "2",
                 "--rewind", "0", "--scratch-dir", str(tmp_path), "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "| multikey | infllm |" in said.out and "(shared prefixes)" in said.err
    rec = evals.read_records(out / "records.jsonl")
    assert len(rec) == 1 and '"n_local": 64' in rec[0].setup
    assert main(["eval", "-m", tiny_model, "--tasks", "passkey", "--lengths", "300", "--depths", "0.5",
                 "--caches", "full", "--no-shared-prefixes", "--out", str(out)]) == 0
    said = capsys.readouterr().err
    assert "1 prompts" in said and "(shared prefixes)" not in said
    txt = tmp_path / "t.txt"
    txt.write_text(" ".join(f"alpha{i % 31} beta{i % 7}" for i in range(2000)))
    assert main(["perplexity", "-m", tiny_model, "--text", str(txt), "--contexts", "512,768", "--target", "128",
                 "--caches", "full", "--json"]) == 0
    pts = json.loads(capsys.readouterr().out)
    assert [p["context"] for p in pts] == [512, 768] and all(p["nll"] > 0 for p in pts)
    assert main(["eval", "-m", tiny_model, "--tasks", "nope", "--out", str(out)]) == 1
    assert "unknown task" in capsys.readouterr().err
    # a context no longer than the scored tokens is refused before the text is read or a model loads
    assert main(["perplexity", "-m", tiny_model, "--text", str(tmp_path / "missing.txt"), "--contexts", "0,512",
                 "--target", "128"]) == 1
    assert "longer than --target (128)" in capsys.readouterr().err


def test_eval_command_stops_cleanly_on_sigterm(tiny_model, tmp_path):
    """A killed grid job (SIGTERM, as from kill or a batch system) removes its saved contexts,
    which reach gigabytes at 128K, and exits 143; the trials it finished stay in records.jsonl."""
    import signal
    import subprocess
    import sys
    import time
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cmd = [sys.executable, "-c", "import sys; from pyllama_inf.cli import main; sys.exit(main())", "eval", "-m", tiny_model, "--tasks", "passkey", "--lengths", "4000",
           "--depths", "0.1,0.5,0.9", "--trials", "2", "--caches", "infllm", "--scratch-dir", str(scratch),
           "--out", str(tmp_path / "ev")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(scratch.glob("*/*.state")):      # the first saved context: the run is mid-way
        assert proc.poll() is None and time.monotonic() < deadline, "no saved context appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated" in err and list(scratch.iterdir()) == []
    records = tmp_path / "ev" / "records.jsonl"
    assert (len(evals.read_records(records)) if records.exists() else 0) < 6   # it stopped mid-way


def test_kjv_text_when_installed():
    try:
        text = evals.kjv_text()
    except FileNotFoundError:
        pytest.skip("Debian's bible-kjv is not installed")
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def _quality_script():
    """benchmarks/quality.py as a module."""
    import importlib
    import sys
    from pathlib import Path
    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    sys.path.insert(0, bench)
    try:
        return importlib.import_module("quality")
    finally:
        sys.path.remove(bench)


def test_quality_run_list_leaves_out_runs_that_added_nothing(tmp_path):
    """quality.md lists a run only if the results grew before the next run started: here the
    rows go 0 -> 3 (run a), 3 -> 3 (run b, nothing), 3 -> 5 (run c, and two now); a run
    recorded without a count (older files) is kept."""
    quality = _quality_script()
    for name, n in (("records.jsonl", 4), ("ppl.jsonl", 1)):
        (tmp_path / name).write_text("".join('{"i": %d}\n' % i for i in range(n)))
    assert quality.n_rows(tmp_path) == 5
    runs = [{"c": "old"}, {"c": "a", "rows_before": 0}, {"c": "b", "rows_before": 3},
            {"c": "c", "rows_before": 3}, {"c": "d", "rows_before": 5}]
    assert [r["c"] for r in quality.runs_that_added(runs, quality.n_rows(tmp_path))] == ["old", "a", "c"]


def test_quality_goal_verdicts():
    """benchmarks/quality.py's goal table: each verdict follows from the counts by arithmetic
    (19/20 = 95% meets the passkey goal, 18/20 does not; 6/6 stock vs 5/6 InfLLM is a 16.7-point
    gap, over 10; 4/6 at 8K vs 3/6 at 32K is 16.7 points lower; recall 2/4 vs 1.5/4 is 12.5)."""
    quality = _quality_script()
    S = evals.EvalSummary
    rows = {line.split(" | ")[1]: line for line in quality.goal_lines([
        S("m", "infllm", "passkey", 4096, 19, 20), S("m", "infllm", "passkey", 8192, 18, 20),
        S("m", "full", "multikey", 8192, 6, 6), S("m", "infllm", "multikey", 8192, 5, 6),
        S("m", "infllm", "multikey", 32768, 5, 6),
        S("m", "full", "vartrack", 8192, 0, 4, 2.0), S("m", "infllm", "vartrack", 8192, 0, 4, 1.5),
        S("m", "full", "kv", 8192, 4, 6), S("m", "infllm", "kv", 8192, 4, 6),
        S("m", "infllm", "kv", 32768, 3, 6)]) if line.startswith("| m |")}
    assert rows["passkey >= 95% at 4096 (InfLLM)"].endswith("| met |")
    assert rows["passkey >= 95% at 8192 (InfLLM)"].endswith("| **not met** |")
    assert rows["passkey >= 95% at 16384 (InfLLM)"].endswith("| not run yet |")
    assert rows["multikey: InfLLM within 10 points of stock at 8192"].endswith("| **not met** |")
    assert rows["multikey: InfLLM at 32768 no more than 10 points below 8192"].endswith("| met |")
    assert rows["kv: InfLLM within 10 points of stock at 8192"].endswith("| met |")
    assert rows["kv: InfLLM at 32768 no more than 10 points below 8192"].endswith("| **not met** |")
    # tasks with several answers on recall: 50% vs 37.5% is 12.5 points; 32K not run
    assert rows["vartrack: InfLLM within 10 points of stock at 8192"].endswith("| **not met** |")
    assert rows["vartrack: InfLLM at 32768 no more than 10 points below 8192"].endswith("| not run yet |")
    assert not any(k.startswith("multivalue") for k in rows)


def test_quality_goal_names_the_stock_drop_inside_a_long_trained_context():
    """Where the stock cache ran at 32K too (Gemma 3's trained context), the 32K goal row
    gives its number, and says the drop is the model's own only when full attention drops by
    more than 10 points from 8K and InfLLM stays within 10 of it at 32K: multivalue recall
    2/4 -> 1/4 with either cache (25 points, both); kv 4/6 -> 2/6 for InfLLM but 4/6 -> 4/6
    for stock (no such note); the verdict itself stays InfLLM 8K vs InfLLM 32K."""
    quality = _quality_script()
    S = evals.EvalSummary
    rows = {line.split(" | ")[1]: line for line in quality.goal_lines([
        S("m", "full", "multivalue", 8192, 0, 4, 2.0), S("m", "infllm", "multivalue", 8192, 0, 4, 2.0),
        S("m", "full", "multivalue", 32768, 0, 4, 1.0), S("m", "infllm", "multivalue", 32768, 0, 4, 1.0),
        S("m", "full", "kv", 8192, 4, 6), S("m", "infllm", "kv", 8192, 4, 6),
        S("m", "full", "kv", 32768, 4, 6), S("m", "infllm", "kv", 32768, 2, 6)]) if line.startswith("| m |")}
    mv = rows["multivalue: InfLLM at 32768 no more than 10 points below 8192"]
    assert "stock at 32768 recall 25% (4 prompts)" in mv and "the model's own loss" in mv
    assert mv.endswith("| **not met** |")
    kv = rows["kv: InfLLM at 32768 no more than 10 points below 8192"]
    assert "stock at 32768 67% (4/6)" in kv and "the model's own loss" not in kv
    assert kv.endswith("| **not met** |")
    # without a stock cell at 32K (SmolLM2) the row is as before
    assert "stock at 32768" not in quality.goal_lines([
        S("m", "infllm", "kv", 8192, 4, 6), S("m", "infllm", "kv", 32768, 2, 6)])[-2]
