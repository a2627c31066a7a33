#!/bin/sh
# The production profile's databases and roles, created once by the postgres container (docker-entrypoint-initdb.d)
# as its superuser. The project's database belongs to flywheel_owner, which `flywheel db upgrade` (the `migrate`
# job) runs as; every other Flywheel service connects as flywheel_app and gets only what that step grants it.
# Passwords come from the container's environment (.env), never from this file.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v owner_password="$POSTGRES_OWNER_PASSWORD" -v app_password="$POSTGRES_APP_PASSWORD" <<'SQL'
CREATE DATABASE prefect;
CREATE DATABASE flywheel_mlflow;
CREATE ROLE flywheel_owner LOGIN PASSWORD :'owner_password';
CREATE ROLE flywheel_app LOGIN PASSWORD :'app_password';
CREATE DATABASE flywheel OWNER flywheel_owner;
REVOKE ALL ON DATABASE flywheel FROM PUBLIC;
GRANT CONNECT ON DATABASE flywheel TO flywheel_app;
SQL
