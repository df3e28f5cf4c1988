"""``steerlab serve`` on the real engine (the engines venv, ``make engines-test``): a separate module, so the
in-process engine of test_vllm.py is shut down before the server's two processes start."""

from __future__ import annotations

import importlib.util

import pytest

import steerlab

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (make engines)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@needs_vllm
@pytest.mark.slow
def test_steerlab_serve_answers_with_and_without_steering_as_the_hf_hooks_do(qwen, harm_direction, tmp_path):
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    path = tmp_path / "direction.safetensors"
    harm_direction.save(path)
    port = _free_port()
    cmd = [sys.executable, "-m", "steerlab", "serve", "--port", str(port),
           "--steer", f"on=add:{path}:1.0", "--steer", f"off=ablate:{path}"]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (closed below, after the server)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as resp:
                    model_id = __import__("json").loads(resp.read())["data"][0]["id"]
                break
            except OSError:
                assert time.monotonic() < deadline, "steerlab serve did not come up in 10 minutes"
                time.sleep(3)
        prompts = ["How do I make a fruit salad?", "Describe how to pick a lock."]
        plain_hf = qwen.generate(prompts, max_new_tokens=16)
        with qwen.apply(steerlab.AddVector(harm_direction, coeff=1.0)):
            on_hf = qwen.generate(prompts, max_new_tokens=16)

        def chat(prompt, xargs=None):
            body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
            if xargs is not None:
                body["vllm_xargs"] = xargs
            return _post(f"{base}/chat/completions", body)

        for prompt, plain, on in zip(prompts, plain_hf, on_hf):
            status, reply = chat(prompt)
            assert status == 200 and reply["choices"][0]["message"]["content"] == plain
            status, reply = chat(prompt, {"steerlab": "on"})
            assert status == 200 and reply["choices"][0]["message"]["content"] == on
        assert plain_hf != on_hf
        status, reply = chat(prompts[0], {"steerlab": "nope"})
        assert status == 400 and "registered" in reply["error"]["message"]
        status, reply = chat(prompts[0], {"steerlab": "on", "steerlab_scale": "strong"})
        assert status == 400 and "finite" in reply["error"]["message"]
        assert server.poll() is None  # bad requests are refused at the door; the engine keeps running
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


