"""The pyllama-inf command line."""

import json
import subprocess
import sys

import pyllama_inf as pi
from pyllama_inf.cli import main


def test_inspect_json(tiny_model, capsys):
    assert main(["inspect", tiny_model, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["n_layer"] == 2
    assert info["kv_bytes_per_token_f16"] == 2 * 2 * (16 + 16) * 2


def test_generate_prints_text_and_stats(tiny_model, capsys):
    rc = main(["generate", "-m", tiny_model, "-p", "hello", "-n", "5", "--temp", "0", "--ctx", "128", "-t", "1"])
    out = capsys.readouterr()
    assert rc == 0
    assert "5 generated" in out.err
    # the same text as the API gives for the same settings (the CLI adds one newline)
    with pi.Model(tiny_model, n_ctx=128, n_threads=1) as m:
        want = m.generate("hello", max_tokens=5, temperature=0).text
    assert out.out == want + "\n"


def test_stream_and_plain_print_the_same_text(smollm2, capsys):
    args = ["generate", "-m", smollm2, "-p", "The capital of France is", "-n", "12", "--temp", "0",
            "--ctx", "256", "-t", "2"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert "Paris" in plain


def test_errors_exit_non_zero_with_a_message(tmp_path, capsys):
    assert main(["generate", "-m", str(tmp_path / "missing.gguf"), "-p", "x"]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 1
    assert "error" in capsys.readouterr().err


def test_unsupported_config_is_refused_clearly(tmp_path, capsys):
    from pyllama_inf.testing import write_random_llama
    hd32 = write_random_llama(tmp_path / "hd32.gguf", n_head=2, n_head_kv=2)   # heads of 32 values
    # the InfLLM cache stores f16, f32, q8_0 or q4_0; q5_0 is a stock cache type it refuses
    assert main(["generate", "-m", str(hd32), "-p", "x", "--kv", "infllm", "--ctx", "256",
                 "-ctk", "q5_0"]) == 1
    assert "K cache type q5_0 is not supported" in capsys.readouterr().err


def test_console_script_runs_as_a_module(tiny_model):
    res = subprocess.run([sys.executable, "-m", "pyllama_inf.cli", "inspect", tiny_model],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "llama" in res.stdout
