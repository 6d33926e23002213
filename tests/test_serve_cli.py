"""``scalestack serve`` as users run it: on a run directory that ``scalestack train`` wrote, as its own
process; SIGTERM lets the response in flight finish before the process exits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

from serve_helpers import free_port  # noqa: E402

from scalestack.cli.main import main  # noqa: E402


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a scalestack run directory" in err
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--kv-budget", "lots"])
    assert "not a size" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-batch", "0"]) == 2


@pytest.mark.slow
def test_serve_a_trained_run_and_shut_down_gracefully(tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(f'run_dir = "{run_dir}"\n[model]\nname = "gpt-tiny"\n[data]\nseq_len = 512\n'
                      "[train]\nsteps = 2\nglobal_batch = 2\nmicro_batch = 2\ntensorboard = false\n")  # fmt: skip
    subprocess.run([sys.executable, "-m", "scalestack.cli.main", "train", str(config)], check=True, timeout=300,
                   capture_output=True)  # fmt: skip
    assert json.loads((run_dir / "model.json").read_text())["architecture"] == "gpt"
    port = free_port()
    command = [sys.executable, "-m", "scalestack.cli.main", "serve", str(run_dir), "--port", str(port),
               "--model-name", "tiny"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        first = client.responses.create(model="tiny", input="Once upon a time", max_output_tokens=8, temperature=0)
        assert first.usage.output_tokens == 8
        with client.responses.stream(model="tiny", input="Tell a long story", max_output_tokens=400,
                                     temperature=0) as stream:  # fmt: skip
            kinds = []
            for event in stream:
                kinds.append(event.type)
                if kinds.count("response.output_text.delta") == 1 and event.type == "response.output_text.delta":
                    server.send_signal(signal.SIGTERM)  # mid-response
        assert kinds[-1] in ("response.incomplete", "response.completed")  # finished, not cut off
        assert kinds.count("response.output_text.delta") > 1
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert "finishing 1 response(s) in flight" in server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()
