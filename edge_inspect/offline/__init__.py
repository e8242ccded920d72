"""Offline tools: evaluate (MVTec-style datasets), AUROC metrics, bench."""
