"""``steerlab serve``: vLLM's OpenAI-compatible server, each request steered by a registered intervention.

A request chooses its steering in vLLM's ``vllm_xargs`` field (an OpenAI client's ``extra_body``)::

    {"model": "qwen", "messages": [...], "vllm_xargs": {"steerlab": "refusal-off", "steerlab_scale": 1.0}}

Requests without it run plain. :class:`SteeringMiddleware` (an ASGI middleware vLLM loads through its
``--middleware`` option) answers 400 for an unknown name or a scale that is not a finite number, and gives every
steered request a ``cache_salt`` naming its steering, so prefix caching stays on and is never shared between
differently steered requests. The hooks are the offline engine's (:mod:`steerlab.backends.vllm_worker`), installed
on every worker through ``collective_rpc`` once the engine is up. Unlike :class:`~steerlab.backends.vllm.VLLMEngine`,
the server does not check after each request that every step acted: register interventions on ``tokens="all"``
(all that ``steerlab serve`` builds), which act on every forward pass their request is in.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlab import compat
from steerlab.backends import vllm_worker
from steerlab.backends.vllm import checkpoint_of, install_args
from steerlab.errors import InvalidValueError
from steerlab.plan import resolve_plans

if TYPE_CHECKING:
    from steerlab.model import Model

REGISTRY_ENV = "STEERLAB_SERVE_STEERING"  # {name: version} of the registered steerings, for the middleware


def steer_request(body: dict[str, Any], registry: Mapping[str, str]) -> str | None:
    """Check a request body's steering and salt its prefix cache (in place); returns the problem, or ``None``.

    Example:
        >>> body = {"vllm_xargs": {"steerlab": "up", "steerlab_scale": 2}}
        >>> steer_request(body, {"up": "v1"}), body["cache_salt"].startswith("steerlab-")
        (None, True)
        >>> steer_request({"vllm_xargs": {"steerlab": "down"}}, {"up": "v1"})
        "no steering named 'down' is registered on this server; registered: ['up']"
    """
    xargs = body.get("vllm_xargs")
    if not isinstance(xargs, dict) or vllm_worker.STEER_KEY not in xargs:
        return None
    name = xargs[vllm_worker.STEER_KEY]
    if name not in registry:
        return f"no steering named {name!r} is registered on this server; registered: {sorted(registry)}"
    scale = xargs.get(vllm_worker.SCALE_KEY, 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        return f"{vllm_worker.SCALE_KEY} must be a finite number, got {scale!r}"
    body["cache_salt"] = vllm_worker.cache_salt(name, scale, registry[name], str(body.get("cache_salt", "")))
    return None


class SteeringMiddleware:
    """ASGI middleware: POST bodies pass through :func:`steer_request`; a bad steering gets a 400 JSON error."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.registry: dict[str, str] = json.loads(os.environ.get(REGISTRY_ENV, "{}"))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            problem = steer_request(data, self.registry)
            if problem is not None:
                await _reply(send, 400, {"error": {"message": problem, "type": "BadRequestError", "code": 400}})
                return
            body = json.dumps(data).encode()
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app(dict(scope, headers=headers), replay, send)


async def _reply(send: Any, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": data})


def serve(
    model: Model,
    interventions: Mapping[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: str | None = None,
    checkpoint: str | Path | None = None,
    kv_cache_bytes: int = 1 << 30,
    max_model_len: int = 2048,
    log: Any = print,
) -> None:
    """Serve ``model`` with vLLM's OpenAI-compatible server, ``interventions`` chosen per request (blocks)."""
    if not isinstance(interventions, Mapping) or not interventions:
        raise InvalidValueError("serve needs at least one named intervention: {name: AddVector(...) / Ablate(...)}")
    plans = {name: plan for name, plan in zip(interventions, resolve_plans(model, list(interventions.values())))}
    partial = [name for name, plan in plans.items() if any(step.tokens != "all" for step in plan.steps)]
    if partial:
        raise InvalidValueError(
            f"{partial}: the server cannot check per request that a tokens='prompt'/'generated' edit acted; "
            "serve interventions on tokens='all' (or use VLLMEngine, which checks)"
        )
    args = install_args(model, plans)  # raises for interventions the engine cannot render, before vLLM starts
    os.environ[REGISTRY_ENV] = json.dumps({name: uuid.uuid4().hex for name in plans})
    path = Path(checkpoint).expanduser() if checkpoint is not None else checkpoint_of(model)
    argv = [
        "--model", str(path), "--served-model-name", served_name or model.name or path.name,
        "--dtype", str(model.dtype).removeprefix("torch."), "--enforce-eager", "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(kv_cache_bytes), "--host", host, "--port", str(port),
        "--worker-extension-cls", vllm_worker.WORKER_EXTENSION,
        "--middleware", f"{__name__}.{SteeringMiddleware.__name__}",
    ]  # fmt: skip

    async def install(client: Any) -> None:
        hooked = await client.collective_rpc("steerlab_install", args=args)
        log(f"steerlab: {', '.join(sorted(plans))} registered ({hooked} hooked places per worker); "
            f"choose one per request with \"vllm_xargs\": {{\"steerlab\": NAME, \"steerlab_scale\": 1.0}}")  # fmt: skip

    compat.run_vllm_openai_server(argv, prepare=install)
