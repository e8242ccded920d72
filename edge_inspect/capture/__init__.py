"""Capture: frame sources, the newest-frame reader with reconnect, triggers, and the ROI geometry
(every frame <-> view <-> product box mapping)."""
