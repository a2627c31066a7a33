"""The production profile refuses to start with empty or default credentials, naming the variable.

Each entry point lists the credentials it reads (`service`, `webhook`, `flows`, `migrations`) and calls
`require_credentials` after loading its settings: outside the production profile nothing is checked (a
laptop runs on SQLite and throwaway secrets). A credential is refused when it is empty, shorter than
`MIN_SECRET_CHARS` (tokens and shared secrets), equal to a product's well-known default (`postgres`,
`minioadmin`, `password1234`, ...), or, inside a database URL, missing or equal to the user name. Every
problem is reported at once, by variable name; no value is ever echoed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa

from flywheel.errors import FlywheelError
from flywheel.settings import Settings

Component = Literal["service", "webhook", "flows", "migrations"]
MIN_SECRET_CHARS = 16
# defaults shipped by the products in the stack and the classic placeholders (compared case-insensitively)
KNOWN_DEFAULTS = frozenset({
    "postgres", "password", "passw0rd", "password1234", "admin", "administrator", "root", "secret", "changeme",
    "change-me", "change_me", "minioadmin", "default", "example", "test", "flywheel", "prefect", "mlflow",
    "token", "12345678", "123456", "letmein", "xxx", "none", "null",
})
# set by the deployment when its server has auth on; refused when set but empty or default
OPTIONAL_SECRETS = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY")


class CredentialsError(FlywheelError):
    """Empty or default credentials in the production profile."""


@dataclass(frozen=True)
class Problem:
    variable: str
    reason: str


def settings_variable(dotted: str) -> str:
    """The environment variable that sets a settings key: stores.audit_db_url -> FLYWHEEL_STORES__AUDIT_DB_URL."""
    return "FLYWHEEL_" + dotted.upper().replace(".", "__")


def weak_secret(value: str | None, min_chars: int = MIN_SECRET_CHARS) -> str | None:
    """Why a token or shared secret is unusable in production; None when it is fine."""
    if value is None:
        return "is not set"
    if not value.strip():
        return "is empty"
    if value.strip().lower() in KNOWN_DEFAULTS:
        return "is a well-known default value"
    if len(value) < min_chars:
        return f"is shorter than {min_chars} characters"
    return None


def weak_password(value: str | None, user: str | None = None) -> str | None:
    """Why a password is unusable in production (defaults and the user's own name); None when it is fine."""
    if value is None or not value.strip():
        return "has no password"
    if value.strip().lower() in KNOWN_DEFAULTS or (user and value == user):
        return "has a default password"
    return None


def url_problem(url: str) -> str | None:
    """Why a database URL carries unusable credentials; None for a fine one or a file database (SQLite)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return None
    if not parsed.username:
        return "has no user name"
    why = weak_password(parsed.password, parsed.username)
    return f"{why} (user {parsed.username!r})" if why else None


def _store_urls(settings: Settings, component: Component) -> dict[str, str]:
    """settings key -> URL of the databases `component` opens with credentials."""
    urls = {"stores.audit_db_url": settings.audit_db_url}
    if component in ("service", "flows"):
        urls["stores.mlflow_tracking_uri"] = settings.mlflow_tracking_uri
    if component == "service":
        urls["serve.prediction_log_url"] = settings.store_url(settings.serve.prediction_log_url)
    if component == "webhook" and settings.webhook.deliveries_db_url:
        urls["webhook.deliveries_db_url"] = settings.webhook_deliveries_url
    if component == "migrations":
        urls = {"stores.owner_db_url": settings.owner_db_url}
    return urls


def problems(settings: Settings, component: Component, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """Every credential `component` reads that is empty or default (whatever the profile)."""
    env = os.environ if environ is None else environ
    found: list[Problem] = []
    for key, url in _store_urls(settings, component).items():
        if url.split(":", 1)[0].startswith(("http", "file")) or "://" not in url:
            continue  # an MLflow server (its basic auth: MLFLOW_TRACKING_PASSWORD) or a local path
        why = url_problem(url)
        if why:
            found.append(Problem(settings_variable(key), f"the database URL {why}"))
    secrets: list[tuple[str, bool]] = []  # (variable, required)
    if component == "service":
        secrets.append((settings.serve.admin_token_env, True))
    if component == "webhook":
        secrets += [(settings.webhook.secret_env, True), (settings.webhook.previous_secret_env, False)]
    if component in ("flows", "service"):
        secrets += [(t.secret_env, True) for t in settings.notify.targets]
    secrets += [(name, False) for name in OPTIONAL_SECRETS]
    for name, required in dict(secrets).items():
        value = env.get(name)
        if not value and not required:
            continue  # an optional secret left unset (or empty, as compose passes an unset one) is not in use
        if name == "PREFECT_API_AUTH_STRING" and value and ":" in value:
            value = value.split(":", 1)[1]  # user:password, the password is what must not be default
            why = weak_password(value)
        else:
            why = weak_secret(value)
        if why:
            found.append(Problem(name, why))
    return found


def require_credentials(settings: Settings, component: Component, environ: Mapping[str, str] | None = None) -> None:
    """In the production profile: refuse to start when any credential `component` reads is empty or default."""
    if settings.profile != "production":
        return
    found = problems(settings, component, environ)
    if found:
        lines = "; ".join(f"{p.variable} {p.reason}" for p in found)
        raise CredentialsError(f"the production profile refuses to start the {component} with empty or default "
                               f"credentials: {lines}. Set them in the environment (see .env.example)")
