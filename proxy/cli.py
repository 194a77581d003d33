"""The `ccproxy` command: serve, demo, warm, check, outbox, simulate-send."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from . import config
from .errors import CannotListen, ScenarioError, WarmRefused
from .fallbacks import load_fallbacks
from .outbox import STATES as OUTBOX_STATES

log = logging.getLogger("ccproxy")



def _name_value(text: str) -> tuple[str, str]:
    """`--param NAME=VALUE`, refused by argparse with a usage line when it is not that."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value

def _workers(args: argparse.Namespace, settings: config.Settings) -> int:
    """`--workers`, else CCPROXY_WORKERS when the operator set it, else one per core."""
    from .serving import default_workers

    if args.workers:
        return int(args.workers)
    return settings.workers if config.is_set("workers", getattr(args, "config", None)) else default_workers()


def _serve(args: argparse.Namespace) -> int:
    from .serving import listen, serve

    settings = config.load(config_file=args.config)
    load_fallbacks(settings.fallbacks_file)  # a file that cannot work stops start-up, before workers
    if not settings.api_keys and not args.no_auth:
        print(
            "ccproxy: refusing to serve without API keys: set CCPROXY_API_KEYS "
            "(or pass --no-auth to serve without authentication)",
            file=sys.stderr,
        )
        return 2
    settings = settings.replace(workers=_workers(args, settings))
    listener = listen(args.host, args.port)  # a busy port is the one line it prints
    warning = link_secret_warning(settings)
    if warning:
        log.warning(warning)
    auth = "on" if settings.api_keys else "off"
    serve(settings, listener, settings.workers, on_ready=lambda: log.info(
        "ccproxy listening on http://%s:%s (auth %s)", args.host, args.port, auth))
    return 0


def link_secret_warning(settings: config.Settings) -> str:
    """What start-up and `ccproxy check` say when pixels and consent links are not signed."""
    if settings.link_secret:
        return ""
    if settings.allow_unsigned_pixel:
        return ("CCPROXY_LINK_SECRET is not set and CCPROXY_ALLOW_UNSIGNED_PIXEL=true: anyone can "
                "record opens for any user through pixel.gif; consent links are disabled")
    return ("CCPROXY_LINK_SECRET is not set: pixel.gif records nothing (unsigned pixels could be "
            "forged) and consent links are disabled")


def _demo(args: argparse.Namespace) -> int:
    from .sandbox import stack
    from .serving import listen, serve

    user_settings = config.load()
    if not _is_loopback(args.host) and not user_settings.api_keys:
        print("ccproxy: the demo is open without keys, so it only listens on loopback; "
              "set CCPROXY_API_KEYS to listen on another address", file=sys.stderr)
        return 2
    # Bind first: a busy port is one line, before any sandbox starts or anything is logged.
    listener = listen(args.host, args.port)
    sandboxes = stack.start("127.0.0.1")
    for name, server in sandboxes.servers.items():
        log.info("sandbox %s upstream listening on %s", name, server.url)
    # The user's settings (keys, TTLs...) with the upstreams wired to the sandboxes, and a
    # link secret for this run so consent links and pixels work out of the box.
    import secrets
    import shutil
    import tempfile

    # As `serve`: the rate limits are the deployment's, split over the workers it runs.
    # Its own outbox, removed at exit: the default file in the working directory is the one
    # `ccproxy serve` would later deliver, with the real mediarithmics token.
    outbox_dir = tempfile.mkdtemp(prefix="ccproxy-demo-")
    settings = user_settings.replace(
        **sandboxes.proxy_settings(), link_secret=user_settings.link_secret or secrets.token_urlsafe(32),
        workers=_workers(args, user_settings), outbox_path=os.path.join(outbox_dir, "outbox.sqlite3"),
    )
    base = f"http://{args.host}:{args.port}"

    def ready() -> None:
        log.info("ccproxy demo listening on %s", base)
        log.info("try: curl '%s/v1/amplitude/recommendations?user_id=testUser&rec_id=testRecId,testRecId2'",
                 base)

    master = os.getpid()
    try:
        serve(settings, listener, settings.workers, on_ready=ready)
    finally:
        sandboxes.stop()
        if os.getpid() == master:  # a worker ending passes here too (SystemExit), while others run
            shutil.rmtree(outbox_dir, ignore_errors=True)
    return 0


def _warm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import auth
    from .warm import ENDPOINTS, warm

    settings = config.load(config_file=args.config)
    _path, upstream = ENDPOINTS[args.endpoint]
    params = dict(args.param)
    if args.rec_id:
        params["rec_id"] = args.rec_id
    if args.flag_keys:
        params["flag_keys"] = args.flag_keys
    # Leave a tenth of the upstream's budget to live traffic.
    rate = args.rate or 0.9 * (settings.deployment_rate_limit(upstream) or 600)
    keys = auth.parse_keys(settings.api_keys)
    api_key = args.api_key or (keys[0] if keys else "")
    users = Path(args.users)
    if not users.is_file():
        print(f"ccproxy: {users} does not exist", file=sys.stderr)
        return 2
    print(f"warming {args.endpoint} through {args.url} at {rate:.0f} calls/minute", file=sys.stderr)
    try:
        summary = warm(args.url, args.endpoint, users, params, rate, api_key, args.concurrency)
    except KeyboardInterrupt:
        return 130
    except WarmRefused as refused:
        print(f"ccproxy: {refused}", file=sys.stderr)
        return 1
    print(
        f"done: {summary.fetched} fetched, {summary.not_found} not found, {summary.failed} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in summary.errors.items())})" if summary.errors else "")
        + (f"; resumed after {summary.skipped} rows" if summary.skipped else ""),
        file=sys.stderr,
    )
    return 1 if summary.failed else 0


def _check(args: argparse.Namespace) -> int:
    from .check import report, run_checks, warnings

    settings = config.load(config_file=args.config)  # a SettingsError names the bad setting
    load_fallbacks(settings.fallbacks_file)
    print("configuration: valid", file=sys.stdout)
    return report(run_checks(settings), sys.stdout, warnings(settings))


def _outbox(args: argparse.Namespace) -> int:
    from .outbox import Outbox

    settings = config.load(config_file=args.config)
    if not os.path.exists(settings.outbox_path):  # never an empty one made here, reported as "0 dead"
        print(f"ccproxy: no outbox at {os.path.abspath(settings.outbox_path)} (CCPROXY_OUTBOX_PATH; "
              "relative paths are from the directory ccproxy serve runs in)", file=sys.stderr)
        return 1
    outbox = Outbox(settings.outbox_path, settings.outbox_max_attempts, settings.outbox_max_backoff)
    if args.action == "purge":
        count = outbox.purge_dead(args.id)
        delivered = 0 if args.id else outbox.purge_delivered(settings.outbox_retention)
        print(f"purged {count} dead letter(s)" + (f" and {delivered} delivered write(s) past retention"
                                                   if delivered else ""))
        if args.id and not count:
            print(f"ccproxy: no dead letter with id {args.id}", file=sys.stderr)
        return 0 if count or not args.id else 1
    if args.action == "retry":
        retried = outbox.retry_dead(args.id)
        print(f"requeued {retried.requeued} dead letter(s)")
        for old in retried.skipped:
            print(f"skipped {old.id} ({old.kind}): superseded by the later write {old.by} "
                  f"({old.by_state}); sending it now would undo that one")
        if args.id and not retried.requeued and not retried.skipped:
            print(f"ccproxy: no dead letter with id {args.id}", file=sys.stderr)
        return 0 if retried.requeued or not args.id else 1
    counts = outbox.counts()
    print("outbox " + settings.outbox_path + ": " +
          ", ".join(f"{state} {counts.get(state, 0)}" for state in ("queued", "failed", "dead", "delivered")))
    for write in outbox.list_writes(args.state, args.limit):
        print(f"{write.id}  {write.state:<9} {write.kind:<8} attempts {write.attempts:<3} "
              f"{write.method} {write.path}  {write.last_error or ''}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    # Greenlets for bounded, cheap concurrency: patch sockets before the HTTP client loads.
    from gevent import monkey

    monkey.patch_all()
    import json
    from pathlib import Path

    from . import simulate

    if not args.liquid and not args.template:
        print("ccproxy: give the message as --liquid FILE and/or --template NAME", file=sys.stderr)
        return 2
    if (args.rate <= 0 or args.renders < 1 or args.concurrency < 1 or args.drain_timeout < 0
            or args.probe_seconds <= 0 or args.max_rate <= 0 or args.find_rate_budget <= 0
            or args.find_rate_recipients < 10):
        print("ccproxy: --rate, --renders, --concurrency, --probe-seconds, --max-rate and "
              "--find-rate-budget must be positive (--find-rate-recipients at least 10)", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    # The templates' snippets first, then the Liquid file's tags: one message.
    liquid = simulate.template_liquid(args.template, url, args.api_key) if args.template else ""
    if args.liquid:
        try:
            liquid += ("\n" if liquid else "") + Path(args.liquid).read_text(encoding="utf-8")
        except OSError as exc:
            raise ScenarioError(f"cannot read {args.liquid}: {exc}") from None
    sandboxes = {}
    if args.demo_log:
        try:
            sandboxes.update(simulate.sandboxes_from_log(Path(args.demo_log).read_text(errors="replace")))
        except OSError as exc:
            raise ScenarioError(f"cannot read {args.demo_log}: {exc.strerror}") from None
    for item in args.sandbox:
        name, _, sandbox_url = item.partition("=")
        sandboxes[name] = sandbox_url.rstrip("/")
    scenario = simulate.Scenario(
        url=url, liquid=liquid,
        recipients=simulate.read_recipients(Path(args.users) if args.users else None, args.recipients,
                                           args.id_prefix),
        rate=args.rate, renders=args.renders, api_key=args.api_key, concurrency=args.concurrency,
        sandboxes=sandboxes, faults=simulate.read_faults(Path(args.faults)) if args.faults else [],
        drain_timeout=args.drain_timeout)
    simulate.require_proxy(url)  # a send to nothing would read as a send with nothing aborted
    progress = None if args.no_progress else sys.stderr
    if args.find_rate:
        bounds = simulate.RateSearch(probe_seconds=args.probe_seconds, max_rate=args.max_rate,
                                     budget_s=args.find_rate_budget, max_recipients=args.find_rate_recipients)
        result = simulate.find_rate(scenario, bounds, progress=progress)
    else:
        result = simulate.run(scenario, progress=progress)
    print(json.dumps(result, indent=2) if args.json else simulate.table(result))
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

    check = sub.add_parser("check", help="validate settings and probe each configured upstream once")
    check.add_argument("--config", default=None, help="TOML settings file (else CCPROXY_CONFIG)")
    check.set_defaults(run=_check)

    outbox = sub.add_parser("outbox", help="list the outbox (dead letters by default), retry or purge dead letters")
    outbox.add_argument("action", nargs="?", choices=("list", "retry", "purge"), default="list")
    outbox.add_argument("id", nargs="?", default=None,
                        help="retry/purge: one write id (default: every dead letter)")
    outbox.add_argument("--state", default="dead", choices=(*OUTBOX_STATES, ""),
                        help="list: queued, failed, dead or delivered ('' for all)")
    outbox.add_argument("--limit", type=int, default=100)
    outbox.add_argument("--config", default=None)
    outbox.set_defaults(run=_outbox)

    from .warm import ENDPOINTS

    warm = sub.add_parser("warm", help="fill the cache ahead of a send, at the upstream's rate")
    warm.add_argument("--endpoint", required=True, choices=sorted(ENDPOINTS))
    warm.add_argument("--users", required=True,
                      help="CSV with a header of id columns (user_id, device_id, third_party_id, "
                           "email_hash...) or one user id per line")
    warm.add_argument("--rec-id", default=None, help="rec_id for recommendations/profile")
    warm.add_argument("--flag-keys", default=None, help="flag_keys for variants")
    warm.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", type=_name_value,
                      help="any other query parameter (repeatable)")
    warm.add_argument("--url", default="http://127.0.0.1:8080", help="a running proxy")
    warm.add_argument("--rate", type=float, default=None,
                      help="calls per minute (default: 90%% of CCPROXY_RATE_LIMIT_<UPSTREAM>)")
    warm.add_argument("--api-key", default="", help="default: the first of CCPROXY_API_KEYS")
    warm.add_argument("--concurrency", type=int, default=16)
    warm.add_argument("--config", default=None)
    warm.set_defaults(run=_warm)

    simulate = sub.add_parser("simulate-send", help="replay a Braze send against a running proxy, "
                                                     "with Braze's timeout, retries, cache and halts")
    simulate.add_argument("--url", default="http://127.0.0.1:8080", help="the proxy (default: the local demo)")
    simulate.add_argument("--api-key", default="", help="sent as the :basic_auth password")
    simulate.add_argument("--liquid", default=None, help="a Braze Liquid message with connected_content tags")
    simulate.add_argument("--template", action="append", default=[],
                          help="a template of templates/ (repeatable: one message with every block)")
    simulate.add_argument("--recipients", type=int, default=100, help="generated recipients (or the "
                                                                      "first N of --users)")
    simulate.add_argument("--id-prefix", default="sim", help="generated ids are <prefix>-000001...")
    simulate.add_argument("--users", default=None, help="CSV with a user_id column; other columns are attributes")
    simulate.add_argument("--rate", type=float, default=6000.0, help="messages per minute")
    simulate.add_argument("--renders", type=int, default=3, help="renders per message (HTML, text, AMP)")
    simulate.add_argument("--concurrency", type=int, default=200, help="calls in flight at most")
    simulate.add_argument("--faults", default=None, help="TOML fault schedule for the demo's sandboxes")
    simulate.add_argument("--sandbox", action="append", default=[], metavar="NAME=URL",
                          help="a sandbox upstream to count calls on and inject faults into")
    simulate.add_argument("--demo-log", default=None,
                          help="the output of `ccproxy demo`: its sandbox URLs are read from it")
    simulate.add_argument("--json", action="store_true", help="the report as JSON")
    simulate.add_argument("--no-progress", action="store_true")
    simulate.add_argument("--drain-timeout", type=float, default=60.0,
                          help="seconds to wait after the send for accepted writes to be delivered")
    simulate.add_argument("--find-rate", action="store_true",
                          help="search for the highest rate with no aborted message and no halt, "
                               "from --rate: doubling, then bisection; short probes to fresh ids")
    simulate.add_argument("--probe-seconds", type=float, default=20.0,
                          help="--find-rate: seconds of sending per probe")
    simulate.add_argument("--max-rate", type=float, default=60_000.0,
                          help="--find-rate: the highest rate probed, messages per minute")
    simulate.add_argument("--find-rate-budget", type=float, default=600.0,
                          help="--find-rate: seconds for every probe together")
    simulate.add_argument("--find-rate-recipients", type=int, default=100_000,
                          help="--find-rate: recipients for every probe together")
    simulate.set_defaults(run=_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .observability import configure_logging

    configure_logging("INFO")
    try:
        return args.run(args)
    except config.SettingsError as exc:
        print(f"ccproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except (CannotListen, ScenarioError) as exc:
        print(f"ccproxy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
