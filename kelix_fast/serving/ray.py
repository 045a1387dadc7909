"""Scale-out on Ray Serve: the same OpenAI-compatible app, one full engine per replica, behind Ray
Serve's router.

Each replica builds its own models and app (:func:`~kelix_fast.serving.server.build_pipeline`,
:func:`~kelix_fast.serving.openai_api.build_app`) when Ray starts it, so nothing large is pickled, and
runs its own engine core: continuous batching happens inside a replica, Ray spreads requests over
replicas. Started by ``kelix-fast serve --ray --replicas N`` or by Ray's own command, with the options
of ``kelix-fast serve`` as ``key=value`` arguments (dashes or underscores)::

    serve run kelix_fast.serving.ray:app tiny=true replicas=2 port=8000
    serve run kelix_fast.serving.ray:app ar=/ckpt/Kelix-SFT dit=/ckpt/Kelix-DiT vae=/ckpt/vae \\
        max_condition_length=720 replicas=4 num_gpus=1

Several machines: start a Ray cluster (``ray start --head`` on one node, ``ray start
--address=<head>:6379`` on the others, each with its GPUs), then run the command above on the head
node: the replicas (``num_gpus=1`` each) are placed on the cluster's GPUs and the head's HTTP proxy (or
one per node, ``proxy_location="EveryNode"``) routes to them. Checkpoint directories must exist at the
same path on every node.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ray import serve

from kelix_fast.options import EngineOptions
from kelix_fast.serving.openai_api import build_app
from kelix_fast.serving.server import build_pipeline, served_model_name
from kelix_fast.weights import parse_dtype

__all__ = ["RayServeOptions", "app", "build_ray_app", "run_ray"]


@dataclass(frozen=True)
class RayServeOptions:
    """What a replica builds and how many there are (the options of ``kelix-fast serve``)."""

    ar: str | None = None
    dit: str | None = None
    vae: str | None = None
    tiny: bool = False
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # "bfloat16", "float32", ...: kelix_fast.weights.parse_dtype
    max_condition_length: int | None = None
    model_name: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_context: int | None = None
    max_render_batch: int = 8
    api_key: str | None = None
    replicas: int = 1
    num_gpus: float = 0.0  # per replica; 1 on a GPU cluster
    engine: EngineOptions = dataclasses.field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        if not self.tiny and self.ar is None:
            raise ValueError("ray serve: give ar= (a Kelix-SFT directory) or tiny=true")
        for name in ("replicas", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ray serve: {name} must be an int >= 1, got {value!r}")


@serve.deployment
@serve.ingress()
class KelixReplica:
    """One replica: a full kelix_fast engine and its app, built on the replica's worker."""

    def __init__(self, options: RayServeOptions) -> None:
        self.options = options

    def __serve_build_asgi_app__(self) -> Any:
        o = self.options
        pipeline = build_pipeline(
            ar=o.ar,
            dit=o.dit,
            vae=o.vae,
            tiny=o.tiny,
            seed=o.seed,
            device=o.device,
            dtype=None if o.dtype is None else parse_dtype(o.dtype),
            model_max_length=o.max_condition_length,
            options=o.engine,
        )
        return build_app(
            pipeline,
            model_name=o.model_name or served_model_name(tiny=o.tiny, ar=o.ar),
            max_batch=o.max_batch,
            max_queue=o.max_queue,
            max_context=o.max_context,
            max_render_batch=o.max_render_batch,
            api_key=o.api_key,
        )


def build_ray_app(options: RayServeOptions) -> serve.Application:
    """The Ray Serve application: ``options.replicas`` replicas of :class:`KelixReplica`."""
    deployment = KelixReplica.options(
        num_replicas=options.replicas, ray_actor_options={"num_gpus": options.num_gpus}
    )
    return deployment.bind(options)


def run_ray(options: RayServeOptions, *, host: str, port: int, address: str | None = None) -> None:
    """``kelix-fast serve --ray``: serve the app on ``host:port`` until interrupted, then shut Serve down.

    ``address``: a running Ray cluster to join (``"auto"``, or ``host:6379``); None starts a local Ray
    instance bound to the loopback interface, without its dashboard and without usage reporting (a
    single machine needs neither, and nothing should leave it).
    """
    import ray

    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, ignore_reinit_error=True)
    else:
        ray.init(address=address, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_ray_app(options), name="kelix_fast", route_prefix="/", blocking=True)
    finally:
        serve.shutdown()


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def app(args: dict[str, str]) -> serve.Application:
    """The application builder of ``serve run kelix_fast.serving.ray:app key=value ...``."""
    fields = {f.name: f for f in dataclasses.fields(RayServeOptions)}
    values: dict[str, Any] = {}
    for key, text in args.items():
        name = key.replace("-", "_")
        if name not in fields or name == "engine":
            raise ValueError(f"ray serve: unknown option {key!r}; options are {sorted(fields)}")
        values[name] = _parse(name, text, fields[name].type)
    return build_ray_app(RayServeOptions(**values))


def _parse(name: str, text: str, annotation: str) -> Any:
    """One ``key=value`` argument, by the field's annotation."""
    try:
        if annotation == "bool":
            return _FLAGS[text.lower()]
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except (KeyError, ValueError):
        raise ValueError(f"ray serve: {name} must be a {annotation}, got {text!r}") from None
    return text
