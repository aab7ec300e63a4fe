"""``python -m unirec.serve serve=<environment>``: compose the config, load the newest model, serve HTTP.

Examples::

    python -m unirec.serve server.registry=models serve=home
    python -m unirec.serve server.registry=models "serve=[home,related,search,genre]" server.port=8080
    python -m unirec.serve --cfg job                  # print the composed config

Hydra composes here only; the app and the scorer take the typed config and never import Hydra.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from unirec.config import conf_dir
from unirec.serve.config import ServeConfig, ServerConfig, register_serve_configs

register_serve_configs()


def serve(cfg: ServeConfig) -> None:
    """Build the app and run uvicorn until interrupted."""
    import torch
    import uvicorn

    from unirec.memory import keep_freed_memory
    from unirec.serve.app import create_app

    torch.set_num_threads(cfg.server.torch_threads)
    if cfg.server.keep_freed_memory:
        keep_freed_memory()
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, **uvicorn_options(cfg.server))


def uvicorn_options(server: ServerConfig) -> dict:
    """uvicorn's options for this server: protocols, logging, and the connection limits.

    The HTTP protocol is uvicorn's own with read deadlines, a head size limit and a connection cap added
    (:mod:`unirec.serve.connections`): uvicorn alone keeps idle and half-sent connections for ever.
    """
    from unirec.serve.connections import ConnectionLimits, limited_protocol

    protocols = fast_protocols()
    limits = ConnectionLimits(
        header_timeout_s=server.header_timeout_s,
        body_timeout_s=server.body_timeout_s,
        keep_alive_s=server.keep_alive_s,
        max_connections=server.max_connections,
        max_head_bytes=server.max_head_bytes,
    )
    return {
        "http": limited_protocol(protocols["http"], limits),
        "loop": protocols["loop"],
        "log_level": server.log_level,
        "access_log": False,
        "timeout_keep_alive": server.keep_alive_s,
        "h11_max_incomplete_event_size": server.max_head_bytes,
    }


def fast_protocols() -> dict:
    """uvicorn's C HTTP parser and event loop (the ``serve`` extra) where installed, else its pure-Python ones.

    Named here rather than left to uvicorn's "auto". Measured on the 2-core box at 1000 candidates (~7 kB in,
    ~55 kB out), they save about 0.1 ms a request over h11 + asyncio: the HTTP layer is not the big cost.
    """
    import importlib.util

    has = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
    return {
        "http": "httptools" if has("httptools") else "h11",
        "loop": "uvloop" if has("uvloop") else "asyncio",
    }


@hydra.main(config_path=conf_dir(), config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, ServeConfig)
    serve(config)


if __name__ == "__main__":
    main()
