"""Prefect flows that sequence the DVC stages (flow `train-loop`; deployments in prefect.yaml)."""
