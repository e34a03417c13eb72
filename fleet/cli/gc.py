"""``fleet gc``: prune ended (and, when told, abandoned) workflows' records from Redis.

See :mod:`fleet.gc` for what is removed and why it is safe while the fleet works.
"""

from __future__ import annotations

import typer
from redis.exceptions import RedisError

from ..config import mask_url
from ..errors import BrokerError, ConfigError
from ..gc import GcReport, collect, parse_duration
from ..redis.clients import sync_client
from ..redis.sentinel import check_redis
from .app import app, console, settings

__all__ = ["gc"]


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return f"{count} B"  # pragma: no cover - the loop always returns


def _summary(report: GcReport, prefix: str) -> str:
    verb = "would remove" if report.dry_run else "removed"
    abandoned = f" ({len(report.abandoned)} abandoned)" if report.abandoned else ""
    text = (
        f"{verb} {len(report.workflows)} workflows{abandoned}, {report.keys} keys, "
        f"{_size(report.bytes)} (scanned {report.scanned} keys under {prefix!r})"
    )
    if report.expiry_set:
        text += f"; set the retention of {report.expiry_set} keys that had lost it"
    if report.loose_expired:
        text += f"; gave {report.loose_expired} reply lists or pipeline hashes an expiry"
    if report.children_pruned:
        text += f"; dropped {report.children_pruned} fields of gone workflows from accounts"
    return text


@app.command("gc")
def gc(
    older_than: str | None = typer.Option(
        None,
        "--older-than",
        metavar="DURATION",
        help="Also prune workflows that never ended (host gone) and were idle this long "
        "(e.g. 30d, 12h, 900). Without it, running and abandoned workflows are kept.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Remove nothing; say what would go."),
    redis_url: str | None = typer.Option(
        None,
        "--redis-url",
        metavar="URL",
        help="Redis or Sentinel URL (default: FLEET_REDIS_URL).",
    ),
    key_prefix: str | None = typer.Option(
        None,
        "--key-prefix",
        metavar="PREFIX",
        help="The fleet's key prefix (default: FLEET_KEY_PREFIX).",
    ),
) -> None:
    """Prune ended workflows past their retention (retention_s) from Redis, in SCAN batches."""
    config = settings(redis_url=redis_url, key_prefix=key_prefix)
    older_than_s = None
    if older_than is not None:
        try:
            older_than_s = parse_duration(older_than)
        except ValueError as error:
            raise ConfigError(f"--older-than: {error}", key="--older-than") from None
    check_redis(config.redis_url)
    client = sync_client(config.redis_url)
    try:
        report = collect(
            client,
            key_prefix=config.key_prefix,
            retention_s=config.retention_s,
            older_than_s=older_than_s,
            dry_run=dry_run,
        )
    except RedisError as error:
        raise BrokerError(
            f"fleet gc failed at {mask_url(config.redis_url)}: {type(error).__name__}: {error}",
            url=mask_url(config.redis_url),
        ) from None
    finally:
        client.close()
    for root in report.workflows:
        console.print(
            f"{'would remove' if dry_run else 'removed'} {root}"
            + (" (abandoned)" if root in report.abandoned else ""),
            highlight=False,
            soft_wrap=True,
        )
    console.print(_summary(report, config.key_prefix), highlight=False, soft_wrap=True)
