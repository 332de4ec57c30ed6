"""``serve(cfg)``: load the model and run the OpenAI-compatible server with uvicorn until interrupted."""

from __future__ import annotations

import ipaddress
import sys

from nemo_customizer.config import Config


def serve(cfg: Config) -> None:
    """Serve ``cfg.model`` (plus the adapters of ``cfg.serving.adapters_dir``) on ``serving.host:serving.port``."""
    import uvicorn

    from nemo_customizer.serving.app import create_app
    from nemo_customizer.serving.service import build_service

    service = build_service(cfg)
    settings = service.settings
    try:
        names = service.registry.model_ids()
        print(f"serving {', '.join(names)} on http://{settings.host}:{settings.port}/v1 "
              f"(API key {'required' if service.api_key else 'not required'})", file=sys.stderr, flush=True)
        if service.api_key is None and not _is_loopback(settings.host):
            print(f"warning: serving.host={settings.host} is reachable from other machines and no API key is set; "
                  "set serving.api_key or $NEMO_CUSTOMIZER_API_KEY", file=sys.stderr, flush=True)
        uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level=settings.log_level)
    finally:
        service.close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
