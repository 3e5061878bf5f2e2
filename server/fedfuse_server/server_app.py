"""The ServerApp: phases chosen by the run config (``phase = "collect,fit,personalize"``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfuse.runconfig import RunConfig
from fedfuse_server.phases import run_phases


def build_server_app(**overrides: Any) -> ServerApp:
    """The ServerApp; ``overrides`` replace run-config keys (for tests and scripts)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedfuse_server").setLevel(logging.INFO)
        cfg = RunConfig.from_run_config(context.run_config, **overrides)
        if cfg.server_threads:
            torch.set_num_threads(cfg.server_threads)
        run_phases(grid, cfg, run=str(context.run_id))

    return app


app = build_server_app()
