-- The Optuna study lives beside MLflow's tables in the same server (docs/cluster.md).
CREATE DATABASE optuna OWNER s4mc;
