"""The daemon: wiring, the per-camera pipeline, the flagged-frame queue, reload / product switch
and health (watchdog, status, runtime stats, sd_notify)."""
