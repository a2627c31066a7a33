"""The production profile refuses to start with empty or default credentials, naming the variable.

Each entry point lists the credentials it reads (`service`, `webhook`, `flows`, `migrations`) and calls
`require_credentials` after loading its settings: outside the production profile nothing is checked (a
laptop runs on SQLite and throwaway secrets). The servers Flywheel does not write are checked the same way
before they start: `flywheel credentials check prefect-server|mlflow-server -- <their command>` checks, then
becomes the server; `flywheel credentials check images` is the one-shot job the compose stack runs before the
images that cannot run Flywheel (PostgreSQL, the object store, Grafana).
A credential is refused when it is empty, shorter than `MIN_SECRET_CHARS` (tokens and shared secrets),
equal to a product's well-known default (`postgres`, `minioadmin`, `password1234`, ...), or, inside a
database URL, missing or equal to the user name. Every problem is reported at once, by variable name; no
value is ever echoed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa

from flywheel.errors import FlywheelError
from flywheel.settings import Settings

Component = Literal["service", "webhook", "flows", "migrations", "prefect-server", "mlflow-server", "images"]
COMPONENTS: tuple[Component, ...] = ("service", "webhook", "flows", "migrations", "prefect-server", "mlflow-server",
                                     "images")
MIN_SECRET_CHARS = 16
# defaults shipped by the products in the stack and the classic placeholders (compared case-insensitively)
KNOWN_DEFAULTS = frozenset({
    "postgres", "password", "passw0rd", "password1234", "admin", "administrator", "root", "secret", "changeme",
    "change-me", "change_me", "minioadmin", "default", "example", "test", "flywheel", "prefect", "mlflow",
    "token", "12345678", "123456", "letmein", "xxx", "none", "null",
})
# set by the deployment when its server has auth on; refused when set but empty or default
OPTIONAL_SECRETS = ("PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY")
# what each server Flywheel does not write reads: (variable, kind, required); kind "secret" (>= 16 characters,
# no default), "auth" (user:password, the password no default), "url" (a database URL), "key" (an access key id)
SERVER_CREDENTIALS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "prefect-server": (("PREFECT_SERVER_API_AUTH_STRING", "auth", True),
                       ("PREFECT_API_DATABASE_CONNECTION_URL", "url", False)),
    "mlflow-server": (("MLFLOW_AUTH_ADMIN_PASSWORD", "secret", True),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "secret", True),
                      ("MLFLOW_BACKEND_STORE_URI", "url", False), ("AWS_ACCESS_KEY_ID", "key", False),
                      ("AWS_SECRET_ACCESS_KEY", "secret", False)),
    "images": (("POSTGRES_PASSWORD", "secret", True), ("POSTGRES_OWNER_PASSWORD", "secret", True),
               ("POSTGRES_APP_PASSWORD", "secret", True), ("S3_ACCESS_KEY", "key", True),
               ("S3_SECRET_KEY", "secret", True), ("GRAFANA_ADMIN_PASSWORD", "secret", True)),
}


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


def weak_auth_string(value: str | None) -> str | None:
    """Why a `user:password` basic-auth string is unusable in production; None when it is fine."""
    if value is None or not value.strip():
        return "is not set" if value is None else "is empty"
    user, colon, password = value.partition(":")
    if not colon or not user:
        return "is not of the form user:password"
    return weak_password(password, user)


def weak_key(value: str | None) -> str | None:
    """Why an access key id (the object store's user) is unusable: empty or a product's default."""
    if value is None or not value.strip():
        return "is not set" if value is None else "is empty"
    return "is a well-known default value" if value.strip().lower() in KNOWN_DEFAULTS else None


def _server_problems(component: str, env: Mapping[str, str]) -> list[Problem]:
    found = []
    for name, kind, required in SERVER_CREDENTIALS[component]:
        value = env.get(name)
        if not value and not required:
            continue
        if kind == "url":
            why = url_problem(value) if "://" in value else "is not a database URL"
            why = f"the database URL {why}" if why else None
        else:
            why = {"auth": weak_auth_string, "key": weak_key, "secret": weak_secret}[kind](value)
        if why:
            found.append(Problem(name, why))
    if component == "mlflow-server" and env.get("MLFLOW_S3_ENDPOINT_URL"):  # artifacts in the object store
        for name, check in (("AWS_ACCESS_KEY_ID", weak_key), ("AWS_SECRET_ACCESS_KEY", weak_secret)):
            if not env.get(name) and (why := check(env.get(name))):
                found.append(Problem(name, why))
    return found


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
    if component in SERVER_CREDENTIALS:
        return _server_problems(component, env)
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
    if component in ("flows", "service") and settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        secrets.append(("MLFLOW_TRACKING_PASSWORD", True))  # an MLflow server: its basic auth is on in production
    secrets += [(name, False) for name in OPTIONAL_SECRETS]
    required_by_name: dict[str, bool] = {}
    for name, required in secrets:
        required_by_name[name] = required_by_name.get(name, False) or required
    for name, required in required_by_name.items():
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
