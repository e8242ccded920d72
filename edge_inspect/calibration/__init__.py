"""Calibration: fitting a product from good parts (fit, views, defects, threshold), writing it as a
version (store, artifacts) and the commands' work (calibrate, refit, rollback)."""
