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
from unirec.serve.config import ServeConfig, register_serve_configs

register_serve_configs()


def serve(cfg: ServeConfig) -> None:
    """Build the app and run uvicorn until interrupted."""
    import torch
    import uvicorn

    from unirec.serve.app import create_app

    torch.set_num_threads(cfg.server.torch_threads)
    app = create_app(cfg)
    uvicorn.run(
        app,
        host=cfg.server.host,
        port=cfg.server.port,
        log_level=cfg.server.log_level,
        access_log=False,
        **fast_protocols(),
    )


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
