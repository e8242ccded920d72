"""Operator feedback: learning on the line from an operator's ok / ng for an inspection.

    ledger.py   calibration/<product>/feedback.jsonl: what was applied, so nothing is applied twice
    defects.py  labelled defects (calibration/<product>/defects/) and their recall/precision report
    apply.py    FeedbackApplier: one feedback, validated and applied (the daemon's and the CLI's one path)
    service.py  FeedbackService: the daemon's bounded, rate-limited, low-priority queue
    command.py  `edge-inspect feedback`: over MQTT to the daemon, or --local on the folders

An NG overruled as ok joins the product's good set as a new calibration version (calibration.calibrate.refit_product),
and the daemon swaps its scorers without losing a frame; a confirmed ng is kept as a labelled defect. The
payloads and topics are mqtt/feedback.py; docs/mqtt.md#operator-feedback.
"""
