"""`flywheel webhook` and `flywheel webhook sign`: refusals name what is missing and leave nothing behind;
what `sign` prints verifies with the receiver's own check."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli import app
from flywheel.hmacsig import Secret, verify

runner = CliRunner()
SECRET = "a-shared-secret-for-the-tests"


def _cfg(home: Path) -> list[str]:
    return ["--profile", "ci", "--config-dir", str(home / "configs")]


def _printed(stdout: str) -> tuple[str, str, str]:
    lines = stdout.splitlines()
    delivery = next(x.split(": ", 1)[1] for x in lines if x.startswith("X-Flywheel-Delivery: "))
    signature = next(x.split(": ", 1)[1] for x in lines if x.startswith("X-Flywheel-Signature: "))
    curl = next(x for x in lines if x.startswith("curl "))
    return delivery, signature, curl


def test_the_receiver_refuses_to_start_without_a_secret_naming_the_variable(home: Path) -> None:
    res = runner.invoke(app, ["webhook", *_cfg(home)], env={"FLYWHEEL_WEBHOOK_SECRET": None,
                                                           "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert res.exit_code == 2
    assert "set the environment variable FLYWHEEL_WEBHOOK_SECRET" in res.output
    assert not (home / "data" / "flywheel.db").exists(), "no deliveries table before it can verify anything"

    short = runner.invoke(app, ["webhook", *_cfg(home)], env={"FLYWHEEL_WEBHOOK_SECRET": "tiny",
                                                             "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert short.exit_code == 2 and "FLYWHEEL_WEBHOOK_SECRET is 4 characters" in short.output


def test_the_receiver_refuses_to_start_without_a_prefect_server(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = runner.invoke(app, ["webhook", *_cfg(home)], env={"FLYWHEEL_WEBHOOK_SECRET": SECRET})
    assert res.exit_code == 2
    assert "needs a running Prefect server: set PREFECT_API_URL or stores.prefect_api_url" in res.output
    assert not (home / "data" / "flywheel.db").exists()


def test_sign_prints_headers_that_verify_and_a_curl_command(home: Path) -> None:
    body = '{"reason": "it\'s Monday", "model": "churn"}'
    res = runner.invoke(app, ["webhook", "sign", "--endpoint", "retrain", "--body", body, *_cfg(home)],
                        env={"FLYWHEEL_WEBHOOK_SECRET": SECRET})
    assert res.exit_code == 0, res.output
    delivery, signature, curl = _printed(res.stdout)
    assert delivery.startswith("cli-")
    ok = verify(signature, delivery, body.encode(), [Secret("current", SECRET)], time.time(), 300)
    assert ok.secret == "current" and abs(ok.timestamp - time.time()) < 60
    argv = shlex.split(curl)  # what a shell would run: the body arrives byte for byte
    assert argv[argv.index("--data-binary") + 1] == body
    assert "http://127.0.0.1:8090/hooks/retrain" in argv
    assert f"X-Flywheel-Signature: {signature}" in argv and f"X-Flywheel-Delivery: {delivery}" in argv


def test_sign_a_retry_from_a_file_with_another_variable(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "batch.json"
    path.write_bytes(b'{"dataset": "churn", "uri": "data/incoming/churn/b1.parquet", "rows": 3}\n')
    res = runner.invoke(app, ["webhook", "sign", "--endpoint", "data-landed", "--body", f"@{path}", "--delivery",
                              "batch-b1", "--secret-env", "MY_HOOK_SECRET", "--url", "http://hooks.internal:9000",
                              *_cfg(home)], env={"MY_HOOK_SECRET": SECRET, "FLYWHEEL_WEBHOOK_SECRET": None})
    assert res.exit_code == 0, res.output
    delivery, signature, curl = _printed(res.stdout)
    assert delivery == "batch-b1"
    verify(signature, delivery, path.read_bytes(), [Secret("current", SECRET)], time.time(), 300)
    argv = shlex.split(curl)
    assert argv[argv.index("--data-binary") + 1] == f"@{path}"  # curl sends the file's exact bytes
    assert "http://hooks.internal:9000/hooks/data-landed" in argv


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--endpoint", "retrain", "--body", '{"reason": "x"}'], {"FLYWHEEL_WEBHOOK_SECRET": None},
     "the environment variable FLYWHEEL_WEBHOOK_SECRET is not set"),
    (["--endpoint", "drop", "--body", '{"reason": "x"}'], {}, "--endpoint 'drop': one of retrain, data-landed"),
    (["--endpoint", "retrain", "--body", '{"reason": 1}'], {}, "would answer 422: reason: Input should be"),
    (["--endpoint", "retrain", "--body", "{not json"], {}, "the receiver would answer 422: malformed JSON"),
    (["--endpoint", "retrain", "--body", "@/no/such/file.json"], {}, "--body @/no/such/file.json: file not found"),
    (["--endpoint", "retrain", "--body", '{"reason": "x"}', "--delivery", "a b"], {}, "X-Flywheel-Delivery: must be"),
])
def test_sign_refuses_with_the_reason_and_prints_no_headers(home: Path, args: list[str], env: dict,
                                                            says: str) -> None:
    res = runner.invoke(app, ["webhook", "sign", *args, *_cfg(home)], env={"FLYWHEEL_WEBHOOK_SECRET": SECRET, **env})
    assert res.exit_code == 2
    assert says in res.output
    assert "X-Flywheel-Signature" not in res.stdout


def test_sign_no_check_signs_a_body_the_receiver_will_refuse(home: Path) -> None:
    res = runner.invoke(app, ["webhook", "sign", "--endpoint", "retrain", "--body", "{not json", "--no-check",
                              *_cfg(home)], env={"FLYWHEEL_WEBHOOK_SECRET": SECRET})
    assert res.exit_code == 0, res.output
    delivery, signature, _ = _printed(res.stdout)
    verify(signature, delivery, b"{not json", [Secret("current", SECRET)], time.time(), 300)
