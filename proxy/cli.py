"""The `ccproxy` command: serve, demo."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from . import config

log = logging.getLogger("ccproxy")


def _serve(args: argparse.Namespace) -> int:
    from .serving import default_workers, serve

    settings = config.load(config_file=args.config)
    if not settings.api_keys and not args.no_auth:
        print(
            "ccproxy: refusing to serve without API keys: set CCPROXY_API_KEYS "
            "(or pass --no-auth to serve without authentication)",
            file=sys.stderr,
        )
        return 2
    if args.workers:
        settings = settings.replace(workers=args.workers)
    else:
        settings = settings.replace(workers=default_workers())
    log.info("ccproxy listening on http://%s:%s (auth %s)", args.host, args.port,
             "on" if settings.api_keys else "off")
    serve(settings, args.host, args.port, args.workers)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .sandbox import stack
    from .serving import serve

    user_settings = config.load()
    if not _is_loopback(args.host) and not user_settings.api_keys:
        print("ccproxy: the demo is open without keys, so it only listens on loopback; "
              "set CCPROXY_API_KEYS to listen on another address", file=sys.stderr)
        return 2
    sandboxes = stack.start("127.0.0.1")
    for name, server in sandboxes.servers.items():
        log.info("sandbox %s upstream listening on %s", name, server.url)
    # The user's settings (keys, TTLs...) with the upstreams wired to the sandboxes.
    settings = user_settings.replace(**sandboxes.proxy_settings())
    base = f"http://{args.host}:{args.port}"
    log.info("ccproxy demo listening on %s", base)
    log.info(
        "try: curl '%s/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId,testRecId2'",
        base,
    )
    try:
        serve(settings, args.host, args.port, args.workers)
    finally:
        sandboxes.stop()
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccproxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy on gunicorn")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=None, help="default: one per core")
    serve.add_argument("--config", default=None, help="TOML settings file (else CCPROXY_CONFIG)")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve without inbound API keys (only behind your own gateway)")
    serve.set_defaults(run=_serve)

    demo = sub.add_parser("demo", help="run the proxy wired to built-in sandbox upstreams")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--workers", type=int, default=None)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except config.SettingsError as exc:
        print(f"ccproxy: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
