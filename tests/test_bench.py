"""pyllama_inf.bench and `pyllama-inf bench`: a small grid end to end, the outputs, failing rows."""

import json

import pytest

import pyllama_inf as pi
from pyllama_inf import bench
from pyllama_inf.cli import main

SMALL = pi.InfLLMConfig(block_size=16, n_init=16, n_local=64, topk=2)


@pytest.fixture(scope="module")
def grid(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = bench.compare([tiny_model], budgets=["full", "full-host", "infllm", "8MiB", "1KiB"],
                         contexts=[256, 512], passkey_trials=1, depths=[0.5], n_gen=8, threads=1,
                         infllm=SMALL, out=out, progress=False)
    return rows, out


def test_grid_runs_end_to_end_and_writes_every_output(grid):
    rows, out = grid
    assert len(rows) == 5 * 2
    for name in ("results.json", "results.md", "decode_vs_context.png", "device_memory_vs_context.png",
                 "passkey_vs_context.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "decode_vs_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert md.count("\n| tiny.gguf |") == len(rows)


def test_results_json_schema(grid):
    rows, out = grid
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["contexts"] == [256, 512] and doc["meta"]["llama.cpp"] == pi.UPSTREAM_COMMIT
    assert len(doc["rows"]) == len(rows)
    for r in doc["rows"]:
        assert set(bench.ROW_KEYS) <= set(r)
        assert r["status"] in ("ok", "skipped", "failed")
        if r["status"] == "ok":
            assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_s"] > 0
            assert r["device_kv_bytes"] > 0 and r["host_kv_bytes"] >= 0
            assert 0.0 <= r["passkey_acc"] <= 1.0 and r["passkey_trials"] == 1
        else:
            assert r["reason"] and r["prefill_tok_s"] is None


def test_rows_measure_what_their_budget_says(grid):
    rows, _ = grid
    by = {(r.budget, r.context): r for r in rows}
    full, inf = by[("full", 512)], by[("8MiB", 512)]
    assert full.status == inf.status == "ok"
    assert full.kv == "full" and full.host_kv_bytes == 0 and full.hit_rate is None
    assert inf.kv == "infllm" and inf.budget_bytes == 8 << 20
    # 8 MiB holds every block of the tiny model at 512 tokens: all on the device, no host store
    assert inf.device_kv_bytes <= 8 << 20 and inf.host_kv_bytes == 0 and inf.hit_rate == 1.0
    assert by[("infllm", 512)].status == "ok" and by[("infllm", 512)].budget_bytes is None


def test_rows_that_cannot_run_are_recorded_with_a_reason(grid):
    rows, _ = grid
    by = {(r.budget, r.context): r for r in rows}
    small = by[("1KiB", 256)]
    assert small.status == "failed" and "below the minimum" in small.reason
    host = by[("full-host", 256)]   # CPU-only run: nothing to keep off a GPU
    assert host.status == "skipped" and "no layers on a GPU" in host.reason


def test_bad_grids_are_refused_before_running(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        bench.compare([tiny_model], budgets=["lots"], contexts=[256], progress=False)
    with pytest.raises(FileNotFoundError):
        bench.compare([str(tmp_path / "missing.gguf")], progress=False)
    with pytest.raises(ValueError, match="depths"):
        bench.compare([tiny_model], contexts=[256], depths=[1.5], progress=False)


def test_cli_bench(tiny_model, tmp_path, capsys):
    rc = main(["bench", "-m", tiny_model, "--budgets", "full,8MiB", "--contexts", "256", "--passkey-trials", "0",
               "--n-gen", "4", "-t", "1", "--n-local", "64", "--n-init", "16", "--block-size", "16", "--topk", "2",
               "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["budget"] for r in doc["rows"]] == ["full", "8MiB"]
    assert all(r["status"] == "ok" and r["passkey_acc"] is None for r in doc["rows"])
    assert "| tiny.gguf | 8MiB | 256 |" in capsys.readouterr().out
    assert main(["bench", "-m", tiny_model, "--contexts", "2k", "--out", str(tmp_path)]) == 1


def test_missing_matplotlib_is_said_not_silent(tiny_model, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rc = main(["bench", "-m", tiny_model, "--budgets", "full", "--contexts", "256", "--passkey-trials", "0",
               "--n-gen", "2", "-t", "1", "--out", str(tmp_path)])
    assert rc == 0 and not list(tmp_path.glob("*.png")) and (tmp_path / "results.json").is_file()
    assert "plots skipped: matplotlib is not installed (pip install 'pyllama-inf[bench]')" in capsys.readouterr().err


def test_second_model_is_smollm2_requantized(smollm2):
    from pathlib import Path
    from pyllama_inf.testing import smollm2_requantized
    path = smollm2_requantized("Q8_0")
    assert path == smollm2_requantized("Q8_0")           # made once, then reused
    info, base = pi.inspect(path), pi.inspect(smollm2)
    assert info.n_layer == base.n_layer and Path(path).stat().st_size > 1.3 * Path(smollm2).stat().st_size
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    with pi.Model(str(path), n_ctx=256, n_threads=2) as m:
        assert "Paris" in m.generate(prompt, max_tokens=16, temperature=0).text
