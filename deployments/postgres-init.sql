-- Databases the production profile uses (created once by the postgres container).
CREATE DATABASE prefect;
CREATE DATABASE flywheel;
CREATE DATABASE flywheel_mlflow;
