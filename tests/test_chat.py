"""Chat: the model's own template, turns that reuse the context, OpenAI-style completions,
the streaming iterator and the ``pyllama-inf chat`` command."""

import os
import re
import subprocess
import sys

import pytest

import pyllama_inf as pi

# SmolLM2's GGUF carries a ChatML template: each turn is "<|im_start|>{role}\n{content}<|im_end|>\n"
# and the assistant's answer starts after "<|im_start|>assistant\n" (the ChatML format itself)
CHATML = "<|im_start|>{}\n{}<|im_end|>\n"


@pytest.fixture(scope="module")
def smol(smollm2):
    with pi.Model(smollm2, n_ctx=4096, n_threads=2, n_ubatch=128) as m:
        yield m


def test_the_models_template_formats_chatml(smol):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = CHATML.format("system", "Be brief.") + CHATML.format("user", "Hi there")
    assert smol.apply_chat_template(msgs) == want + "<|im_start|>assistant\n"
    assert smol.apply_chat_template(msgs, add_generation_prompt=False) == want


def test_a_named_template_overrides_the_models(smol):
    # Llama 3's turn format: header ids around the role, two newlines, the content, <|eot_id|>
    got = smol.apply_chat_template([{"role": "user", "content": "Hi"}], template="llama3")
    assert got == ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_bad_messages_and_templates_raise(smol, tiny_model):
    for bad in ("hi", [{"content": "x"}], [{"role": "user", "content": 3}], [], [{"role": "u", "content": "a\0b"}]):
        with pytest.raises((TypeError, ValueError)):
            smol.apply_chat_template(bad)
    with pytest.raises(pi.UnsupportedError):
        smol.apply_chat_template([{"role": "user", "content": "x"}], template="{{ no template llama.cpp knows }}")
    with pi.Model(tiny_model, n_ctx=256, n_threads=1) as m:
        with pytest.raises(ValueError, match="no chat template"):
            m.apply_chat_template([{"role": "user", "content": "x"}])


def test_turns_reuse_the_conversation(smol):
    notes = " ".join(f"Note {i}: the museum opens at {8 + i % 4} o'clock." for i in range(40))
    msgs = [{"role": "system", "content": f"You answer questions about these notes. {notes}"},
            {"role": "user", "content": "What is the capital of France? Answer in one word."}]
    smol.reset()
    first = smol.chat(msgs, max_tokens=16, temperature=0)
    assert first.n_reused_tokens == 0 and first.text.strip()
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And of Italy?"}]
    second = smol.chat(msgs, max_tokens=16, temperature=0)
    # everything before the answer's last chunk boundary comes from the context
    assert second.n_reused_tokens >= (first.n_prompt_tokens // 128) * 128 > 0
    assert second.timings.prompt_tokens == second.n_prompt_tokens - second.n_reused_tokens


def test_chat_completion_dicts(smol):
    msgs = [{"role": "user", "content": "Say hello."}]
    out = smol.create_chat_completion(msgs, max_tokens=12, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 12
    chunks = list(smol.create_chat_completion(msgs, max_tokens=12, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]


def test_a_stream_is_one_iterator(smol):
    prompt = CHATML.format("user", "Count from one to ten.") + "<|im_start|>assistant\n"
    full = smol.generate(prompt, max_tokens=24, temperature=0)
    stream = smol.generate(prompt, max_tokens=24, temperature=0, stream=True)
    assert iter(stream) is stream
    first = next(stream)
    rest = [piece for piece in stream]      # continues; does not cancel
    assert first + "".join(rest) == full.text
    assert stream.result.tokens == full.tokens
    assert list(stream) == [] and next(stream, None) is None   # exhausted stays exhausted, at once


def test_closing_a_stream_stops_it_and_the_model_stays_usable(smol):
    prompt = CHATML.format("user", "Write a long story.") + "<|im_start|>assistant\n"
    with smol.generate(prompt, max_tokens=200, temperature=0, stream=True) as stream:
        next(stream)
    assert stream.result is None and list(stream) == []
    assert len(smol.generate(prompt, max_tokens=3, temperature=0).tokens) == 3


def _cli(args, stdin="", timeout=600):
    return subprocess.run([sys.executable, "-m", "pyllama_inf.cli"] + args, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_cli_chat_reads_the_document_once_and_answers_from_the_context(smollm2, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret code of the vault is 4711. " + "The weather was mild that year. " * 60)
    state = tmp_path / "doc.state"
    args = ["chat", "-m", smollm2, "-c", "4096", "-t", "2", "-ub", "128", "-f", str(doc), "--temp", "0", "-n", "16",
            "--state", str(state)]
    r = _cli(args, stdin="What is the secret code of the vault?\nRepeat the code.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "4711" in r.stdout
    lines = [line for line in r.stderr.splitlines() if "prompt tokens evaluated" in line]
    assert len(lines) == 2
    kept = [int(re.search(r"(\d+) kept", line).group(1)) for line in lines]
    assert min(kept) > 300          # the document was not evaluated again for either question
    assert "context saved" in r.stderr and state.is_file()
    again = _cli(args, stdin="What is the secret code of the vault?\n")
    assert again.returncode == 0, again.stderr
    assert "context loaded" in again.stderr and "4711" in again.stdout


def test_cli_refuses_infllm_flags_without_the_infllm_cache(smollm2):
    r = _cli(["generate", "-m", smollm2, "-p", "hi", "--kv-budget", "64MiB", "--topk", "4"])
    assert r.returncode == 1
    assert "--topk, --kv-budget apply to the InfLLM cache only" in r.stderr


def test_cli_chat_on_a_terminal(smollm2, tmp_path):
    """The chat under a pseudo-terminal (stdin, stdout and stderr a tty, as a user runs it):
    the progress bar of the document, the prompt, a streamed answer, /exit."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    doc = tmp_path / "doc.txt"
    doc.write_text("The secret code of the vault is 4711. " + "The weather was mild that year. " * 150)
    master, slave = pty.openpty()
    # a terminal of 24 x 80 (a new pseudo-terminal has 0 columns, where tqdm draws nothing)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "pyllama_inf.cli", "chat", "-m", smollm2, "-c", "4096", "-t", "2",
                             "-ub", "128", "-f", str(doc), "--temp", "0", "-n", "16"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 300) -> None:
        nonlocal seen
        end = time.time() + timeout
        while marker not in seen and time.time() < end:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert marker in seen, seen[-2000:]

    try:
        read_until(b"> ")
        os.write(master, b"What is the secret code of the vault?\n")
        read_until(b"kept;")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode("utf-8", "replace")
    assert re.search(r"prompt: +\d+%\|", text), text[-2000:]     # the progress bar over the document
    assert "4711" in text
